"""Tests of the block kernels: bit packing, round-to-nearest quantization, dequantization.

Kinds (docs/STYLE.md rule 14): exact round trips, an oracle against a slow per-block
reference that reports the worst block, Hypothesis properties (derandomized), and the
named edge cases (all-zero block, constant block, single huge outlier, tiny values).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arrowquant_core.errors import ConfigurationError
from arrowquant_core.kernels import (
    CHUNK_VALUES,
    block_range,
    dequantize_blocks,
    dequantize_matrix,
    pack,
    params_from_range,
    quantize_blocks,
    quantize_matrix,
    unpack,
)

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]
BITS = (8, 4, 2)
KINDS = [(bits, sym) for bits in BITS for sym in (True, False)]
KIND_IDS = [f"int{b}-{'sym' if s else 'asym'}" for b, s in KINDS]


def normal_floats(limit: float) -> st.SearchStrategy[float]:
    """float32 values in [-limit, limit], with magnitudes below 1e-30 flushed to 0.0.

    Tiny magnitudes make the scale subnormal; that case has its own named test
    (``test_tiny_values_whose_scale_is_subnormal``) so it fails once, not everywhere.
    """
    return st.floats(-limit, limit, width=32).map(lambda v: v if abs(v) >= 1e-30 else 0.0)


# --------------------------------------------------------------------------------- packing

@given(data=st.data(), bits=st.sampled_from(BITS))
@settings(derandomize=True, max_examples=150, deadline=None)
def test_pack_unpack_round_trip_is_exact(data: st.DataObject, bits: int) -> None:
    values = data.draw(st.lists(st.integers(0, 2 ** bits - 1), max_size=300), label="codes")
    codes = np.array(values, dtype=np.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == np.uint8
    assert packed.size == math.ceil(codes.size * bits / 8)
    back = unpack(packed, bits, codes.size)
    assert back.dtype == np.uint8
    assert back.tolist() == values


@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_every_small_length(bits: int) -> None:
    rng = np.random.default_rng(bits)
    for n in range(0, 67):  # covers every remainder modulo codes-per-byte, several times
        codes = rng.integers(0, 2 ** bits, size=n, dtype=np.uint8)
        packed = pack(codes, bits)
        assert packed.size == -(-n * bits // 8), f"n={n}"
        assert np.array_equal(unpack(packed, bits, n), codes), f"n={n}"


def test_known_byte_layout() -> None:
    # 4-bit: byte = c0 | c1 << 4 (low nibble first)
    assert pack(np.array([1, 2, 3], np.uint8), 4).tolist() == [0x21, 0x03]
    assert pack(np.array([0xF, 0x0, 0x0, 0xF], np.uint8), 4).tolist() == [0x0F, 0xF0]
    # 2-bit: byte = c0 | c1 << 2 | c2 << 4 | c3 << 6
    assert pack(np.array([1, 2, 3, 0, 3], np.uint8), 2).tolist() == [1 | 2 << 2 | 3 << 4, 3]
    assert pack(np.array([0, 0, 0, 3], np.uint8), 2).tolist() == [0xC0]
    # 8-bit: identity
    assert pack(np.array([0, 7, 255], np.uint8), 8).tolist() == [0, 7, 255]


@pytest.mark.parametrize("bits", (4, 2))
def test_byte_layout_matches_the_formula_on_random_codes(bits: int) -> None:
    rng = np.random.default_rng(7)
    per = 8 // bits
    codes = rng.integers(0, 2 ** bits, size=per * 50, dtype=np.uint8)
    expected = [sum(int(codes[i * per + k]) << (k * bits) for k in range(per)) for i in range(50)]
    assert pack(codes, bits).tolist() == expected


def test_pack_accepts_any_shape_and_leaves_input_alone() -> None:
    codes = np.arange(24, dtype=np.uint8).reshape(2, 3, 4) % 16
    before = codes.copy()
    packed = pack(codes, 4)
    assert np.array_equal(codes, before)
    assert np.array_equal(unpack(packed, 4, 24), codes.reshape(-1))


def test_unsupported_widths_and_short_buffers_are_configuration_errors() -> None:
    with pytest.raises(ConfigurationError, match="3-bit"):
        pack(np.zeros(4, np.uint8), 3)
    with pytest.raises(ConfigurationError, match="3-bit"):
        unpack(np.zeros(4, np.uint8), 3, 4)
    with pytest.raises(ConfigurationError, match="2 bytes"):
        unpack(np.zeros(2, np.uint8), 4, 5)


# ------------------------------------------------------------------- the slow reference

def reference_quantize(blocks: F32, bits: int, symmetric: bool) -> tuple[U8, F32, U8]:
    """Obviously correct, one block at a time, in float64 with a float32 cast after each
    element-wise operation (for + - * / that equals float32 arithmetic exactly); the
    per-block range and zero point stay in float64, as in the kernel.

    Convention (kernels.py docstring): ``value = (code - zero) * scale``, codes unsigned in
    ``[0, 2**bits - 1]``; symmetric: ``scale = absmax / (2**(bits-1) - 1)``, zero =
    ``2**(bits-1)``; asymmetric: range widened to include 0, ``scale = (hi - lo) / qmax``,
    integer zero point ``round(-lo / scale)``. The code is ``round(x * (1/scale)) + zero``:
    the kernel multiplies by the float32 reciprocal, and the oracle does the same so that
    values sitting exactly on a rounding boundary agree. A zero scale maps every value to
    the zero point.
    """
    def f32(x: float) -> float:
        return float(np.float32(x))

    qmax = 2 ** bits - 1
    n = blocks.shape[0]
    codes = np.zeros(blocks.shape, np.uint8)
    scales = np.zeros(n, np.float32)
    zeros = np.zeros(n, np.uint8)
    for i in range(n):
        row = [float(v) for v in blocks[i]]
        if symmetric:
            scale = f32(max(abs(v) for v in row) / (2 ** (bits - 1) - 1))
            zero = 2 ** (bits - 1)
        else:
            lo, hi = min(min(row), 0.0), max(max(row), 0.0)
            scale = f32((hi - lo) / qmax)  # the kernel works per block in float64, then casts
            inv = f32(1.0 / scale) if scale != 0 else 0.0
            zero = int(min(max(np.rint(-lo * inv), 0), qmax))
        inv = f32(1.0 / scale) if scale != 0 else 0.0
        for j, v in enumerate(row):
            codes[i, j] = int(min(max(np.rint(f32(v * inv)) + zero, 0), qmax))
        scales[i], zeros[i] = scale, zero
    return codes, scales, zeros


def planted_blocks(rng: np.random.Generator, n: int, block: int) -> F32:
    """``(n, block)`` float32: Gaussian weights plus named edge-case blocks at the top.

    Row 0 all zeros, row 1 constant positive, row 2 constant negative, row 3 a single
    huge outlier among small values, row 4 all positive, row 5 all negative, row 6 a
    value exactly at zero among others (asymmetric: must come back as 0.0).
    """
    x = (rng.standard_normal((n, block)) * 0.05).astype(np.float32)
    x[0] = 0.0
    x[1] = 0.3
    x[2] = -1.7
    x[3] = rng.standard_normal(block).astype(np.float32) * 1e-3
    x[3, block // 2] = 1.0e4
    x[4] = np.abs(x[4]) + 0.5
    x[5] = -np.abs(x[5]) - 0.5
    x[6, ::3] = 0.0
    return x


def worst_block(a: npt.NDArray[np.generic], b: npt.NDArray[np.generic], blocks: F32) -> str:
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64)).reshape(a.shape[0], -1).max(axis=1)
    i = int(np.argmax(diff))
    return (f"{int(np.count_nonzero(diff))} block(s) differ; worst block {i} (max diff {diff[i]}): "
            f"input {blocks[i].tolist()}, kernel {a[i].tolist()}, reference {b[i].tolist()}")


@pytest.mark.parametrize(("bits", "symmetric"), KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("block", [32, 64, 100])
def test_quantize_blocks_matches_reference(bits: int, symmetric: bool, block: int) -> None:
    blocks = planted_blocks(np.random.default_rng(bits * 1000 + block), 48, block)
    codes, scales, zeros = quantize_blocks(blocks, bits, symmetric)
    ref_codes, ref_scales, ref_zeros = reference_quantize(blocks, bits, symmetric)
    assert codes.shape == blocks.shape and codes.dtype == np.uint8
    assert scales.shape == (48,) and scales.dtype == np.float32
    assert zeros.shape == (48,) and zeros.dtype == np.uint8
    assert np.array_equal(scales, ref_scales), "scales: " + worst_block(scales[:, None], ref_scales[:, None], blocks)
    assert np.array_equal(zeros, ref_zeros), "zeros: " + worst_block(zeros[:, None], ref_zeros[:, None], blocks)
    assert np.array_equal(codes, ref_codes), "codes: " + worst_block(codes, ref_codes, blocks)


@given(data=st.data(), kind=st.sampled_from(KINDS))
@settings(derandomize=True, max_examples=60, deadline=None)
def test_quantize_blocks_matches_reference_on_arbitrary_blocks(
        data: st.DataObject, kind: tuple[int, bool]) -> None:
    bits, symmetric = kind
    n = data.draw(st.integers(1, 4), label="n_blocks")
    block = data.draw(st.integers(1, 40), label="block")
    finite = normal_floats(1e6)
    values = data.draw(st.lists(finite, min_size=n * block, max_size=n * block), label="values")
    blocks = np.array(values, dtype=np.float32).reshape(n, block)
    codes, scales, zeros = quantize_blocks(blocks, bits, symmetric)
    ref_codes, ref_scales, ref_zeros = reference_quantize(blocks, bits, symmetric)
    assert np.array_equal(scales, ref_scales), worst_block(scales[:, None], ref_scales[:, None], blocks)
    assert np.array_equal(zeros, ref_zeros), worst_block(zeros[:, None], ref_zeros[:, None], blocks)
    assert np.array_equal(codes, ref_codes), worst_block(codes, ref_codes, blocks)


# ----------------------------------------------------------------------- error bound

def assert_within_half_step(blocks: F32, bits: int, symmetric: bool) -> None:
    codes, scales, zeros = quantize_blocks(blocks, bits, symmetric)
    deq = dequantize_blocks(codes, scales, zeros)
    assert deq.dtype == np.float32 and deq.shape == blocks.shape
    assert np.all(np.isfinite(scales)), f"non-finite scales {scales.tolist()}"
    err = np.abs(blocks.astype(np.float64) - deq.astype(np.float64))
    # half a step, plus float32 rounding of the scale, the reciprocal and the product
    bound = scales.astype(np.float64)[:, None] * (0.5 + 1e-5) + np.abs(blocks) * 1e-6 + 1e-44
    excess = (err - bound).max(axis=1)
    i = int(np.argmax(excess))
    assert excess[i] <= 0, (f"block {i}: error {err[i].max()} > scale/2 = {scales[i] / 2}; "
                            f"input {blocks[i].tolist()}, dequantized {deq[i].tolist()}")


@pytest.mark.parametrize(("bits", "symmetric"), KINDS, ids=KIND_IDS)
def test_error_is_at_most_half_a_step(bits: int, symmetric: bool) -> None:
    assert_within_half_step(planted_blocks(np.random.default_rng(3), 64, 64), bits, symmetric)


@given(data=st.data(), kind=st.sampled_from(KINDS))
@settings(derandomize=True, max_examples=60, deadline=None)
def test_error_is_at_most_half_a_step_on_arbitrary_blocks(
        data: st.DataObject, kind: tuple[int, bool]) -> None:
    block = data.draw(st.integers(1, 48), label="block")
    finite = normal_floats(2.0 ** 100)
    values = data.draw(st.lists(finite, min_size=block, max_size=block), label="values")
    assert_within_half_step(np.array([values], dtype=np.float32), *kind)


# ----------------------------------------------------------------- exact on the code grid

def grid_blocks(rng: np.random.Generator, bits: int, symmetric: bool,
                n: int, block: int) -> tuple[U8, F32, U8, F32]:
    """Codes, power-of-two scales, zero points and the exact values they encode.

    Every block uses its extreme codes (0 and qmax asymmetric, zero +- (2**(bits-1)-1)
    symmetric) so the kernel recovers the same scale; powers of two make every product exact.
    """
    qmax = 2 ** bits - 1
    half = 2 ** (bits - 1) - 1
    scales = (2.0 ** rng.integers(-12, 4, size=n)).astype(np.float32)
    if symmetric:
        zeros = np.full(n, 2 ** (bits - 1), np.uint8)
        codes = rng.integers(1, qmax + 1, size=(n, block)).astype(np.uint8)
        codes[:, 0] = zeros + half
        codes[:, 1] = np.where(rng.random(n) < 0.5, zeros - half, zeros + half)
    else:
        zeros = rng.integers(0, qmax + 1, size=n).astype(np.uint8)
        codes = rng.integers(0, qmax + 1, size=(n, block)).astype(np.uint8)
        codes[:, 0] = 0
        codes[:, 1] = qmax
    values = (codes.astype(np.float32) - zeros[:, None].astype(np.float32)) * scales[:, None]
    return codes, scales, zeros, values.astype(np.float32)


@pytest.mark.parametrize(("bits", "symmetric"), KINDS, ids=KIND_IDS)
def test_values_on_the_code_grid_round_trip_exactly(bits: int, symmetric: bool) -> None:
    codes, scales, zeros, values = grid_blocks(np.random.default_rng(bits), bits, symmetric, 40, 33)
    got_codes, got_scales, got_zeros = quantize_blocks(values, bits, symmetric)
    assert np.array_equal(got_scales, scales), worst_block(got_scales[:, None], scales[:, None], values)
    assert np.array_equal(got_zeros, zeros), worst_block(got_zeros[:, None], zeros[:, None], values)
    assert np.array_equal(got_codes, codes), worst_block(got_codes, codes, values)
    deq = dequantize_blocks(got_codes, got_scales, got_zeros)
    assert deq.tobytes() == values.tobytes(), worst_block(deq, values, values)
    # and once more: quantize(dequantize(quantize(x))) gives the same codes
    again = quantize_blocks(deq, bits, symmetric)[0]
    assert np.array_equal(again, got_codes), worst_block(again, got_codes, values)


@pytest.mark.parametrize(("bits", "symmetric"), KINDS, ids=KIND_IDS)
def test_requantizing_dequantized_values_is_stable(bits: int, symmetric: bool) -> None:
    blocks = planted_blocks(np.random.default_rng(11), 32, 64)
    codes, scales, zeros = quantize_blocks(blocks, bits, symmetric)
    deq = dequantize_blocks(codes, scales, zeros)
    codes2, scales2, zeros2 = quantize_blocks(deq, bits, symmetric)
    deq2 = dequantize_blocks(codes2, scales2, zeros2)
    # a second pass may pick a scale one ulp away, but must reproduce the same values
    assert np.allclose(deq2, deq, rtol=1e-6, atol=0), worst_block(deq2, deq, blocks)


# ---------------------------------------------------------------------- named edge cases

@pytest.mark.parametrize("bits", BITS)
def test_asymmetric_zero_is_exactly_representable(bits: int) -> None:
    rng = np.random.default_rng(5)
    blocks = (rng.standard_normal((200, 32)) * rng.uniform(1e-3, 10, size=(200, 1))
              + rng.uniform(-3, 3, size=(200, 1))).astype(np.float32)
    at = rng.random(blocks.shape) < 0.2
    blocks[at] = 0.0
    deq = dequantize_blocks(*quantize_blocks(blocks, bits, False))
    wrong = deq[at] != 0.0
    assert not wrong.any(), (f"{int(wrong.sum())} exact zeros dequantize to non-zero, "
                             f"e.g. {deq[at][wrong][:5].tolist()}")


@pytest.mark.parametrize(("bits", "symmetric"), KINDS, ids=KIND_IDS)
def test_all_zero_block_gives_zero_and_no_nan(bits: int, symmetric: bool) -> None:
    blocks = np.zeros((3, 16), np.float32)
    codes, scales, zeros = quantize_blocks(blocks, bits, symmetric)
    assert scales.tolist() == [0.0, 0.0, 0.0]
    assert np.array_equal(codes, np.repeat(zeros[:, None], 16, axis=1))
    deq = dequantize_blocks(codes, scales, zeros)
    assert not np.isnan(deq).any()
    assert deq.tolist() == blocks.tolist()


@pytest.mark.parametrize(("bits", "symmetric"), KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("value", [0.3, -1.7, 1e-20, 6.5e4])
def test_constant_block_comes_back(bits: int, symmetric: bool, value: float) -> None:
    blocks = np.full((2, 24), value, np.float32)
    codes, scales, zeros = quantize_blocks(blocks, bits, symmetric)
    deq = dequantize_blocks(codes, scales, zeros)
    assert len(set(codes.reshape(-1).tolist())) == 1
    np.testing.assert_allclose(deq, blocks, rtol=1e-6, atol=0)


@pytest.mark.parametrize(("bits", "symmetric"), KINDS, ids=KIND_IDS)
def test_single_huge_outlier(bits: int, symmetric: bool) -> None:
    rng = np.random.default_rng(9)
    blocks = (rng.standard_normal((1, 128)) * 1e-3).astype(np.float32)
    blocks[0, 77] = 3.0e4
    codes, scales, zeros = quantize_blocks(blocks, bits, symmetric)
    deq = dequantize_blocks(codes, scales, zeros)
    assert np.isfinite(deq).all()
    assert abs(float(deq[0, 77]) - 3.0e4) <= float(scales[0]) / 2 * (1 + 1e-5)
    # the small values collapse onto the zero point: they dequantize to exactly 0.0
    small = np.delete(deq[0], 77)
    assert np.all(small == 0.0), small[small != 0.0][:5].tolist()
    assert_within_half_step(blocks, bits, symmetric)


@pytest.mark.parametrize(("bits", "symmetric"), KINDS, ids=KIND_IDS)
def test_tiny_values_whose_scale_is_subnormal(bits: int, symmetric: bool) -> None:
    # scale = absmax / 127 here is a float32 subnormal, whose reciprocal overflows to inf:
    # 0 * inf = NaN then. Tiny weights are legal finite input and must quantize cleanly
    # (no RuntimeWarning, 0.0 stays exactly 0.0, error within half a step).
    blocks = np.array([[1e-38, -5e-39, 0.0, 2e-39]], np.float32)
    codes, scales, zeros = quantize_blocks(blocks, bits, symmetric)
    deq = dequantize_blocks(codes, scales, zeros)
    assert deq[0, 2] == 0.0, f"0.0 dequantized to {deq[0, 2]} (codes {codes.tolist()}, scale {scales[0]})"
    assert_within_half_step(blocks, bits, symmetric)


@pytest.mark.parametrize("bits", BITS)
def test_asymmetric_range_wider_than_float32_max(bits: int) -> None:
    # hi - lo overflows float32 although both ends are finite float32 values; the
    # scale (hi - lo) / qmax is itself well inside float32 range.
    blocks = np.array([[3.0e38, -3.0e38, 0.0, 1.0]], np.float32)
    assert_within_half_step(blocks, bits, False)


# ------------------------------------------------- chunked matrix kernels (issue 11) vs blocks
# quantize_matrix / dequantize_matrix work a chunk of rows at a time (int8 arithmetic for
# codes up to 4 bits, saturation skipped when no product can overflow, an ``out`` array);
# they must equal the block kernels above bit for bit at every chunk boundary, for odd
# sizes, a group that does not divide the columns, and 1-row tensors.

def matrix_reference(matrix: F32, block: int, n_groups: int, bits: int,
                     symmetric: bool) -> tuple[U8, F32, U8, F32]:
    """(packed codes, scales, zeros, dequantized matrix) through the block kernels."""
    rows, cols = matrix.shape
    pad = block * n_groups - cols
    padded = np.pad(matrix, ((0, 0), (0, pad)), mode="edge") if pad else matrix
    blocks = np.ascontiguousarray(padded.reshape(rows * n_groups, block))
    codes, scales, zeros = quantize_blocks(blocks, bits, symmetric)
    real = codes.reshape(rows, n_groups * block)[:, :cols]
    deq = dequantize_blocks(codes, scales, zeros).reshape(rows, n_groups * block)[:, :cols]
    return pack(real, bits), scales, zeros, np.ascontiguousarray(deq)


@given(data=st.data(), kind=st.sampled_from(KINDS))
@settings(derandomize=True, max_examples=100, deadline=None)
def test_chunked_matrix_kernels_equal_the_block_kernels(data: st.DataObject, kind: tuple[int, bool]) -> None:
    bits, symmetric = kind
    rows = data.draw(st.integers(1, 7), label="rows")
    cols = data.draw(st.integers(1, 40), label="cols")
    block = data.draw(st.one_of(st.just(cols), st.integers(1, 24)), label="block")  # per channel or group
    n_groups = -(-cols // block)
    chunk_values = data.draw(st.sampled_from([1, 5, 48, 100, CHUNK_VALUES]), label="chunk_values")
    values = data.draw(st.one_of(
        st.lists(normal_floats(data.draw(st.sampled_from([1.0, 1e6, float(np.float32(3.0e38))]), label="limit")),
                 min_size=rows * cols, max_size=rows * cols),
        st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False),  # subnormals too
                 min_size=rows * cols, max_size=rows * cols)), label="values")
    matrix = np.array(values, dtype=np.float32).reshape(rows, cols)
    want_packed, want_scales, want_zeros, want_values = matrix_reference(matrix, block, n_groups, bits, symmetric)

    lo, hi = block_range(matrix, block, n_groups)
    scales, zeros = params_from_range(lo, hi, bits, symmetric)
    assert scales.tobytes() == want_scales.tobytes()
    assert np.array_equal(zeros, want_zeros)
    packed = quantize_matrix(matrix, block, n_groups, bits, scales, zeros, chunk_values=chunk_values)
    assert np.array_equal(packed, want_packed), (
        f"codes differ at byte(s) {np.flatnonzero(packed != want_packed)[:8].tolist()}")

    got = dequantize_matrix(packed, rows, cols, block, n_groups, bits, scales, zeros, chunk_values=chunk_values)
    assert got.tobytes() == want_values.tobytes(), worst_block(got, want_values, matrix)
    out = np.full((rows, cols), np.nan, np.float32)  # garbage in the caller's array is overwritten
    again = dequantize_matrix(packed, rows, cols, block, n_groups, bits, scales, zeros, out=out,
                              chunk_values=chunk_values)
    assert again is out and out.tobytes() == want_values.tobytes()


def test_dequantize_matrix_rejects_a_wrong_out_array() -> None:
    packed = pack(np.zeros(8, np.uint8), 4)
    args = (packed, 2, 4, 4, 1, 4, np.ones(2, np.float32), np.zeros(2, np.uint8))
    with pytest.raises(ConfigurationError, match=r"C-contiguous \(2, 4\) float32"):
        dequantize_matrix(*args, out=np.empty((4, 2), np.float32))
    with pytest.raises(ConfigurationError, match="float32"):
        dequantize_matrix(*args, out=np.empty((2, 4), np.float64))
