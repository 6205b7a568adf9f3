"""Activation fake-quantization (quantize then dequantize) for weight-activation schemes.

Placeholder of the branch ``dit`` written against the API the ``time-aware`` branch
provides at this path; that version replaces this one when both are merged.

An activation scheme is bits (8 or 4), a granularity -- ``tensor`` or ``channel`` (static
ranges measured on calibration data) or ``token`` (dynamic, one range per row at run
time) -- and symmetry. Quantization runs along the last axis (the Linear input features).

>>> s = ActScheme(8, "token")
>>> s.name
'a8-token-sym'
>>> x = np.array([[1.0, -2.0, 0.5]], np.float32)
>>> float(np.abs(fake_quant(x, s) - x).max()) < 0.01
True
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


@dataclass(frozen=True)
class ActScheme:
    bits: int
    granularity: str
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.bits not in ACT_BITS:
            raise ConfigurationError(f"activation bits = {self.bits!r}: must be one of {list(ACT_BITS)}")
        if self.granularity not in ACT_GRANULARITIES:
            raise ConfigurationError(f"activation granularity = {self.granularity!r}: must be one of "
                                     f"{list(ACT_GRANULARITIES)}")

    @property
    def name(self) -> str:
        return f"a{self.bits}-{self.granularity}-{'sym' if self.symmetric else 'asym'}"

    @property
    def static(self) -> bool:
        return self.granularity != "token"


def act_range(x: npt.NDArray[np.floating], granularity: str) -> tuple[F32, F32]:
    """``(min, max)`` of ``x``: over all axes (``tensor``, shape ``(1,)``), over all but the
    last (``channel``, shape ``(C,)``), or over the last axis (``token``, one per row)."""
    a = np.asarray(x, dtype=np.float32)
    if a.size == 0:
        raise QuantizationError(f"activation range of an empty array (shape {list(a.shape)})")
    if granularity == "tensor":
        return np.array([a.min()], np.float32), np.array([a.max()], np.float32)
    if granularity == "channel":
        flat = a.reshape(-1, a.shape[-1])
        return flat.min(axis=0).astype(np.float32), flat.max(axis=0).astype(np.float32)
    if granularity == "token":
        return a.min(axis=-1, keepdims=True), a.max(axis=-1, keepdims=True)
    raise ConfigurationError(f"activation granularity = {granularity!r}: must be one of {list(ACT_GRANULARITIES)}")


def act_params(lo: npt.NDArray[np.floating], hi: npt.NDArray[np.floating], scheme: ActScheme) -> tuple[F32, F32]:
    """``(scale, zero)`` float32 for the range ``[lo, hi]`` (0.0 always representable)."""
    lo32 = np.minimum(np.asarray(lo, dtype=np.float32), np.float32(0.0))
    hi32 = np.maximum(np.asarray(hi, dtype=np.float32), np.float32(0.0))
    if scheme.symmetric:
        qmax = float(2 ** (scheme.bits - 1) - 1)
        scale = np.maximum(np.abs(lo32), np.abs(hi32)) / np.float32(qmax)
        zero = np.zeros_like(scale)
    else:
        levels = float(2 ** scheme.bits - 1)
        scale = (hi32 - lo32) / np.float32(levels)
        with np.errstate(divide="ignore", invalid="ignore"):
            zero = np.where(scale > 0, np.rint(-lo32 / scale), 0.0).astype(np.float32)
    safe: F32 = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    return safe, zero.astype(np.float32)


def fake_quant(x: npt.NDArray[np.floating], scheme: ActScheme, scale: npt.NDArray[np.floating] | None = None,
               zero: npt.NDArray[np.floating] | None = None) -> F32:
    """Quantize-dequantize ``x`` along its last axis. ``token`` computes the range of each row
    from ``x``; static granularities need the calibrated ``scale`` and ``zero``."""
    a = np.asarray(x, dtype=np.float32)
    if scheme.granularity == "token":
        lo, hi = act_range(a, "token")
        scale, zero = act_params(lo, hi, scheme)
    elif scale is None or zero is None:
        raise ConfigurationError(f"activation scheme {scheme.name}: static granularity needs the scale and "
                                 "zero point measured on calibration data")
    s = np.asarray(scale, dtype=np.float32)
    z = np.asarray(zero, dtype=np.float32)
    q = a / s
    np.rint(q, out=q)
    if scheme.symmetric:
        qmax = np.float32(2 ** (scheme.bits - 1) - 1)
        np.clip(q, -qmax, qmax, out=q)
    else:
        q += z
        np.clip(q, np.float32(0.0), np.float32(2 ** scheme.bits - 1), out=q)
        q -= z
    q *= s
    return q.astype(np.float32, copy=False)
