"""The suite's bit-for-bit comparison (harness/suite/checks.py): fast on equal
tensors, and it fails on every kind of difference a round trip could introduce."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from harness.suite.checks import assert_bit_identical


def test_identical_tensors_pass_whatever_their_dtype() -> None:
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float16, np.float64, ml_dtypes.bfloat16, np.int64, np.bool_):
        a = (rng.standard_normal((7, 5)) * 3).astype(dtype)
        assert_bit_identical(a, a.copy(), "t")
        assert_bit_identical(a.T, np.ascontiguousarray(a.T), "t (a strided view)")


def test_one_changed_value_fails_naming_the_tensor() -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = a.copy()
    b[2, 1] = np.nextafter(b[2, 1], np.float32(100))
    with pytest.raises(AssertionError, match="tensor w"):
        assert_bit_identical(b, a, "tensor w")


def test_signed_zero_and_nan_payload_fail_though_the_values_compare_equal() -> None:
    a = np.zeros(4, np.float32)
    b = a.copy()
    b[3] = -0.0
    with pytest.raises(AssertionError, match=r"1 value\(s\) have other bits.*index \[3\]"):
        assert_bit_identical(b, a, "tensor z")
    n1 = np.array([np.nan], np.float32)
    n2 = n1.view(np.uint32).copy()
    n2 |= 1
    with pytest.raises(AssertionError, match="other bits"):
        assert_bit_identical(n2.view(np.float32), n1, "tensor n")


def test_dtype_and_shape_must_match() -> None:
    a = np.ones((2, 3), np.float32)
    with pytest.raises(AssertionError, match="dtype float16 != float32"):
        assert_bit_identical(a.astype(np.float16), a, "t")
    with pytest.raises(AssertionError, match=r"shape \[3, 2\] != \[2, 3\]"):
        assert_bit_identical(a.reshape(3, 2), a, "t")
