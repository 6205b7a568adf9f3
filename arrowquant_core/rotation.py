"""Randomized Hadamard rotation of a weight's input dimension (incoherence processing).

QuIP# (Tseng et al., "QuIP#: Even Better LLM Quantization with Hadamard Incoherence and
Lattice Codebooks", arXiv:2402.04396, section 3) and QuaRot (Ashkboos et al.,
arXiv:2404.00456) multiply weights by a random orthogonal ``R = D B``: ``D`` a diagonal
of random signs, ``B`` a (block-)Hadamard matrix normalised to be orthogonal. A weight
row's outliers are spread over its block, so the rotated weights are close to Gaussian
and a uniform grid wastes fewer levels; the layer is unchanged because
``W x = (W R)(R^T x)``.

Where the inverse can be folded, for BERT (MiniLM), and what we do instead:

- The input of Q/K/V and of the FFN's first Linear is a post-LayerNorm residual stream.
  BERT is *post*-LN: ``LN(x + f(x))`` subtracts the mean and multiplies by a
  per-feature ``gamma`` after every residual add, so neither the residual stream nor
  the LN can be rotated (QuaRot's trick turns *pre*-LN into RMSNorm and rotates the
  stream; that does not exist here). Not foldable.
- The FFN's second Linear reads GELU outputs: a nonlinearity per feature, not foldable.
- The attention output Linear reads ``softmax(QK^T) V`` per head: rotating V's output
  rows inside each head (block size = head size 32) and the output Linear's input
  columns with the same ``R`` is exact (QuaRot's per-head value/output rotation). Only
  2 of 6 Linears per layer, and only with blocks of 32.

So instead of folding, we store the quantized *rotated* weight and undo the rotation
when dequantizing (``unrotate``: ``W ~= Q(W R) R^T``), which is what QuIP# does at
inference with a fast Hadamard transform on the activations (``x R``, O(n log n) per
token). The weights the model sees are the dequantized ones, so every metric measures
the real effect; an inference engine reading our format applies ``R`` to activations.

GPTQ in the rotated basis needs the rotated Hessian ``R^T H R`` (``rotate_hessian``).
The signs come from ``numpy.random.PCG64`` raw output with a fixed seed per width
(NumPy guarantees a bit generator's stream), so the rotation is a function of the
tensor's width alone and nothing has to be stored. The transform is a butterfly of
adds (no BLAS), so it gives the same bits on any machine and thread count.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np
import numpy.typing as npt

from arrowquant_core.errors import ConfigurationError

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
Floats = npt.NDArray[Any]

SIGN_SEED: Final[int] = 0x41515254  # "AQRT"
BLOCK_SIZES: Final[tuple[int, ...]] = (32, 64, 128, 256)

# Methods whose codes are of the rotated weight, and their Hadamard block size. The one
# table ``tensor.dequantize_float32`` reads to undo the rotation; ``methods.py`` rows
# name the same block sizes.
ROTATED_METHODS: Final[dict[str, int]] = {"gptq-ih": 64, "iclip-h": 64, "gptq-kh": 64, "gptq-kh128": 128,
                                       "gptq-khr": 64}


def signs(cols: int) -> F32:
    """``cols`` random signs (+1 / -1), fixed by the width.

    >>> signs(4).tolist() == signs(4).tolist()
    True
    """
    raw = np.random.PCG64(SIGN_SEED + cols).random_raw(cols)
    out: F32 = np.where((raw & np.uint64(1)) == 0, 1.0, -1.0).astype(np.float32)
    return out


def check_block(cols: int, block: int, name: str) -> None:
    if block not in BLOCK_SIZES:
        raise ConfigurationError(f"tensor {name!r}: Hadamard block {block} is not one of {list(BLOCK_SIZES)}")
    if cols % block:
        raise ConfigurationError(f"tensor {name!r}: {cols} input columns are not a multiple of the "
                                 f"Hadamard block {block}")


def fwht(matrix: Floats, block: int) -> Floats:
    """Orthonormal Walsh-Hadamard transform of every run of ``block`` columns (Sylvester order).

    >>> fwht(np.array([[1.0, 1.0]]), 2).round(6).tolist()
    [[1.414214, 0.0]]
    """
    rows, cols = int(matrix.shape[0]), int(matrix.shape[1])
    n = rows * (cols // block)
    # Butterflies on the transposed layout (block, n): the two halves of every stage are
    # contiguous slabs, where on (n, block) they were strided runs of h values (h = 1, 2...),
    # ~10x slower on MiniLM's 1536-wide Hessians. Same pairs, same stage order, same
    # a + b and a - b: the result is bit-identical to the row-wise butterfly.
    x = np.ascontiguousarray(np.asarray(matrix).reshape(n, block).T)
    y = np.empty_like(x)
    h = 1
    while h < block:
        v = x.reshape(block // (2 * h), 2, h * n)
        u = y.reshape(block // (2 * h), 2, h * n)
        np.add(v[:, 0], v[:, 1], out=u[:, 0])
        np.subtract(v[:, 0], v[:, 1], out=u[:, 1])
        x, y = y, x
        h *= 2
    x *= x.dtype.type(1.0 / np.sqrt(block))
    out: Floats = np.ascontiguousarray(x.T).reshape(rows, cols)
    return out


def rotate(matrix: Floats, block: int) -> Floats:
    """``matrix R`` (rotate the columns): signs, then block Hadamard."""
    cols = int(matrix.shape[1])
    return fwht(matrix * signs(cols).astype(matrix.dtype), block)


def unrotate(matrix: Floats, block: int) -> Floats:
    """``matrix R^T``, the inverse of ``rotate`` (the block Hadamard is symmetric)."""
    cols = int(matrix.shape[1])
    out = fwht(matrix, block)
    out *= signs(cols).astype(out.dtype)
    return out


def _fwht_rows(x: F64, y: F64, block: int) -> tuple[F64, F64]:
    """``fwht`` of the transpose, transposed back, in place: the butterfly runs down every
    run of ``block`` rows of the C-contiguous float64 matrix ``x``, where both halves of a
    stage are contiguous slabs already (same pairs and order as ``fwht``). ``y`` is a
    scratch matrix of the same shape; returns (result, the other buffer), both the
    caller's arrays, so no copy is made."""
    rows, cols = int(x.shape[0]), int(x.shape[1])
    # one run of ``block`` rows at a time: the runs are independent, and all stages of one
    # (64 x 1536 float64: 786 KB) stay in cache, where whole-matrix stages streamed the
    # matrix through memory three times a stage
    per = max(1, (1 << 20) // max(1, block * cols * 8))  # runs per pass: about 1 MB
    for r0 in range(0, rows, per * block):
        r1 = min(rows, r0 + per * block)
        a, b = x[r0:r1], y[r0:r1]
        n = (r1 - r0) // block
        h = 1
        while h < block:
            v = a.reshape(n, block // (2 * h), 2, h * cols)
            u = b.reshape(n, block // (2 * h), 2, h * cols)
            np.add(v[:, :, 0], v[:, :, 1], out=u[:, :, 0])
            np.subtract(v[:, :, 0], v[:, :, 1], out=u[:, :, 1])
            a, b = b, a
            h *= 2
    stages = int(block).bit_length() - 1
    if stages % 2:
        x, y = y, x
    x *= 1.0 / np.sqrt(block)
    return x, y


_TILE: Final[int] = 128  # rows and columns of a tile of the transposed passes


def rotate_hessian(hessian: Floats, block: int) -> F32:
    """``R^T H R`` in float64, returned float32 and exactly symmetric.

    Computed as ``R^T (R^T H)^T`` (equal to ``R^T H R`` for symmetric ``H``) with the
    butterfly down the rows (``_fwht_rows``): one transposed copy of the 1536-wide float64
    Hessians instead of five, which made this 40% of a rotated GPTQ run on MiniLM. Two
    buffers serve every step, the butterflies run a run of rows at a time and the
    transposed passes a tile at a time: the same operations on the same values, so the
    same bits (tests/test_rotation.py), in 0.29-0.35 s for MiniLM's 37 Hessians instead of
    0.66-0.77 s (compiled core, one thread)."""
    h = np.asarray(hessian, dtype=np.float64)
    s = signs(int(h.shape[0])).astype(np.float64)[:, None]
    # two float64 buffers for the whole computation (fresh pages of a 1536-wide float64
    # Hessian cost about what a butterfly stage does); every value is computed by the same
    # operations in the same order as with a new array per step
    x = np.multiply(h, s)
    y = np.empty_like(x)
    left, spare = _fwht_rows(x, y, block)  # R^T H
    n = int(h.shape[0])
    # the transposed reads tile by tile (128 x 128 float64 stays in cache): on a 1536-wide
    # Hessian 5.6 ms instead of 21 ms for the whole transposed pass
    for i0 in range(0, n, _TILE):
        for j0 in range(0, n, _TILE):
            i1, j1 = min(n, i0 + _TILE), min(n, j0 + _TILE)
            # (R^T H)^T with the signs, C-contiguous
            np.multiply(left[j0:j1, i0:i1].T, s[i0:i1], out=spare[i0:i1, j0:j1])
    full, spare = _fwht_rows(spare, left, block)  # R^T (R^T H)^T = R^T H^T R
    for i0 in range(0, n, _TILE):
        for j0 in range(0, n, _TILE):
            i1, j1 = min(n, i0 + _TILE), min(n, j0 + _TILE)
            np.add(full[i0:i1, j0:j1], full[j0:j1, i0:i1].T, out=spare[i0:i1, j0:j1])
    spare *= 0.5
    out: F32 = spare.astype(np.float32)
    return out
