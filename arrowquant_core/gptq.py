"""GPTQ: second-order, calibration-based rounding of a Linear weight.

GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", arXiv:2210.17323; reference code IST-DASLab/gptq
``gptq.py`` and AutoGPTQ) quantizes a weight ``W (rows = outputs, cols = inputs)``
one input column at a time and spreads each column's rounding error over the columns
not yet quantized, so that the layer *output* ``X W^T`` moves as little as possible
on calibration activations ``X (n, cols)``. The layer-wise objective has Hessian
``H = 2 X^T X / n`` (``hessian_from_activations``; ``HessianAccumulator`` sums it
over batches).

What this implementation does, step by step (paper section 3 / Algorithm 1):

1. ``H`` is validated ((cols, cols), finite, symmetric up to rounding). *Dead* input
   columns (``H[j, j] == 0``: the feature was always 0 in the calibration set) get
   ``H[j, j] = 1``. Unlike the reference code we do **not** zero those weights: with
   ``H[j, :] = 0`` the column's rounding error is propagated nowhere, so it is plainly
   rounded (RTN) and the weight stays meaningful for inputs the calibration set missed.
2. Dampening: ``H += damp * mean(diag(H)) * I`` (``damp = 0.01`` as in the paper). If
   the Cholesky factorisation still fails (not positive definite, e.g. a Hessian
   handed in from elsewhere), the dampening is multiplied by 10 up to 6 times and a
   ``GPTQDampingWarning`` names the tensor and the dampening finally used.
3. ``U``, the upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``), is obtained without
   forming ``H^-1``: with ``J`` the exchange matrix, ``chol(J H J) = L'`` gives
   ``U = J L'^-1 J``; ``L'^-1`` comes from one recursive blocked Cholesky-and-inverse
   made of matrix products (NumPy has no ``trtri``; ``np.linalg.inv`` of the factor is
   ~4x slower on 1536x1536).
4. Columns are processed in lazy batches of ``block_size`` (128). Inside a batch the
   update is left-looking: column ``j`` is first brought up to date with one
   matrix-vector product of the batch's earlier errors (``e = (w - q) / U[j, j]``) and
   ``U[i1:j, j]``, then rounded; at the end of the batch its errors update all later
   columns with one matrix product (the paper's right-looking rank-1 updates do the
   same arithmetic but allocate a temporary per column, ~2x slower in NumPy).
5. Groups: without ``act_order`` a group's scale and integer zero point are computed
   (by the same min/max rule as round-to-nearest, ``kernels.asymmetric_params`` /
   ``symmetric_params``) from the *current, error-updated* weights when the group's
   first column is reached. Unlike the reference code (which reads the stale
   block-start copy for a group starting mid-batch), pending updates are applied
   first, so this equals the textbook column-by-column algorithm exactly.
6. ``act_order`` ("desc_act"): columns are visited in order of decreasing ``H[j, j]``.
   Our format stores groups as contiguous runs of input columns, so we use AutoGPTQ's
   *static groups*: every group's parameters are computed up front from the original
   weights, and a column uses the parameters of the group it belongs to in the
   original order. (The alternative, GPTQ-for-LLaMa's ``g_idx`` permutation of groups,
   would need a per-column group index in storage.)
7. ``mse_clip`` (the reference quantizer's ``mse=True``): each group's range is chosen
   by the MSE clip search of ``clip.py`` on the current weights instead of min/max.
   On MiniLM INT2 g64 it lifts the sentence-embedding cosine from 0.45 to 0.73.

The loop runs in float32 on the transposed weight (a column is a contiguous row).
Embedding tables see no input activations, so GPTQ does not apply to them:
``methods.quantize_tensor`` gives them MSE clip search (``clip.quantize_clip``).
"""

from __future__ import annotations

from typing import Any, Final
import warnings

import numpy as np
import numpy.typing as npt

from arrowquant_core.clip import DEFAULT_GRID, clip_search_blocks
from arrowquant_core.errors import ConfigurationError, QuantizationError
from arrowquant_core.kernels import asymmetric_params, safe_reciprocal, symmetric_params, symmetric_zero
from arrowquant_core.schemes import Scheme, get_scheme
from arrowquant_core.tensor import QuantizedTensor, as_float32, from_codes, layout

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
U8 = npt.NDArray[np.uint8]
Floats = npt.NDArray[Any]

DAMP_RETRIES: Final[int] = 6
"""How many times the dampening is multiplied by 10 before giving up."""
TRI_INV_LEAF: Final[int] = 64
"""Below this size the recursive inverse Cholesky calls LAPACK directly."""
SYMMETRY_RTOL: Final[float] = 1e-4
PRODUCT_ROWS: Final[int] = 4096
"""Rows per float32 ``X^T X`` product in ``HessianAccumulator``: bounds how many float32
terms one Hessian entry sums before it is added in float64."""


class GPTQDampingWarning(UserWarning):
    """The Hessian needed more dampening than asked to be positive definite."""


class HessianAccumulator:
    """Accumulate ``H = 2 X^T X / n`` over batches of activations ``X (n_i, cols)``.

    Each batch's ``X^T X`` is one float32 product over at most ``PRODUCT_ROWS`` rows
    (the precision the GPTQ reference accumulates its whole Hessian in), and the products
    are summed in float64, so that many batches lose nothing -- the scheme dream-mini's
    calibration uses. float32 products take half the time of float64 ones (MiniLM's
    calibration capture 7.5 s -> 5.8 s; issue 11). float64 activations keep float64
    products, and a product that overflows float32 is redone in float64. ``hessian()``
    returns float32. Batches may come from any number of calls (e.g. forward hooks).

    >>> acc = HessianAccumulator(2)
    >>> acc.add(np.array([[1.0, 0.0]], np.float32)); acc.add(np.array([[0.0, 1.0]], np.float32))
    >>> acc.hessian().tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """

    def __init__(self, cols: int, name: str = "tensor") -> None:
        if cols < 1:
            raise ConfigurationError(f"tensor {name!r}: Hessian size {cols} must be >= 1")
        self.cols = cols
        self.name = name
        self.count = 0
        self.sum: F64 = np.zeros((cols, cols), dtype=np.float64)

    def add(self, x: npt.NDArray[np.floating[Any]]) -> None:
        """Add the rows of ``x (n, cols)`` (one row per token / sample)."""
        if x.ndim != 2 or int(x.shape[1]) != self.cols:
            raise QuantizationError(
                f"tensor {self.name!r}: activations of shape {list(x.shape)} do not fit a Hessian "
                f"of {self.cols} input features; expected (n, {self.cols})")
        if not bool(np.all(np.isfinite(x))):
            raise QuantizationError(f"tensor {self.name!r}: activations contain NaN or Inf; "
                                    "calibration activations must be finite")
        wide = x.dtype == np.float64
        rows = int(x.shape[0])
        for r0 in range(0, rows, PRODUCT_ROWS):
            part: Floats = np.ascontiguousarray(x[r0:r0 + PRODUCT_ROWS], dtype=np.float64 if wide else np.float32)
            with np.errstate(over="ignore", invalid="ignore"):  # an overflow is caught just below
                product: Floats = part.T @ part  # one symmetric rank-k update (NumPy calls BLAS syrk for a.T @ a)
            if not wide and not bool(np.all(np.isfinite(product))):
                part = part.astype(np.float64)  # |x| near 1e19: float32's range is too small
                product = part.T @ part
            self.sum += product
        self.count += rows

    def hessian(self) -> F32:
        """``2 X^T X / n`` in float32; raises if no activation was added."""
        if self.count == 0:
            raise QuantizationError(f"tensor {self.name!r}: no activations were collected, "
                                    "so there is no Hessian (was the layer ever called?)")
        return (self.sum * (2.0 / self.count)).astype(np.float32)


def hessian_from_activations(x: npt.NDArray[np.floating[Any]], name: str = "tensor") -> F32:
    """``H = 2 X^T X / n`` (float32) for activations ``x (n, cols)``.

    >>> hessian_from_activations(np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)).tolist()
    [[10.0, 14.0], [14.0, 20.0]]
    """
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise QuantizationError(f"tensor {name!r}: activations of shape {list(x.shape)}; "
                                "need a non-empty 2-D (n, cols) array")
    acc = HessianAccumulator(int(x.shape[1]), name)
    acc.add(x)
    return acc.hessian()


# --- linear algebra --------------------------------------------------------------------

def _inverse_cholesky_lower(a: Floats) -> Floats:
    """``inv(L)`` for the lower Cholesky factor ``L`` of SPD ``a``, by recursive 2x2 blocking.

    With ``a = [[A11, .], [A21, A22]]``: ``L11 = chol(A11)``, ``L21 = A21 L11^-T``,
    ``L22 = chol(A22 - L21 L21^T)`` and ``inv(L)[2,1] = -inv(L22) L21 inv(L11)``. Everything
    above the leaf size is matrix products, ~2x faster than ``np.linalg.cholesky`` followed
    by a triangular inverse on 1536x1536 (NumPy has no ``trtri``). Raises
    ``np.linalg.LinAlgError`` when ``a`` is not positive definite.
    """
    n = int(a.shape[0])
    if n <= TRI_INV_LEAF:
        return np.tril(np.linalg.inv(np.linalg.cholesky(a)))
    k = n // 2
    l11_inv = _inverse_cholesky_lower(np.ascontiguousarray(a[:k, :k]))
    l21 = a[k:, :k] @ l11_inv.T
    schur = a[k:, k:] - l21 @ l21.T
    l22_inv = _inverse_cholesky_lower(schur)
    out = np.zeros_like(a)
    out[:k, :k] = l11_inv
    out[k:, k:] = l22_inv
    out[k:, :k] = -(l22_inv @ (l21 @ l11_inv))
    return out


def inverse_cholesky_upper(h: Floats) -> Floats:
    """Upper ``U`` with ``inv(h) = U^T U``, for symmetric positive definite ``h``.

    With ``J`` the exchange matrix and ``J h J = L' L'^T``: ``U = J inv(L') J``.
    Raises ``np.linalg.LinAlgError`` if ``h`` is not positive definite.
    """
    flipped = np.ascontiguousarray(h[::-1, ::-1])
    return np.ascontiguousarray(_inverse_cholesky_lower(flipped)[::-1, ::-1])


def prepare_hessian(hessian: object, cols: int, damp: float, name: str,
                    float32: bool = False) -> tuple[Floats, float]:
    """Validate, fix dead columns, dampen; return ``(U, damp used)``.

    ``float32=True`` factors in float32 (about 1.8x faster on MiniLM's 1536-wide Hessian,
    where the factorization was half of a GPTQ run): the loop runs in float32 anyway, and
    the reference implementation (IST-DASLab/gptq ``gptq.py``) factors ``H`` in the
    weight's float32 too. Used by the ``igptq`` methods; plain ``gptq`` keeps float64 so
    its golden codes (tests/golden/kernel_codes.json) do not move.
    """
    if not isinstance(hessian, np.ndarray):
        raise QuantizationError(f"tensor {name!r}: Hessian must be a numpy array, got {type(hessian).__name__}")
    if hessian.shape != (cols, cols):
        raise QuantizationError(
            f"tensor {name!r}: Hessian shape {list(hessian.shape)} does not match the weight's "
            f"{cols} input columns; expected [{cols}, {cols}]")
    h: Floats = np.array(hessian, dtype=np.float32 if float32 else np.float64, copy=True)
    # A finite sum implies finite entries (any NaN/Inf propagates), so one reduction
    # usually settles it; the full check only runs when the sum is not finite.
    if not np.isfinite(float(np.sum(h))) and not bool(np.all(np.isfinite(h))):
        raise QuantizationError(f"tensor {name!r}: Hessian contains NaN or Inf; it must be finite")
    scale = float(np.max(np.abs(h))) if h.size else 0.0
    asym = float(np.max(np.abs(h - h.T))) if h.size else 0.0
    if asym > SYMMETRY_RTOL * max(scale, 1e-30):
        raise QuantizationError(f"tensor {name!r}: Hessian is not symmetric (max |H - H^T| = "
                                f"{asym:.3g}); H = 2 X^T X / n is")
    diag = np.diagonal(h).copy()
    if bool(np.any(diag < 0)):
        j = int(np.argmin(diag))
        raise QuantizationError(f"tensor {name!r}: Hessian diagonal H[{j},{j}] = {diag[j]:.3g} < 0; "
                                "H = 2 X^T X / n has a non-negative diagonal")
    dead = np.flatnonzero(diag == 0)
    h[dead, dead] = 1.0  # error of a dead column is propagated nowhere (module docstring, 1.)
    base = float(np.mean(np.diagonal(h)))
    idx = np.arange(cols)
    used = damp
    added = 0.0
    for attempt in range(DAMP_RETRIES + 1):
        h[idx, idx] += used * base - added  # dampen in place (h is our own copy)
        added = used * base
        try:
            u = inverse_cholesky_upper(h)
            if bool(np.all(np.isfinite(u))):
                if attempt:
                    warnings.warn(
                        f"tensor {name!r}: Hessian not positive definite with dampening {damp:g} "
                        f"x mean(diag); used {used:g} instead (rule: H + damp*mean(diag)*I must "
                        "have a Cholesky factor)", GPTQDampingWarning, stacklevel=3)
                return u, used
        except np.linalg.LinAlgError:
            pass
        used = used * 10.0 if used > 0 else 1e-6
    raise QuantizationError(f"tensor {name!r}: Hessian is not positive definite even with dampening "
                            f"{used / 10.0:g} x mean(diag); check the calibration activations")


# --- the GPTQ loop ---------------------------------------------------------------------

_F32_MAX: Final[float] = float(np.finfo(np.float32).max)
_EXTREME: Final[float] = 1e30
"""Above this |weight| a float32 GPTQ loop can overflow (errors times Hessian factors)."""


def _group_params(cur_t: Floats, bits: int, symmetric: bool, mse: bool) -> tuple[F32, U8]:
    """Scale and zero per output row for a group given transposed weights ``(g, rows)``."""
    wide = np.clip(cur_t.T, -_F32_MAX, _F32_MAX)  # error updates may leave float32's range
    blocks = np.ascontiguousarray(wide, dtype=np.float32)
    if mse:
        _codes, scales, zeros = clip_search_blocks(blocks, bits, symmetric, DEFAULT_GRID)
        return scales, zeros
    if symmetric:
        return symmetric_params(blocks, bits)
    return asymmetric_params(blocks, bits)


def gptq_matrix(matrix: F32, u: Floats, bits: int, symmetric: bool, group: int, block_size: int,
                perm: npt.NDArray[np.intp] | None, float64: bool = False,
                mse: bool = False, params: tuple[F32, U8] | None = None) -> tuple[U8, F32, U8]:
    """GPTQ on a ``(rows, cols)`` matrix given ``U`` (already permuted if ``perm``).

    Returns ``codes (rows, cols) uint8`` in the original column order and
    ``scales, zeros (rows, n_groups)``. ``float64=True`` runs the loop in float64
    (used by the oracle test to compare codes exactly). ``mse=True`` picks each group's
    range by MSE clip search instead of min/max (module docstring, 7.). ``params``
    (``scales, zeros``, each ``(rows, n_groups)``) fixes every group's parameters up
    front, as static groups do (module docstring, 6.): callers that choose them their
    own way (``kquant.py``: importance-weighted clip search, quantized scales) pass them.
    """
    rows, cols = int(matrix.shape[0]), int(matrix.shape[1])
    n_groups = -(-cols // group)
    qmax = float((1 << bits) - 1)
    ftype = np.float64 if float64 else np.float32
    scales = np.zeros((n_groups, rows), dtype=np.float32)
    zeros = np.zeros((n_groups, rows), dtype=np.uint8)
    wt: Floats = np.array(matrix.T, dtype=ftype, copy=True)  # (cols, rows): a column is a row
    col_group = np.arange(cols) // group
    static = perm is not None or params is not None
    if params is not None:
        scales[:] = np.asarray(params[0], dtype=np.float32).reshape(rows, n_groups).T
        zeros[:] = np.asarray(params[1], dtype=np.uint8).reshape(rows, n_groups).T
    elif perm is not None:
        # Static groups (module docstring, 6.): parameters from the original weights.
        for k in range(n_groups):
            s, z = _group_params(wt[k * group:(k + 1) * group], bits, symmetric, mse)
            scales[k] = s
            zeros[k] = z
    if perm is not None:
        wt = wt[perm]
        col_group = col_group[perm]
    uu: Floats = u.astype(ftype)
    # 1/scale per group, in the dtype ``kernels.safe_reciprocal`` chose (float64 only for
    # subnormal scales), so a column is rounded exactly as ``kernels.quantize_with`` would.
    inv_scales: list[Floats] = [safe_reciprocal(scales[k]) for k in range(n_groups)]
    zero_f: list[Floats] = [zeros[k].astype(ftype) for k in range(n_groups)]  # once per group, not per column
    codes_t = np.empty((cols, rows), dtype=np.uint8)
    q: Floats = np.empty(rows, dtype=ftype)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        count = i2 - i1
        w1 = wt[i1:i2]  # updated from earlier batches; this batch's updates are applied lazily
        err1: Floats = np.zeros((count, rows), dtype=ftype)
        ub = uu[i1:i2, i1:i2]
        w: Floats = np.empty(rows, dtype=ftype)
        for i in range(count):
            j = i1 + i
            k = int(col_group[j])
            if not static and j % group == 0:
                # Current weights of the group's columns: pending updates of this batch
                # applied (left-looking), including columns past the batch.
                end = min(j + group, cols)
                cur = wt[j:end] - uu[i1:j, j:end].T @ err1[:i]
                s, z = _group_params(cur, bits, symmetric, mse)
                scales[k] = s
                zeros[k] = z
                inv_scales[k] = safe_reciprocal(scales[k])
                zero_f[k] = zeros[k].astype(ftype)
            # Left-looking update: column j minus the propagated errors of columns i1..j-1
            # (one matrix-vector product instead of a rank-1 update of the whole batch).
            np.subtract(w1[i], ub[:i, i] @ err1[:i], out=w)
            zf = zero_f[k]
            np.multiply(w, inv_scales[k], out=q)
            np.rint(q, out=q)
            q += zf
            # np.clip's Python wrapper cost more than the arithmetic on 384-wide columns;
            # the two ufuncs give the same values
            np.maximum(q, 0.0, out=q)
            np.minimum(q, qmax, out=q)
            codes_t[j] = q
            q -= zf
            q *= scales[k]  # q is now the dequantized column
            e = err1[i]
            np.subtract(w, q, out=e)
            e /= ub[i, i]
        if i2 < cols:
            wt[i2:] -= uu[i1:i2, i2:].T @ err1
    if perm is not None:
        inverse = np.empty_like(perm)
        inverse[perm] = np.arange(cols)
        codes_t = codes_t[inverse]
    return (np.ascontiguousarray(codes_t.T), np.ascontiguousarray(scales.T),
            np.ascontiguousarray(zeros.T))


def gptq_group_size(scheme: Scheme, shape: tuple[int, ...], name: str) -> int:
    """Columns per group for GPTQ: the scheme's group size, or all columns per channel."""
    if len(shape) < 2:
        raise QuantizationError(f"tensor {name!r}: GPTQ needs a Linear weight (out, in) or a conv weight "
                                f"(out, in, *kernel), got shape {list(shape)}")
    if scheme.granularity == "tensor":
        raise ConfigurationError(
            f"tensor {name!r}: scheme {scheme.name} has one scale per tensor; GPTQ needs per-channel "
            "or per-group scales (choose an int*-channel-* or int*-g*-* scheme)")
    # a conv weight (out, in, kh, kw) is the matrix (out, in*kh*kw) in row-major order, the
    # column order of im2col patches (channel, then kernel row, then kernel column)
    return scheme.group_size if scheme.granularity == "group" else int(np.prod(shape[1:]))


def quantize_gptq(array: object, scheme: Scheme | str, name: str, hessian: object,
                  block_size: int = 128, damp: float = 0.01, act_order: bool = False,
                  mse_clip: bool = False) -> QuantizedTensor:
    """GPTQ-quantize a Linear weight ``(out, in)`` given the input Hessian ``(in, in)``.

    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((256, 64)).astype(np.float32)
    >>> w = rng.standard_normal((8, 64)).astype(np.float32)
    >>> quantize_gptq(w, "int4-g32-asym", "fc", hessian_from_activations(x)).method
    'gptq'
    """
    sch = get_scheme(scheme) if isinstance(scheme, str) else scheme
    check_options(block_size, damp, name)
    values, dtype = as_float32(array, name)
    shape = tuple(int(d) for d in values.shape)
    gptq_group_size(sch, shape, name)
    u, perm = factor_hessian(hessian, int(np.prod(shape[1:])), damp, act_order, name)
    return _gptq_tensor(values, dtype, sch, name, u, perm, block_size, mse_clip)


def check_options(block_size: int, damp: float, name: str) -> None:
    """Raise ConfigurationError for a lazy-batch size < 1 or a negative / non-finite damp."""
    if block_size < 1:
        raise ConfigurationError(f"tensor {name!r}: block_size = {block_size} must be >= 1")
    if not (damp >= 0.0 and np.isfinite(damp)):
        raise ConfigurationError(f"tensor {name!r}: damp = {damp} must be finite and >= 0")


def factor_hessian(hessian: object, cols: int, damp: float, act_order: bool,
                   name: str, float32: bool = False) -> tuple[Floats, npt.NDArray[np.intp] | None]:
    """``(U, perm)`` for GPTQ: the column order (``None`` = natural) and ``U`` in that order
    (``float32``: see ``prepare_hessian``)."""
    if act_order and isinstance(hessian, np.ndarray) and hessian.shape == (cols, cols):
        # Visit columns by decreasing H[j, j] (the Hessian is permuted the same way).
        perm = np.argsort(-np.diagonal(hessian).astype(np.float64), kind="stable")
        u, _used = prepare_hessian(hessian[np.ix_(perm, perm)], cols, damp, name, float32)
        return u, perm
    u, _used = prepare_hessian(hessian, cols, damp, name, float32)
    return u, None


def _gptq_tensor(values: F32, dtype: str, sch: Scheme, name: str, u: Floats,
                 perm: npt.NDArray[np.intp] | None, block_size: int, mse_clip: bool) -> QuantizedTensor:
    shape = tuple(int(d) for d in values.shape)
    group = gptq_group_size(sch, shape, name)
    rows, cols, block, n_groups = layout(shape, sch)
    # Near float32's max the propagated errors overflow a float32 loop: run such a tensor
    # in float64 (rare; ordinary weights keep the float32 loop and its exact codes).
    extreme = values.size > 0 and float(np.max(np.abs(values))) > _EXTREME
    codes, scales, zeros = gptq_matrix(values.reshape(rows, cols), u, sch.bits, sch.symmetric, group, block_size, perm,
                                       float64=extreme, mse=mse_clip)
    pad = block * n_groups - cols
    if pad:
        codes = np.pad(codes, ((0, 0), (0, pad)))
    if sch.symmetric:
        zeros = np.full(zeros.shape, symmetric_zero(sch.bits), dtype=np.uint8)
    return from_codes(name, sch, shape, dtype, codes.reshape(rows * n_groups, block),
                      scales.reshape(-1), zeros.reshape(-1), "gptq")

