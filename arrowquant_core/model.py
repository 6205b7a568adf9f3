"""Model-level quantization: a plan per tensor, then the kernels.

``quantize_model(weights, config)`` decides for every tensor whether it is quantized and
with which scheme (the plan), quantizes, and returns a ``QuantizedModel``. The caller's
arrays are never modified. Tensors with fewer than ``min_ndim`` dimensions (norm gains,
biases) stay in floating point: they are a fraction of a percent of the parameters and
quantizing them buys nothing but error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
import fnmatch

import numpy as np
import numpy.typing as npt

from arrowquant_core.errors import ConfigurationError, QuantizationError
from arrowquant_core.schemes import Scheme, get_scheme
from arrowquant_core.methods import check_method, get_method, quantize_tensor
from arrowquant_core.tensor import QuantizedTensor, as_float32, dequantize

Progress = Callable[[int, int, str], None]
FloatArray = npt.NDArray[np.floating]


@dataclass(frozen=True)
class QuantizationConfig:
    """Which scheme each tensor gets.

    ``overrides`` is a tuple of ``(glob pattern, scheme name)``; the first pattern that
    matches a tensor name wins over ``scheme``. ``method`` (see ``methods.METHODS``)
    picks the algorithm, ``method_overrides`` per pattern likewise. ``keep_float``
    patterns are never quantized. ``fail_fast`` stops at the first tensor that cannot be
    quantized; otherwise such a tensor is kept in float and reported in
    ``QuantizedModel.skipped``.

    >>> QuantizationConfig("int4-g64-asym", overrides=(("*.embeddings.*", "int8-channel-sym"),)).scheme_for("x.embeddings.w").name
    'int8-channel-sym'
    """

    scheme: str
    overrides: tuple[tuple[str, str], ...] = ()
    keep_float: tuple[str, ...] = ()
    min_ndim: int = 2
    fail_fast: bool = True
    method: str = "rtn"
    method_overrides: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        check_method(self.method, get_scheme(self.scheme))
        for pattern, name in self.overrides:
            try:
                check_method(self.method_for(pattern), get_scheme(name))
            except ConfigurationError as exc:
                raise ConfigurationError(f"override {pattern!r}: {exc}") from None
        for pattern, name in self.method_overrides:
            try:
                get_method(name)
            except ConfigurationError as exc:
                raise ConfigurationError(f"method override {pattern!r}: {exc}") from None
        if self.min_ndim < 1:
            raise ConfigurationError(f"min_ndim = {self.min_ndim}: must be >= 1")

    def scheme_for(self, name: str) -> Scheme:
        for pattern, scheme_name in self.overrides:
            if fnmatch.fnmatchcase(name, pattern):
                return get_scheme(scheme_name)
        return get_scheme(self.scheme)

    def method_for(self, name: str) -> str:
        for pattern, method in self.method_overrides:
            if fnmatch.fnmatchcase(name, pattern):
                return method
        return self.method

    def wants(self, name: str, array: FloatArray) -> bool:
        if array.ndim < self.min_ndim:
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in self.keep_float)


@dataclass(frozen=True)
class QuantizedModel:
    """Quantized tensors plus the tensors kept in floating point.

    ``order`` is the tensor order of the source checkpoint; ``skipped`` maps a tensor
    that could not be quantized (``fail_fast=False``) to the reason.
    """

    tensors: dict[str, QuantizedTensor]
    floats: dict[str, FloatArray]
    order: tuple[str, ...]
    metadata: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def dequantize(self) -> dict[str, FloatArray]:
        """Every tensor as a float array in its original dtype, in source order."""
        out: dict[str, FloatArray] = {}
        for name in self.order:
            qt = self.tensors.get(name)
            out[name] = dequantize(qt) if qt is not None else self.floats[name]
        return out

    @property
    def parameter_count(self) -> int:
        return sum(qt.numel for qt in self.tensors.values()) + sum(
            int(a.size) for a in self.floats.values())

    @property
    def quantized_parameter_count(self) -> int:
        return sum(qt.numel for qt in self.tensors.values())


def quantize_model(weights: Mapping[str, FloatArray], config: QuantizationConfig,
                   progress: Progress | None = None,
                   hessians: Mapping[str, npt.NDArray[np.float32]] | None = None) -> QuantizedModel:
    """Quantize every tensor the config selects.

    ``progress(done, total, name)`` is called after each tensor. ``hessians`` maps
    tensor names to the input Hessian GPTQ needs (``2 X^T X / n`` of the calibration
    activations); tensors without one fall back to clip search (their ``method`` says so).

    >>> w = {"fc.weight": np.ones((4, 64), np.float32), "fc.bias": np.zeros(4, np.float32)}
    >>> m = quantize_model(w, QuantizationConfig("int8-channel-sym"))
    >>> sorted(m.tensors), sorted(m.floats)
    (['fc.weight'], ['fc.bias'])
    """
    if not weights:
        raise QuantizationError("the model has no tensors; nothing to quantize")
    tensors: dict[str, QuantizedTensor] = {}
    floats: dict[str, FloatArray] = {}
    skipped: dict[str, str] = {}
    total = len(weights)
    for done, (name, array) in enumerate(weights.items(), start=1):
        if isinstance(array, QuantizedTensor):
            raise QuantizationError(f"tensor {name!r} is already quantized ({array.scheme.name})")
        if not isinstance(array, np.ndarray):
            raise QuantizationError(f"tensor {name!r}: expected a numpy array, got {type(array).__name__}")
        if config.wants(name, array):
            try:
                scheme = config.scheme_for(name)
                tensors[name] = quantize_tensor(array, scheme, name, config.method_for(name),
                                                hessians.get(name) if hessians is not None else None)
            except QuantizationError as exc:
                if config.fail_fast:
                    raise
                skipped[name] = str(exc)
                floats[name] = np.array(array, copy=True)
        else:
            values, _dtype = as_float32(array, name)  # same validation for float tensors
            del values
            floats[name] = np.array(array, copy=True)
        if progress is not None:
            progress(done, total, name)
    return QuantizedModel(tensors=tensors, floats=floats, order=tuple(weights), skipped=skipped)
