"""Model-level quantization: a plan per tensor, then the kernels.

``quantize_model(weights, config)`` decides for every tensor whether it is quantized and
with which scheme (the plan), quantizes, and returns a ``QuantizedModel``. The caller's
arrays are never modified. Tensors with fewer than ``min_ndim`` dimensions (norm gains,
biases) stay in floating point: they are a fraction of a percent of the parameters and
quantizing them buys nothing but error.

Every tensor of the source is accounted for in the result, because a model rebuilt
from the artifact alone must have all of them:

* floating-point tensors are quantized (``tensors``) or kept as they are (``floats``);
* integer and boolean tensors (BERT's ``position_ids``, BatchNorm's
  ``num_batches_tracked``) are buffers, never quantized, passed through bit-exact
  (``buffers``);
* tied weights (an LM head that is the embedding matrix) are stored once: the alias
  is recorded in ``ties`` (alias -> canonical name) and dequantizes to the same array;
* ``aux`` holds auxiliary arrays that are not model tensors but belong to the artifact
  (per-time-group activation parameters, smoothing vectors); they are stored and
  checksummed with it and are not part of ``dequantize()``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
import fnmatch
import threading
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from arrowquant_core.errors import ConfigurationError, QuantizationError
from arrowquant_core.schemes import Scheme, get_scheme
from arrowquant_core.methods import check_method, get_method, quantize_tensor
from arrowquant_core.tensor import QuantizedTensor, as_float32, dequantize

Progress = Callable[[int, int, str], None]
Outcome = tuple[QuantizedTensor | None, str | None]
Mapper = Callable[[Callable[[str], Any], list[str]], list[Any]]
"""``mapper(fn, names)`` returns ``[fn(n) for n in names]`` in that order, and may run the
calls side by side (the harness passes ``fixtures.parallel.map_ordered``). The core calls
it only where each call does its own tensor's work (quantize_model here; the plan's
sensitivity pass, ladder climbs and promotion scores), so results do not depend on it."""


def each(fn: Callable[[str], Any], names: list[str]) -> list[Any]:
    """The mapper used when none is given: one call after another."""
    return [fn(name) for name in names]
FloatArray = npt.NDArray[np.floating]
AnyArray = npt.NDArray[Any]

# dtypes of tensors passed through bit-exact (buffers and auxiliary tables)
RAW_DTYPES: Final[tuple[str, ...]] = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                                      "uint64")


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
    buffers: dict[str, AnyArray] = field(default_factory=dict)
    ties: dict[str, str] = field(default_factory=dict)
    aux: dict[str, AnyArray] = field(default_factory=dict)

    def dequantize(self, mapper: Mapper | None = None) -> dict[str, AnyArray]:
        """Every tensor of the source, in source order: quantized ones dequantized to
        their original dtype, float ones and buffers as stored, tied aliases as the
        very array of their canonical tensor.

        ``mapper`` (see ``Mapper``) may dequantize the tensors side by side; the arrays
        are the same either way. MiniLM at INT4 g64 took 42 ms on one thread and 26 ms on
        two where the output reused freed memory; with fresh pages for every output, load
        plus dequantization took 59-64 ms either way (tests/benchmarks/test_bench_kernels.py).
        """
        out: dict[str, AnyArray] = {}
        quantized: list[str] = []
        for name in self.order:
            if name in self.ties:
                continue
            if name in self.tensors:
                quantized.append(name)
            elif name in self.floats:
                out[name] = self.floats[name]
            elif name in self.buffers:
                out[name] = self.buffers[name]
            else:
                raise QuantizationError(f"tensor {name!r} is in the model's order but has no data")
        tensors = self.tensors
        out.update(zip(quantized, (mapper or each)(lambda name: dequantize(tensors[name]), quantized)))
        for alias, canonical in self.ties.items():
            out[alias] = out[canonical]
        return {name: out[name] for name in self.order}

    @property
    def parameter_count(self) -> int:
        """Floating-point parameters, each tied tensor counted once."""
        return sum(qt.numel for qt in self.tensors.values()) + sum(
            int(a.size) for a in self.floats.values())

    @property
    def quantized_parameter_count(self) -> int:
        return sum(qt.numel for qt in self.tensors.values())


def passthrough(weights: Mapping[str, AnyArray], ties: Mapping[str, str] | None = None
                ) -> tuple[dict[str, AnyArray], dict[str, AnyArray], dict[str, str]]:
    """Split a checkpoint into (floating tensors to plan, buffers, ties).

    Buffers are integer/boolean tensors (copied, never quantized). ``ties`` maps an
    alias to its canonical tensor; both must be in ``weights`` with identical dtype,
    shape and values (a "tie" whose values differ is two tensors, and storing it once
    would silently change the model), and a canonical tensor is never itself an alias.
    """
    ties = dict(ties or {})
    for alias, canonical in ties.items():
        if alias not in weights or canonical not in weights:
            raise QuantizationError(f"tie {alias!r} -> {canonical!r}: both tensors must be in the checkpoint")
        if canonical in ties or alias == canonical:
            raise QuantizationError(f"tie {alias!r} -> {canonical!r}: the canonical tensor must not be tied itself")
        a, c = weights[alias], weights[canonical]
        if a.dtype != c.dtype or a.shape != c.shape or not bool(np.array_equal(a, c)):
            raise QuantizationError(f"tie {alias!r} -> {canonical!r}: the two tensors differ "
                                    f"({a.dtype}{list(a.shape)[:4]} vs {c.dtype}{list(c.shape)[:4]} or values); "
                                    "only identical tensors can be stored once")
    floating: dict[str, AnyArray] = {}
    buffers: dict[str, AnyArray] = {}
    for name, array in weights.items():
        if isinstance(array, QuantizedTensor):
            raise QuantizationError(f"tensor {name!r} is already quantized ({array.scheme.name})")
        if not isinstance(array, np.ndarray):
            raise QuantizationError(f"tensor {name!r}: expected a numpy array, got {type(array).__name__}")
        if name in ties:
            continue
        if array.dtype.name in RAW_DTYPES:
            buffers[name] = np.array(array, copy=True)
        else:
            floating[name] = array
    return floating, buffers, ties


def quantize_model(weights: Mapping[str, AnyArray], config: QuantizationConfig,
                   progress: Progress | None = None,
                   hessians: Mapping[str, npt.NDArray[np.float32]] | None = None,
                   ties: Mapping[str, str] | None = None,
                   mapper: Mapper | None = None) -> QuantizedModel:
    """Quantize every tensor the config selects.

    ``progress(done, total, name)`` is called after each tensor (with a ``mapper``, from
    the threads it uses, one call at a time). ``hessians`` maps
    tensor names to the input Hessian GPTQ needs (``2 X^T X / n`` of the calibration
    activations); tensors without one fall back to clip search (their ``method`` says so).
    Integer and boolean tensors pass through as buffers; ``ties`` (alias -> canonical)
    stores tied weights once (see ``passthrough``).

    >>> w = {"fc.weight": np.ones((4, 64), np.float32), "fc.bias": np.zeros(4, np.float32)}
    >>> m = quantize_model(w, QuantizationConfig("int8-channel-sym"))
    >>> sorted(m.tensors), sorted(m.floats)
    (['fc.weight'], ['fc.bias'])
    """
    if not weights:
        raise QuantizationError("the model has no tensors; nothing to quantize")
    floating, buffers, tie_map = passthrough(weights, ties)
    tensors: dict[str, QuantizedTensor] = {}
    floats: dict[str, FloatArray] = {}
    skipped: dict[str, str] = {}
    total = len(floating)
    done = [0]
    lock = threading.Lock()

    def one(name: str) -> Outcome:
        """(quantized, None); (None, why) when it could not be (kept as float); (None, None)
        when the config keeps it as float."""
        array = floating[name]
        outcome: Outcome = (None, None)
        if config.wants(name, array):
            try:
                outcome = (quantize_tensor(array, config.scheme_for(name), name, config.method_for(name),
                                           hessians.get(name) if hessians is not None else None), None)
            except QuantizationError as exc:
                if config.fail_fast:
                    raise
                outcome = (None, str(exc))
        else:
            values, _dtype = as_float32(array, name)  # same validation for float tensors
            del values
        if progress is not None:
            with lock:
                done[0] += 1
                progress(done[0], total, name)
        return outcome

    names = list(floating)
    for name, (qt, why) in zip(names, (mapper or each)(one, names)):
        if qt is not None:
            tensors[name] = qt
            continue
        if why is not None:
            skipped[name] = why
        floats[name] = np.array(floating[name], copy=True)
    return QuantizedModel(tensors=tensors, floats=floats, order=tuple(weights), skipped=skipped,
                          buffers=buffers, ties=tie_map)
