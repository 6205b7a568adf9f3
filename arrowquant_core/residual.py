"""Residual 2-bit quantization: two successive sign (1-bit) steps per group.

Residual binarization (Li et al., "Performance Guaranteed Network Acceleration via
High-Order Residual Quantization", HORQ, ICCV 2017; Ghasemzadeh et al., ReBNet, 2017;
the issue calls it "R2Q-style") approximates each group ``w (b,)`` by::

    w ~= m + a1 * s1 + a2 * s2,      s1, s2 in {-1, +1}^b

Greedy construction (``residual2_greedy``): ``m = mean(w)``; ``s1 = sign(w - m)``,
``a1 = mean(|w - m|)`` (the optimal scale for a fixed sign vector); ``r = w - m - a1 s1``,
``s2 = sign(r)``, ``a2 = mean(|r|)``. The four levels ``m +- a1 +- a2`` form a
*non-uniform* lattice (the two outer gaps equal, ``2 min(a1, a2)``, the middle one
free), so it does not fit the affine ``(code - zero) * scale`` grid of ``kernels.py``.

Refinement (``residual2_refine``): for fixed signs the error is linear least squares
in ``theta = (m, a1, a2)``: with ``A = [1, s1, s2] (b, 3)``, ``theta = argmin ||w - A
theta||^2`` solves the 3x3 normal equations ``(A^T A) theta = A^T w`` (pseudo-inverse
when a sign pattern is degenerate, e.g. a constant group). It never increases the
error of the greedy parameters, which are one feasible ``theta``. Alternating it with
reassigning every value to the nearest of the four levels (which never increases the
error either) is a Lloyd-style descent. That descent gets stuck from the greedy start
(~15 % of exact-lattice test blocks were not recovered), so ``residual2_quantize_blocks``
runs it from three starts -- the greedy signs, and nearest-level codes for outer levels
at the block's min/max with inner-gap ratios ``RANGE_STARTS`` -- and keeps per block
the start with the lowest error (never above the greedy one).

Codes: ``code = 2 * [s1 > 0] + [s2 > 0]`` in ``[0, 3]``, value ``m + a1 (2 b1 - 1) +
a2 (2 b0 - 1)``. Storage needs, per block, three float32 parameters ``(m, a1, a2)``
(12 bytes, vs 4 + 1 for an affine group) instead of scale and zero point, and a
method tag saying the codes are residual signs, not affine.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np
import numpy.typing as npt

from arrowquant_core.errors import ConfigurationError, QuantizationError
from arrowquant_core.kernels import residual2_dequantize_blocks, residual2_levels
from arrowquant_core.schemes import Scheme, get_scheme
from arrowquant_core.tensor import as_float32, blocks_of

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
U8 = npt.NDArray[np.uint8]

DEFAULT_ITERS: Final[int] = 3
RANGE_STARTS: Final[tuple[float, ...]] = (0.02, 1.0 / 3.0)
"""Inner-gap ratios ``a2 / (a1 + a2)`` of the min/max starts (1/3 = uniform levels)."""
PINV_RCOND: Final[float] = 1e-10


def _signs(codes: U8) -> tuple[F64, F64]:
    s1 = (codes >> 1).astype(np.float64) * 2.0 - 1.0
    s2 = (codes & 1).astype(np.float64) * 2.0 - 1.0
    return s1, s2


def residual2_refine(blocks: F32, codes: U8) -> F32:
    """Least-squares ``(m, a1, a2)`` per block for fixed sign codes; ``(n, 3)`` float32.

    >>> x = np.array([[-3.0, -1.0, 1.0, 3.0]], np.float32)
    >>> residual2_refine(x, np.array([[0, 1, 2, 3]], np.uint8)).tolist()
    [[0.0, 2.0, 1.0]]
    """
    x = blocks.astype(np.float64)
    s1, s2 = _signs(codes)
    b = float(x.shape[1])
    n = int(x.shape[0])
    g = np.empty((n, 3, 3), dtype=np.float64)
    t1 = s1.sum(axis=1)
    t2 = s2.sum(axis=1)
    t12 = (s1 * s2).sum(axis=1)
    g[:, 0, 0] = b
    g[:, 1, 1] = b
    g[:, 2, 2] = b
    g[:, 0, 1] = g[:, 1, 0] = t1
    g[:, 0, 2] = g[:, 2, 0] = t2
    g[:, 1, 2] = g[:, 2, 1] = t12
    rhs = np.stack([x.sum(axis=1), (s1 * x).sum(axis=1), (s2 * x).sum(axis=1)], axis=1)
    theta = np.zeros((n, 3), dtype=np.float64)
    det = np.linalg.det(g)
    ok = np.abs(det) > 1e-9 * b ** 3
    if bool(np.any(ok)):
        theta[ok] = np.linalg.solve(g[ok], rhs[ok][:, :, None])[:, :, 0]
    if not bool(np.all(ok)):
        # Degenerate sign patterns (a level pair unused): minimum-norm least squares.
        bad = ~ok
        theta[bad] = (np.linalg.pinv(g[bad], rcond=PINV_RCOND) @ rhs[bad][:, :, None])[:, :, 0]
    # Near float32's max the float64 optimum can pass it: saturate, never store inf.
    limit = float(np.finfo(np.float32).max)
    np.clip(theta, -limit, limit, out=theta)
    return theta.astype(np.float32)


def _nearest(blocks: F32, params: F32) -> U8:
    """Code of the nearest of the four levels, via the three midpoints of the sorted levels."""
    levels = residual2_levels(params)
    order = np.argsort(levels, axis=1, kind="stable")
    ordered = np.take_along_axis(levels, order, axis=1)
    mids = ordered[:, :3] * np.float32(0.5)
    mids += ordered[:, 1:] * np.float32(0.5)  # halves first: no overflow near float32's max
    rank = (blocks > mids[:, 0:1]).astype(np.intp)
    rank += blocks > mids[:, 1:2]
    rank += blocks > mids[:, 2:3]
    return np.take_along_axis(order, rank, axis=1).astype(np.uint8)


def _sq_error(blocks: F32, codes: U8, params: F32) -> F64:
    d = residual2_dequantize_blocks(codes, params).astype(np.float64)
    d -= blocks
    np.square(d, out=d)
    out: F64 = np.sum(d, axis=1)
    return out


def residual2_greedy(blocks: F32) -> tuple[U8, F32]:
    """The plain two-step residual sign quantizer (no refinement).

    Residuals of a block near float32's max (``x - m`` up to twice the max) overflow
    float32; such input is redone in float64 with the parameters saturated, so finite
    weights never give inf levels. Ordinary blocks keep the float32 arithmetic."""
    with np.errstate(over="ignore", invalid="ignore"):
        codes, params = _greedy(blocks.astype(np.float32))
    if not bool(np.all(np.isfinite(params))):
        codes, params64 = _greedy(blocks.astype(np.float64))
        limit = float(np.finfo(np.float32).max)
        np.clip(params64, -limit, limit, out=params64)
        params = params64.astype(np.float32)
    return codes, params


def _greedy(x: npt.NDArray[np.floating[Any]]) -> tuple[U8, npt.NDArray[np.floating[Any]]]:
    m = np.mean(x, axis=1, keepdims=True, dtype=np.float64).astype(x.dtype)
    r = x - m
    b1 = r >= 0
    a1 = np.mean(np.abs(r), axis=1, keepdims=True, dtype=np.float64).astype(x.dtype)
    r -= np.where(b1, a1, -a1)
    b2 = r >= 0
    a2 = np.mean(np.abs(r), axis=1, keepdims=True, dtype=np.float64).astype(x.dtype)
    codes = (b1.astype(np.uint8) * np.uint8(2) + b2.astype(np.uint8)).astype(np.uint8)
    return codes, np.concatenate([m, a1, a2], axis=1)


def _range_start(blocks: F32, ratio: float) -> U8:
    """Nearest-level codes for outer levels at min/max and inner gap ratio ``a2/(a1+a2)``."""
    lo = np.min(blocks, axis=1)
    hi = np.max(blocks, axis=1)
    half = hi * np.float32(0.5) - lo * np.float32(0.5)  # halves first: no overflow
    params = np.stack([hi * np.float32(0.5) + lo * np.float32(0.5), half * np.float32(1.0 - ratio),
                       half * np.float32(ratio)], axis=1).astype(np.float32)
    return _nearest(blocks, params)


def residual2_quantize_blocks(blocks: F32, iters: int = DEFAULT_ITERS) -> tuple[U8, F32]:
    """Residual 2-bit with least-squares refinement; best of several starts per block.

    Starts (module docstring): the greedy residual signs, and nearest-level codes for
    outer levels at the block's min/max with inner-gap ratios ``RANGE_STARTS``. Each
    start runs ``iters`` rounds of (least squares, nearest level) and a final least
    squares fit; each block keeps the start with the lowest squared error. The 0.02
    start recovers data lying exactly on a lattice ``m +- a1 +- a2`` (with both outer
    levels present and ``min(a1, a2) / (a1 + a2) > 0.01``): its assignment is then
    already correct and the least-squares fit is exact.

    Returns ``(codes (n, b) uint8 in [0, 3], params (n, 3) float32 [m, a1, a2])``.

    >>> c, p = residual2_quantize_blocks(np.array([[-3.0, -1.0, 1.0, 3.0]], np.float32))
    >>> residual2_dequantize_blocks(c, p).tolist()
    [[-3.0, -1.0, 1.0, 3.0]]
    """
    if iters < 0:
        raise ConfigurationError(f"residual 2-bit: iters = {iters} must be >= 0")
    x = np.ascontiguousarray(blocks, dtype=np.float32)
    codes, params = residual2_greedy(x)
    if iters == 0:
        return codes, params
    best_codes = codes
    best_params = params
    best_err = _sq_error(x, codes, params)
    starts: list[U8] = [codes] + [_range_start(x, r) for r in RANGE_STARTS]
    for start in starts:
        c = start
        p = residual2_refine(x, c)
        for _ in range(iters - 1):
            c = _nearest(x, p)
            p = residual2_refine(x, c)
        err = _sq_error(x, c, p)
        better = err < best_err
        best_err[better] = err[better]
        best_codes[better] = c[better]
        best_params[better] = p[better]
    return best_codes, best_params


def residual2_quantize(array: object, scheme: Scheme | str, name: str = "tensor",
                       iters: int = DEFAULT_ITERS) -> tuple[U8, F32]:
    """Residual 2-bit codes and per-group params for a tensor, grouped like ``scheme``.

    Only the scheme's layout (group size) is used; its bit width must be 2.
    """
    sch = get_scheme(scheme) if isinstance(scheme, str) else scheme
    if sch.bits != 2:
        raise ConfigurationError(f"tensor {name!r}: residual 2-bit needs a 2-bit scheme, got {sch.name}")
    values, _dtype = as_float32(array, name)
    blocks, _layout = blocks_of(values, sch)
    return residual2_quantize_blocks(blocks, iters)


def residual2_roundtrip(array: object, scheme: Scheme | str, name: str = "tensor",
                        iters: int = DEFAULT_ITERS) -> F32:
    """Quantize with residual 2-bit and dequantize back to float32 in the original shape."""
    sch = get_scheme(scheme) if isinstance(scheme, str) else scheme
    values, _dtype = as_float32(array, name)
    blocks, (rows, cols, block, n_groups) = blocks_of(values, sch)
    if sch.bits != 2:
        raise ConfigurationError(f"tensor {name!r}: residual 2-bit needs a 2-bit scheme, got {sch.name}")
    codes, params = residual2_quantize_blocks(blocks, iters)
    out = residual2_dequantize_blocks(codes, params)
    if not bool(np.all(np.isfinite(out))):
        raise QuantizationError(f"tensor {name!r}: residual 2-bit produced non-finite values")
    return np.ascontiguousarray(out.reshape(rows, n_groups * block)[:, :cols]).reshape(values.shape)
