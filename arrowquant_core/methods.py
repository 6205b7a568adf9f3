"""The one table of quantization methods: how a tensor's codes are chosen.

A scheme (``schemes.py``) fixes the format (bits, grouping, symmetry); a method fixes
the algorithm that picks codes in that format. Every method is selectable per run and
per tensor (``QuantizationConfig.method`` / ``method_overrides``).

    rtn           round-to-nearest                                   (kernels.py)
    clip          MSE clip search per group                          (clip.py)
    hqq           HQQ-style refinement, integer zero points          (hqq.py)
    gptq          GPTQ with calibration Hessians                     (gptq.py)
    gptq-act      GPTQ, activation order (static groups)
    gptq-mse      GPTQ, MSE-clipped group ranges
    gptq-act-mse  both
    residual2     residual 2-bit: two sign steps, 4-level lattice    (residual.py)
    iclip         clip search weighted by diag(H) (imatrix style)    (kquant.py)
    iclip-h       iclip on the Hadamard-rotated weight               (kquant.py, rotation.py)
    gptq-i        GPTQ, act order, static ranges from iclip          (igptq.py)
    gptq-ih       gptq-i on the Hadamard-rotated weight (block 64)   (igptq.py, rotation.py)
    gptq-k        GPTQ, act order, static ranges from the plain       (igptq.py)
                  squared-error search on the scheme's scale grid
    gptq-kh       gptq-k on the Hadamard-rotated weight (block 64)   (igptq.py, rotation.py)
    gptq-kh128    gptq-k, Hadamard block 128
    krtn          round-to-nearest on the scheme's scale grid (no search: INT8's fast path)
    gptq-kr       GPTQ, act order, min/max ranges on the scale grid (fallback krtn)
    gptq-khr      gptq-kr on the Hadamard-rotated weight (block 64), fallback krtn

Measured on MiniLM (tests/benchmarks/test_bench_quality_per_bit.py): weighting the
range search by diag(H) *before* GPTQ does not help -- GPTQ already steers the rounding
by the full Hessian -- (INT4 g64: gptq-i 0.9881 / 0.957 vs gptq-k 0.9887 / 0.966); the
K-scheme grid and the rotation do. The range search itself is what costs time (20 clip
factors per group, 4-5x a GPTQ pass on MiniLM): with the rotation it adds little --
INT4 g32-k8 gptq-kh 0.9927 / 0.979 vs gptq-khr 0.9921 / 0.976; without it none (gptq-k
with 4 factors 0.9912 / 0.970 vs gptq-kr 0.9913 / 0.973) -- so ``gptq-khr`` (rotation,
min/max ranges) is MiniLM's INT4 and INT2 default, within the 5 s GPTQ budget that
``gptq-kh`` misses (tests/benchmarks/test_bench_methods.py, issue 13).

Only the ``iclip`` / ``gptq-i*`` family supports the K-quant schemes (``-k6`` / ``-k8``:
scales stored as codes, ``kquant.py``): their searches choose scales on the stored grid.

GPTQ needs the Hessian of the tensor's input activations; a tensor without one (an
embedding table has no input activations) falls back to the row's ``fallback``
(``clip``; ``iclip`` with uniform importance for the ``i`` family, ``iclip-h`` for the
rotated ones), and the tensor's ``method`` says so, so the report never claims GPTQ
where it did not run.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from arrowquant_core.clip import DEFAULT_GRID, quantize_clip
from arrowquant_core.errors import ConfigurationError, unknown_name
from arrowquant_core.gptq import quantize_gptq
from arrowquant_core.hqq import quantize_hqq
from arrowquant_core.igptq import quantize_igptq
from arrowquant_core.kquant import quantize_iclip
from arrowquant_core.residual import residual2_quantize
from arrowquant_core.rotation import rotate, rotate_hessian
from arrowquant_core.schemes import Scheme
from arrowquant_core.tensor import QuantizedTensor, as_float32, from_codes, quantize

F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    needs_hessian: bool = False
    act_order: bool = False
    mse_clip: bool = False
    bits: tuple[int, ...] = (8, 4, 2)  # bit widths the method supports
    fallback: str = "clip"  # what runs on a tensor without a Hessian
    k_schemes: bool = False  # can choose scales on a K-scheme's code grid (kquant.py)
    rotation: int = 0  # Hadamard block of the input dimension (rotation.py), 0 = none
    importance: bool = True  # i family: range search weighted by diag(H); k family: plain error
    search: bool = True  # False: min/max ranges (clip factor 1.0 only), for speed at INT8

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (get_method, (self.name,))  # compiled frozen dataclasses unpickle by name


_ROWS: Final[tuple[Method, ...]] = (
    Method("rtn", "round-to-nearest on the min/max (or absmax) grid"),
    Method("clip", "MSE clip search: per group, the range shrink factor with the least squared error"),
    Method("hqq", "HQQ-style calibration-free refinement of scale and integer zero point"),
    Method("gptq", "GPTQ: column-wise error feedback through the input Hessian", needs_hessian=True),
    Method("gptq-act", "GPTQ in activation order (static groups)", needs_hessian=True, act_order=True),
    Method("gptq-mse", "GPTQ with MSE-clipped group ranges", needs_hessian=True, mse_clip=True),
    Method("gptq-act-mse", "GPTQ, activation order and MSE-clipped ranges", needs_hessian=True,
           act_order=True, mse_clip=True),
    Method("residual2", "residual 2-bit: two 1-bit sign steps per group (non-uniform 4-level lattice)",
           bits=(2,)),
    Method("iclip", "clip search weighted by diag(H) of the input (imatrix style); uniform without a Hessian",
           needs_hessian=True, fallback="iclip", k_schemes=True),
    Method("iclip-h", "iclip on the randomized-Hadamard-rotated weight (block 64), undone at dequantization",
           needs_hessian=True, fallback="iclip-h", k_schemes=True, rotation=64),
    Method("gptq-i", "GPTQ in activation order, static group ranges from iclip (diag(H)-weighted)",
           needs_hessian=True, act_order=True, fallback="iclip", k_schemes=True),
    Method("gptq-ih", "gptq-i on the randomized-Hadamard-rotated weight (block 64, QuIP#-style)",
           needs_hessian=True, act_order=True, fallback="iclip-h", k_schemes=True, rotation=64),
    Method("gptq-k", "GPTQ in activation order, static group ranges from the plain clip search on the "
           "scheme's scale grid", needs_hessian=True, act_order=True, fallback="iclip", k_schemes=True,
           importance=False),
    Method("gptq-kh", "gptq-k on the randomized-Hadamard-rotated weight (block 64, QuIP#-style)",
           needs_hessian=True, act_order=True, fallback="iclip-h", k_schemes=True, rotation=64, importance=False),
    Method("krtn", "round-to-nearest with scales on the scheme's grid (K-schemes' plain RTN)",
           fallback="krtn", k_schemes=True, importance=False, search=False),
    Method("gptq-kr", "GPTQ in activation order, min/max group ranges on the scheme's scale grid",
           needs_hessian=True, act_order=True, fallback="krtn", k_schemes=True, importance=False, search=False),
    Method("gptq-kh128", "gptq-k on the randomized-Hadamard-rotated weight (block 128)",
           needs_hessian=True, act_order=True, fallback="iclip", k_schemes=True, rotation=128, importance=False),
    Method("gptq-khr", "gptq-kr on the randomized-Hadamard-rotated weight (block 64): no range search",
           needs_hessian=True, act_order=True, fallback="krtn", k_schemes=True, rotation=64, importance=False,
           search=False),
)

METHODS: Final[dict[str, Method]] = {m.name: m for m in _ROWS}
FALLBACK: Final = "clip"  # for Hessian methods on tensors without a Hessian


def get_method(name: str) -> Method:
    method = METHODS.get(name)
    if method is None:
        raise unknown_name("method", name, METHODS)
    return method


def check_method(name: str, scheme: Scheme) -> Method:
    method = get_method(name)
    if scheme.bits not in method.bits:
        raise ConfigurationError(f"method {name!r} supports {list(method.bits)}-bit schemes, not {scheme.name}")
    if method.k_schemes and scheme.granularity != "group":
        raise ConfigurationError(f"method {name!r} searches ranges per group; scheme {scheme.name} is per "
                                 f"{scheme.granularity}: choose a group scheme (e.g. int4-g32-asym)")
    if scheme.scale_bits and not method.k_schemes:
        k_methods = [m.name for m in _ROWS if m.k_schemes]
        raise ConfigurationError(f"method {name!r} cannot store scales as codes (scheme {scheme.name}); "
                                 f"K-schemes take one of {k_methods}")
    return method


def _rtn(array: object, scheme: Scheme, name: str, hessian: F32 | None, method: Method) -> QuantizedTensor:
    return quantize(array, scheme, name)


def _clip(array: object, scheme: Scheme, name: str, hessian: F32 | None, method: Method) -> QuantizedTensor:
    return quantize_clip(array, scheme, name)


def _hqq(array: object, scheme: Scheme, name: str, hessian: F32 | None, method: Method) -> QuantizedTensor:
    return quantize_hqq(array, scheme, name)


def _gptq(array: object, scheme: Scheme, name: str, hessian: F32 | None, method: Method) -> QuantizedTensor:
    if hessian is None:
        return quantize_clip(array, scheme, name)  # tagged "clip": GPTQ did not run here
    qt = quantize_gptq(array, scheme, name, hessian, act_order=method.act_order, mse_clip=method.mse_clip)
    return dataclasses.replace(qt, method=method.name)


def _residual2(array: object, scheme: Scheme, name: str, hessian: F32 | None,
               method: Method) -> QuantizedTensor:
    values, dtype = as_float32(array, name)
    codes, params = residual2_quantize(values, scheme, name)
    return from_codes(name, scheme, tuple(int(d) for d in values.shape), dtype, codes,
                      np.zeros(0, np.float32), np.zeros(0, np.uint8), method.name, params)


def _iclip(array: object, scheme: Scheme, name: str, hessian: F32 | None, method: Method) -> QuantizedTensor:
    if not method.search:
        return quantize_iclip(array, scheme, name, None, grid=(1.0,), method=method.name)
    if method.rotation:
        values, _dtype = as_float32(array, name)
        shape = tuple(int(d) for d in values.shape)
        if len(shape) != 2 or shape[1] % method.rotation:
            return quantize_iclip(array, scheme, name, hessian)  # tagged "iclip": not rotated
        rotated = rotate(values, method.rotation).astype(values.dtype)
        h = rotate_hessian(hessian, method.rotation) if hessian is not None else None
        qt = quantize_iclip(rotated, scheme, name, h, method=method.name)
        return dataclasses.replace(qt, dtype=_dtype)
    return quantize_iclip(array, scheme, name, hessian)


def _igptq(array: object, scheme: Scheme, name: str, hessian: F32 | None, method: Method) -> QuantizedTensor:
    if hessian is None:
        return _iclip(array, scheme, name, None, get_method(method.fallback))
    return quantize_igptq(array, scheme, name, hessian, rotation=method.rotation, method=method.name,
                          importance=method.importance, grid=DEFAULT_GRID if method.search else (1.0,))


Kernel = Callable[[object, Scheme, str, "F32 | None", Method], QuantizedTensor]

_DISPATCH: Final[dict[str, Kernel]] = {
    "rtn": _rtn, "clip": _clip, "hqq": _hqq, "gptq": _gptq, "gptq-act": _gptq, "gptq-mse": _gptq,
    "gptq-act-mse": _gptq, "residual2": _residual2, "iclip": _iclip, "iclip-h": _iclip, "gptq-i": _igptq,
    "gptq-ih": _igptq, "gptq-k": _igptq, "krtn": _iclip, "gptq-kr": _igptq, "gptq-kh": _igptq, "gptq-kh128": _igptq,
    "gptq-khr": _igptq,
}


def quantize_tensor(array: object, scheme: Scheme, name: str, method: str = "rtn",
                    hessian: F32 | None = None) -> QuantizedTensor:
    """Quantize one tensor with the named method.

    >>> import numpy as np
    >>> w = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    >>> from arrowquant_core.schemes import get_scheme
    >>> quantize_tensor(w, get_scheme("int2-g32-asym"), "w", "residual2").method
    'residual2'
    """
    row = check_method(method, scheme)
    if row.k_schemes and isinstance(array, np.ndarray) and array.size and array.dtype.kind == "f":
        # the grid and rotation searches run in float32: values near float32's edge overflow
        # there, so such a tensor is a configuration the method cannot take
        # float32 input: |x| and the maximum are exact in float32, so no float64 copy (it
        # was a tenth of the shipped INT4 method's time on MiniLM, the 11.7M-value embedding)
        values = array if array.dtype == np.float32 else array.astype(np.float64)
        peak = float(np.max(np.abs(values)))
        if peak > _K_LIMIT:
            raise ConfigurationError(f"tensor {name!r}: |value| up to {peak:.3g}; method {method!r} searches in "
                                     f"float32 and takes values up to {_K_LIMIT:g}: use rtn, clip or gptq")
    return _DISPATCH[row.name](array, scheme, name, hessian, row)


_K_LIMIT: Final[float] = 1e30
