"""Deliberately broken quantizers, to prove the acceptance suite can say no.

Each fault turns a correct quantized model into a broken one (or writes it wrongly).
``tests/test_fault_injection.py`` runs the whole suite with each fault and asserts the
verdict is FAIL and names the gate that caught it. A fault no gate catches means a
threshold is too loose. Compiled core functions cannot be monkeypatched (docs/MYPYC.md), so
faults act on the core's outputs, exactly where a buggy quantizer would differ.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from arrowquant_core import storage
from arrowquant_core.errors import ConfigurationError, unknown_name
from arrowquant_core.kquant import groups_per_super
from arrowquant_core.model import RAW_DTYPES, Mapper, QuantizedModel
from arrowquant_core.plan import MixedPlan, realize
from arrowquant_core.spatial import SmoothSite, SpatialResult
from arrowquant_core.tensor import QuantizedTensor, block_codes


def _largest(model: QuantizedModel) -> str:
    """The victim of single-tensor faults: the largest quantized 2-D tensor but one that is
    not an embedding table, so the fault hits a layer every input passes through."""
    return _largest_of(model.tensors)


def _non_embedding(tensors: Mapping[str, Any]) -> list[str]:
    """The tensors a single-tensor fault may hit: every one but the embedding tables (all, if
    that leaves none)."""
    return [n for n in tensors if "embed" not in n] or list(tensors)


def _largest_of(tensors: Mapping[str, Any]) -> str:
    """``_largest``'s rule on any name -> tensor mapping (a streamed artifact's rows too)."""
    return max(_non_embedding(tensors), key=lambda n: math.prod(tensors[n].shape))


def _map(model: QuantizedModel, fn: Callable[[QuantizedTensor], QuantizedTensor],
         only: str | None = None) -> QuantizedModel:
    tensors = {n: (fn(t) if only is None or n == only else t) for n, t in model.tensors.items()}
    return dataclasses.replace(model, tensors=tensors)


def scales_doubled(model: QuantizedModel) -> QuantizedModel:
    return _map(model, lambda t: dataclasses.replace(t, scales=t.scales * np.float32(2.0)))


def zero_off_by_one(model: QuantizedModel) -> QuantizedModel:
    def shift(t: QuantizedTensor) -> QuantizedTensor:
        if not t.zeros.size:  # symmetric: the implicit zero point moves, codes shift instead
            return dataclasses.replace(t, codes=_repack(t, np.minimum(block_codes(t).astype(np.int16) + 1,
                                                                       t.scheme.qmax)))
        return dataclasses.replace(t, zeros=np.minimum(t.zeros.astype(np.int16) + 1,
                                                       t.scheme.qmax).astype(np.uint8))
    return _map(model, shift)


def _repack(t: QuantizedTensor, blocks: np.ndarray) -> np.ndarray:
    from arrowquant_core.tensor import from_codes

    return from_codes(t.name, t.scheme, t.shape, t.dtype, blocks.astype(np.uint8), t.scales,
                      t.zeros, t.method, t.params if t.is_lattice else None).codes


def nibbles_swapped(model: QuantizedModel) -> QuantizedModel:
    def swap(t: QuantizedTensor) -> QuantizedTensor:
        c = t.codes
        return dataclasses.replace(t, codes=((c >> 4) | (c << 4)).astype(np.uint8))
    return _map(model, swap)


def source_clipped_in_place(model: QuantizedModel, weights: Mapping[str, np.ndarray]) -> None:
    """The largest weight's outliers clipped in the caller's own array, as a quantizer
    that "cleans" its input before the range search would (the artifact is unaffected)."""
    w = weights[_largest(model)]
    limit = np.float32(0.5) * np.float32(np.max(np.abs(w)))
    np.clip(w, -limit, limit, out=w)


def one_weight_unquantized(model: QuantizedModel) -> QuantizedModel:
    victim = _largest(model)
    from arrowquant_core.tensor import dequantize

    tensors = {n: t for n, t in model.tensors.items() if n != victim}
    floats = dict(model.floats)
    floats[victim] = dequantize(model.tensors[victim])
    return dataclasses.replace(model, tensors=tensors, floats=floats)


def nothing_quantized(model: QuantizedModel) -> QuantizedModel:
    """Every weight kept in floating point (dequantized): a quantizer that silently skipped
    them all, whose file is as big as the model."""
    from arrowquant_core.tensor import dequantize

    floats = {**model.floats, **{n: dequantize(t) for n, t in model.tensors.items()}}
    return dataclasses.replace(model, tensors={}, floats=floats)


STALL_SECONDS = 3.0


def quantizer_stalls(model: QuantizedModel) -> QuantizedModel:
    """The quantizer waits ``STALL_SECONDS`` before it returns (a lock or an I/O wait in
    its path): the artifact is right, the time it took is not."""
    import time

    time.sleep(STALL_SECONDS)
    return model


def _permute_rows(t: QuantizedTensor, perm: np.ndarray) -> QuantizedTensor:
    rows = t.shape[0]
    blocks = block_codes(t)
    per_row = blocks.shape[0] // rows
    blocks = blocks.reshape(rows, per_row, -1)[perm].reshape(blocks.shape)
    if t.is_lattice:
        params = t.params.reshape(rows, per_row, 3)[perm].reshape(-1)
        return dataclasses.replace(t, codes=_repack(t, blocks), params=params)
    scales = t.scales.reshape(rows, per_row)[perm].reshape(-1)
    zeros = t.zeros.reshape(rows, per_row)[perm].reshape(-1) if t.zeros.size else t.zeros
    return dataclasses.replace(t, codes=_repack(t, blocks), scales=scales, zeros=zeros)


def _row_unit(t: QuantizedTensor) -> int:
    """Rows that move together in a row fault: 1, or for a K-scheme the rows whose groups
    share super-blocks (kquant.py: a super-block's scales are codes of one power-of-two
    exponent, so rows moved apart from it would not encode and the writer refuses them)."""
    if not t.scheme.scale_bits or t.is_lattice:
        return 1
    rows = t.shape[0]
    per_row = block_codes(t).shape[0] // rows
    per = groups_per_super(t.scheme)
    k = per // math.gcd(per, per_row)
    return k if rows % k == 0 else 1


def _expand(unit_perm: np.ndarray, k: int) -> np.ndarray:
    """A permutation of k-row units as a permutation of rows."""
    return (unit_perm[:, None] * k + np.arange(k)[None, :]).reshape(-1)


def rows_permuted(model: QuantizedModel) -> QuantizedModel:
    victim = _largest(model)

    def permute(t: QuantizedTensor) -> QuantizedTensor:
        k = _row_unit(t)
        return _permute_rows(t, _expand(np.random.default_rng(0).permutation(t.shape[0] // k), k))
    return _map(model, permute, only=victim)


def save_codes_as_float32(model: QuantizedModel, path: Path) -> None:
    """Write the artifact with every code as a float32 instead of packed bits."""
    storage.save(model, path)
    table = pq.read_table(path)
    codes = []
    for row, name in enumerate(table.column("name").to_pylist()):
        t = model.tensors.get(name)
        codes.append(None if t is None else block_codes(t).astype(np.float32).tobytes())
    index = table.schema.get_field_index("codes")
    table = table.set_column(index, table.schema.field("codes"), pa.array(codes, pa.large_binary()))
    pq.write_table(table, path, compression="zstd", use_dictionary=False)


def _one_code_off(codes: np.ndarray) -> np.ndarray:
    """A copy of packed ``codes`` with the lowest bit of one byte flipped: the first byte
    whose flip stays within any scheme's code range (a symmetric INT8 code of 0 or 255 would
    be out of range; packed INT4 / INT2 bytes always fit)."""
    out = codes.copy()
    at = int(np.flatnonzero((out >= 2) & (out <= 253))[0])
    out[at] ^= np.uint8(1)
    return out


def save_one_code_changed(model: QuantizedModel, path: Path) -> None:
    """Write the artifact with one code of the largest weight one step off: a writer bug
    that keeps the file self-consistent (its digests are computed from what it writes),
    too small for any quality gate to see; only the exact round trip can."""
    victim = model.tensors[_largest(model)]
    tensors = {**model.tensors, victim.name: dataclasses.replace(victim, codes=_one_code_off(victim.codes))}
    storage.save(dataclasses.replace(model, tensors=tensors), path)


def hessians_of_another_layer(hessians: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each Linear gets the Hessian of the next layer of the same width (a wiring bug)."""
    out = dict(hessians)
    by_width: dict[int, list[str]] = {}
    for name, h in hessians.items():
        by_width.setdefault(h.shape[0], []).append(name)
    for names in by_width.values():
        for i, name in enumerate(names):
            out[name] = hessians[names[(i + 1) % len(names)]]
    return out


def no_calibration(hessians: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The calibration set silently came back empty."""
    return {}


def realize_ignoring_promotions(weights: dict[str, np.ndarray], plan: MixedPlan,
                                hessians: dict[str, np.ndarray] | None,
                                ties: dict[str, str] | None = None, mapper: Mapper | None = None) -> QuantizedModel:
    """Write every tensor at the ladder's first rung, whatever the plan promoted."""
    flat = dataclasses.replace(plan, decisions=tuple(dataclasses.replace(d, rung=0) for d in plan.decisions))
    return realize(weights, flat, hessians, ties=ties, mapper=mapper)


def _float_vectors(arrays: Mapping[str, Any]) -> list[str]:
    """1-D floating-point tensors (norm gains and shifts, biases), largest first: the
    victims of the float-tensor faults. ``arrays`` is a model's kept floats, or the source
    weights when a run checks beforehand that a fault can act (``requires``)."""
    names = [n for n, a in arrays.items() if a.ndim == 1 and a.dtype.name not in RAW_DTYPES]
    return sorted(names, key=lambda n: -arrays[n].size)


def _is_norm(name: str) -> bool:
    """A normalisation layer's tensor by the common names: ``LayerNorm``, ``input_layernorm``,
    ``norm``, ``layer_norm`` (BERT, Llama, Qwen, T5) and GPT-2's ``ln_1`` / ``ln_f``."""
    return any("norm" in part or part == "ln" or part.startswith("ln_") for part in name.lower().split("."))


def _norm_gains(arrays: Mapping[str, Any]) -> list[str]:
    """Normalisation gains (not their shifts: ``LayerNorm.bias`` is not a gain), largest first."""
    return [n for n in _float_vectors(arrays)
            if _is_norm(n) and n.lower().rsplit(".", 1)[-1] not in ("bias", "beta")]


def _biases(arrays: Mapping[str, Any]) -> list[str]:
    return [n for n in _float_vectors(arrays) if "bias" in n.lower()]


def float_tensor_dropped(model: QuantizedModel) -> QuantizedModel:
    """The largest 1-D float tensor (a norm gain or bias) silently left out of the artifact."""
    victim = _float_vectors(model.floats)[0]
    floats = {n: a for n, a in model.floats.items() if n != victim}
    return dataclasses.replace(model, floats=floats, order=tuple(n for n in model.order if n != victim))


def extra_tensor_stored(model: QuantizedModel) -> QuantizedModel:
    """A tensor the source does not have written into the artifact: a copy of the largest
    1-D float tensor under ``<name>.ema`` (a writer that also saves an averaged copy)."""
    victim = _float_vectors(model.floats)[0]
    extra = f"{victim}.ema"
    return dataclasses.replace(model, floats={**model.floats, extra: model.floats[victim].copy()},
                               order=(*model.order, extra))


def norm_gain_nan(model: QuantizedModel) -> QuantizedModel:
    """One normalisation gain stored with a NaN as its first value (a float tensor the
    quantizer passes through, corrupted on the way)."""
    victim = _norm_gains(model.floats)[0]
    gain = model.floats[victim].copy()
    gain.reshape(-1)[0] = np.nan
    return dataclasses.replace(model, floats={**model.floats, victim: gain})


def norm_gain_scaled(model: QuantizedModel) -> QuantizedModel:
    """One normalisation gain stored x1.5 (a LayerNorm/RMSNorm weight edited by mistake)."""
    victim = _norm_gains(model.floats)[0]
    floats = dict(model.floats)
    floats[victim] = (floats[victim].astype(np.float32) * 1.5).astype(floats[victim].dtype)
    return dataclasses.replace(model, floats=floats)


def bias_zeroed(model: QuantizedModel) -> QuantizedModel:
    """One bias vector stored as zeros (or, without biases, the first norm gain zeroed)."""
    victim = (_biases(model.floats) or _norm_gains(model.floats))[0]
    floats = dict(model.floats)
    floats[victim] = np.zeros_like(floats[victim])
    return dataclasses.replace(model, floats=floats)


def dtype_recorded_wrong(model: QuantizedModel) -> QuantizedModel:
    """The largest non-embedding weight recorded with another dtype than its source's
    (float16 for a float32 tensor, float32 otherwise): it reloads as that dtype."""
    victim = model.tensors[_largest(model)]
    dtype = "float16" if victim.dtype == "float32" else "float32"
    return dataclasses.replace(model, tensors={**model.tensors, victim.name: dataclasses.replace(victim, dtype=dtype)})


def _same_shape_pair(tensors: Mapping[str, Any]) -> tuple[str, str] | None:
    """(alias, canonical): the largest non-embedding weight and the first other quantized
    weight of its shape, the pair a deduplication by shape would wrongly merge."""
    for alias in sorted(_non_embedding(tensors), key=lambda n: -math.prod(tensors[n].shape)):
        for other in tensors:
            if other != alias and tuple(tensors[other].shape) == tuple(tensors[alias].shape):
                return alias, other
    return None


def tie_invented(model: QuantizedModel) -> QuantizedModel:
    """A writer that deduplicates by shape: a weight stored as a tie of another weight of
    the same shape (recorded as identical tensors, which they are not)."""
    pair = _same_shape_pair(model.tensors)
    assert pair is not None, "checked by _has_same_shape_pair before the run"
    alias, canonical = pair
    tensors = {n: t for n, t in model.tensors.items() if n != alias}
    return dataclasses.replace(model, tensors=tensors, ties={**model.ties, alias: canonical})


def _embedding_tables(tensors: Mapping[str, Any]) -> list[str]:
    """Token embedding tables by the common names (``embed_tokens``, ``word_embeddings``, GPT-2's ``wte``)."""
    return [n for n in tensors if ("embed" in n.lower() or "wte" in n.lower()) and len(tensors[n].shape) == 2]


def _embedding_victim(tensors: Mapping[str, Any]) -> str:
    """The token embedding table: the embedding with the most rows."""
    return max(_embedding_tables(tensors), key=lambda n: tensors[n].shape[0])


def embedding_rows_swapped(model: QuantizedModel) -> QuantizedModel:
    """64 rows of the embedding table swapped in pairs (32 tokens exchange their vectors;
    K-schemes: 64 units of the rows that share super-blocks, ``_row_unit``)."""
    victim = _embedding_victim(model.tensors)

    def swap(t: QuantizedTensor) -> QuantizedTensor:
        k = _row_unit(t)
        rows = t.shape[0] // k
        picked = np.random.default_rng(1).choice(rows, size=min(64, rows - rows % 2), replace=False)
        perm = np.arange(rows)
        perm[picked[0::2]], perm[picked[1::2]] = picked[1::2], picked[0::2]
        return _permute_rows(t, _expand(perm, k))
    return _map(model, swap, only=victim)


def group_scales_off(model: QuantizedModel) -> QuantizedModel:
    """Eight groups (eight super-blocks for K-schemes) of the largest non-embedding weight stored
    with 4x their scale."""
    victim = _largest(model)

    def off(t: QuantizedTensor) -> QuantizedTensor:
        if t.is_lattice:  # lattice methods keep their step sizes in params (m, a1, a2)
            params = t.params.reshape(-1, 3).copy()
            params[np.linspace(0, len(params) - 1, 8).astype(int), 1:] *= np.float32(4.0)
            return dataclasses.replace(t, params=params.reshape(-1))
        scales = t.scales.copy()
        if t.scheme.scale_bits:
            # K-schemes store a scale as a code times its super-block's power-of-two scale
            # (kquant.py): a single group at 4x does not fit that grid and the writer
            # refuses it. Eight whole super-blocks at 4x do (the exponent moves by 2), and
            # every group in them spans 4x its source range all the same.
            per = groups_per_super(t.scheme)
            supers = -(-scales.size // per)
            for k in np.linspace(0, supers - 1, 8).astype(int):
                scales[k * per:(k + 1) * per] *= np.float32(4.0)
            return dataclasses.replace(t, scales=scales)
        scales[np.linspace(0, scales.size - 1, 8).astype(int)] *= np.float32(4.0)
        return dataclasses.replace(t, scales=scales)
    return _map(model, off, only=victim)


def stale_artifact(model: QuantizedModel) -> QuantizedModel:
    """An artifact made from an earlier version of the model, reused as if current: the
    largest non-embedding tensor was quantized from weights that have since changed, and
    the recorded source digest is that earlier version's."""
    from arrowquant_core.methods import quantize_tensor
    from arrowquant_core.tensor import dequantize

    victim = _largest(model)
    old = dequantize(model.tensors[victim]) * np.float32(1.01)  # the earlier weights
    tensors = dict(model.tensors)
    scheme = model.tensors[victim].scheme
    # round-to-nearest, on the scale grid for a K-scheme (plain rtn's scales would not encode)
    tensors[victim] = quantize_tensor(old, scheme, victim, "krtn" if scheme.scale_bits else "rtn")
    meta = dict(model.metadata)
    meta["source_digest"] = "0" * 64  # the digest of the earlier model, not this one
    return dataclasses.replace(model, tensors=tensors, metadata=meta)


# dream-mini time-aware: faults of the activation tables stored in the artifact's aux rows
# (names "timeaware.{scheme}.g{groups}.{site}.{scale|zero|stats}", fixtures.dream_mini.runner)
def _aux_tables(aux: dict[str, np.ndarray]) -> dict[str, list[str]]:
    """{table prefix: its sites in stored order} for every activation table in ``aux``."""
    import json

    out: dict[str, list[str]] = {}
    for name, array in aux.items():
        if name.startswith("timeaware.") and name.endswith(".header"):
            out[name[:-len("header")]] = list(json.loads(np.asarray(array, np.uint8).tobytes())["sites"])
    return out


def time_groups_reversed(model: QuantizedModel) -> QuantizedModel:
    """Every time group reads the parameters of the mirror group (timestep t looked up as
    999 - t: Dream's t runs from 1 down to 0 while the step index runs up, a classic mix-up)."""
    aux = dict(model.aux)
    for prefix, sites in _aux_tables(aux).items():
        for site in sites:
            for part in ("scale", "zero"):
                name = f"{prefix}{site}.{part}"
                aux[name] = np.ascontiguousarray(aux[name][::-1])
    return dataclasses.replace(model, aux=aux)


def act_scales_of_another_layer(model: QuantizedModel) -> QuantizedModel:
    """Each Linear input reads the activation parameters of the next site of the same
    width (a wiring bug between layers)."""
    aux = dict(model.aux)
    for prefix, sites in _aux_tables(model.aux).items():
        by_width: dict[int, list[str]] = {}
        for site in sites:
            by_width.setdefault(int(model.aux[f"{prefix}{site}.scale"].shape[1]), []).append(site)
        for group in by_width.values():
            for i, site in enumerate(group):
                donor = group[(i + 1) % len(group)]
                for part in ("scale", "zero"):
                    aux[f"{prefix}{site}.{part}"] = model.aux[f"{prefix}{donor}.{part}"]
    return dataclasses.replace(model, aux=aux)


def time_group_table_dropped(model: QuantizedModel) -> QuantizedModel:
    """The artifact is written without its activation tables."""
    return dataclasses.replace(model, aux={k: v for k, v in model.aux.items() if not k.startswith("timeaware.")})


def time_aware_pass_fails(produce: Callable[[], dict[str, np.ndarray]]) -> Callable[[], dict[str, np.ndarray]]:
    """The time-aware pass raises (as a calibration that hits a NaN activation would):
    the run falls back to base quantization, and the artifact has no activation tables."""
    def failing() -> dict[str, np.ndarray]:
        raise FloatingPointError("activation statistics of time group 3 are NaN (injected)")
    return failing


AUX_FAULTS: dict[str, Callable[[QuantizedModel], QuantizedModel]] = {
    "time-groups-reversed": time_groups_reversed,
    "act-scales-other-layer": act_scales_of_another_layer,
    "time-group-table-dropped": time_group_table_dropped,
}
# end dream-mini time-aware

# dit-mini: faults of the spatial path ------------------------------------------------
def _conv_victims(model: QuantizedModel) -> list[str]:
    return [n for n, t in model.tensors.items() if len(t.shape) >= 3]


def conv_reshaped_wrong_order(model: QuantizedModel) -> QuantizedModel:
    """A quantizer that flattened each conv weight ``(out, in, *kernel)`` as ``(out, *kernel, in)``
    (channels last) but stored it as if it were channel-first: codes of every row permuted."""
    def reorder(t: QuantizedTensor) -> QuantizedTensor:
        rows, kernel, cin = t.shape[0], t.shape[2:], t.shape[1]
        blocks = block_codes(t)
        flat = blocks.reshape(rows, -1)
        cols = cin * int(np.prod(kernel))
        grid = flat[:, :cols].reshape((rows, cin) + kernel)
        moved = np.moveaxis(grid, 1, -1).reshape(rows, cols)  # channel-last order, read as channel-first
        flat = flat.copy()
        flat[:, :cols] = moved
        return dataclasses.replace(t, codes=_repack(t, flat.reshape(blocks.shape)))
    victims = _conv_victims(model)
    if not victims:
        raise ConfigurationError("fault conv-reshaped-wrong-order: the model has no quantized conv weight "
                                 "(3+ dimensions); inject it into dit-mini or dit-mini-audio")
    tensors = {n: (reorder(t) if n in victims else t) for n, t in model.tensors.items()}
    return dataclasses.replace(model, tensors=tensors)


def _undo_fold(weights: dict[str, np.ndarray], site: SmoothSite, s: np.ndarray) -> None:
    """Multiply ``s`` back into what received ``1/s`` (the producers or the auxiliary vector)."""
    for fold in site.folds:
        bias = fold.tensor[: -len("weight")] + "bias"
        w, b = weights[fold.tensor].copy(), weights[bias].copy()
        stop = fold.offset + s.shape[0]
        w[fold.offset:stop] *= s.reshape((-1,) + (1,) * (w.ndim - 1))
        b[fold.offset:stop] = (1.0 + b[fold.offset:stop]) * s - 1.0 if fold.kind == "one_plus" else b[fold.offset:stop] * s
        weights[fold.tensor], weights[bias] = w, b
    if not site.folds:
        weights[site.aux] = weights[site.aux] / s


def _fold(weights: dict[str, np.ndarray], site: SmoothSite, s: np.ndarray) -> None:
    for fold in site.folds:
        bias = fold.tensor[: -len("weight")] + "bias"
        w, b = weights[fold.tensor].copy(), weights[bias].copy()
        stop = fold.offset + s.shape[0]
        w[fold.offset:stop] /= s.reshape((-1,) + (1,) * (w.ndim - 1))
        b[fold.offset:stop] = (1.0 + b[fold.offset:stop]) / s - 1.0 if fold.kind == "one_plus" else b[fold.offset:stop] / s
        weights[fold.tensor], weights[bias] = w, b
    if not site.folds:
        weights[site.aux] = weights[site.aux] * s


def smoothing_not_folded(weights: dict[str, np.ndarray], result: SpatialResult,
                         sites: tuple[SmoothSite, ...]) -> dict[str, np.ndarray]:
    """Consumer columns multiplied by ``s`` but the inverse never applied to the activations."""
    out = dict(weights)
    for site in sites:
        if site.name in result.factors:
            _undo_fold(out, site, result.factors[site.name])
    return out


def smoothing_wrong_layer(weights: dict[str, np.ndarray], result: SpatialResult,
                          sites: tuple[SmoothSite, ...]) -> dict[str, np.ndarray]:
    """Each site's inverse factor applied at the same kind of site one block later (a wiring bug)."""
    out = dict(weights)
    by_kind: dict[tuple[str, int], list[SmoothSite]] = {}
    for site in sites:
        if site.name in result.factors:
            kind = site.name.rsplit(".", 1)[-1]
            by_kind.setdefault((kind, int(result.factors[site.name].shape[0])), []).append(site)
    for group in by_kind.values():
        for i, site in enumerate(group):
            other = group[(i + 1) % len(group)]
            if other is site:
                continue
            _undo_fold(out, site, result.factors[site.name])
            _fold(out, site, result.factors[other.name])
    return out


@dataclass(frozen=True)
class SpatialFault:
    """A fault of the smoothing path: corrupts the dequantized weights of every smoothed
    configuration the dit-mini runner measures (``DiTRunner(spatial_fault=...)``)."""

    name: str
    description: str
    corrupt: Callable[[dict[str, np.ndarray], SpatialResult, tuple[SmoothSite, ...]], dict[str, np.ndarray]]


SPATIAL_FAULTS: dict[str, SpatialFault] = {f.name: f for f in (
    SpatialFault("smoothing-not-folded", "smoothing factors multiplied into the weights, their inverse never "
                 "applied to the activations", smoothing_not_folded),
    SpatialFault("smoothing-wrong-layer", "each smoothing vector's inverse applied at the next block's layer",
                 smoothing_wrong_layer),
)}


@dataclass(frozen=True)
class FaultTarget:
    """What a run knows before any work that decides whether a fault can act on it: the
    source weights, the model's runner and the plans of the bit widths it runs."""

    weights: Mapping[str, Any]  # arrays, or anything with shape, ndim, size and dtype.name
    runner: object | None
    plans: tuple[Any, ...]  # harness.criteria.BitPlan of each bit width run
    compare: bool = False
    streaming: bool = False  # the streaming run (--stream) rather than the in-memory suite


def _has_norm_gain(target: FaultTarget) -> str | None:
    return None if _norm_gains(target.weights) else (
        "the model has no 1-D normalisation gain (a float vector named like *norm*.weight, *layernorm*.weight "
        "or ln_*.weight)")


def _has_bias_or_gain(target: FaultTarget) -> str | None:
    return None if _biases(target.weights) or _norm_gains(target.weights) else (
        "the model has no 1-D bias and no normalisation gain")


def _has_float_vector(target: FaultTarget) -> str | None:
    return None if _float_vectors(target.weights) else "the model has no 1-D floating-point tensor"


def _has_embedding(target: FaultTarget) -> str | None:
    return None if _embedding_tables(target.weights) else (
        "the model has no 2-D embedding table (a weight named like *embed* or wte)")


def _has_same_shape_pair(target: FaultTarget) -> str | None:
    weights = {n: a for n, a in target.weights.items() if a.ndim >= 2 and a.dtype.name not in RAW_DTYPES}
    return None if _same_shape_pair(weights) is not None else "the model has no two weights of one shape"


def _has_conv(target: FaultTarget) -> str | None:
    return None if any(a.ndim >= 3 for a in target.weights.values()) else (
        "the model has no conv weight (3+ dimensions); inject it into dit-mini or dit-mini-audio")


def _has_activation_tables(target: FaultTarget) -> str | None:
    return None if hasattr(target.runner, "activation_aux") else (
        "its runner stores no time-aware activation tables in the artifact (dream-mini's does)")


def _uses_hessians(target: FaultTarget) -> str | None:
    from arrowquant_core.methods import METHODS

    def hessian(methods: Iterable[str]) -> bool:
        return any(m in METHODS and METHODS[m].needs_hessian for m in methods)
    for plan in target.plans:
        if (hessian([plan.method, *(m for _p, m in plan.method_overrides)]) or plan.hessian_comparison
                or (plan.ladder is not None and hessian(m for _s, m in plan.ladder.rungs))
                or (target.compare and hessian(plan.compare))):
            return None
    return ("no bit width of this run quantizes with calibration Hessians (a GPTQ-family method, a ladder "
            "with one, or a hessian_comparison in the criteria)")


def _streaming_only(target: FaultTarget) -> str | None:
    return None if target.streaming else "it breaks the streaming run's memory bound; run it with --stream"


def _stall_exceeds_the_time_bound(target: FaultTarget) -> str | None:
    """Stalling is only a test when every bit width's quantize_seconds bound is under the stall."""
    for plan in target.plans:
        bounds = [g.threshold for g in plan.gates if g.metric == "quantize_seconds" and g.op in ("<", "<=")]
        if not bounds or min(bounds) >= STALL_SECONDS:
            return (f"INT{plan.bits}'s quantize_seconds bound is {min(bounds) if bounds else 'absent'}, not under the "
                    f"{STALL_SECONDS:g} s this fault stalls; give it criteria with a tighter bound (a copy of the "
                    "model's criteria file)")
    return None


def _has_ladder(target: FaultTarget) -> str | None:
    return None if any(plan.ladder is not None for plan in target.plans) else (
        "no bit width of this run uses the fallback ladder (e.g. --profile edge)")


@dataclass(frozen=True)
class Fault:
    name: str
    description: str
    mutate: Callable[[QuantizedModel], QuantizedModel] = lambda m: m
    save: Callable[[QuantizedModel, Path], None] | None = None
    hessians: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None
    realize: Callable[..., QuantizedModel] | None = None
    # wraps the runner's time-aware pass (the function producing its activation tables)
    time_aware: Callable[[Callable[[], dict[str, np.ndarray]]], Callable[[], dict[str, np.ndarray]]] | None = None
    # called with the quantized model and the caller's source tensors once a bit width is
    # quantized: what a quantizer that writes into its input leaves behind
    source: Callable[[QuantizedModel, Mapping[str, np.ndarray]], None] | None = None
    # why the fault cannot act on a run (None when it can): checked before any work, so an
    # injected fault that would change nothing, or crash the suite, is a usage error and
    # never a "self-test" whose verdict says nothing about the gates
    requires: Callable[[FaultTarget], str | None] | None = None

    def cannot_act(self, target: FaultTarget) -> str | None:
        return self.requires(target) if self.requires is not None else None


FAULTS: dict[str, Fault] = {f.name: f for f in (
    Fault("scales-doubled", "every scale multiplied by 2", scales_doubled),
    Fault("zero-off-by-one", "every zero point one code too high", zero_off_by_one),
    Fault("nibbles-swapped", "the two halves of every packed byte swapped", nibbles_swapped),
    Fault("codes-as-float32", "codes written as float32 values, not packed bits", save=save_codes_as_float32),
    Fault("one-code-changed-on-write", "one code of the largest weight written one step off, the file's digests "
          "made to match", save=save_one_code_changed),
    Fault("one-weight-unquantized", "the largest non-embedding weight kept in floating point",
          one_weight_unquantized),
    Fault("nothing-quantized", "every weight kept in floating point (the quantizer silently skipped them)",
          nothing_quantized),
    Fault("rows-permuted", "rows of the largest non-embedding weight permuted", rows_permuted),
    Fault("quantizer-stalls", f"the quantizer waits {STALL_SECONDS:g} s before it returns (needs a quantize_seconds "
          "bound under that)", quantizer_stalls, requires=_stall_exceeds_the_time_bound),
    Fault("gptq-wrong-hessian", "GPTQ run with the Hessian of another layer", hessians=hessians_of_another_layer,
          requires=_uses_hessians),
    Fault("calibration-empty", "the calibration data silently empty", hessians=no_calibration, requires=_uses_hessians),
    Fault("ladder-promotions-ignored", "the ladder's promotions dropped when writing the file",
          realize=realize_ignoring_promotions, requires=_has_ladder),
    Fault("stale-artifact", "an artifact quantized from an earlier version of the model reused", stale_artifact),
    Fault("float-tensor-dropped", "the largest 1-D float tensor (norm gain or bias) left out of the artifact",
          float_tensor_dropped, requires=_has_float_vector),
    Fault("norm-gain-scaled", "one normalisation gain stored x1.5", norm_gain_scaled, requires=_has_norm_gain),
    Fault("norm-gain-nan", "one normalisation gain stored with a NaN", norm_gain_nan, requires=_has_norm_gain),
    Fault("extra-tensor-stored", "a tensor the model does not have (a copy of a bias or gain) written into the "
          "artifact", extra_tensor_stored, requires=_has_float_vector),
    Fault("bias-zeroed", "one bias (or norm gain, without biases) stored as zeros", bias_zeroed, requires=_has_bias_or_gain),
    Fault("dtype-recorded-wrong", "the largest non-embedding weight recorded as float16 (float32 if its source is not)",
          dtype_recorded_wrong),
    Fault("tie-invented", "a weight stored as a tie of another weight of the same shape (deduplicated by shape)",
          tie_invented, requires=_has_same_shape_pair),
    Fault("embedding-rows-swapped", "64 rows of the embedding table swapped in pairs", embedding_rows_swapped,
          requires=_has_embedding),
    Fault("group-scales-off", "eight groups of the largest weight stored with 4x their scale", group_scales_off),
    Fault("source-clipped-in-place", "the quantizer clips the largest weight's outliers in the caller's own array",
          source=source_clipped_in_place),
    # dream-mini: the artifact's activation tables (time groups)
    Fault("time-groups-reversed", "the activation table's time groups applied in reverse order",
          time_groups_reversed, requires=_has_activation_tables),
    Fault("act-scales-other-layer", "each layer's activation scales taken from another layer",
          act_scales_of_another_layer, requires=_has_activation_tables),
    Fault("time-group-table-dropped", "the time-group activation tables left out of the artifact",
          time_group_table_dropped, requires=_has_activation_tables),
    Fault("time-aware-pass-fails", "the time-aware calibration pass raises; the run falls back to base quantization",
          time_aware=time_aware_pass_fails, requires=_has_activation_tables),
    # the streaming run only: what its peak RSS gate is for
    Fault("model-held-in-memory", "the streaming run keeps every tensor it writes, as float64, until the file is "
          "done (whole-model float64 copies, what the row blocks exist to avoid)", requires=_streaming_only),
    # dit-mini
    Fault("conv-reshaped-wrong-order", "conv weights flattened channel-last but stored as channel-first",
          conv_reshaped_wrong_order, requires=_has_conv),
)}


def get_fault(name: str) -> Fault:
    fault = FAULTS.get(name)
    if fault is None:
        raise unknown_name("fault", name, FAULTS)
    return fault


# streaming: the same faults on a streamed artifact --------------------------------------
# The streaming run (harness/streaming.py) writes its artifact tensor by tensor from disk;
# a fault there rewrites that file one row at a time, before the read-back, and the records
# of what was written follow the rewrite (as a quantizer that produced the broken tensors
# would have written them), so only the gates can tell. Each row goes through the same
# ``mutate`` as in memory, as a one-row model; the victims are chosen by the same rules
# from the rows' names and shapes.

@dataclass(frozen=True)
class _Dtype:
    name: str  # "bfloat16" too, which NumPy alone does not know


@dataclass(frozen=True)
class _Row:
    """A streamed row's shape and dtype without its data (what the victim rules read)."""

    shape: tuple[int, ...]
    dtype: _Dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)


_Victims = Callable[[Mapping[str, _Row], Mapping[str, _Row]], set[str] | None]  # None: every quantized row


def _one(rule: Callable[[Mapping[str, _Row]], str]) -> _Victims:
    return lambda quantized, floats: {rule(quantized)}


STREAM_VICTIMS: dict[str, _Victims] = {
    "scales-doubled": lambda q, f: None,
    "zero-off-by-one": lambda q, f: None,
    "nibbles-swapped": lambda q, f: None,
    "rows-permuted": _one(_largest_of),
    "group-scales-off": _one(_largest_of),
    "one-weight-unquantized": _one(_largest_of),
    "nothing-quantized": lambda q, f: None,
    "dtype-recorded-wrong": _one(_largest_of),
    "stale-artifact": _one(_largest_of),
    "embedding-rows-swapped": _one(_embedding_victim),
    "norm-gain-scaled": lambda q, f: {_norm_gains(f)[0]},
    "norm-gain-nan": lambda q, f: {_norm_gains(f)[0]},
    "bias-zeroed": lambda q, f: {(_biases(f) or _norm_gains(f))[0]},
    "float-tensor-dropped": lambda q, f: {_float_vectors(f)[0]},
    "extra-tensor-stored": lambda q, f: {_float_vectors(f)[0]},
    "conv-reshaped-wrong-order": lambda q, f: {n for n, r in q.items() if r.ndim >= 3},
}
# written differently rather than mutated: see rewrite_streamed
STREAM_SPECIAL = ("one-code-changed-on-write", "tie-invented", "model-held-in-memory")


def streams(name: str) -> bool:
    """Whether fault ``name`` has a streaming form."""
    return name in STREAM_VICTIMS or name in STREAM_SPECIAL


def check_streaming(fault: Fault, shapes: Mapping[str, tuple[tuple[int, ...], str]], where: str) -> None:
    """Refuse, before any work, a fault the streaming run cannot inject into the model at
    ``where`` (name -> (shape, dtype name) of its tensors): no streaming form, or nothing
    to act on."""
    if not streams(fault.name):
        raise ConfigurationError(f"--inject-fault {fault.name} has no streaming form (faults of the streaming run: "
                                 f"{', '.join(sorted([*STREAM_VICTIMS, *STREAM_SPECIAL]))}); pass --no-stream")
    rows = {n: _Row(tuple(shape), _Dtype(dtype)) for n, (shape, dtype) in shapes.items()}
    why = fault.cannot_act(FaultTarget(rows, None, (), streaming=True))
    if why is not None:
        raise ConfigurationError(f"--inject-fault {fault.name} cannot act on {where}: {why}")


def rewrite_streamed(fault: Fault, path: Path, streamed: list[Any]) -> list[Any]:
    """Rewrite the streamed artifact at ``path`` with ``fault``, one row in memory at a time;
    returns the records (``stream.StreamedTensor``) of what the rewrite wrote."""
    from arrowquant_core import stream
    from arrowquant_core.atomic import write_atomic
    from arrowquant_core.tensor import dequantize

    check_streaming(fault, {t.name: (tuple(t.shape), t.dtype) for t in streamed if t.kind in ("quantized", "float")},
                    path.name)  # run_streaming checked the source already; the rows are what is rewritten
    records = {t.name: t for t in streamed}
    quantized = {t.name: _Row(tuple(t.shape), _Dtype(t.dtype)) for t in streamed if t.kind == "quantized"}
    floats = {t.name: _Row(tuple(t.shape), _Dtype(t.dtype)) for t in streamed if t.kind == "float"}
    victims: set[str] | None = set()
    pair: tuple[str, str] | None = None
    if fault.name == "tie-invented":
        pair = _same_shape_pair(quantized)
        assert pair is not None  # cannot_act said there is one
        pair = (max(pair), min(pair))  # the canonical row must be written before its alias
        victims = {pair[0]}
    elif fault.name == "one-code-changed-on-write":
        victims = {_largest_of(quantized)}
    elif fault.name == "model-held-in-memory":
        victims = set()  # nothing changes but what stays in memory
    else:
        victims = STREAM_VICTIMS[fault.name](quantized, floats)
    metadata = stream.artifact_metadata(path)
    out: list[Any] = []
    held: list[np.ndarray] = []  # model-held-in-memory: every row as float64, until the end

    def body(handle: Any) -> None:
        writer = stream.StreamWriter(handle, metadata)
        extra: dict[str, str] = {}
        for name, kind, _checksum, value in stream.iter_artifact(path):
            record = records[name]
            hit = (kind == "quantized") if victims is None else name in victims
            if isinstance(value, stream.Tie):
                out.append(dataclasses.replace(record, checksum=writer.write_tied(name, value.canonical,
                                                                                  value.shape, value.dtype)))
                continue
            if not hit:
                checksum = (writer.write_quantized(value) if isinstance(value, QuantizedTensor)
                            else writer.write_raw(name, value, kind))
                out.append(dataclasses.replace(record, checksum=checksum))
                if fault.name == "model-held-in-memory":
                    held.append(np.asarray(dequantize(value) if isinstance(value, QuantizedTensor) else value,
                                           dtype=np.float64))
                continue
            if pair is not None:  # the alias stored as a tie of the other weight of its shape
                checksum = writer.write_tied(name, pair[1], tuple(record.shape), record.dtype)
                out.append(dataclasses.replace(record, kind="tied", tied_to=pair[1], checksum=checksum))
                continue
            if fault.name == "one-code-changed-on-write":  # written one code off; the record keeps the intended row
                assert isinstance(value, QuantizedTensor)  # the victim is a quantized row
                writer.write_quantized(dataclasses.replace(value, codes=_one_code_off(value.codes)))
                out.append(record)
                continue
            one = (QuantizedModel(tensors={name: value}, floats={}, order=(name,))
                   if isinstance(value, QuantizedTensor) else QuantizedModel(tensors={}, floats={name: value},
                                                                            order=(name,)))
            broken = fault.mutate(one)
            extra.update({k: v for k, v in broken.metadata.items() if one.metadata.get(k) != v})
            for n in broken.order:
                if n in broken.tensors:
                    qt = broken.tensors[n]
                    out.append(dataclasses.replace(record, name=n, kind="quantized", dtype=qt.dtype,
                                                   checksum=writer.write_quantized(qt)))
                elif n in broken.floats:
                    array = broken.floats[n]
                    out.append(dataclasses.replace(record, name=n, kind="float", scheme="", method="",
                                                   dtype=array.dtype.name,
                                                   checksum=writer.write_raw(n, array, "float")))
        writer.close(extra)

    write_atomic(path, body)
    del held
    return out
