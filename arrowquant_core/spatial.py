"""SpatialQuantizer: channel equalization (activation smoothing) folded into the weights,
composable with any weight method (GPTQ included) and with activation fake-quantization.

Why: image and audio diffusion transformers have a few input channels whose activations
are an order of magnitude above the rest, and whose range moves with the timestep
(PTQ4DiT, Q-DiT, DiTAS measure this on DiT-XL/2). A per-tensor or per-token activation
scale is then set by those channels and every other channel is quantized coarsely.
SmoothQuant (Xiao et al. 2022, sec. 4; reference ``smoothquant/smooth.py``) migrates the
difficulty into the weights with a per-input-channel factor

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)        (max|W_j| over every consumer)

so that ``X W^T = (X diag(1/s)) (W diag(s))^T`` exactly; the reference divides the
preceding LayerNorm's weight and bias by ``s`` and multiplies the Linear columns by ``s``,
clamping the factors from below at 1e-5. DiTAS (Dong and Zhang 2024, sec. 4.1-4.2;
reference ``DZY122/DiTAS``) adapts it to DiTs: the activation statistic is aggregated
over timesteps (temporal-aggregated smoothing: the mean over timesteps of the channel
maxima, so one late-timestep burst does not set the factor for every step), alpha is
grid-searched per layer on the layer's output error, and for QKV and FC1 the inverse
factor is merged into the adaLN modulation. Facts taken from the papers; the code is
ours.

How the inverse factor reaches the activations is described by data, so the core never
knows the model: a :class:`SmoothSite` names the consumer weights that read one activation
and the :class:`Fold` targets that produce it. ``linear`` folds divide producer rows (and
bias) by ``s`` (a Linear whose output is the activation, or the V rows of an attention
whose output feeds ``attn.proj``); ``one_plus`` folds rewrite an adaLN ``scale`` row so that
``1 + scale`` is divided by ``s`` (``W' = W / s``, ``b' = (1 + b) / s - 1``). Where no
producer is linear (the input of ``fc2`` comes out of a GELU), ``aux`` names a 1-D tensor the
model divides its input by; it is stored with the model.

Fallback: a site whose search finds no factor that lowers its output error (or whose
factors are not finite) is not smoothed, and its consumers are quantized per channel
(``fallback_scheme``); every fallback is logged with the reason and counted in
:attr:`SpatialResult.fallbacks`.

With GPTQ the Hessian of a smoothed consumer is the Hessian of its new input ``X / s``,
``diag(1/s) H diag(1/s)``, computed exactly from the caller's Hessian.

Time-aware activation parameters (``SpatialConfig.time_aware``; TDQ, So et al. 2023; TQ-DiT,
Hwang et al. 2025, sec. 3.2): static activation ranges are also measured per timestep
group of the calibration rows, so a runner can use the parameters of the step's group.

Weight grouping of convolutions: a conv weight ``(out, in, *kernel)`` is quantized as the
matrix ``(out, in * prod(kernel))`` in row-major order (the im2col column order); its
Hessian must use the same column order.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
import json
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from arrowquant_core.actquant import ActScheme, act_params, act_range, fake_quant
from arrowquant_core.errors import ConfigurationError, QuantizationError
from arrowquant_core.methods import get_method
from arrowquant_core.model import QuantizationConfig, QuantizedModel, quantize_model
from arrowquant_core.schemes import get_scheme
from arrowquant_core.tensor import dequantize, quantize

F32 = npt.NDArray[np.float32]
FOLD_KINDS: Final[tuple[str, ...]] = ("linear", "one_plus")
STATISTICS: Final[tuple[str, ...]] = ("max", "temporal-mean")
DEFAULT_ALPHAS: Final[tuple[float, ...]] = (0.2, 0.35, 0.5, 0.65, 0.8)
MIN_FACTOR: Final[float] = 1e-5  # SmoothQuant's clamp
MAX_FACTOR: Final[float] = 1e5


@dataclass(frozen=True)
class Fold:
    """Rows ``[offset, offset + width)`` of the producer Linear ``tensor`` (its ``.bias`` too)."""

    tensor: str
    offset: int
    kind: str = "linear"

    def __post_init__(self) -> None:
        if self.kind not in FOLD_KINDS:
            raise ConfigurationError(f"fold of {self.tensor!r}: kind {self.kind!r} must be one of {list(FOLD_KINDS)}")
        if self.offset < 0:
            raise ConfigurationError(f"fold of {self.tensor!r}: offset {self.offset} must be >= 0")


@dataclass(frozen=True)
class SmoothSite:
    """One activation: the weights that read it (columns scaled by ``s``) and where ``1/s`` goes."""

    name: str
    consumers: tuple[str, ...]
    folds: tuple[Fold, ...] = ()
    aux: str = ""

    def __post_init__(self) -> None:
        if not self.consumers:
            raise ConfigurationError(f"smoothing site {self.name!r}: no consumer weights")
        if not self.folds and not self.aux:
            raise ConfigurationError(f"smoothing site {self.name!r}: needs a fold target or an auxiliary "
                                     "tensor name, or the inverse factor would be lost")


@dataclass(frozen=True)
class SpatialConfig:
    """Weight scheme and method, optional activation scheme, smoothing search."""

    weight_scheme: str
    method: str = "rtn"
    act: ActScheme | None = None
    smooth: bool = True
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    statistic: str = "temporal-mean"
    fallback_scheme: str = ""
    search_rows: int = 256  # evenly spaced calibration rows the alpha search scores on
    time_aware: bool = False  # static activation parameters per timestep group as well

    def __post_init__(self) -> None:
        get_scheme(self.weight_scheme)
        get_method(self.method)
        if self.statistic not in STATISTICS:
            raise ConfigurationError(f"smoothing statistic {self.statistic!r}: must be one of {list(STATISTICS)}")
        if not self.alphas or any(not 0.0 <= a <= 1.0 for a in self.alphas):
            raise ConfigurationError(f"smoothing alphas {list(self.alphas)}: need at least one, each in [0, 1]")
        if self.fallback_scheme:
            get_scheme(self.fallback_scheme)
        if self.search_rows < 1:
            raise ConfigurationError(f"search_rows = {self.search_rows}: must be >= 1")

    @property
    def fallback(self) -> str:
        """Per-channel scheme of the same bits (symmetric, as activations are)."""
        return self.fallback_scheme or f"int{get_scheme(self.weight_scheme).bits}-channel-sym"

    @property
    def label(self) -> str:
        act = self.act.name if self.act is not None else "weight-only"
        return f"{self.weight_scheme}/{self.method}/{act}/{'smooth' if self.smooth else 'plain'}"


@dataclass(frozen=True)
class SpatialResult:
    """The quantized model (smoothed weights, folds applied, auxiliary tensors as floats),
    the factors and alphas chosen, every fallback with its reason, and the static
    activation parameters ``(scale, zero)`` of every calibrated weight's input."""

    model: QuantizedModel
    factors: dict[str, F32]
    alphas: dict[str, float]
    fallbacks: dict[str, str]
    act_params: dict[str, tuple[F32, F32]] = field(default_factory=dict)
    log: tuple[str, ...] = ()
    smoothed: dict[str, F32] = field(default_factory=dict)  # the float model after smoothing
    act_params_by_group: dict[int, dict[str, tuple[F32, F32]]] = field(default_factory=dict)


@dataclass(frozen=True)
class SpatialCalibration:
    """What the SpatialQuantizer needs from a model runner: where smoothing can fold, each
    weight's input activations ``(rows, in)`` on calibration data, the timestep group of
    each row, and GPTQ Hessians (conv weights as ``(out, in * prod(kernel))`` matrices)."""

    sites: tuple[SmoothSite, ...]
    activations: dict[str, F32]
    hessians: dict[str, F32] = field(default_factory=dict)
    groups: dict[str, npt.NDArray[np.int64]] = field(default_factory=dict)


def smoothing_factors(act_absmax: F32, weight_absmax: F32, alpha: float) -> F32:
    """``s_j = act_j^alpha / weight_j^(1-alpha)``, clamped to [1e-5, 1e5]; 1 where either is 0.

    >>> smoothing_factors(np.array([16.0, 1.0], np.float32), np.array([1.0, 1.0], np.float32), 0.5).tolist()
    [4.0, 1.0]
    """
    a = np.asarray(act_absmax, dtype=np.float64)
    w = np.asarray(weight_absmax, dtype=np.float64)
    ok = (a > 0) & (w > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(ok, np.power(a, alpha) / np.power(w, 1.0 - alpha), 1.0)
    return np.clip(s, MIN_FACTOR, MAX_FACTOR).astype(np.float32)


def activation_statistic(x: F32, groups: npt.NDArray[np.int64] | None, statistic: str) -> F32:
    """Per-channel max|x| (``max``), or the mean over timestep groups of each group's
    per-channel max|x| (``temporal-mean``, DiTAS's temporal aggregation)."""
    a: F32 = np.abs(np.asarray(x, dtype=np.float32))
    if statistic == "max" or groups is None:
        top: F32 = a.max(axis=0).astype(np.float32)
        return top
    maxima = [a[groups == g].max(axis=0) for g in np.unique(groups)]
    mean: F32 = np.mean(np.stack(maxima), axis=0).astype(np.float32)
    return mean


def _rows(weight: F32) -> F32:
    return weight.reshape(weight.shape[0], -1)


def _quant_weight(w: F32, scheme: str, name: str) -> F32:
    return dequantize(quantize(w, scheme, name)).reshape(w.shape)


def _layer_error(x: F32, consumers: list[F32], refs: list[F32], s: F32, config: SpatialConfig,
                 act: tuple[F32, F32] | None, scheme: str) -> float:
    """Relative output error of the consumers on ``x`` when smoothed by ``s`` and quantized
    (round-to-nearest weights: the search only ranks factors)."""
    xs = (x / s).astype(np.float32)
    if config.act is not None:
        if config.act.static:
            lo, hi = act_range(xs, config.act.granularity) if act is None else act
            scale, zero = act_params(lo, hi, config.act)
            xs = fake_quant(xs, config.act, scale, zero)
        else:
            xs = fake_quant(xs, config.act)
    num = 0.0
    den = 0.0
    for w, ref in zip(consumers, refs):
        got = xs @ _quant_weight(_rows(w) * s[None, :], scheme, "search").T
        num += float(np.sum(np.square(ref - got, dtype=np.float64)))
        den += float(np.sum(np.square(ref, dtype=np.float64)))
    return num / den if den > 0 else 0.0


def _bias_name(weight_name: str) -> str:
    return weight_name[: -len("weight")] + "bias" if weight_name.endswith("weight") else weight_name + ".bias"


def apply_smoothing(weights: Mapping[str, F32], site: SmoothSite, s: F32) -> dict[str, F32]:
    """New float tensors with ``s`` folded in: consumer columns times ``s``, producers (or the
    auxiliary tensor) carrying ``1/s``. The caller's arrays are never modified."""
    out: dict[str, F32] = {}
    width = int(s.shape[0])
    for name in site.consumers:
        w = np.array(weights[name], dtype=np.float32, copy=True)
        rows = _rows(w)
        if rows.shape[1] != width:
            raise ConfigurationError(f"smoothing site {site.name!r}: consumer {name!r} has {rows.shape[1]} input "
                                     f"features, the factor has {width}")
        out[name] = (rows * s[None, :]).reshape(w.shape).astype(np.float32)
    for fold in site.folds:
        w = np.array(out.get(fold.tensor, weights[fold.tensor]), dtype=np.float32, copy=True)
        bname = _bias_name(fold.tensor)
        if bname not in weights:
            raise ConfigurationError(f"smoothing site {site.name!r}: fold target {fold.tensor!r} has no bias "
                                     f"{bname!r}")
        b = np.array(out.get(bname, weights[bname]), dtype=np.float32, copy=True)
        stop = fold.offset + width
        if stop > w.shape[0]:
            raise ConfigurationError(f"smoothing site {site.name!r}: rows {fold.offset}..{stop} are outside "
                                     f"{fold.tensor!r} ({w.shape[0]} rows)")
        w[fold.offset:stop] /= s.reshape((-1,) + (1,) * (w.ndim - 1))
        if fold.kind == "one_plus":
            b[fold.offset:stop] = (1.0 + b[fold.offset:stop]) / s - 1.0
        else:
            b[fold.offset:stop] /= s
        out[fold.tensor], out[bname] = w, b
    if not site.folds:
        previous = weights.get(site.aux)
        out[site.aux] = (s if previous is None else np.asarray(previous, np.float32) * s).astype(np.float32)
    return out


def smoothed_hessian(h: F32, s: F32) -> F32:
    """Hessian of the input ``X / s`` from that of ``X``: ``diag(1/s) H diag(1/s)``."""
    inv = (1.0 / s.astype(np.float64))
    return (np.asarray(h, np.float64) * inv[:, None] * inv[None, :]).astype(np.float32)


def quantize_spatial(weights: Mapping[str, F32], sites: tuple[SmoothSite, ...], calibration: Mapping[str, F32],
                     config: SpatialConfig, hessians: Mapping[str, F32] | None = None,
                     groups: Mapping[str, npt.NDArray[np.int64]] | None = None,
                     log: Callable[[str], None] | None = None) -> SpatialResult:
    """Smooth (when ``config.smooth``), then quantize every 2+-D weight with ``config``.

    ``calibration`` maps a weight name to a sample of its input activations ``(rows, in)``
    (the consumers of a site share it); ``groups`` the timestep group of each row, for the
    temporal statistic. Every other tensor passes through as float. Hessians of smoothed
    consumers are transformed to match their new inputs.
    """
    current: dict[str, F32] = {k: np.asarray(v, np.float32) for k, v in weights.items()}
    factors: dict[str, F32] = {}
    alphas: dict[str, float] = {}
    fallbacks: dict[str, str] = {}
    lines: list[str] = []
    overrides: list[tuple[str, str]] = []
    new_hessians: dict[str, F32] = dict(hessians or {})

    def note(message: str) -> None:
        lines.append(message)
        if log is not None:
            log(message)

    if config.smooth:
        for site in sites:
            missing = [n for n in site.consumers + tuple(f.tensor for f in site.folds) if n not in current]
            if missing:
                raise ConfigurationError(f"smoothing site {site.name!r}: tensor {missing[0]!r} is not in the model")
            x = calibration.get(site.consumers[0])
            if x is None:
                raise QuantizationError(f"smoothing site {site.name!r}: no calibration activations for "
                                        f"{site.consumers[0]!r}")
            consumers = [current[n] for n in site.consumers]
            act_stat = activation_statistic(x, None if groups is None else groups.get(site.consumers[0]),
                                            config.statistic)
            w_stat = np.max(np.stack([np.abs(_rows(w)).max(axis=0) for w in consumers]), axis=0)
            ones = np.ones_like(act_stat)
            step = max(1, int(x.shape[0]) // config.search_rows)
            xs = np.ascontiguousarray(x[::step])
            refs = [xs @ _rows(w).T for w in consumers]
            base = _layer_error(xs, consumers, refs, ones, config, None, config.weight_scheme)
            best_err, best_alpha, best_s = base, -1.0, ones
            for alpha in config.alphas:
                s = smoothing_factors(act_stat, w_stat, alpha)
                if not bool(np.all(np.isfinite(s))):
                    continue
                err = _layer_error(xs, consumers, refs, s, config, None, config.weight_scheme)
                if err < best_err:
                    best_err, best_alpha, best_s = err, alpha, s
            if best_alpha < 0:
                reason = (f"no alpha in {list(config.alphas)} lowers the output error ({base:.3g}); "
                          f"quantized per channel ({config.fallback})")
                fallbacks[site.name] = reason
                note(f"spatial fallback {site.name}: {reason}")
                overrides += [(n, config.fallback) for n in site.consumers]
                continue
            current.update(apply_smoothing(current, site, best_s))
            factors[site.name], alphas[site.name] = best_s, best_alpha
            for n in site.consumers:
                if n in new_hessians:
                    new_hessians[n] = smoothed_hessian(new_hessians[n], best_s)
            note(f"smoothed {site.name}: alpha {best_alpha}, output error {base:.3g} -> {best_err:.3g}")
    qconfig = QuantizationConfig(config.weight_scheme, overrides=tuple(overrides), method=config.method)
    model = quantize_model(current, qconfig, hessians=new_hessians if get_method(config.method).needs_hessian else None)
    params: dict[str, tuple[F32, F32]] = {}
    by_group: dict[int, dict[str, tuple[F32, F32]]] = {}
    if config.act is not None and config.act.static:
        divisor = {n: factors[site.name] for site in sites if site.name in factors for n in site.consumers}
        for name, x in calibration.items():
            xs = x / divisor[name] if name in divisor else x
            lo, hi = act_range(xs, config.act.granularity)
            params[name] = act_params(lo, hi, config.act)
            rows = None if groups is None else groups.get(name)
            if config.time_aware and rows is not None:
                # TQ-DiT / TDQ: one set of activation parameters per group of timesteps
                for g in np.unique(rows):
                    glo, ghi = act_range(xs[rows == g], config.act.granularity)
                    by_group.setdefault(int(g), {})[name] = act_params(glo, ghi, config.act)
    return SpatialResult(model, factors, alphas, fallbacks, params, tuple(lines), current, by_group)


def describe(result: SpatialResult, sites: tuple[SmoothSite, ...]) -> str:
    """JSON record of the smoothing applied (sites, folds, alpha, the exact float32 factor in
    base64) and every fallback: stored with the artifact, so the smoothed reference can be
    rebuilt from the original weights (:func:`smoothed_reference`)."""
    applied: list[dict[str, Any]] = []
    for site in sites:
        s = result.factors.get(site.name)
        if s is None:
            continue
        applied.append({"name": site.name, "consumers": list(site.consumers),
                        "folds": [[f.tensor, f.offset, f.kind] for f in site.folds], "aux": site.aux,
                        "alpha": result.alphas[site.name],
                        "factor_f32_b64": base64.b64encode(s.astype("<f4").tobytes()).decode("ascii")})
    return json.dumps({"smoothed": applied, "fallbacks": result.fallbacks}, sort_keys=True)


def smoothed_reference(original: Mapping[str, npt.NDArray[Any]], record: str) -> dict[str, F32]:
    """The original weights with the smoothing of a :func:`describe` record applied: the
    float model a smoothed artifact approximates (weight-level quality is measured on it)."""
    try:
        data = json.loads(record)
        entries = list(data["smoothed"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigurationError(f"spatial record is not valid: {exc}") from None
    out: dict[str, F32] = {k: np.asarray(v, np.float32) for k, v in original.items()}
    for entry in entries:
        site = SmoothSite(str(entry["name"]), tuple(str(c) for c in entry["consumers"]),
                          tuple(Fold(str(f[0]), int(f[1]), str(f[2])) for f in entry["folds"]), str(entry["aux"]))
        s = np.frombuffer(base64.b64decode(str(entry["factor_f32_b64"])), dtype="<f4").astype(np.float32)
        out.update(apply_smoothing(out, site, s))
    return out
