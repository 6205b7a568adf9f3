"""arrowquant_core.metrics at its edges: what a gate reads when an output is zero, NaN or
infinite. A metric that turns a broken output into a passing figure is a gate that
cannot fail."""

from __future__ import annotations

import math

import numpy as np
import pytest

from arrowquant_core.metrics import cosine, row_cosines


def test_row_cosines_match_the_flat_cosine_row_by_row() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((16, 384)).astype(np.float32)
    b = a + 0.1 * rng.standard_normal((16, 384)).astype(np.float32)
    got = row_cosines(a, b)
    assert got.dtype == np.float64 and got.shape == (16,)
    for i in range(16):
        assert got[i] == pytest.approx(cosine(a[i], b[i]), abs=1e-12)


@pytest.mark.parametrize(("ref", "test", "want"), [
    ([0.0, 0.0], [0.0, 0.0], 1.0),            # both zero: identical (as ``cosine``)
    ([1.0, 2.0], [0.0, 0.0], 0.0),            # the output collapsed to zero: nothing in common
    ([0.0, 0.0], [1.0, 2.0], 0.0),
    ([3.0, 4.0], [-3.0, -4.0], -1.0),
    ([1.0, 2.0], [np.nan, 2.0], math.nan),    # a NaN output never reads as a match
    ([1.0, 2.0], [np.inf, 2.0], math.nan),
    ([np.nan, 0.0], [0.0, 0.0], math.nan),
])
def test_row_cosines_at_zero_and_non_finite_rows(ref: list[float], test: list[float], want: float) -> None:
    a, b = np.array([ref, [1.0, 1.0]]), np.array([test, [1.0, 1.0]])
    got = row_cosines(a, b)
    assert float(got[1]) == pytest.approx(1.0)  # a bad row does not spill onto the others
    if math.isnan(want):
        assert math.isnan(float(got[0]))
    else:
        assert float(got[0]) == pytest.approx(want) == cosine(a[:1], b[:1])


def test_a_nan_row_makes_the_mean_nan() -> None:
    """What the output gates read: the mean and the minimum over rows."""
    a = np.ones((3, 4))
    b = a.copy()
    b[1, 2] = np.nan
    cos = row_cosines(a, b)
    assert math.isnan(float(cos.mean())) and math.isnan(float(np.min(cos)))



def test_the_weight_row_cosines_follow_the_same_rule() -> None:
    """The suite's worst row of a weight and the streaming reader's row blocks use the
    rule of row_cosines (cosines_from_sums): a zero row kept zero is 1, a row that
    became zero 0, and a row with a NaN (here: one group's scale corrupted) NaN, where
    both used to read 0.0 (the streaming reader's running minimum, folded with Python's
    min(), would have dropped a NaN entirely)."""
    import dataclasses

    from arrowquant_core import stream
    from arrowquant_core.schemes import get_scheme
    from arrowquant_core.methods import quantize_tensor
    from arrowquant_core.tensor import dequantize
    from harness.context import row_cosine_min

    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 128)).astype(np.float32)
    w[2] = 0.0
    qt = quantize_tensor(w, get_scheme("int8-g64-asym"), "w")
    clean = dequantize(qt)
    assert row_cosine_min(w, clean) > 0.999 and row_cosine_min(w, np.zeros_like(w)) == 0.0
    m = stream.measure_tensor(qt, lambda r0, r1: w[r0:r1], block_values=256)
    assert m.row_cosine_min == pytest.approx(row_cosine_min(w, clean), abs=1e-12)
    scales = qt.scales.copy()
    scales[9] = np.nan  # row 4, second group
    broken = dataclasses.replace(qt, scales=scales)
    assert math.isnan(row_cosine_min(w, dequantize(broken)))
    for block_values in (128, 256, 10_000):  # the NaN row in the first, a middle or the only block
        assert math.isnan(stream.measure_tensor(broken, lambda r0, r1: w[r0:r1], block_values).row_cosine_min)
