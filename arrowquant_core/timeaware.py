"""Time-aware activation quantization: one set of activation parameters per group of timesteps.

A diffusion model runs the same weights at every denoising step, but what flows through
them changes with the step. In a masked-diffusion LLM (Dream, LLaDA) the step is the mask
ratio: the first steps see a canvas that is almost all mask tokens, the last ones a nearly
finished text. Static activation scales calibrated over all steps at once must cover the
union of every step's range; per-time-group scales only cover their own group's range.
This is the idea of TDQ (So et al. 2023, "Temporal Dynamic Quantization for Diffusion
Models": parameters as a function of the timestep) and TQ-DiT (Hwang et al. 2024,
"time-grouping quantization": one parameter set per group of timesteps), which we follow
in its simplest form: a table indexed by (time group, site).

Pieces:

- :class:`TimeGrouping` -- edges over the timestep axis ``[0, MAX_STEPS)``; ``uniform(n)``
  or ``quantile(n, timesteps)`` (edges at quantiles of the calibration timesteps, so
  every group holds the same number of calibration samples). ``group_of(t)``.
- :func:`stratify` -- the calibration timesteps to add so that every group holds at least
  ``min_per_group`` samples (DLLMQuant's TMAS, Xu & Yang 2025: calibration must cover the
  time steps and mask ratios the sampler visits; here, deterministically spread inside
  each thin group).
- :class:`TimeAwareCalibrator` -- ``observe(group, site, x)`` accumulates per-channel
  min / max and running sums per (group, site); ``table()`` gives the parameters.
- :class:`TimeGroupTable` -- the frozen result: scales, zero points and statistics (mean,
  std, min, max) per (group, site), ``params(group, site)`` for the denoiser, and
  ``to_arrays`` / ``from_arrays`` for storage as named arrays in the artifact.

Time-agnostic quantization is the same machinery with one group (``uniform(1)``), so the
comparison of the two changes nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
import json
from typing import Final

import numpy as np
import numpy.typing as npt

from arrowquant_core.actquant import ActScheme, act_params, parse_act_scheme
from arrowquant_core.errors import ConfigurationError, FormatError, QuantizationError

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

MAX_STEPS: Final[int] = 1000
"""Timesteps are integers in ``[0, MAX_STEPS)`` (the 1000-step grid of diffusion codebases;
``fixtures.calibration.timestep_for`` maps mask ratio r to ``round(r * 999)``)."""
GROUPINGS: Final[tuple[str, ...]] = ("uniform", "quantile")
STAT_COLUMNS: Final[tuple[str, ...]] = ("mean", "std", "min", "max")
PREFIX: Final[str] = "timeaware."


@dataclass(frozen=True)
class TimeGrouping:
    """Groups of timesteps: group ``g`` holds ``edges[g] <= t < edges[g + 1]``.

    >>> TimeGrouping.uniform(4).edges
    (0.0, 250.0, 500.0, 750.0, 1000.0)
    >>> TimeGrouping.uniform(4).group_of(999)
    3
    """

    edges: tuple[float, ...]
    kind: str = "uniform"

    def __post_init__(self) -> None:
        if self.kind not in GROUPINGS:
            raise ConfigurationError(f"time grouping kind {self.kind!r} is not one of {list(GROUPINGS)}")
        e = self.edges
        if len(e) < 2 or e[0] != 0.0 or e[-1] != float(MAX_STEPS):
            raise ConfigurationError(
                f"time grouping edges {list(e)[:6]}...: need at least 2 edges from 0 to {MAX_STEPS}")
        for a, b in zip(e[:-1], e[1:]):
            if not b > a:
                raise ConfigurationError(f"time grouping edges {list(e)}: must increase strictly")

    def __reduce__(self) -> tuple[object, tuple[tuple[float, ...], str]]:
        return (TimeGrouping, (self.edges, self.kind))

    @property
    def groups(self) -> int:
        return len(self.edges) - 1

    @classmethod
    def uniform(cls, groups: int) -> TimeGrouping:
        """``groups`` equal ranges of timesteps."""
        if groups < 1 or groups > MAX_STEPS:
            raise ConfigurationError(f"time groups = {groups}: must be in [1, {MAX_STEPS}]")
        return cls(tuple(float(MAX_STEPS) * i / groups for i in range(groups + 1)), "uniform")

    @classmethod
    def quantile(cls, groups: int, timesteps: list[int]) -> TimeGrouping:
        """Edges at the quantiles of ``timesteps`` (e.g. the calibration set's), so each
        group holds about the same number of them; duplicate edges are merged, so the
        result may have fewer groups when the timesteps take few values.

        >>> TimeGrouping.quantile(2, [0, 10, 20, 900]).edges
        (0.0, 15.5, 1000.0)
        """
        if groups < 1 or groups > MAX_STEPS:
            raise ConfigurationError(f"time groups = {groups}: must be in [1, {MAX_STEPS}]")
        if not timesteps:
            raise ConfigurationError("quantile time grouping: no timesteps to take quantiles of")
        t = np.asarray(timesteps, dtype=np.float64)
        if bool(np.any((t < 0) | (t >= MAX_STEPS))):
            raise ConfigurationError(f"quantile time grouping: timesteps must be in [0, {MAX_STEPS})")
        # interior edges: midway between neighbouring quantiles' order statistics (+0.5 keeps
        # an edge off an integer timestep, so no sample sits exactly on a boundary)
        inner = np.quantile(t, np.arange(1, groups) / groups, method="midpoint")
        edges = [0.0]
        for value in inner.tolist():
            v = float(value) + 0.5 if float(value).is_integer() else float(value)
            if edges[-1] < v < float(MAX_STEPS):
                edges.append(v)
        edges.append(float(MAX_STEPS))
        return cls(tuple(edges), "quantile")

    def group_of(self, timestep: int) -> int:
        """The group holding ``timestep`` (clipped into ``[0, MAX_STEPS)``)."""
        t = min(max(float(timestep), 0.0), float(MAX_STEPS) - 0.5)
        g = int(np.searchsorted(np.asarray(self.edges), t, side="right")) - 1
        return min(max(g, 0), self.groups - 1)

    def groups_of(self, timesteps: npt.NDArray[np.integer]) -> npt.NDArray[np.intp]:
        """Vectorized ``group_of``."""
        t = np.clip(np.asarray(timesteps, dtype=np.float64), 0.0, float(MAX_STEPS) - 0.5)
        g = np.searchsorted(np.asarray(self.edges), t, side="right") - 1
        return np.clip(g, 0, self.groups - 1).astype(np.intp)


def stratify(grouping: TimeGrouping, timesteps: list[int], min_per_group: int) -> list[int]:
    """Timesteps to add so every group holds at least ``min_per_group`` calibration samples.

    The added timesteps of a thin group are spread evenly inside it (deterministic, no
    random draw), so a caller builds one synthetic sample per returned timestep.

    >>> stratify(TimeGrouping.uniform(2), [100, 200, 300], 2)
    [625, 875]
    """
    if min_per_group < 0:
        raise ConfigurationError(f"min_per_group = {min_per_group}: must be >= 0")
    have = np.bincount(grouping.groups_of(np.asarray(timesteps, dtype=np.int64)),
                       minlength=grouping.groups) if timesteps else np.zeros(grouping.groups, np.int64)
    out: list[int] = []
    for g in range(grouping.groups):
        need = min_per_group - int(have[g])
        lo, hi = grouping.edges[g], grouping.edges[g + 1]
        for j in range(max(need, 0)):
            t = int(np.floor(lo + (j + 0.5) * (hi - lo) / need))
            t = min(max(t, int(np.ceil(lo))), MAX_STEPS - 1)
            out.append(t)
    return out


def aux_prefix(scheme: ActScheme, groups: int) -> str:
    """Where an activation table lives among an artifact's auxiliary arrays.

    >>> aux_prefix(ActScheme(8, "tensor", False), 10)
    'timeaware.a8-tensor-asym.g10.'
    """
    return f"{PREFIX}{scheme.name}.g{groups}."


def _stat_rows(count: F64, total: F64, squares: F64, lo: F32, hi: F32) -> F32:
    mean = total / np.maximum(count, 1.0)
    var = np.maximum(squares / np.maximum(count, 1.0) - mean * mean, 0.0)
    out = np.zeros((count.shape[0], len(STAT_COLUMNS)), dtype=np.float32)
    out[:, 0] = mean
    out[:, 1] = np.sqrt(var)
    out[:, 2] = lo
    out[:, 3] = hi
    return out


@dataclass(frozen=True)
class TimeGroupTable:
    """Activation parameters per (time group, site), with the statistics they came from.

    ``scales[site]`` and ``zeros[site]`` are ``(groups, width)`` float32 with ``width`` 1
    for a per-tensor scheme and the site's feature count for per-channel; ``stats[site]``
    is ``(groups, 4)`` float32: mean, std, min, max of every activation value the group saw.
    """

    scheme: ActScheme
    grouping: TimeGrouping
    sites: tuple[str, ...]
    scales: dict[str, F32]
    zeros: dict[str, F32]
    stats: dict[str, F32]

    def __post_init__(self) -> None:
        if not self.scheme.static:
            raise ConfigurationError(
                f"time-group table: scheme {self.scheme.name} is dynamic; only static schemes have "
                "calibrated parameters")
        g = self.grouping.groups
        for site in self.sites:
            for what, table, cols in (("scales", self.scales, -1), ("zeros", self.zeros, -1),
                                      ("stats", self.stats, len(STAT_COLUMNS))):
                a = table.get(site)
                if a is None:
                    raise ConfigurationError(f"time-group table: {what} of site {site!r} missing")
                if a.ndim != 2 or a.shape[0] != g or (cols > 0 and a.shape[1] != cols):
                    raise ConfigurationError(
                        f"time-group table: {what} of site {site!r} has shape {a.shape}, "
                        f"expected ({g}, {'width' if cols < 0 else cols})")
            if self.scales[site].shape != self.zeros[site].shape:
                raise ConfigurationError(f"time-group table: scales and zeros of site {site!r} differ in shape")
            if self.scheme.granularity == "tensor" and self.scales[site].shape[1] != 1:
                raise ConfigurationError(
                    f"time-group table: per-tensor scheme but site {site!r} has {self.scales[site].shape[1]} scales")

    @property
    def groups(self) -> int:
        return self.grouping.groups

    def params(self, group: int, site: str) -> tuple[F32, F32]:
        """(scale, zero) of ``site`` at time group ``group``, shaped for ``fake_quant``."""
        if not 0 <= group < self.groups:
            raise ConfigurationError(f"time group {group}: table has groups 0..{self.groups - 1}")
        if site not in self.scales:
            raise ConfigurationError(f"time-group table: no parameters for site {site!r} "
                                     f"(sites: {', '.join(self.sites)})")
        return self.scales[site][group], self.zeros[site][group]

    def to_arrays(self, prefix: str = PREFIX) -> dict[str, np.ndarray]:
        """Named arrays for storage (all names start with ``prefix``); ``from_arrays``
        inverts it exactly. The scheme, grouping kind and site order travel as a UTF-8
        JSON header.

        >>> cal = TimeAwareCalibrator(ActScheme(8, "tensor"), TimeGrouping.uniform(2))
        >>> for g in (0, 1): cal.observe(g, "fc", np.ones((1, 3), np.float32))
        >>> sorted(cal.table().to_arrays())
        ['timeaware.edges', 'timeaware.fc.scale', 'timeaware.fc.stats', 'timeaware.fc.zero', 'timeaware.header']
        """
        header = json.dumps({"scheme": self.scheme.name, "kind": self.grouping.kind,
                             "sites": list(self.sites)}, sort_keys=True)
        out: dict[str, np.ndarray] = {
            prefix + "header": np.frombuffer(header.encode("utf-8"), dtype=np.uint8).copy(),
            prefix + "edges": np.asarray(self.grouping.edges, dtype=np.float64),
        }
        for site in self.sites:
            out[f"{prefix}{site}.scale"] = self.scales[site]
            out[f"{prefix}{site}.zero"] = self.zeros[site]
            out[f"{prefix}{site}.stats"] = self.stats[site]
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], source: str = "artifact",
                    prefix: str = PREFIX) -> TimeGroupTable:
        """Rebuild a table from ``to_arrays`` output; a missing or malformed piece is a
        ``FormatError`` naming ``source`` and the array."""
        def need(name: str) -> np.ndarray:
            a = arrays.get(name)
            if a is None:
                raise FormatError(f"{source}: time-group table array {name!r} missing")
            return np.asarray(a)

        try:
            header = json.loads(need(prefix + "header").astype(np.uint8).tobytes().decode("utf-8"))
            scheme = parse_act_scheme(str(header["scheme"]))
            kind = str(header["kind"])
            sites = tuple(str(s) for s in header["sites"])
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ConfigurationError) as exc:
            raise FormatError(f"{source}: time-group table header unreadable ({exc})") from None
        edges = tuple(float(e) for e in need(prefix + "edges").tolist())
        try:
            grouping = TimeGrouping(edges, kind)
            return cls(scheme, grouping, sites,
                       {s: need(f"{prefix}{s}.scale").astype(np.float32, copy=False) for s in sites},
                       {s: need(f"{prefix}{s}.zero").astype(np.float32, copy=False) for s in sites},
                       {s: need(f"{prefix}{s}.stats").astype(np.float32, copy=False) for s in sites})
        except ConfigurationError as exc:
            raise FormatError(f"{source}: time-group table inconsistent ({exc})") from None

    def drift(self) -> dict[str, float]:
        """Per site: the largest over groups of the group's range (max - min) divided by the
        smallest such range, i.e. how much a single time-agnostic range overstates the
        tightest group's. 1.0 means no drift across time groups."""
        out: dict[str, float] = {}
        for site in self.sites:
            width = self.stats[site][:, 3].astype(np.float64) - self.stats[site][:, 2].astype(np.float64)
            lo = float(np.min(width))
            out[site] = float(np.max(width)) / lo if lo > 0 else float("inf")
        return out


class TimeAwareCalibrator:
    """Accumulate activation ranges and moments per (time group, site).

    >>> cal = TimeAwareCalibrator(ActScheme(8, "tensor", False), TimeGrouping.uniform(2))
    >>> cal.observe(0, "fc", np.array([[0.0, 1.0]], np.float32))
    >>> cal.observe(1, "fc", np.array([[-4.0, 4.0]], np.float32))
    >>> t = cal.table()
    >>> [round(float(t.params(g, "fc")[0][0]) * 255, 4) for g in (0, 1)]
    [1.0, 8.0]
    """

    def __init__(self, scheme: ActScheme, grouping: TimeGrouping) -> None:
        if not scheme.static:
            raise ConfigurationError(f"time-aware calibration: scheme {scheme.name} is dynamic (per token); "
                                     "it has nothing to calibrate")
        self.scheme = scheme
        self.grouping = grouping
        self.sites: list[str] = []
        self._lo: dict[str, F32] = {}
        self._hi: dict[str, F32] = {}
        self._count: dict[str, F64] = {}
        self._sum: dict[str, F64] = {}
        self._sq: dict[str, F64] = {}

    def observe(self, group: int, site: str, x: npt.NDArray[np.floating]) -> None:
        """Add activations ``x (..., features)`` seen at ``site`` during time group ``group``."""
        if not 0 <= group < self.grouping.groups:
            raise ConfigurationError(f"time group {group}: grouping has groups 0..{self.grouping.groups - 1}")
        if x.ndim < 1 or x.size == 0:
            raise QuantizationError(f"site {site!r}: empty activations {x.shape}")
        flat = np.asarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
        if not bool(np.all(np.isfinite(flat))):
            raise QuantizationError(f"site {site!r}: activations hold NaN or Inf")
        width = int(flat.shape[1])
        if site not in self._lo:
            g = self.grouping.groups
            self.sites.append(site)
            self._lo[site] = np.full((g, width), np.inf, dtype=np.float32)
            self._hi[site] = np.full((g, width), -np.inf, dtype=np.float32)
            self._count[site] = np.zeros(g, dtype=np.float64)
            self._sum[site] = np.zeros(g, dtype=np.float64)
            self._sq[site] = np.zeros(g, dtype=np.float64)
        elif int(self._lo[site].shape[1]) != width:
            raise QuantizationError(
                f"site {site!r}: {width} features, but earlier activations had {int(self._lo[site].shape[1])}")
        np.minimum(self._lo[site][group], np.min(flat, axis=0), out=self._lo[site][group])
        np.maximum(self._hi[site][group], np.max(flat, axis=0), out=self._hi[site][group])
        f64 = flat.astype(np.float64)
        self._count[site][group] += float(f64.size)
        self._sum[site][group] += float(np.sum(f64))
        self._sq[site][group] += float(np.sum(f64 * f64))

    def table(self) -> TimeGroupTable:
        """The parameters; a (group, site) that saw no activation is an error naming both."""
        if not self.sites:
            raise QuantizationError("time-aware calibration: no activation was observed")
        scales: dict[str, F32] = {}
        zeros: dict[str, F32] = {}
        stats: dict[str, F32] = {}
        for site in self.sites:
            lo, hi = self._lo[site], self._hi[site]
            empty = np.flatnonzero(self._count[site] == 0)
            if empty.size:
                g = int(empty[0])
                raise QuantizationError(
                    f"site {site!r}: time group {g} (timesteps {self.grouping.edges[g]:g}-"
                    f"{self.grouping.edges[g + 1]:g}) saw no calibration activation; stratify the "
                    "calibration set so every group is covered")
            if self.scheme.granularity == "tensor":
                lo_p = np.min(lo, axis=1, keepdims=True)
                hi_p = np.max(hi, axis=1, keepdims=True)
            else:
                lo_p, hi_p = lo, hi
            scale, zero = act_params(lo_p, hi_p, self.scheme)
            scales[site] = scale
            zeros[site] = zero
            stats[site] = _stat_rows(self._count[site], self._sum[site], self._sq[site],
                                     np.min(lo, axis=1), np.max(hi, axis=1))
        return TimeGroupTable(self.scheme, self.grouping, tuple(self.sites), scales, zeros, stats)
