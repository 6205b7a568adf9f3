"""Block-shaped, vectorized quantization kernels.

Every kernel takes ``blocks`` of shape ``(n_blocks, block)`` float32 and works on all
blocks at once; callers reshape once at the edge (see ``tensor.py``). No Python loop
touches elements. Temporaries are updated in place (``out=``) because mypyc-compiled
callers lose NumPy's temporary elision (docs/MYPYC.md, "What mypyc does to NumPy code").

Code convention: codes are unsigned integers in ``[0, 2**bits - 1]`` and
``value = (code - zero) * scale``.

- symmetric: ``scale = absmax / (2**(bits-1) - 1)``, ``zero = 2**(bits-1)`` (implicit,
  not stored);
- asymmetric: the block range is widened to include 0, ``scale = (hi - lo) / qmax`` and
  the zero point is the *integer* ``round(-lo / scale)``, so 0.0 is exactly representable.
  (A float zero point keeps weight cosine but shifts every zero weight by a fraction of
  a step; on MiniLM INT4 per-channel that dropped the sentence-embedding cosine from
  0.94 to 0.31 -- issue 2.)
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

from arrowquant_core.errors import ConfigurationError

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]


def symmetric_zero(bits: int) -> int:
    """The implicit zero point of a symmetric scheme (mid-range code)."""
    return 1 << (bits - 1)


def quantize_blocks(blocks: F32, bits: int, symmetric: bool) -> tuple[U8, F32, U8]:
    """Round-to-nearest quantization of each row of ``blocks``.

    Returns ``(codes (n, b) uint8, scales (n,) float32, zeros (n,) uint8)``.

    >>> c, s, z = quantize_blocks(np.array([[-1.0, 0.0, 0.5, 1.0]], np.float32), 8, True)
    >>> c.tolist(), int(z[0])
    ([[1, 128, 192, 255]], 128)
    """
    if symmetric:
        scales, zeros = symmetric_params(blocks, bits)
    else:
        scales, zeros = asymmetric_params(blocks, bits)
    return quantize_with(blocks, scales, zeros, bits), scales, zeros


def symmetric_params(blocks: F32, bits: int) -> tuple[F32, U8]:
    """Scale from the absolute maximum; zero point fixed at mid-range."""
    half = float((1 << (bits - 1)) - 1)
    absmax = np.max(np.abs(blocks), axis=1).astype(np.float64)
    scales = (absmax / half).astype(np.float32)
    zeros = np.full(blocks.shape[0], symmetric_zero(bits), dtype=np.uint8)
    return scales, zeros


def asymmetric_params(blocks: F32, bits: int) -> tuple[F32, U8]:
    """Scale from the range widened to include 0; integer zero point."""
    qmax = float((1 << bits) - 1)
    # per-block arithmetic in float64: hi - lo of a float32 range can exceed float32's max
    lo = np.minimum(np.min(blocks, axis=1), np.float32(0.0)).astype(np.float64)
    hi = np.maximum(np.max(blocks, axis=1), np.float32(0.0)).astype(np.float64)
    scales = ((hi - lo) / qmax).astype(np.float32)
    zeros = np.rint(-lo * safe_reciprocal(scales).astype(np.float64))
    np.clip(zeros, 0.0, qmax, out=zeros)
    return scales, zeros.astype(np.uint8)


def safe_reciprocal(scales: F32) -> npt.NDArray[np.floating]:
    """1/scale, with 0 where the scale is 0 (an all-zero block quantizes to its zero point).

    float32 unless a scale is so small (values ~1e-38) that its reciprocal would
    overflow float32; then float64, so such blocks still quantize within scale/2.
    """
    wide = bool(np.any((scales > 0) & (scales < _TINY_SCALE)))
    dtype = np.float64 if wide else np.float32
    out = np.zeros(scales.shape, dtype=dtype)
    np.divide(1.0, scales.astype(dtype), out=out, where=scales != 0)
    return out


# Below this a float32 reciprocal overflows (1 / 2.9e-39 > float32 max).
_TINY_SCALE: Final = 1e-36


def quantize_with(blocks: F32, scales: F32, zeros: U8, bits: int) -> U8:
    """Codes for ``blocks`` under given per-block scales and zero points."""
    qmax = float((1 << bits) - 1)
    inv = safe_reciprocal(scales)
    t = blocks.astype(inv.dtype) * inv[:, None]
    np.rint(t, out=t)
    t += zeros[:, None].astype(inv.dtype)
    np.clip(t, 0.0, qmax, out=t)
    codes: U8 = t.astype(np.uint8)
    return codes


def dequantize_blocks(codes: U8, scales: F32, zeros: U8) -> F32:
    """``(codes - zero) * scale`` for each block; float32 out."""
    t = codes.astype(np.float32)
    t -= zeros[:, None].astype(np.float32)
    t *= scales[:, None]
    return t


# --- residual 2-bit lattice (R2Q-style; see residual.py) ---------------------------------
# value = m + a1 * s1 + a2 * s2 with s1, s2 in {-1, +1}; code = 2 * [s1 > 0] + [s2 > 0];
# params per block: (m, a1, a2). The four levels are non-uniform, so this is a lookup,
# not the affine (code - zero) * scale.

def residual2_levels(params: F32) -> F32:
    """The four values of each block, in code order 0..3: ``(n, 4)``."""
    p = params.astype(np.float32)
    m, a1, a2 = p[:, 0:1], p[:, 1:2], p[:, 2:3]
    return np.concatenate([m - a1 - a2, m - a1 + a2, m + a1 - a2, m + a1 + a2], axis=1)


def residual2_dequantize_blocks(codes: U8, params: F32) -> F32:
    """``m + a1 s1 + a2 s2`` per value; ``(n, b)`` float32."""
    levels = residual2_levels(params)
    out: F32 = np.take_along_axis(levels, codes.astype(np.intp), axis=1).astype(np.float32)
    return out


# --- bit packing -----------------------------------------------------------------------
# Codes are packed little-end first: for 4-bit, byte = c0 | c1 << 4; for 2-bit,
# byte = c0 | c1 << 2 | c2 << 4 | c3 << 6 (the order of llama.cpp's Q4_0 nibbles
# differs; ours is documented here and fixed by the format version).

_SHIFTS: Final[dict[int, tuple[int, ...]]] = {8: (0,), 4: (0, 4), 2: (0, 2, 4, 6)}


def _shifts(bits: int) -> tuple[int, ...]:
    shifts = _SHIFTS.get(bits)
    if shifts is None:
        raise ConfigurationError(f"cannot pack {bits}-bit codes: supported widths are {sorted(_SHIFTS)}")
    return shifts


def pack(codes: U8, bits: int) -> U8:
    """Pack a flat array of ``bits``-bit codes densely into bytes.

    >>> pack(np.array([1, 2, 3], np.uint8), 4).tolist()
    [33, 3]
    """
    shifts = _shifts(bits)
    per = len(shifts)
    flat = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    if flat.size and int(flat.max()) >= (1 << bits):
        raise ConfigurationError(
            f"cannot pack code {int(flat.max())} into {bits} bits (codes must be < {1 << bits})")
    if per == 1:
        return flat.copy()
    pad = (-flat.size) % per
    if pad:
        flat = np.concatenate([flat, np.zeros(pad, dtype=np.uint8)])
    lanes = flat.reshape(-1, per)
    out = lanes[:, 0].copy()
    for lane in range(1, per):  # at most 3 vectorized passes, not a loop over elements
        out |= np.left_shift(lanes[:, lane], np.uint8(shifts[lane]))
    return out


def unpack(packed: U8, bits: int, count: int) -> U8:
    """Inverse of ``pack``: the first ``count`` codes.

    >>> unpack(np.array([33, 3], np.uint8), 4, 3).tolist()
    [1, 2, 3]
    """
    shifts = _shifts(bits)
    per = len(shifts)
    flat = np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1)
    if flat.size * per < count:
        raise ConfigurationError(
            f"packed buffer of {flat.size} bytes holds {flat.size * per} {bits}-bit codes, "
            f"{count} were asked for")
    if per == 1:
        return flat[:count].copy()
    mask = np.uint8((1 << bits) - 1)
    shift_row = np.array(shifts, dtype=np.uint8)
    lanes = np.right_shift(flat[:, None], shift_row[None, :]) & mask
    return np.ascontiguousarray(lanes.reshape(-1)[:count])
