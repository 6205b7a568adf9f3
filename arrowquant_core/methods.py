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

GPTQ needs the Hessian of the tensor's input activations; a tensor without one (an
embedding table has no input activations) falls back to ``clip``, and the tensor's
``method`` says so, so the report never claims GPTQ where it did not run.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from arrowquant_core.clip import quantize_clip
from arrowquant_core.errors import ConfigurationError, unknown_name
from arrowquant_core.gptq import quantize_gptq
from arrowquant_core.hqq import quantize_hqq
from arrowquant_core.residual import residual2_quantize
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


Kernel = Callable[[object, Scheme, str, "F32 | None", Method], QuantizedTensor]

_DISPATCH: Final[dict[str, Kernel]] = {
    "rtn": _rtn, "clip": _clip, "hqq": _hqq, "gptq": _gptq, "gptq-act": _gptq, "gptq-mse": _gptq,
    "gptq-act-mse": _gptq, "residual2": _residual2,
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
    return _DISPATCH[row.name](array, scheme, name, hessian, row)
