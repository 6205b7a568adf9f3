"""Activation fake quantization: the "A" of W8A8 / W4A8 / W4A4.

Weights are quantized once and stored; activations are quantized on the fly at every
Linear input, so what we need is a quantize-dequantize ("fake quant") of a float tensor
along its last (feature) axis, with parameters that are either

- static, from calibration: one (scale, zero) for the whole tensor (``"tensor"``) or one
  per input feature (``"channel"``), computed from ranges observed on calibration data
  (``act_range`` -> ``act_params``); or
- dynamic, per token (``"token"``): one (scale, zero) per row, computed from the row
  itself at run time (the LLM.int8() / SmoothQuant "per-token" activation scale).

Code convention is the kernels' one (``kernels.py``): unsigned codes in
``[0, 2**bits - 1]`` and ``value = (code - zero) * scale``. Symmetric: ``zero`` is the
mid-range code ``2**(bits-1)`` and ``scale = absmax / (2**(bits-1) - 1)``; asymmetric:
the range is widened to include 0, ``scale = (hi - lo) / qmax`` and ``zero =
round(-lo / scale)`` is an integer, so 0.0 is exact. Scales and zeros are float32 arrays
(zeros hold integers) so a parameter table can store them in one column type.

Ranges are plain min/max: static scales with percentile clipping would need a choice per
layer and hide the outliers the dLLM papers measure ("Quantization Meets dLLMs", Lin et
al. 2025, Sec. 4: massive activation outliers in Dream 7B / LLaDA 8B), which is exactly
what per-time-group parameters (``timeaware.py``) are meant to track.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from arrowquant_core.errors import ConfigurationError, QuantizationError

F32 = npt.NDArray[np.float32]

ACT_BITS: Final[tuple[int, ...]] = (8, 4)
ACT_GRANULARITIES: Final[tuple[str, ...]] = ("tensor", "channel", "token")
# Granularities whose parameters come from calibration (and so live in a parameter table).
STATIC_GRANULARITIES: Final[tuple[str, ...]] = ("tensor", "channel")


@dataclass(frozen=True)
class ActScheme:
    """How the activations at a Linear input are fake-quantized.

    >>> ActScheme(8, "token").name
    'a8-token-sym'
    >>> ActScheme(4, "channel", symmetric=False).levels
    16
    """

    bits: int
    granularity: str
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.bits not in ACT_BITS:
            raise ConfigurationError(
                f"activation scheme: bits = {self.bits} is not one of {list(ACT_BITS)}")
        if self.granularity not in ACT_GRANULARITIES:
            raise ConfigurationError(
                f"activation scheme: granularity {self.granularity!r} is not one of "
                f"{list(ACT_GRANULARITIES)}")

    def __reduce__(self) -> tuple[object, tuple[int, str, bool]]:
        # Compiled frozen dataclasses cannot be unpickled field by field (docs/MYPYC.md).
        return (ActScheme, (self.bits, self.granularity, self.symmetric))

    @property
    def name(self) -> str:
        return f"a{self.bits}-{self.granularity}-{'sym' if self.symmetric else 'asym'}"

    @property
    def static(self) -> bool:
        """True when scale and zero come from calibration rather than from the input."""
        return self.granularity in STATIC_GRANULARITIES

    @property
    def levels(self) -> int:
        return 1 << self.bits

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1


def parse_act_scheme(name: str) -> ActScheme:
    """Inverse of ``ActScheme.name``.

    >>> parse_act_scheme("a4-channel-asym")
    ActScheme(bits=4, granularity='channel', symmetric=False)
    """
    parts = name.split("-")
    if len(parts) != 3 or not parts[0].startswith("a") or not parts[0][1:].isdigit() \
            or parts[2] not in ("sym", "asym"):
        raise ConfigurationError(
            f"activation scheme {name!r}: expected 'a{{bits}}-{{tensor|channel|token}}-{{sym|asym}}'")
    return ActScheme(int(parts[0][1:]), parts[1], parts[2] == "sym")


def _check_finite(x: npt.NDArray[np.floating], what: str) -> None:
    if x.size == 0:
        raise QuantizationError(f"{what}: empty activation tensor {x.shape}")
    if not bool(np.all(np.isfinite(x))):
        raise QuantizationError(f"{what}: activation holds NaN or Inf; cannot set a range")


def act_range(x: npt.NDArray[np.floating], granularity: str) -> tuple[F32, F32]:
    """(min, max) of ``x`` as float32: per last-axis feature (``"channel"``, shape
    ``(features,)``), over everything (``"tensor"``, shape ``(1,)``) or per row
    (``"token"``, shape ``x.shape[:-1] + (1,)``).

    >>> lo, hi = act_range(np.array([[1.0, -2.0], [3.0, 0.5]], np.float32), "channel")
    >>> lo.tolist(), hi.tolist()
    ([1.0, -2.0], [3.0, 0.5])
    """
    if granularity not in ACT_GRANULARITIES:
        raise ConfigurationError(
            f"activation range: granularity {granularity!r} is not one of {list(ACT_GRANULARITIES)}")
    if x.ndim == 0:
        raise QuantizationError("activation range: a scalar has no feature axis")
    _check_finite(x, "activation range")
    if granularity == "tensor":
        lo = np.array([np.min(x)], dtype=np.float32)
        hi = np.array([np.max(x)], dtype=np.float32)
    elif granularity == "channel":
        flat = x.reshape(-1, x.shape[-1])
        lo = np.min(flat, axis=0).astype(np.float32)
        hi = np.max(flat, axis=0).astype(np.float32)
    else:
        lo = np.min(x, axis=-1, keepdims=True).astype(np.float32)
        hi = np.max(x, axis=-1, keepdims=True).astype(np.float32)
    return lo, hi


def act_params(lo: npt.NDArray[np.floating], hi: npt.NDArray[np.floating],
               scheme: ActScheme) -> tuple[F32, F32]:
    """(scale, zero) float32 for ranges ``[lo, hi]`` (any matching shapes).

    A zero range (an all-zero feature, a dead channel) gets scale 1.0, so it quantizes
    to its zero point instead of dividing by zero.

    >>> s, z = act_params(np.array([-1.0], np.float32), np.array([1.0], np.float32), ActScheme(8, "tensor"))
    >>> round(float(s[0]) * 127, 6), float(z[0])
    (1.0, 128.0)
    """
    if lo.shape != hi.shape:
        raise ConfigurationError(f"activation params: lo {lo.shape} and hi {hi.shape} differ in shape")
    lo64 = np.asarray(lo, dtype=np.float64)
    hi64 = np.asarray(hi, dtype=np.float64)
    if not (bool(np.all(np.isfinite(lo64))) and bool(np.all(np.isfinite(hi64)))):
        raise QuantizationError("activation params: a range bound is NaN or Inf")
    if bool(np.any(lo64 > hi64)):
        raise ConfigurationError("activation params: a range has min > max")
    if scheme.symmetric:
        half = float((1 << (scheme.bits - 1)) - 1)
        absmax = np.maximum(np.abs(lo64), np.abs(hi64))
        scale = absmax / half
        zero = np.full(lo64.shape, float(1 << (scheme.bits - 1)))
        scale = np.where(scale > 0.0, scale, 1.0)
    else:
        qmax = float(scheme.qmax)
        lo64 = np.minimum(lo64, 0.0)
        hi64 = np.maximum(hi64, 0.0)
        scale = (hi64 - lo64) / qmax
        scale = np.where(scale > 0.0, scale, 1.0)
        zero = np.rint(-lo64 / scale)
        np.clip(zero, 0.0, qmax, out=zero)
    scale32 = scale.astype(np.float32)
    # a range so small its float32 scale underflows to 0 still gets a usable scale
    scale32 = np.where(scale32 > 0.0, scale32, np.float32(1.0)).astype(np.float32)
    return scale32, zero.astype(np.float32)


def fake_quant(x: npt.NDArray[np.floating], scheme: ActScheme,
               scale: F32 | None = None, zero: F32 | None = None) -> F32:
    """Quantize then dequantize ``x`` (float32 result, same shape).

    ``"token"`` computes scale and zero from each row of ``x``; the static granularities
    need ``scale`` and ``zero`` from calibration, shaped ``(1,)`` (tensor) or
    ``(features,)`` (channel). Values outside the calibrated range are clipped to the
    grid, which is what a static integer kernel would do.

    >>> fake_quant(np.array([[0.5, -1.0, 0.26]], np.float32), ActScheme(4, "token")).tolist()
    [[0.5714285969734192, -1.0, 0.2857142984867096]]
    """
    if x.ndim == 0:
        raise QuantizationError("fake_quant: a scalar has no feature axis")
    if scheme.granularity == "token":
        lo, hi = act_range(x, "token")
        scale, zero = act_params(lo, hi, scheme)
    else:
        if scale is None or zero is None:
            raise ConfigurationError(
                f"fake_quant: scheme {scheme.name} has a static granularity and needs calibrated scale and zero")
        features = x.shape[-1]
        want = (1,) if scheme.granularity == "tensor" else (features,)
        if scale.shape != want or zero.shape != want:
            raise ConfigurationError(
                f"fake_quant: scheme {scheme.name} on {features} features needs scale and zero "
                f"of shape {want}, got {scale.shape} and {zero.shape}")
        _check_finite(x, "fake_quant")
    work = np.asarray(x, dtype=np.float32) / scale
    work += zero
    np.rint(work, out=work)
    np.clip(work, 0.0, float(scheme.qmax), out=work)
    work -= zero
    work *= scale
    return work.astype(np.float32, copy=False)
