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

from typing import Any, Final

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
    # one pass: the product in inv's dtype (float32 values convert to float64 exactly)
    t = np.multiply(blocks, inv[:, None], dtype=inv.dtype)
    np.rint(t, out=t)
    t += zeros[:, None].astype(inv.dtype)
    np.clip(t, 0.0, qmax, out=t)
    codes: U8 = t.astype(np.uint8)
    return codes


def dequantize_blocks(codes: U8, scales: F32, zeros: U8) -> F32:
    """``(codes - zero) * scale`` for each block; float32 out, always finite.

    A block spanning nearly float32's whole range has ``|code - zero| * scale`` up to half
    a step beyond ``float32`` max (the zero point is an integer, and the scale is rounded
    to float32): saturate to the largest finite value instead of overflowing to inf.
    For every other input the product is exact-then-rounded as before (bit-identical).
    """
    t = codes.astype(np.float32)
    t -= zeros[:, None].astype(np.float32)
    with np.errstate(over="ignore"):
        t *= scales[:, None]
    np.clip(t, -_F32_MAX, _F32_MAX, out=t)
    return t


_F32_MAX: Final[float] = float(np.finfo(np.float32).max)


# --- residual 2-bit lattice (R2Q-style; see residual.py) ---------------------------------
# value = m + a1 * s1 + a2 * s2 with s1, s2 in {-1, +1}; code = 2 * [s1 > 0] + [s2 > 0];
# params per block: (m, a1, a2). The four levels are non-uniform, so this is a lookup,
# not the affine (code - zero) * scale.

def residual2_levels(params: F32) -> F32:
    """The four values of each block, in code order 0..3: ``(n, 4)``."""
    p = params.astype(np.float32)
    m, a1, a2 = p[:, 0:1], p[:, 1:2], p[:, 2:3]
    with np.errstate(over="ignore"):
        levels = np.concatenate([m - a1 - a2, m - a1 + a2, m + a1 - a2, m + a1 + a2], axis=1)
    if not bool(np.all(np.isfinite(levels))):
        # m +- a1 +- a2 can pass float32's max near its edge: those blocks in float64,
        # saturated; every other block keeps the float32 arithmetic (and its exact codes)
        q = params.astype(np.float64)
        m64, b1, b2 = q[:, 0:1], q[:, 1:2], q[:, 2:3]
        wide = np.concatenate([m64 - b1 - b2, m64 - b1 + b2, m64 + b1 - b2, m64 + b1 + b2], axis=1)
        np.clip(wide, -_F32_MAX, _F32_MAX, out=wide)
        levels = wide.astype(np.float32)
    out: F32 = levels
    return out


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
    out = np.empty(-(-flat.size // per), dtype=np.uint8)
    pack_into(flat, bits, out)
    return out


def _pack_lanes(flat: U8, bits: int) -> U8:
    """Portable packing, lane by lane (big-endian machines and the odd tail)."""
    per = 8 // bits
    pad = (-flat.size) % per
    if pad:
        flat = np.concatenate([flat, np.zeros(pad, dtype=np.uint8)])
    lanes = flat.reshape(-1, per)
    out = lanes[:, 0].copy()
    for lane in range(1, per):  # at most 3 vectorized passes, not a loop over elements
        out |= np.left_shift(lanes[:, lane], np.uint8(_SHIFTS[bits][lane]))
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
    out = np.empty(count, dtype=np.uint8)
    unpack_into(flat, bits, out)
    return out


# --- fused, chunked round-to-nearest over a whole matrix (issue 11) ----------------------
# The block kernels above allocate input-sized temporaries (a float copy, the scaled
# values, the codes, the lanes): on this machine a fresh page costs about five times a
# copy of it, and the kernels were 9-16x ``np.copyto`` of the same data. The functions
# below read the caller's matrix in place (never writing it), take each block's range with
# one ``reduceat`` per bound over the flat data (no padding, ragged groups included), and
# then quantize and pack a chunk of rows at a time in small buffers that stay in cache.
# Every arithmetic step is the one of ``quantize_blocks`` / ``dequantize_blocks`` in the
# same order and dtype, so the codes are bit-exact (tests/test_golden_codes.py).

CHUNK_VALUES: Final[int] = 1 << 16
"""Values per chunk of rows: 256 KB of float32, small enough to stay in L2."""
_LITTLE_ENDIAN: Final[bool] = bool(np.little_endian)


def block_starts(rows: int, cols: int, block: int, n_groups: int) -> npt.NDArray[np.intp]:
    """Flat index of the first value of every block of a ``(rows, cols)`` matrix, block order."""
    starts = np.arange(n_groups, dtype=np.intp) * block
    if rows == 1:
        return starts
    return (np.arange(rows, dtype=np.intp)[:, None] * cols + starts[None, :]).reshape(-1)


def block_range(matrix: F32, block: int, n_groups: int) -> tuple[F32, F32]:
    """Per-block minimum and maximum ``(rows * n_groups,)`` of a C-contiguous matrix.

    The last group of a row may be short (ragged); its range is that of its real values,
    which equals the range of the edge-padded block ``blocks_of`` builds. A NaN or an
    infinity anywhere shows up in the range, so callers check finiteness on the ranges.
    """
    rows, cols = int(matrix.shape[0]), int(matrix.shape[1])
    flat = matrix.reshape(-1)
    if n_groups == 1 and rows > 1:  # one block per row: a plain row reduction is faster
        return np.min(matrix, axis=1), np.max(matrix, axis=1)
    starts = block_starts(rows, cols, block, n_groups)
    lo: F32 = np.minimum.reduceat(flat, starts)
    hi: F32 = np.maximum.reduceat(flat, starts)
    return lo, hi


def params_from_range(lo: F32, hi: F32, bits: int, symmetric: bool) -> tuple[F32, U8]:
    """Scales and zero points from block ranges; the rules of ``symmetric_params`` and
    ``asymmetric_params`` (``max|x| = |max(hi, -lo)|`` exactly)."""
    if symmetric:
        half = float((1 << (bits - 1)) - 1)
        absmax = np.abs(np.maximum(hi, -lo)).astype(np.float64)  # abs: -0.0 of a zero block
        scales = (absmax / half).astype(np.float32)
        return scales, np.full(lo.shape[0], symmetric_zero(bits), dtype=np.uint8)
    qmax = float((1 << bits) - 1)
    low = np.minimum(lo, np.float32(0.0)).astype(np.float64)
    high = np.maximum(hi, np.float32(0.0)).astype(np.float64)
    scales = ((high - low) / qmax).astype(np.float32)
    zeros = np.rint(-low * safe_reciprocal(scales).astype(np.float64))
    np.clip(zeros, 0.0, qmax, out=zeros)
    return scales, zeros.astype(np.uint8)


def _chunk_rows(rows: int, cols: int, per: int) -> int:
    """Rows per chunk: about CHUNK_VALUES values, a multiple of ``per`` so every chunk
    but the last starts on a byte boundary of the packed codes."""
    k = max(1, CHUNK_VALUES // max(cols, 1))
    k = max(per, k - k % per)
    return min(k, rows)


def pack_into(codes: U8, bits: int, out: U8) -> None:
    """Pack a flat array of codes known to be < 2**bits into ``out`` (``ceil(n / per)`` bytes).

    Same layout as ``pack`` (little end first); on a little-endian machine a pair (quad)
    of code bytes is read as one uint16 (uint32) and folded with shifts, three passes
    instead of a strided pass per lane.
    """
    per = 8 // bits
    n = int(codes.shape[0])
    if per == 1:
        np.copyto(out, codes)
        return
    whole = n - n % per
    if whole and _LITTLE_ENDIAN:
        if per == 2:
            v16 = codes[:whole].view(np.uint16)
            w16 = np.right_shift(v16, np.uint16(4))
            w16 |= v16
            np.copyto(out[:whole // 2], w16, casting="unsafe")  # keeps the low byte
        else:
            v32 = codes[:whole].view(np.uint32)
            w32 = np.right_shift(v32, np.uint32(6))
            w32 |= v32
            t32 = np.right_shift(v32, np.uint32(12))
            w32 |= t32
            np.right_shift(v32, np.uint32(18), out=t32)
            w32 |= t32
            np.copyto(out[:whole // 4], w32, casting="unsafe")
    elif whole:
        np.copyto(out[:whole // per], _pack_lanes(codes[:whole], bits))
    if n > whole:
        out[whole // per:] = _pack_lanes(codes[whole:], bits)


def unpack_into(packed: U8, bits: int, out: U8) -> None:
    """Lane-wise inverse of ``pack_into``: the first ``out.size`` codes, written in place."""
    per = 8 // bits
    n = int(out.shape[0])
    if per == 1:
        np.copyto(out, packed[:n])
        return
    whole = n - n % per
    mask = np.uint8((1 << bits) - 1)
    if whole and _LITTLE_ENDIAN:
        # Spread each byte over a uint16 (uint32) of the output itself, then mask the
        # lanes: contiguous passes, ~3.5x faster than writing each lane with stride.
        if per == 2:
            o16 = out[:whole].view(np.uint16)
            np.copyto(o16, packed[:whole // 2])
            t16 = np.left_shift(o16, np.uint16(4))
            o16 |= t16
            o16 &= np.uint16(0x0F0F)
        else:
            o32 = out[:whole].view(np.uint32)
            np.copyto(o32, packed[:whole // 4])
            t32 = np.left_shift(o32, np.uint32(6))
            o32 |= t32
            np.left_shift(o32, np.uint32(12), out=t32)
            o32 |= t32
            o32 &= np.uint32(0x03030303)
    elif whole:
        lanes = out[:whole].reshape(-1, per)
        src = packed[:whole // per]
        for lane in range(per):
            shift = _SHIFTS[bits][lane]
            if shift:
                np.right_shift(src, np.uint8(shift), out=lanes[:, lane])
                if lane < per - 1:
                    lanes[:, lane] &= mask
            else:
                np.bitwise_and(src, mask, out=lanes[:, lane])
    if n > whole:
        last = int(packed[whole // per])
        for lane in range(n - whole):  # at most 3 codes of a last, partly filled byte
            out[whole + lane] = (last >> _SHIFTS[bits][lane]) & ((1 << bits) - 1)


_REPEAT_MAX: Final[int] = 4096


def per_value(params: npt.NDArray[Any], block: int) -> npt.NDArray[Any]:
    """Per-block values ``(m, n_groups)`` spread over their blocks, ``(m, n_groups, block)``.

    A broadcast ``(m, n, 1)`` operand makes NumPy call its inner loop once per block
    (64 values), which measured 5-8x slower than ``np.repeat`` followed by a plain
    elementwise operation; a block longer than ``_REPEAT_MAX`` keeps the broadcast.
    """
    m, n = int(params.shape[0]), int(params.shape[1])
    if block > _REPEAT_MAX:
        return params[:, :, None]
    return np.repeat(params.reshape(-1), block).reshape(m, n, block)


def quantize_matrix(matrix: F32, block: int, n_groups: int, bits: int, scales: F32,
                    zeros: U8) -> U8:
    """Packed codes of a C-contiguous ``(rows, cols)`` float32 matrix under given block
    parameters (from ``params_from_range``), chunk by chunk; ``matrix`` is only read.

    Equal, byte for byte, to ``pack(quantize_with(blocks_of(matrix), scales, zeros, bits))``
    restricted to the real values.
    """
    rows, cols = int(matrix.shape[0]), int(matrix.shape[1])
    per = 8 // bits
    qmax = float((1 << bits) - 1)
    inv = safe_reciprocal(scales).reshape(rows, n_groups)
    zf = zeros.astype(inv.dtype).reshape(rows, n_groups)
    one_zero = bool(zeros.size) and bool(np.all(zeros == zeros[0]))  # symmetric schemes
    zero0 = float(zeros[0]) if zeros.size else 0.0
    width = block * n_groups
    ragged = width != cols
    out = np.empty(-(-rows * cols // per), dtype=np.uint8)
    k = _chunk_rows(rows, cols, per)
    work = np.empty(k * width, dtype=inv.dtype)
    codes = np.empty(k * width, dtype=np.uint8)
    padded = np.empty((k, width), dtype=np.float32) if ragged else np.empty((0, 0), np.float32)
    for r0 in range(0, rows, k):
        r1 = min(rows, r0 + k)
        m = r1 - r0
        src = matrix[r0:r1]
        if ragged:  # edge padding, as blocks_of does, only for this chunk
            np.copyto(padded[:m, :cols], src)
            np.copyto(padded[:m, cols:], src[:, cols - 1:cols])
            src = padded[:m]
        s3 = src.reshape(m, n_groups, block)
        t3 = work[:m * width].reshape(m, n_groups, block)
        np.multiply(s3, per_value(inv[r0:r1], block), out=t3)
        np.rint(t3, out=t3)
        if one_zero:  # one zero point for all blocks: a scalar add, no per-block broadcast
            t3 += zero0
        else:
            t3 += per_value(zf[r0:r1], block)
        np.clip(t3, 0.0, qmax, out=t3)
        c = codes[:m * width]
        np.copyto(c.reshape(m, n_groups, block), t3, casting="unsafe")
        if ragged:
            c = np.ascontiguousarray(c.reshape(m, width)[:, :cols]).reshape(-1)
        start = r0 * cols // per
        pack_into(c, bits, out[start:start + -(-m * cols // per)])
    return out


def dequantize_matrix(packed: U8, rows: int, cols: int, block: int, n_groups: int, bits: int,
                      scales: F32, zeros: U8) -> F32:
    """``(code - zero) * scale`` as a ``(rows, cols)`` float32 matrix, unpacking a chunk of
    rows at a time into one small buffer (the arithmetic of ``dequantize_blocks``)."""
    per = 8 // bits
    out = np.empty((rows, cols), dtype=np.float32)
    s2 = scales.reshape(rows, n_groups)
    z2 = zeros.astype(np.float32).reshape(rows, n_groups)
    one_zero = bool(zeros.size) and bool(np.all(zeros == zeros[0]))  # symmetric schemes
    zero0 = np.float32(zeros[0]) if zeros.size else np.float32(0.0)
    width = block * n_groups
    ragged = width != cols
    k = _chunk_rows(rows, cols, per)
    codes = np.empty(k * width, dtype=np.uint8)
    work = np.empty((k, width), dtype=np.float32) if ragged else np.empty((0, 0), np.float32)
    for r0 in range(0, rows, k):
        r1 = min(rows, r0 + k)
        m = r1 - r0
        start = r0 * cols // per
        c = codes[:m * cols]
        unpack_into(packed[start:start + -(-m * cols // per)], bits, c)
        if ragged:
            c3 = np.zeros((m, width), dtype=np.uint8)
            c3[:, :cols] = c.reshape(m, cols)
            t3 = work[:m].reshape(m, n_groups, block)
            np.subtract(c3.reshape(m, n_groups, block), per_value(z2[r0:r1], block), out=t3)
            with np.errstate(over="ignore"):
                t3 *= per_value(s2[r0:r1], block)
            np.clip(t3, -_F32_MAX, _F32_MAX, out=t3)  # saturate as dequantize_blocks does
            np.copyto(out[r0:r1], work[:m, :cols])
        else:
            o3 = out[r0:r1].reshape(m, n_groups, block)
            if one_zero:
                np.subtract(c.reshape(m, n_groups, block), zero0, out=o3)
            else:
                np.subtract(c.reshape(m, n_groups, block), per_value(z2[r0:r1], block), out=o3)
            with np.errstate(over="ignore"):
                o3 *= per_value(s2[r0:r1], block)
            np.clip(o3, -_F32_MAX, _F32_MAX, out=o3)  # saturate as dequantize_blocks does
    return out
