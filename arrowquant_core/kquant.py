"""Quantized group scales (K-quant style) and importance-weighted clip search (imatrix style).

Two ideas from llama.cpp, re-derived for this format (facts checked against
ggml-common.h / ggml-quants.c; the code is ours):

**Scales stored as codes.** A float32 scale per group of 32 costs a whole bit per
weight; llama.cpp's K-quants (``block_q4_K``: per 256 weights one fp16 super-scale
``d`` and per 32-weight sub-block a 6-bit scale code; ``block_q2_K``: 4-bit codes per
16 weights) quantize the scales themselves. Schemes with ``scale_bits`` (``-k8`` /
``-k6`` in ``schemes.py``) do the same with one difference that makes the stored form
canonical: the super-scale is a **power of two**, ``d = 2**e``, so a group's scale
``d * c`` (``c`` an integer code in ``[0, 2**scale_bits - 1]``) is an exact float32
product, and the encoder recovers ``e`` and every ``c`` from the float32 scales alone
(``encode_scales``): ``e`` is the smallest exponent with ``max(scale) <= cmax * 2**e``.
The in-memory ``QuantizedTensor`` keeps its float32 scales (dequantization is the
same affine formula as every other scheme); only the Parquet row is smaller.
A power-of-two ``d`` leaves the largest code between ``cmax / 2`` and ``cmax``: at 8-bit
codes the relative step of the largest scale is at most 1/128.

Super-blocks are ``SUPER_BLOCK // group_size`` consecutive groups in the tensor's block
order (row-major: the groups of a row, then the next row), the last one ragged.
Stored ``scales`` column of such a row (``storage.py``)::

    int16 little-endian exponent e per super-block  |  uint8 code per group

The zero point stays an integer per group (``zeros`` column, unchanged): at INT4 a
float zero point shifts every zero weight (``kernels.py`` docstring).

**Importance-weighted clip search.** ``clip.py`` picks each group's clip factor by
plain squared error. llama.cpp with an importance matrix (``--imatrix``;
``quantize_row_q4_K_impl`` weights each value's squared error by the mean squared
activation of its input column) picks the range that minimises the error the layer's
*output* sees. The diagonal of GPTQ's Hessian ``H = 2 X^T X / n`` is exactly that
mean squared activation (times 2), so ``importance = diag(H)`` per input column.
Without a Hessian (embedding tables) every value weighs the same. With quantized
scales the search runs on the scale grid: each candidate scale is rounded to its
code first, so the chosen range is the best *storable* one.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np
import numpy.typing as npt

from arrowquant_core.clip import DEFAULT_GRID, check_grid, error_normalizer
from arrowquant_core.errors import FormatError, QuantizationError
from arrowquant_core.kernels import dequantize_blocks, quantize_with, safe_reciprocal, symmetric_zero
from arrowquant_core.schemes import SUPER_BLOCK, Scheme, get_scheme
from arrowquant_core.tensor import QuantizedTensor, as_float32, blocks_of, from_codes, layout

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]

CHUNK_BLOCKS: Final[int] = 4096
"""Groups searched together (temporaries of 4096 x 64 float32 = 1 MiB stay in cache)."""
EXPONENT_RANGE: Final[tuple[int, int]] = (-160, 160)
"""Exponents an int16 super-scale may hold: every float32 scale fits."""


# --- the scale grid ---------------------------------------------------------------------

def groups_per_super(scheme: Scheme) -> int:
    """Groups that share one super-scale: ``SUPER_BLOCK // group_size``."""
    return SUPER_BLOCK // scheme.group_size


def super_index(n_blocks: int, per: int) -> I64:
    """Super-block of every group, ``(n_blocks,)``."""
    return np.arange(n_blocks, dtype=np.int64) // per


def super_max(values: F32, per: int) -> F32:
    """Maximum of ``values`` over each super-block of ``per`` consecutive groups."""
    n = int(values.size)
    pad = (-n) % per
    v = np.concatenate([values, np.zeros(pad, np.float32)]) if pad else values
    out: F32 = np.max(v.reshape(-1, per), axis=1).astype(np.float32)
    return out


def exponents_for(maxima: F32, cmax: int) -> I64:
    """Smallest ``e`` with ``maxima <= cmax * 2**e`` (0 where the maximum is 0).

    >>> exponents_for(np.array([255.0, 256.0, 0.5], np.float32), 255).tolist()
    [0, 1, -8]
    """
    m = maxima.astype(np.float64)
    positive = m > 0
    safe = np.where(positive, m, 1.0)
    e = np.ceil(np.log2(safe / float(cmax))).astype(np.int64)
    # log2 is not exact; two correction steps make the bound exact (ldexp is exact).
    for _ in range(2):
        e = np.where(safe > np.ldexp(float(cmax), e), e + 1, e)
        e = np.where(safe <= np.ldexp(float(cmax), e - 1), e - 1, e)
    out: I64 = np.where(positive, e, 0).astype(np.int64)
    return out


def quantize_scale_values(scales: F32, step: F32, cmax: int) -> F32:
    """Round scales to the grid ``step * c``, ``c`` in ``[1, cmax]`` (0 stays 0); float32."""
    c = np.rint(scales.astype(np.float64) / step.astype(np.float64))
    np.clip(c, 1.0, float(cmax), out=c)
    out: F32 = (step * c.astype(np.float32)).astype(np.float32)
    out[scales == 0] = 0.0
    return out


def encode_scales(scales: F32, scheme: Scheme, name: str) -> bytes:
    """The stored form of a K-scheme tensor's scales (module docstring); raises
    FormatError naming the tensor if a scale is not on a power-of-two code grid."""
    per = groups_per_super(scheme)
    cmax = (1 << scheme.scale_bits) - 1
    exps = exponents_for(super_max(scales, per), cmax)
    lo, hi = EXPONENT_RANGE
    if exps.size and (int(exps.min()) < lo or int(exps.max()) > hi):
        raise FormatError(f"tensor {name!r}: super-scale exponent outside [{lo}, {hi}]")
    step = np.ldexp(np.float32(1.0), exps[super_index(int(scales.size), per)]).astype(np.float32)
    codes = scales.astype(np.float64) / step.astype(np.float64)
    rounded = np.rint(codes)
    if bool(np.any(rounded != codes)) or bool(np.any(rounded > cmax)) or bool(np.any(rounded < 0)):
        bad = int(np.flatnonzero((rounded != codes) | (rounded > cmax) | (rounded < 0))[0])
        raise FormatError(f"tensor {name!r}: scale {float(scales[bad])!r} of group {bad} is not a "
                          f"{scheme.scale_bits}-bit code times a power-of-two super-scale "
                          f"(scheme {scheme.name}); quantize it with a method that supports K-schemes")
    return exps.astype("<i2").tobytes() + rounded.astype(np.uint8).tobytes()


def decode_scales(blob: bytes, scheme: Scheme, n_blocks: int, name: str) -> F32:
    """Inverse of ``encode_scales``: float32 scales, bit-exact."""
    per = groups_per_super(scheme)
    n_super = -(-n_blocks // per)
    if len(blob) != 2 * n_super + n_blocks:
        raise FormatError(f"tensor {name!r}: {len(blob)} scale bytes, scheme {scheme.name} with "
                          f"{n_blocks} groups needs {2 * n_super + n_blocks} ({n_super} int16 exponents "
                          f"+ {n_blocks} uint8 codes)")
    exps = np.frombuffer(blob[:2 * n_super], dtype="<i2").astype(np.int64)
    lo, hi = EXPONENT_RANGE
    if exps.size and (int(exps.min()) < lo or int(exps.max()) > hi):
        raise FormatError(f"tensor {name!r}: super-scale exponent outside [{lo}, {hi}]")
    codes = np.frombuffer(blob[2 * n_super:], dtype=np.uint8)
    if codes.size and int(codes.max()) >= (1 << scheme.scale_bits):
        raise FormatError(f"tensor {name!r}: scale code {int(codes.max())} does not fit "
                          f"{scheme.scale_bits} bits (scheme {scheme.name})")
    step = np.ldexp(np.float32(1.0), exps[super_index(n_blocks, per)]).astype(np.float32)
    out: F32 = (step * codes.astype(np.float32)).astype(np.float32)
    return out


# --- importance-weighted clip search ----------------------------------------------------

def _candidate(x: F32, lo: F32, hi: F32, absmax: F32, factor: float, bits: int, symmetric: bool,
               step: F32 | None, cmax: int) -> tuple[U8, F32, U8]:
    """Codes, scale and zero of the range shrunk by ``factor`` (scale on the grid if ``step``)."""
    f = np.float32(factor)
    qmax = (1 << bits) - 1
    if symmetric:
        scales = (absmax.astype(np.float64) * float(f) / float((1 << (bits - 1)) - 1)).astype(np.float32)
    else:
        scales = (((hi * f).astype(np.float64) - (lo * f).astype(np.float64)) / float(qmax)).astype(np.float32)
    if step is not None:
        scales = quantize_scale_values(scales, step, cmax)
    if symmetric:
        zeros = np.full(x.shape[0], symmetric_zero(bits), dtype=np.uint8)
    else:
        z = np.rint(-(lo * f).astype(np.float64) * safe_reciprocal(scales).astype(np.float64))
        np.clip(z, 0.0, float(qmax), out=z)
        zeros = z.astype(np.uint8)
    return quantize_with(x, scales, zeros, bits), scales, zeros


def block_extrema(blocks: F32) -> tuple[F32, F32, F32]:
    """Per block: ``min``, ``max`` and ``max |x|`` (exact, as ``np.min`` / ``np.max`` give).

    ``reduceat`` over the flat array runs ~4x faster than a reduction along a 16-64 wide
    axis; this was most of ``krtn``'s time on MiniLM (issue 13's INT8 time rule).
    ``max |x| = max(max x, -min x)``; adding +0.0 turns a -0.0 into the +0.0 ``abs`` gives.

    >>> [v.tolist() for v in block_extrema(np.array([[1.0, -3.0], [0.0, 2.0]], np.float32))]
    [[-3.0, 0.0], [1.0, 2.0], [3.0, 2.0]]
    """
    n, block = int(blocks.shape[0]), int(blocks.shape[1])
    if n == 0 or block == 0 or not blocks.flags.c_contiguous:
        lo: F32 = np.min(blocks, axis=1) if block else np.zeros(n, np.float32)
        hi: F32 = np.max(blocks, axis=1) if block else np.zeros(n, np.float32)
    else:
        flat = blocks.reshape(-1)
        starts = np.arange(0, n * block, block)
        lo = np.minimum.reduceat(flat, starts)
        hi = np.maximum.reduceat(flat, starts)
    absmax: F32 = np.maximum(hi, -lo)
    absmax += np.float32(0.0)
    return lo, hi, absmax


def _search_chunk(x: F32, w: F32 | None, step: F32 | None, bits: int, symmetric: bool, cmax: int,
                  factors: tuple[float, ...], extrema: tuple[F32, F32, F32]) -> tuple[U8, F32, U8]:
    raw_lo, raw_hi, absmax = extrema
    lo = np.minimum(raw_lo, np.float32(0.0))
    hi = np.maximum(raw_hi, np.float32(0.0))
    if len(factors) == 1:
        # Round-to-nearest on the grid (krtn, gptq-kr's ranges): the only candidate is the
        # answer (its error is finite, so the search below would pick it), so skip scoring it.
        return _candidate(x, lo, hi, absmax, factors[0], bits, symmetric, step, cmax)
    norm = error_normalizer(absmax)
    best_err = np.full(x.shape[0], np.inf, dtype=np.float64)
    best_c = np.zeros(x.shape, dtype=np.uint8)
    best_s = np.zeros(x.shape[0], dtype=np.float32)
    best_z = np.zeros(x.shape[0], dtype=np.uint8)
    for factor in factors:
        c, s, z = _candidate(x, lo, hi, absmax, factor, bits, symmetric, step, cmax)
        t = dequantize_blocks(c, s, z)
        t -= x
        scaled: npt.NDArray[Any] = t * norm
        np.square(scaled, out=scaled)
        if w is not None:
            scaled *= w
        err = np.sum(scaled, axis=1)
        better = err < best_err
        best_err[better] = err[better]
        best_c[better] = c[better]
        best_s[better] = s[better]
        best_z[better] = z[better]
    return best_c, best_s, best_z


def search_params(blocks: F32, bits: int, symmetric: bool, scale_bits: int = 0, per: int = 1,
                  importance: F32 | None = None,
                  grid: tuple[float, ...] = DEFAULT_GRID) -> tuple[U8, F32, U8]:
    """Per group, the clip factor with the least importance-weighted squared error.

    ``importance (n_blocks, block)`` weighs each value's squared error (``None``: all 1).
    With ``scale_bits`` the scales are searched on the power-of-two code grid of their
    super-block of ``per`` groups (module docstring), so the result encodes exactly.
    Returns ``(codes, scales, zeros)`` like ``kernels.quantize_blocks``.

    >>> b = np.array([[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 5.0]], np.float32)
    >>> _c, s, _z = search_params(b, 2, False, scale_bits=8)
    >>> float(s[0]) < 5.0 / 3
    True
    """
    factors = check_grid(grid, "blocks")
    n = int(blocks.shape[0])
    step_all: F32 | None = None
    cmax = (1 << scale_bits) - 1
    raw_lo, raw_hi, raw_absmax = block_extrema(blocks)
    if scale_bits:
        # The super-scale comes from the unclipped (factor 1.0) ranges: every clipped
        # candidate's scale is then at most cmax codes.
        lo = np.minimum(raw_lo, np.float32(0.0)).astype(np.float64)
        hi = np.maximum(raw_hi, np.float32(0.0)).astype(np.float64)
        if symmetric:
            full = (raw_absmax.astype(np.float64) / ((1 << (bits - 1)) - 1)).astype(np.float32)
        else:
            full = ((hi - lo).astype(np.float32) / np.float32((1 << bits) - 1)).astype(np.float32)
        exps = exponents_for(super_max(full, per), cmax)
        step_all = np.ldexp(np.float32(1.0), exps[super_index(n, per)]).astype(np.float32)
    codes = np.empty(blocks.shape, dtype=np.uint8)
    scales = np.empty(n, dtype=np.float32)
    zeros = np.empty(n, dtype=np.uint8)
    for start in range(0, n, CHUNK_BLOCKS):
        end = min(start + CHUNK_BLOCKS, n)
        x = np.ascontiguousarray(blocks[start:end])
        w = None if importance is None else np.ascontiguousarray(importance[start:end], dtype=np.float32)
        st = None if step_all is None else step_all[start:end]
        c, s, z = _search_chunk(x, w, st, bits, symmetric, cmax, factors,
                                (raw_lo[start:end], raw_hi[start:end], raw_absmax[start:end]))
        codes[start:end] = c
        scales[start:end] = s
        zeros[start:end] = z
    return codes, scales, zeros


def column_importance(hessian: object, cols: int, name: str) -> F32:
    """``diag(H)`` of a ``(cols, cols)`` Hessian, the per-input-column importance (>= 0)."""
    if not isinstance(hessian, np.ndarray) or hessian.shape != (cols, cols):
        shape = list(hessian.shape) if isinstance(hessian, np.ndarray) else type(hessian).__name__
        raise QuantizationError(f"tensor {name!r}: Hessian {shape} does not fit {cols} input columns")
    d = np.diagonal(hessian).astype(np.float64)
    if not bool(np.all(np.isfinite(d))) or bool(np.any(d < 0)):
        raise QuantizationError(f"tensor {name!r}: Hessian diagonal must be finite and >= 0")
    mean = float(np.mean(d))
    # Normalised to mean 1, with a floor so a dead column still counts a little (its
    # weights still matter for inputs the calibration set missed).
    out: F32 = (np.maximum(d / mean, 1e-3) if mean > 0 else np.ones(cols)).astype(np.float32)
    return out


def importance_blocks(importance: F32, shape: tuple[int, ...], scheme: Scheme) -> F32:
    """Per-column importance broadcast to the tensor's block shape ``(rows * n_groups, block)``."""
    rows, cols, block, n_groups = layout(shape, scheme)
    row = np.broadcast_to(importance.reshape(1, cols), (rows, cols))
    full = np.ascontiguousarray(row, dtype=np.float32)
    blocks, _layout = blocks_of(full, scheme)
    return blocks


def quantize_iclip(array: object, scheme: Scheme | str, name: str = "tensor", hessian: object = None,
                   grid: tuple[float, ...] = DEFAULT_GRID, method: str = "iclip") -> QuantizedTensor:
    """Importance-weighted clip search (``diag(H)``; uniform without a Hessian), on the
    scale grid for K-schemes.

    >>> w = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    >>> quantize_iclip(w, "int4-g32-asym-k8", "w").method
    'iclip'
    """
    sch = get_scheme(scheme) if isinstance(scheme, str) else scheme
    values, dtype = as_float32(array, name)
    shape = tuple(int(d) for d in values.shape)
    blocks, _layout = blocks_of(values, sch)
    weights = None
    if hessian is not None and len(shape) == 2:
        weights = importance_blocks(column_importance(hessian, shape[1], name), shape, sch)
    per = groups_per_super(sch) if sch.scale_bits else 1
    codes, scales, zeros = search_params(blocks, sch.bits, sch.symmetric, sch.scale_bits, per, weights, grid)
    return from_codes(name, sch, shape, dtype, codes, scales, zeros, method)
