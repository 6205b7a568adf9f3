"""Quantize and dequantize one tensor: layout, validation, packing.

A tensor of any shape is viewed as a matrix ``(rows, cols)``: rows = the first axis
(output channels of a ``Linear`` weight, tokens of an embedding; a vector is one row),
cols = the product of the rest. Per-tensor schemes use one block of everything,
per-channel one block per row, per-group ``ceil(cols / g)`` blocks per row. A ragged last group is padded by repeating
the row's last value, which leaves that group's min and max unchanged; only the real
``rows * cols`` codes are packed and stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import math

from typing import Any

import numpy as np
import numpy.typing as npt

from arrowquant_core.bf16 import bfloat16, is_bfloat16
from arrowquant_core.errors import FormatError, QuantizationError
from arrowquant_core.kernels import (
    block_range,
    dequantize_matrix,
    pack,
    params_from_range,
    quantize_matrix,
    residual2_dequantize_blocks,
    unpack,
)
from arrowquant_core.rotation import ROTATED_METHODS, unrotate
from arrowquant_core.schemes import Scheme, get_scheme

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]


# Largest finite value of each narrow output dtype (bfloat16: 8-bit mantissa, float32's exponent).
_FINITE_MAX: dict[str, float] = {"float16": float(np.finfo(np.float16).max),
                                 "bfloat16": (2.0 - 2.0 ** -7) * 2.0 ** 127}

FLOAT_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16", "float64")

# Methods whose codes are residual-lattice signs (params per block), not affine codes.
LATTICE_METHODS: tuple[str, ...] = ("residual2",)


def _no_params() -> F32:
    return np.zeros(0, dtype=np.float32)


@dataclass(frozen=True, eq=False)  # eq over NumPy arrays is ambiguous; compare explicitly
class QuantizedTensor:
    """A tensor stored as packed integer codes plus per-block scales and zero points.

    ``zeros`` is empty for symmetric schemes (the zero point is implicit).
    ``method`` names the algorithm that chose the codes ("rtn" = round-to-nearest).
    Lattice methods (``LATTICE_METHODS``, residual 2-bit) store no scales or zero
    points but three float32 ``params`` per block, ``(m, a1, a2)``.
    """

    name: str
    scheme: Scheme
    shape: tuple[int, ...]
    dtype: str
    codes: U8
    scales: F32
    zeros: U8
    method: str = "rtn"
    params: F32 = field(default_factory=_no_params)

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        # Compiled frozen dataclasses cannot be unpickled field by field (docs/MYPYC.md); Ray
        # tasks (harness/sweep.py) send QuantizedTensors between processes.
        return (QuantizedTensor, (self.name, self.scheme, self.shape, self.dtype, self.codes, self.scales,
                                  self.zeros, self.method, self.params))

    @property
    def is_lattice(self) -> bool:
        return self.method in LATTICE_METHODS

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of codes, scales and zero points held in memory (not a file size)."""
        return int(self.codes.nbytes + self.scales.nbytes + self.zeros.nbytes + self.params.nbytes)

    def check(self, where: str = "") -> None:
        """Raise FormatError if the arrays do not fit the shape and scheme."""
        prefix = f"{where}: " if where else ""
        rows, cols, _block, n_groups = layout(self.shape, self.scheme)
        n_blocks = rows * n_groups
        need_codes = -(-rows * cols // self.scheme.codes_per_byte)
        if self.dtype not in FLOAT_DTYPES:
            raise FormatError(f"{prefix}tensor {self.name!r}: dtype {self.dtype!r} is not one of {list(FLOAT_DTYPES)}")
        if self.codes.dtype != np.uint8 or self.codes.size != need_codes:
            raise FormatError(
                f"{prefix}tensor {self.name!r}: {self.codes.size} code bytes ({self.codes.dtype}), "
                f"scheme {self.scheme.name} and shape {list(self.shape)} need {need_codes} uint8")
        if self.is_lattice:
            if self.scheme.bits != 2 or self.scales.size or self.zeros.size:
                raise FormatError(f"{prefix}tensor {self.name!r}: method {self.method} stores 2-bit codes "
                                  f"and params only (scheme {self.scheme.name})")
            if self.params.dtype != np.float32 or self.params.size != 3 * n_blocks \
                    or not bool(np.all(np.isfinite(self.params))):
                raise FormatError(f"{prefix}tensor {self.name!r}: {self.params.size} params, method "
                                  f"{self.method} needs {3 * n_blocks} finite float32 (3 per block)")
            return
        if self.params.size:
            raise FormatError(f"{prefix}tensor {self.name!r}: method {self.method!r} takes no params")
        if self.scales.dtype != np.float32 or self.scales.size != n_blocks:
            raise FormatError(
                f"{prefix}tensor {self.name!r}: {self.scales.size} scales ({self.scales.dtype}), "
                f"scheme {self.scheme.name} and shape {list(self.shape)} need {n_blocks} float32")
        need_zeros = 0 if self.scheme.symmetric else n_blocks
        if self.zeros.dtype != np.uint8 or self.zeros.size != need_zeros:
            raise FormatError(
                f"{prefix}tensor {self.name!r}: {self.zeros.size} zero points, scheme "
                f"{self.scheme.name} needs {need_zeros} uint8")
        if not bool(np.all(np.isfinite(self.scales))) or bool(np.any(self.scales < 0)):
            raise FormatError(f"{prefix}tensor {self.name!r}: scales must be finite and >= 0")
        if self.zeros.size and int(self.zeros.max()) > self.scheme.qmax:
            raise FormatError(
                f"{prefix}tensor {self.name!r}: zero point {int(self.zeros.max())} exceeds "
                f"{self.scheme.qmax} for {self.scheme.bits}-bit codes")


def layout(shape: tuple[int, ...], scheme: Scheme) -> tuple[int, int, int, int]:
    """``(rows, cols, block, n_groups)`` of a tensor under a scheme.

    >>> layout((10, 100), get_scheme("int4-g64-asym"))
    (10, 100, 64, 2)
    """
    numel = math.prod(shape)
    if scheme.granularity == "tensor":
        return 1, numel, numel, 1
    rows = shape[0] if len(shape) >= 2 else 1  # a vector is one row
    cols = numel // rows if rows else 0
    if scheme.granularity == "channel":
        return rows, cols, cols, 1
    g = scheme.group_size
    return rows, cols, g, -(-cols // g)


def blocks_of(values: F32, scheme: Scheme) -> tuple[F32, tuple[int, int, int, int]]:
    """Block-shaped copy ``(rows * n_groups, block)`` of a float32 tensor, plus its layout.

    A ragged last group is padded by repeating the row's last value, so its min and max
    stay those of the real data.
    """
    shape = tuple(int(d) for d in values.shape)
    rows, cols, block, n_groups = layout(shape, scheme)
    matrix = values.reshape(rows, cols)
    pad = block * n_groups - cols
    if pad:
        matrix = np.pad(matrix, ((0, 0), (0, pad)), mode="edge")
    return np.ascontiguousarray(matrix.reshape(rows * n_groups, block)), (rows, cols, block, n_groups)


def check_finite(values: npt.NDArray[Any], name: str) -> None:
    """Raise QuantizationError naming the tensor if any value is NaN or infinite.

    Every floating dtype is checked, bfloat16 included (its numpy kind is ``"V"``, not
    ``"f"``, which is how bf16 NaN/Inf once slipped past a ``kind == "f"`` filter);
    integer and boolean arrays are finite by construction and pass."""
    if values.dtype.kind not in "fc" and not is_bfloat16(values.dtype):
        return
    finite = np.isfinite(values)
    if not bool(np.all(finite)):
        bad = np.flatnonzero(~finite.reshape(-1))
        first = int(bad[0])
        index = tuple(int(i) for i in np.unravel_index(first, values.shape))
        raise QuantizationError(
            f"tensor {name!r}: {bad.size} non-finite value(s) (first {values.reshape(-1)[first]} "
            f"at index {list(index)}); weights must be finite to quantize")


def as_float32(array: object, name: str) -> tuple[F32, str]:
    """Validate an input tensor and return a float32 copy plus its original dtype name."""
    if isinstance(array, QuantizedTensor):
        raise QuantizationError(f"tensor {name!r} is already quantized ({array.scheme.name}); "
                                "dequantize it first or keep the quantized form")
    if not isinstance(array, np.ndarray):
        raise QuantizationError(f"tensor {name!r}: expected a numpy array, got {type(array).__name__}")
    dtype = array.dtype.name  # ">f4".name == "float32": byte order is not a different dtype
    if dtype not in FLOAT_DTYPES:
        hint = " (integer codes look already quantized)" if array.dtype.kind in "iu" else ""
        raise QuantizationError(
            f"tensor {name!r}: dtype {dtype} cannot be quantized{hint}; accepted: {list(FLOAT_DTYPES)}")
    if array.size == 0:
        raise QuantizationError(f"tensor {name!r}: shape {list(array.shape)} is empty; nothing to quantize")
    check_finite(array, name)
    if dtype == "float64":
        limit = float(np.finfo(np.float32).max)
        too_big = np.abs(array) > limit
        if bool(np.any(too_big)):
            first = int(np.flatnonzero(too_big.reshape(-1))[0])
            raise QuantizationError(
                f"tensor {name!r}: value {float(array.reshape(-1)[first]):g} at flat index {first} is outside "
                f"the float32 range (|x| <= {limit:g}) the quantizer computes in")
    values = np.array(array, dtype=np.float32, copy=True)  # never touch the caller's array
    return values, dtype


def quantize(array: object, scheme: Scheme | str, name: str = "tensor") -> QuantizedTensor:
    """Round-to-nearest quantization of one float tensor.

    >>> qt = quantize(np.linspace(-1, 1, 128, dtype=np.float32).reshape(2, 64), "int4-g32-asym")
    >>> qt.codes.size, qt.scales.size
    (64, 4)
    """
    sch = get_scheme(scheme) if isinstance(scheme, str) else scheme
    values, dtype = float32_input(array, name)
    shape = tuple(int(d) for d in values.shape)
    rows, cols, block, n_groups = layout(shape, sch)
    matrix = values.reshape(rows, cols)
    lo, hi = block_range(matrix, block, n_groups)
    if not (bool(np.all(np.isfinite(lo))) and bool(np.all(np.isfinite(hi)))):
        check_finite(values, name)  # a NaN or inf propagates into the ranges; name the first
    scales, zeros = params_from_range(lo, hi, sch.bits, sch.symmetric)
    qt = QuantizedTensor(
        name=name, scheme=sch, shape=shape, dtype=dtype,
        codes=quantize_matrix(matrix, block, n_groups, sch.bits, scales, zeros),
        scales=scales, zeros=np.zeros(0, np.uint8) if sch.symmetric else zeros, method="rtn")
    qt.check()
    return qt


def float32_input(array: object, name: str) -> tuple[F32, str]:
    """Like ``as_float32``, but a C-contiguous native float32 array is returned as is,
    not copied: the round-to-nearest path only reads it (issue 11: the defensive copy
    was a full extra pass). Its finiteness is checked by the caller on the block ranges.
    """
    if isinstance(array, np.ndarray) and array.dtype == np.float32 and array.dtype.isnative \
            and array.flags.c_contiguous and array.size:
        return array, "float32"
    return as_float32(array, name)


def from_codes(name: str, scheme: Scheme, shape: tuple[int, ...], dtype: str, block_codes: U8,
               scales: F32, zeros: U8, method: str, params: F32 | None = None) -> QuantizedTensor:
    """Build a QuantizedTensor from block-shaped codes ``(rows * n_groups, block)``.

    Quantization methods other than round-to-nearest choose codes, scales and zero
    points (or, for lattice methods, ``params``) their own way and hand them here.
    """
    rows, cols, block, n_groups = layout(shape, scheme)
    codes = block_codes.reshape(rows, n_groups * block)[:, :cols]
    lattice = method in LATTICE_METHODS
    qt = QuantizedTensor(
        name=name, scheme=scheme, shape=shape, dtype=dtype,
        codes=pack(codes, scheme.bits),
        scales=(np.zeros(0, np.float32) if lattice
                else np.ascontiguousarray(scales, dtype=np.float32).reshape(-1)),
        zeros=(np.zeros(0, np.uint8) if scheme.symmetric or lattice
               else np.ascontiguousarray(zeros, dtype=np.uint8).reshape(-1)),
        method=method,
        params=(np.ascontiguousarray(params, dtype=np.float32).reshape(-1) if params is not None
                else _no_params()))
    qt.check()
    return qt


def block_codes(qt: QuantizedTensor) -> U8:
    """Unpacked codes in block shape ``(rows * n_groups, block)`` (padding codes are 0)."""
    rows, cols, block, n_groups = layout(qt.shape, qt.scheme)
    codes = unpack(qt.codes, qt.scheme.bits, rows * cols).reshape(rows, cols)
    pad = block * n_groups - cols
    if pad:
        codes = np.pad(codes, ((0, 0), (0, pad)))
    return codes.reshape(rows * n_groups, block)


def dequantize_float32(qt: QuantizedTensor, out: F32 | None = None) -> F32:
    """Dequantize to float32 in the original shape.

    ``out``, a C-contiguous float32 array of ``qt.shape``, receives the values in place
    (and is returned): a caller that dequantizes tensor after tensor reuses its pages
    instead of faulting in fresh ones, which cost more than the dequantization here.
    """
    rows, cols, block, n_groups = layout(qt.shape, qt.scheme)
    hadamard = ROTATED_METHODS.get(qt.method, 0)
    if out is not None and (tuple(out.shape) != qt.shape or out.dtype != np.float32
                            or not out.flags.c_contiguous):
        raise QuantizationError(f"tensor {qt.name!r}: out must be a C-contiguous float32 array of shape "
                                f"{list(qt.shape)}, got {out.dtype} {list(out.shape)}")
    direct = None if out is None or hadamard or qt.is_lattice else out.reshape(rows, cols)
    if not qt.is_lattice:
        zeros = qt.zeros if qt.zeros.size else np.full(qt.scales.size, 1 << (qt.scheme.bits - 1), np.uint8)
        matrix = dequantize_matrix(qt.codes, rows, cols, block, n_groups, qt.scheme.bits, qt.scales, zeros,
                                   direct)
    else:
        values = residual2_dequantize_blocks(block_codes(qt), qt.params.reshape(-1, 3))
        matrix = np.ascontiguousarray(values.reshape(rows, n_groups * block)[:, :cols])
    if hadamard:  # codes are of the rotated weight W R (rotation.py); undo: W = (W R) R^T
        matrix = unrotate(matrix, hadamard)
    if out is None:
        return matrix.reshape(qt.shape)
    if direct is None:  # the lattice and rotated paths build their own array
        np.copyto(out, matrix.reshape(qt.shape))
    return out


def dequantize(qt: object) -> npt.NDArray[np.floating]:
    """Dequantize to the original shape and dtype (bfloat16 via ml_dtypes).

    >>> x = np.array([[0.0, 0.5, -1.0, 1.0]], np.float16)
    >>> dequantize(quantize(x, "int8-channel-asym")).dtype
    dtype('float16')
    """
    if not isinstance(qt, QuantizedTensor):
        raise QuantizationError(f"dequantize expects a QuantizedTensor, got {type(qt).__name__}")
    values = dequantize_float32(qt)
    if qt.dtype == "float32" or qt.dtype == "float64":
        return values if qt.dtype == "float32" else values.astype(np.float64)
    target = bfloat16() if qt.dtype == "bfloat16" else np.dtype(qt.dtype)
    # A block at float16's +-65504 dequantizes up to half a step past it (integer zero
    # point): saturate to the target's largest finite value, never cast to inf.
    limit = _FINITE_MAX[qt.dtype]
    np.clip(values, -limit, limit, out=values)
    return values.astype(target)
