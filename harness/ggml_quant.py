"""ggml's own quantizer through ctypes: the K-quants and IQ types gguf-py cannot quantize.

``libggml-base`` is built by ``harness.ggml_build`` (``make setup``) from the pinned
llama-cpp-python sdist; this module binds the few functions llama-quantize itself calls
(``src/llama-quant.cpp``, ``llama_tensor_quantize_impl``):

- ``ggml_quantize_chunk(type, src, dst, start, nrows, n_per_row, imatrix)``: quantize
  ``nrows`` rows of ``n_per_row`` floats; ``imatrix`` (``n_per_row`` floats, or NULL) is
  the importance of each column. Returns the bytes written.
- ``ggml_quantize_requires_imatrix(type)``: IQ2_XXS, IQ2_XS, IQ1_S (and IQ1_M, IQ2_S
  below them) refuse to quantize without one (ggml.c).
- ``ggml_row_size``, ``ggml_type_size``, ``ggml_blck_size``; ``ggml_get_type_traits``'s
  ``to_float`` (ggml's own dequantizer: the cross-check of gguf-py's).

The importance matrix (``importance``) is what ``llama-imatrix`` computes
(tools/imatrix/imatrix.cpp, ``IMatrixCollector::collect_imatrix``: ``acc[j] += x[j] *
x[j]`` over every input row of a MUL_MAT, divided by the row count when llama-quantize
loads it, tools/quantize/quantize.cpp): per weight, the mean over calibration tokens of
the squared input activation of each input column. A GPTQ Hessian ``H = 2 XᵀX / n`` of
the same rows holds exactly that on its diagonal, times two, so the runner's calibration
capture (``calibration_hessians``) serves both.

Example::

    q = quantize(w, T.Q4_K, imatrix=importance(h))   # uint8 rows, ggml's layout
    back = dequantize(q, T.Q4_K, w.shape)           # ggml's to_float
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
import functools
from typing import Any, Final

import gguf
import numpy as np
import numpy.typing as npt

from arrowquant_core.errors import ConfigurationError, QuantizationError
from harness import ggml_build

T = gguf.GGMLQuantizationType
F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]
_F32P: Final = ctypes.POINTER(ctypes.c_float)


class _TypeTraits(ctypes.Structure):
    """``struct ggml_type_traits`` (ggml/include/ggml.h)."""

    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool),
                ("to_float", ctypes.CFUNCTYPE(None, ctypes.c_void_p, _F32P, ctypes.c_int64)),
                ("from_float_ref", ctypes.c_void_p)]


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    """The built ``libggml-base``, its signatures declared; ConfigurationError naming the
    file and the build command when it is missing or from another version."""
    path = ggml_build.library_path()
    if not path.is_file():
        raise ConfigurationError(f"{path}: ggml's quantizer is not built (the K-quant and IQ peers need it); run "
                                 f"`{ggml_build.BUILD_COMMAND}` (make setup does), which downloads "
                                 f"{ggml_build.PACKAGE}=={ggml_build.VERSION}'s sdist from PyPI and compiles ggml-base")
    ggml_build.read_record(path.parent)  # pinned version, else a ConfigurationError
    lib = ctypes.CDLL(str(path))
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, _F32P, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_int64, _F32P]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_type_size.argtypes = [ctypes.c_int]
    lib.ggml_type_size.restype = ctypes.c_size_t
    lib.ggml_blck_size.argtypes = [ctypes.c_int]
    lib.ggml_blck_size.restype = ctypes.c_int64
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_validate_row_data.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    lib.ggml_validate_row_data.restype = ctypes.c_bool
    return lib


def block_size(qtype: gguf.GGMLQuantizationType) -> int:
    return int(library().ggml_blck_size(int(qtype)))


def type_size(qtype: gguf.GGMLQuantizationType) -> int:
    return int(library().ggml_type_size(int(qtype)))


def row_size(qtype: gguf.GGMLQuantizationType, n_per_row: int) -> int:
    return int(library().ggml_row_size(int(qtype), int(n_per_row)))


def requires_imatrix(qtype: gguf.GGMLQuantizationType) -> bool:
    return bool(library().ggml_quantize_requires_imatrix(int(qtype)))


def _floats(a: F32) -> Any:
    return a.ctypes.data_as(_F32P)


def quantize(weights: npt.NDArray[np.floating], qtype: gguf.GGMLQuantizationType,
             imatrix: npt.NDArray[np.floating] | None = None, name: str = "tensor") -> U8:
    """``weights`` (..., n_per_row) quantized by ggml as ``qtype``: uint8 (rows, row bytes),
    the layout gguf-py's dequantizer and GGUF files hold. ``imatrix``: one importance per
    column (``n_per_row``), as llama-quantize passes it."""
    lib = library()
    w = np.ascontiguousarray(weights, dtype=np.float32)
    n_per_row = int(w.shape[-1]) if w.ndim else 1
    nrows = w.size // max(n_per_row, 1)
    block = block_size(qtype)
    if n_per_row % block != 0:
        raise QuantizationError(f"tensor {name!r}: rows of {n_per_row} values are not a whole number of "
                                f"{qtype.name}'s {block}-value blocks")
    imp = None
    if imatrix is not None:
        imp = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
        if imp.size != n_per_row:
            raise QuantizationError(f"tensor {name!r}: importance matrix has {imp.size} values, rows have "
                                    f"{n_per_row}; rule: one importance per input column")
        if not bool(np.all(np.isfinite(imp))) or bool(np.any(imp < 0)):
            raise QuantizationError(f"tensor {name!r}: importance matrix holds negative or non-finite values")
    elif requires_imatrix(qtype):
        raise QuantizationError(f"tensor {name!r}: ggml quantizes {qtype.name} only with an importance matrix "
                                "(ggml_quantize_requires_imatrix); rule: IQ2/IQ1 types need calibration")
    if not bool(np.all(np.isfinite(w))):
        raise QuantizationError(f"tensor {name!r}: non-finite weights cannot be quantized")
    out = np.zeros((nrows, row_size(qtype, n_per_row)), dtype=np.uint8)
    written = int(lib.ggml_quantize_chunk(int(qtype), _floats(w), out.ctypes.data_as(ctypes.c_void_p), 0, nrows,
                                          n_per_row, None if imp is None else _floats(imp)))
    if written != out.nbytes:
        raise QuantizationError(f"tensor {name!r}: ggml_quantize_chunk wrote {written} bytes for {qtype.name}, "
                                f"expected {out.nbytes}")
    return out


def dequantize(data: U8, qtype: gguf.GGMLQuantizationType, shape: tuple[int, ...]) -> F32:
    """ggml's own ``to_float`` (the reference dequantizer of ggml-quants.c)."""
    traits = library().ggml_get_type_traits(int(qtype)).contents
    raw = np.ascontiguousarray(data, dtype=np.uint8)
    out = np.empty(shape, dtype=np.float32)
    if raw.nbytes != out.size // block_size(qtype) * type_size(qtype):
        raise QuantizationError(f"{qtype.name}: {raw.nbytes} bytes cannot hold a tensor of shape {list(shape)}")
    traits.to_float(raw.ctypes.data_as(ctypes.c_void_p), _floats(out), out.size)
    return out


def valid(data: U8, qtype: gguf.GGMLQuantizationType) -> bool:
    """``ggml_validate_row_data``: scales finite, codes in range (what llama.cpp checks on load)."""
    raw = np.ascontiguousarray(data, dtype=np.uint8)
    return bool(library().ggml_validate_row_data(int(qtype), raw.ctypes.data_as(ctypes.c_void_p), raw.nbytes))


def importance(hessian: npt.NDArray[np.floating]) -> F32:
    """llama-imatrix's per-column importance from a GPTQ Hessian ``2 XᵀX / n``: diag / 2 =
    the mean over calibration tokens of each input column's squared activation."""
    h = np.asarray(hessian)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ConfigurationError(f"importance: a Hessian is square, got shape {list(h.shape)}")
    return np.ascontiguousarray(np.diagonal(h) / 2, dtype=np.float32)


def importances(hessians: Mapping[str, npt.NDArray[np.floating]]) -> dict[str, F32]:
    """``importance`` of every calibrated weight (source names)."""
    return {name: importance(h) for name, h in hessians.items()}
