"""Quality metrics between a reference tensor and its quantized reconstruction.

All accumulate in float64: a float32 sum over 11M embedding values loses the digits
that separate an INT8 cosine of 0.9999 from 0.99999.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.floating]


def _pair(reference: FloatArray, test: FloatArray) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    if reference.shape != test.shape:
        raise ValueError(f"shapes differ: reference {list(reference.shape)} vs test {list(test.shape)}")
    return (np.asarray(reference, dtype=np.float64).reshape(-1),
            np.asarray(test, dtype=np.float64).reshape(-1))


def cosine(reference: FloatArray, test: FloatArray) -> float:
    """Cosine similarity of two tensors flattened; 1.0 when both are all zero.

    >>> cosine(np.array([1.0, 0.0]), np.array([1.0, 0.0]))
    1.0
    """
    a, b = _pair(reference, test)
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def sqnr_db(reference: FloatArray, test: FloatArray) -> float:
    """Signal-to-quantization-noise ratio in dB; +inf for an exact reconstruction."""
    a, b = _pair(reference, test)
    noise = float(np.sum((a - b) ** 2))
    signal = float(np.sum(a * a))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def relative_error(reference: FloatArray, test: FloatArray) -> float:
    """||reference - test|| / ||reference|| (0 when both are zero)."""
    a, b = _pair(reference, test)
    norm = float(np.linalg.norm(a))
    diff = float(np.linalg.norm(a - b))
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / norm


def row_cosines(reference: FloatArray, test: FloatArray) -> npt.NDArray[np.float64]:
    """Cosine of each row pair of two 2-D arrays (e.g. sentence embeddings), as ``cosine``
    per row: 1.0 for two zero rows, 0.0 when only one row is zero, and NaN where either
    row holds a NaN or an infinity, so that no gate passes it. (A row of NaN embeddings
    used to read 1.0: its norm failed the ``> 0`` test and kept the default.)

    >>> row_cosines(np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]),
    ...             np.array([[2.0, 0.0], [0.0, 0.0], [np.nan, 1.0]])).tolist()
    [1.0, 1.0, nan]
    """
    if reference.shape != test.shape or reference.ndim != 2:
        raise ValueError(f"need two 2-D arrays of one shape, got {list(reference.shape)} and {list(test.shape)}")
    a = np.asarray(reference, dtype=np.float64)
    b = np.asarray(test, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite rows are NaN (cosines_from_sums)
        return cosines_from_sums(np.sum(a * b, axis=1), np.sum(a * a, axis=1), np.sum(b * b, axis=1))


def cosines_from_sums(dot: npt.NDArray[np.float64], ref_sq: npt.NDArray[np.float64],
                      test_sq: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Per-row cosines from per-row float64 sums ``dot = sum(a * b)``, ``ref_sq = sum(a * a)``
    and ``test_sq = sum(b * b)``: the one rule of ``row_cosines``, the harness's worst-row
    cosine of a weight and the streaming reader's row blocks. 1.0 for two zero rows, 0.0
    when only one row is zero, NaN where a sum is not finite (a NaN or an infinity in
    either row), so that no gate passes it.

    >>> cosines_from_sums(np.array([2.0, 0.0, 0.0]), np.array([1.0, 0.0, 0.0]), np.array([4.0, 0.0, 1.0])).tolist()
    [1.0, 1.0, 0.0]
    """
    out: npt.NDArray[np.float64] = np.zeros(dot.shape[0], dtype=np.float64)  # one zero row: 0.0
    with np.errstate(invalid="ignore", over="ignore"):
        na, nb = np.sqrt(ref_sq), np.sqrt(test_sq)
        np.divide(dot, na * nb, out=out, where=(na > 0) & (nb > 0))
    out[(na == 0) & (nb == 0)] = 1.0
    out[~(np.isfinite(na) & np.isfinite(nb) & np.isfinite(dot))] = np.nan
    return out
