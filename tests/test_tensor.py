"""Tests of quantize/dequantize on whole tensors: every scheme, shape and dtype; the error
bound; the caller's array; typed errors; ``QuantizedTensor.check``."""

from __future__ import annotations

import dataclasses
import math

import ml_dtypes
import numpy as np
import numpy.typing as npt
import pytest

from arrowquant_core.errors import ConfigurationError, FormatError, QuantizationError
from arrowquant_core.schemes import SCHEMES
from arrowquant_core.tensor import QuantizedTensor, dequantize, quantize

ALL = sorted(SCHEMES)
# 1-D; 2-D whose row fills groups of 32/64 exactly; 2-D ragged for every group size
# (300 = 9*32+12 = 4*64+44 = 2*128+44 = 256+44); 3-D (rows = first axis, cols = 3*24 = 72).
SHAPES = [(200,), (6, 64), (5, 300), (4, 3, 24)]
DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
          "bfloat16": np.dtype(ml_dtypes.bfloat16), "float64": np.dtype(np.float64)}
# relative rounding of the output dtype, added to the bound when deq is cast back
OUT_EPS = {"float32": 0.0, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8, "float64": 0.0}


def sample(shape: tuple[int, ...], dtype: np.dtype[np.generic], seed: int = 0) -> npt.NDArray[np.floating]:
    """Gaussian weights with an all-zero leading stretch, a constant stretch and one outlier."""
    rng = np.random.default_rng(seed)
    flat = rng.standard_normal(math.prod(shape)) * 0.1
    flat[:20] = 0.0
    flat[20:40] = 0.25
    flat[len(flat) // 2 + 3] = 9.0
    return flat.reshape(shape).astype(dtype)


def element_scales(qt: QuantizedTensor) -> npt.NDArray[np.float64]:
    """The scale that applies to each element, from the documented layout.

    A tensor is a matrix (rows = first axis, a vector is one row; cols = the rest);
    tensor: one scale; channel: one per row; group: ceil(cols / g) per row, in order.
    """
    numel = math.prod(qt.shape)
    scales = qt.scales.astype(np.float64)
    if qt.scheme.granularity == "tensor":
        return np.full(qt.shape, scales[0])
    rows = qt.shape[0] if len(qt.shape) >= 2 else 1
    cols = numel // rows
    if qt.scheme.granularity == "channel":
        return np.repeat(scales, cols).reshape(qt.shape)
    g = qt.scheme.group_size
    n_groups = -(-cols // g)
    col_group = np.arange(cols) // g
    index = np.arange(rows)[:, None] * n_groups + col_group[None, :]
    out: npt.NDArray[np.float64] = scales[index].reshape(qt.shape)
    return out


def assert_within_bound(x: npt.NDArray[np.floating], qt: QuantizedTensor) -> None:
    deq = dequantize(qt)
    x64 = x.astype(np.float64)
    d64 = deq.astype(np.float64)
    scale = element_scales(qt)
    err = np.abs(x64 - d64)
    bound = scale * (0.5 + 1e-5) + np.abs(x64) * (1e-6 + OUT_EPS[qt.dtype]) + 1e-30
    excess = err - bound
    worst = np.unravel_index(int(np.argmax(excess)), x.shape)
    assert excess[worst] <= 0, (f"{qt.scheme.name} {list(qt.shape)} {qt.dtype}: at {list(worst)} "
                                f"x={x64[worst]} deq={d64[worst]} error {err[worst]} > scale/2 = "
                                f"{scale[worst] / 2}")


# ------------------------------------------------------------------------------ round trips

@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", ALL)
def test_every_scheme_shape_and_dtype(name: str, shape: tuple[int, ...], dtype: str) -> None:
    x = sample(shape, DTYPES[dtype])
    qt = quantize(x, name, name="w")
    qt.check()
    assert (qt.name, qt.scheme, qt.shape, qt.dtype, qt.method) == ("w", SCHEMES[name], shape, dtype, "rtn")
    assert qt.codes.size == math.ceil(math.prod(shape) * qt.scheme.bits / 8)
    assert qt.zeros.size == (0 if qt.scheme.symmetric else qt.scales.size)
    deq = dequantize(qt)
    assert deq.shape == shape
    assert deq.dtype == DTYPES[dtype]
    assert_within_bound(x, qt)


@pytest.mark.parametrize("name", ALL)
def test_scheme_object_and_name_give_the_same_tensor(name: str) -> None:
    x = sample((5, 300), DTYPES["float32"], seed=1)
    a, b = quantize(x, name, "w"), quantize(x, SCHEMES[name], "w")
    assert a.codes.tobytes() == b.codes.tobytes()
    assert a.scales.tobytes() == b.scales.tobytes()
    assert a.zeros.tobytes() == b.zeros.tobytes()


@pytest.mark.parametrize("name", ["int8-tensor-sym", "int4-channel-asym", "int2-g32-asym", "int4-g256-sym"])
def test_scalar_tensor(name: str) -> None:
    x = np.array(0.75, np.float32)
    deq = dequantize(quantize(x, name, "s"))
    assert deq.shape == ()
    assert abs(float(deq) - 0.75) <= 1e-6


@pytest.mark.parametrize("name", ["int4-g32-asym", "int8-g64-sym", "int2-g128-asym"])
def test_ragged_last_group_uses_only_real_values(name: str) -> None:
    # cols = 40 with g = 32 (or larger): the last group holds 8 (or 40) real values. Its
    # scale must come from those values alone: a padded group made of a huge value must
    # not bleed into the next row, and a tiny last group gets a tiny scale.
    x = np.zeros((2, 40), np.float32)
    x[0] = 1000.0
    x[1, :] = 0.001
    qt = quantize(x, name, "w")
    g = qt.scheme.group_size
    n_groups = -(-40 // g)
    scales = qt.scales.reshape(2, n_groups)
    assert np.all(scales[1] <= 0.001 / (2 ** (qt.scheme.bits - 1) - 1) * 1.001)
    assert_within_bound(x, qt)


@pytest.mark.parametrize("name", ["int8-channel-asym", "int4-g32-sym", "int2-tensor-asym"])
def test_non_contiguous_and_read_only_inputs(name: str) -> None:
    base = sample((6, 128), DTYPES["float32"], seed=4)
    reference = quantize(np.ascontiguousarray(base[:, ::2]), name, "w")
    view = base[:, ::2]
    assert not view.flags.c_contiguous
    frozen = np.ascontiguousarray(base[:, ::2])
    frozen.flags.writeable = False
    for variant in (view, frozen):
        qt = quantize(variant, name, "w")
        assert qt.codes.tobytes() == reference.codes.tobytes()
        assert qt.scales.tobytes() == reference.scales.tobytes()
        assert qt.zeros.tobytes() == reference.zeros.tobytes()
    assert frozen.flags.writeable is False


@pytest.mark.parametrize("dtype", [">f4", ">f2", ">f8"])
def test_big_endian_floats_quantize_like_native_ones(dtype: str) -> None:
    # A big-endian float32 is a float32 (np.load of a '>f4' .npy, some checkpoint
    # formats); storage.py even byte-swaps such arrays on write. Same values, same codes.
    native = sample((6, 64), np.dtype(dtype).newbyteorder("="), seed=4)
    swapped = native.astype(dtype)
    reference = quantize(native, "int4-g32-asym", "w")
    qt = quantize(swapped, "int4-g32-asym", "w")
    assert qt.dtype == str(native.dtype)
    assert qt.codes.tobytes() == reference.codes.tobytes()
    assert qt.scales.tobytes() == reference.scales.tobytes()
    assert dequantize(qt).tobytes() == dequantize(reference).tobytes()


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("writeable", [True, False])
def test_callers_array_is_not_modified(dtype: str, writeable: bool) -> None:
    x = sample((5, 300), DTYPES[dtype], seed=2)
    x.flags.writeable = writeable
    before = x.copy()
    for name in ("int4-g64-asym", "int8-channel-sym", "int2-tensor-asym"):
        qt = quantize(x, name, "w")
        dequantize(qt)
        assert not np.shares_memory(qt.codes, x) and not np.shares_memory(qt.scales, x)
    assert x.tobytes() == before.tobytes()
    assert x.dtype == before.dtype and x.shape == before.shape
    assert x.flags.writeable is writeable


def test_dequantize_returns_a_fresh_array_each_time() -> None:
    qt = quantize(sample((4, 64), DTYPES["float32"]), "int8-channel-sym", "w")
    a = dequantize(qt)
    a[...] = 123.0
    b = dequantize(qt)
    assert not np.any(b == 123.0)


# ---------------------------------------------------------------------------------- errors

def test_nan_names_the_tensor_the_index_and_the_rule() -> None:
    x = np.ones((3, 4), np.float32)
    x[1, 2] = np.nan
    with pytest.raises(QuantizationError) as info:
        quantize(x, "int8-channel-sym", "layer.3.q.weight")
    message = str(info.value)
    assert "'layer.3.q.weight'" in message
    assert "nan" in message.lower() and "[1, 2]" in message and "finite" in message


@pytest.mark.parametrize("value", [np.inf, -np.inf])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_infinities_are_rejected(value: float, dtype: str) -> None:
    x = np.zeros(10, DTYPES[dtype])
    x[7] = value
    with pytest.raises(QuantizationError) as info:
        quantize(x, "int4-tensor-asym", "emb")
    assert "'emb'" in str(info.value) and "inf" in str(info.value) and "finite" in str(info.value)


def test_float64_values_outside_float32_range_name_the_value() -> None:
    # 1e39 is a finite float64 that does not fit float32; the message must state the
    # offending value and the rule, not claim the tensor holds an infinity.
    x = np.array([1.0, 1e39, -2.0], np.float64)
    with pytest.raises(QuantizationError) as info:
        quantize(x, "int8-tensor-sym", "big")
    message = str(info.value)
    assert "'big'" in message
    assert "1e+39" in message, message


@pytest.mark.parametrize("shape", [(0,), (0, 8), (8, 0), (2, 0, 3)])
def test_empty_tensor(shape: tuple[int, ...]) -> None:
    with pytest.raises(QuantizationError) as info:
        quantize(np.zeros(shape, np.float32), "int8-channel-sym", "empty.w")
    assert "'empty.w'" in str(info.value) and "empty" in str(info.value)


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int32, np.int64])
def test_integer_dtype_looks_already_quantized(dtype: type) -> None:
    with pytest.raises(QuantizationError) as info:
        quantize(np.zeros((4, 4), dtype), "int8-channel-sym", "codes.w")
    message = str(info.value)
    assert "'codes.w'" in message and np.dtype(dtype).name in message
    assert "already quantized" in message


@pytest.mark.parametrize("array", [np.zeros(4, np.bool_), np.zeros(4, np.complex64)])
def test_other_dtypes_are_rejected(array: npt.NDArray[np.generic]) -> None:
    with pytest.raises(QuantizationError, match="'odd'.*cannot be quantized"):
        quantize(array, "int8-tensor-sym", "odd")


def test_quantized_tensor_cannot_be_quantized_again() -> None:
    qt = quantize(np.ones((2, 32), np.float32), "int4-g32-asym", "w")
    with pytest.raises(QuantizationError) as info:
        quantize(qt, "int8-channel-sym", "w")
    assert "'w'" in str(info.value) and "already quantized" in str(info.value)
    assert "int4-g32-asym" in str(info.value)


@pytest.mark.parametrize("value", [[1.0, 2.0], 3.0, None])
def test_non_arrays_are_rejected(value: object) -> None:
    with pytest.raises(QuantizationError, match="'x'.*expected a numpy array"):
        quantize(value, "int8-tensor-sym", "x")


def test_dequantize_of_a_plain_array_is_rejected() -> None:
    with pytest.raises(QuantizationError, match="expects a QuantizedTensor"):
        dequantize(np.ones(3, np.float32))  # type: ignore[arg-type]


def test_unknown_scheme_string_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="unknown scheme 'int4-g63-asym'; did you mean"):
        quantize(np.ones((2, 64), np.float32), "int4-g63-asym", "w")


# ------------------------------------------------------------------- QuantizedTensor.check

def base_tensor(name: str) -> QuantizedTensor:
    return quantize(sample((5, 300), DTYPES["float32"]), name, "blk.0.w")


def damaged(qt: QuantizedTensor) -> list[tuple[str, QuantizedTensor]]:
    cases = [
        ("one code byte short", dataclasses.replace(qt, codes=qt.codes[:-1])),
        ("one code byte extra", dataclasses.replace(qt, codes=np.append(qt.codes, np.uint8(0)))),
        ("codes not uint8", dataclasses.replace(qt, codes=qt.codes.astype(np.int16))),
        ("one scale short", dataclasses.replace(qt, scales=qt.scales[:-1])),
        ("one scale extra", dataclasses.replace(qt, scales=np.append(qt.scales, np.float32(1)))),
        ("scales float64", dataclasses.replace(qt, scales=qt.scales.astype(np.float64))),
        ("negative scale", dataclasses.replace(qt, scales=-qt.scales)),
        ("nan scale", dataclasses.replace(qt, scales=np.where(np.arange(qt.scales.size) == 0,
                                                               np.float32(np.nan), qt.scales))),
        ("dtype int8", dataclasses.replace(qt, dtype="int8")),
        ("shape grown", dataclasses.replace(qt, shape=(5, 301))),
    ]
    if qt.scheme.symmetric:
        cases.append(("zeros on a symmetric scheme",
                      dataclasses.replace(qt, zeros=np.zeros(qt.scales.size, np.uint8))))
    else:
        cases += [
            ("zeros missing", dataclasses.replace(qt, zeros=np.zeros(0, np.uint8))),
            ("one zero short", dataclasses.replace(qt, zeros=qt.zeros[:-1])),
            ("zeros not uint8", dataclasses.replace(qt, zeros=qt.zeros.astype(np.int16))),
        ]
        if qt.scheme.bits < 8:
            cases.append(("zero point above qmax", dataclasses.replace(
                qt, zeros=np.full(qt.zeros.size, qt.scheme.qmax + 1, np.uint8))))
    return cases


@pytest.mark.parametrize("name", ["int8-g32-asym", "int4-g64-sym", "int2-channel-asym", "int4-tensor-asym"])
def test_check_catches_wrong_sizes_and_values(name: str) -> None:
    qt = base_tensor(name)
    qt.check()
    for what, bad in damaged(qt):
        with pytest.raises(FormatError) as info:
            bad.check("model.parquet")
        message = str(info.value)
        assert message.startswith("model.parquet: "), f"{what}: {message}"
        assert "'blk.0.w'" in message, f"{what}: {message}"


def test_group_of_16_with_ragged_rows_quantizes() -> None:
    scheme = SCHEMES["int4-g16-asym"]
    x = sample((3, 50), DTYPES["float32"])
    qt = quantize(x, scheme, "w")
    qt.check()
    assert qt.scales.size == 3 * 4
    assert_within_bound(x, qt)
