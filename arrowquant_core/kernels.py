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

from collections.abc import Iterator
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

CHUNK_VALUES: Final[int] = 1 << 18
"""Values per chunk of rows: 1 MB of float32. Measured on the MiniLM Linear weights
(issue 11 benchmark, ratios to a copy): 32k values 6.8x (INT4 round-to-nearest + pack) /
5.8x (INT4 dequantize), 64k 5.8x / 5.0x, 256k 5.3x / 4.2x, 1M 8.8x / 4.4x -- each NumPy
call costs about a microsecond and a half here, so chunks that fit L2 (512 KB) pay more
in calls than they save in cache misses; the chunk stays well inside L3. Re-measured
once the per-block values became broadcasts (the chunked INT4 quantizer alone / INT4
dequantization into ``out``): 32k 4.5x / 3.7x, 64k 3.6x / 3.1x, 128k 3.2x / 3.0x,
256k 3.4x / 2.2x."""
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


def _chunk_rows(rows: int, cols: int, per: int, chunk_values: int = CHUNK_VALUES) -> int:
    """Rows per chunk: about ``chunk_values`` values, a multiple of ``per`` so every chunk
    but the last starts on a byte boundary of the packed codes."""
    k = max(1, chunk_values // max(cols, 1))
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


def per_value(params: npt.NDArray[Any], block: int) -> npt.NDArray[Any]:
    """Per-block values ``(m, n_groups)`` as a broadcast operand ``(m, n_groups, 1)`` for
    ``(m, n_groups, block)`` data.

    An earlier version expanded them with ``np.repeat`` into an input-sized temporary
    because a hot-cache micro-benchmark favoured it; measured in place on the MiniLM
    weights (issue 11 benchmark), the broadcast took the chunked INT4 quantizer from
    5.2-5.9x to 2.4-3.2x a copy: every chunk-sized temporary is a fresh allocation whose
    pages fault in again (a 1 MB block sits at glibc's mmap threshold), which costs more
    than NumPy's per-block inner-loop calls.
    """
    return params[:, :, None]


def quantize_matrix(matrix: F32, block: int, n_groups: int, bits: int, scales: F32,
                    zeros: U8, chunk_values: int = CHUNK_VALUES) -> U8:
    """Packed codes of a C-contiguous ``(rows, cols)`` float32 matrix under given block
    parameters (from ``params_from_range``), chunk by chunk; ``matrix`` is only read.

    Equal, byte for byte, to ``pack(quantize_with(blocks_of(matrix), scales, zeros, bits))``
    restricted to the real values. ``chunk_values`` (values per chunk of rows) only moves
    the chunk boundaries; tests set it small to cross them.
    """
    rows, cols = int(matrix.shape[0]), int(matrix.shape[1])
    per = 8 // bits
    qmax = float((1 << bits) - 1)
    inv = safe_reciprocal(scales).reshape(rows, n_groups)
    one_zero = bool(zeros.size) and bool(np.all(zeros == zeros[0]))  # symmetric schemes
    zero0 = float(zeros[0]) if zeros.size else 0.0
    width = block * n_groups
    ragged = width != cols
    # rint(x / scale) lies in [-qmax - 1, qmax + 1] (|x| <= hi - lo = qmax * scale, up to
    # float rounding), so adding the zero point and clipping are exact in int8 for codes of
    # up to 4 bits and in int16 for 8-bit codes: one or two bytes per value instead of
    # four. The float64 reciprocals of tiny scales and ragged groups keep the float path.
    integer = inv.dtype == np.float32 and not ragged
    narrow = integer and bits <= 4
    wide = integer and bits == 8
    zf = zeros.astype(inv.dtype).reshape(rows, n_groups)
    z8 = zeros.reshape(rows, n_groups).view(np.int8)
    z16 = zeros.astype(np.int16).reshape(rows, n_groups)
    out = np.empty(-(-rows * cols // per), dtype=np.uint8)
    k = _chunk_rows(rows, cols, per, chunk_values)
    work = np.empty(k * width, dtype=inv.dtype)
    codes = np.empty(k * width, dtype=np.uint8)
    codes16 = np.empty(k * width if wide else 0, dtype=np.int16)
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
        c = codes[:m * width]
        if narrow:
            c8 = c.view(np.int8)
            c3 = c8.reshape(m, n_groups, block)
            np.rint(t3, out=c3, casting="unsafe")  # rounded in NumPy's small buffers, stored as int8
            if one_zero:
                c8 += np.int8(int(zero0))
            else:
                c3 += z8[r0:r1, :, None]
            np.clip(c8, np.int8(0), np.int8(int(qmax)), out=c8)
        elif wide:
            c16 = codes16[:m * width]
            w3 = c16.reshape(m, n_groups, block)
            np.rint(t3, out=w3, casting="unsafe")
            if one_zero:
                c16 += np.int16(int(zero0))
            else:
                w3 += z16[r0:r1, :, None]
            np.clip(c16, np.int16(0), np.int16(int(qmax)), out=c16)
            start = r0 * cols
            np.copyto(out[start:start + m * cols], c16, casting="unsafe")  # 8-bit codes are their own packing
            continue
        else:
            np.rint(t3, out=t3)
            if one_zero:  # one zero point for all blocks: a scalar add, no per-block broadcast
                t3 += zero0
            else:
                t3 += per_value(zf[r0:r1], block)
            np.clip(t3, 0.0, qmax, out=t3)
            np.copyto(c.reshape(m, n_groups, block), t3, casting="unsafe")
        if ragged:
            c = np.ascontiguousarray(c.reshape(m, width)[:, :cols]).reshape(-1)
        start = r0 * cols // per
        pack_into(c, bits, out[start:start + -(-m * cols // per)])
    return out


def dequantize_matrix(packed: U8, rows: int, cols: int, block: int, n_groups: int, bits: int,
                      scales: F32, zeros: U8, out: F32 | None = None,
                      chunk_values: int = CHUNK_VALUES) -> F32:
    """``(code - zero) * scale`` as a ``(rows, cols)`` float32 matrix, unpacking a chunk of
    rows at a time into one reused buffer (the arithmetic of ``dequantize_blocks``).

    ``out``, when given, is a C-contiguous ``(rows, cols)`` float32 array written in place
    and returned: a caller that dequantizes many tensors reuses its pages (a fresh page
    costs several times a copy of it on this machine; issue 11).

    Three measured shortcuts, each bit-identical to the plain arithmetic:
    - ``code - zero`` of codes up to 4 bits lies in [-15, 15]: it is taken in int8 (one
      byte per value) and converted once, exactly, to float32;
    - the saturation to float32's largest finite value is skipped when no product can
      reach it (``qmax * max(scale)`` below half of float32's max), which is every tensor
      but a pathological one;
    - scales and zero points are broadcast per block, never expanded into chunk-sized
      temporaries (see ``per_value``).
    """
    per = 8 // bits
    qmax = (1 << bits) - 1
    if out is None:
        out = np.empty((rows, cols), dtype=np.float32)
    elif out.shape != (rows, cols) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ConfigurationError(f"dequantize_matrix: out must be a C-contiguous ({rows}, {cols}) float32 "
                                 f"array, got {out.dtype} {list(out.shape)}")
    if rows == 0 or cols == 0:
        return out
    width = block * n_groups
    if width != cols:
        return _dequantize_ragged(packed, rows, cols, block, n_groups, bits, scales, zeros, out, chunk_values)
    s2 = scales.reshape(rows, n_groups)
    z2 = zeros.reshape(rows, n_groups)
    one_zero = bool(np.all(zeros == zeros[0]))  # symmetric schemes
    narrow = bits <= 4  # code - zero fits int8
    saturate = float(np.max(scales)) * qmax >= _F32_MAX / 2
    k = _chunk_rows(rows, cols, per, chunk_values)
    diff = np.empty(k * cols if narrow else 0, dtype=np.int8)
    zero8 = np.int8(int(zeros[0])) if narrow else np.int8(0)
    zero32 = np.float32(zeros[0])
    for r0, r1, c in _unpacked_chunks(packed, rows, cols, bits, k):
        m = r1 - r0
        o = out[r0:r1].reshape(-1)
        o3 = o.reshape(m, n_groups, block)
        if narrow:
            d = diff[:m * cols]
            if one_zero:
                np.subtract(c.view(np.int8), zero8, out=d)
            else:
                np.subtract(c.view(np.int8).reshape(m, n_groups, block), z2[r0:r1, :, None].view(np.int8),
                            out=d.reshape(m, n_groups, block))
            with np.errstate(over="ignore"):  # int8 differences converted in NumPy's buffers, exactly
                np.multiply(d.reshape(m, n_groups, block), s2[r0:r1, :, None], out=o3)
        else:
            np.copyto(o, c)
            if one_zero:
                o -= zero32
            else:
                o3 -= z2[r0:r1, :, None].astype(np.float32)
            with np.errstate(over="ignore"):
                o3 *= s2[r0:r1, :, None]
        if saturate:
            np.clip(o, -_F32_MAX, _F32_MAX, out=o)  # as dequantize_blocks does
    return out


def _unpacked_chunks(packed: U8, rows: int, cols: int, bits: int, k: int) -> Iterator[tuple[int, int, U8]]:
    """``(r0, r1, codes)`` for row chunks of ``k`` rows: the chunk's codes unpacked into one
    reused buffer (valid until the next chunk is yielded)."""
    per = 8 // bits
    codes = np.empty(k * cols, dtype=np.uint8)
    for r0 in range(0, rows, k):
        r1 = min(rows, r0 + k)
        start = r0 * cols // per
        c = codes[:(r1 - r0) * cols]
        unpack_into(packed[start:start + -(-(r1 - r0) * cols // per)], bits, c)
        yield r0, r1, c


def _dequantize_ragged(packed: U8, rows: int, cols: int, block: int, n_groups: int, bits: int,
                       scales: F32, zeros: U8, out: F32, chunk_values: int) -> F32:
    """``dequantize_matrix`` when the last group of a row is short: each chunk is
    zero-padded to whole groups in a work buffer, then the real columns are copied out."""
    per = 8 // bits
    s2 = scales.reshape(rows, n_groups)
    z2 = zeros.astype(np.float32).reshape(rows, n_groups)
    width = block * n_groups
    k = _chunk_rows(rows, cols, per, chunk_values)
    work = np.empty((k, width), dtype=np.float32)
    padded = np.zeros((k, width), dtype=np.uint8)
    for r0, r1, c in _unpacked_chunks(packed, rows, cols, bits, k):
        m = r1 - r0
        c3 = padded[:m]
        c3[:, :cols] = c.reshape(m, cols)
        t3 = work[:m].reshape(m, n_groups, block)
        np.subtract(c3.reshape(m, n_groups, block), per_value(z2[r0:r1], block), out=t3)
        with np.errstate(over="ignore"):
            t3 *= per_value(s2[r0:r1], block)
        np.clip(t3, -_F32_MAX, _F32_MAX, out=t3)  # saturate as dequantize_blocks does
        np.copyto(out[r0:r1], work[:m, :cols])
    return out
