"""GPTQ against a slow, obviously-correct reference, plus its error paths.

The reference below is the textbook algorithm (Frantar et al. 2022, Algorithm 1 without
lazy batching): float64, one column at a time, every later column updated right away,
a group's parameters taken from the current weights when its first column is reached
(or, with act_order, "static groups" from the original weights). The fast
implementation must produce the same codes; when it does not, the worst differing
block is reported.
"""

from __future__ import annotations

import warnings

import numpy as np
import numpy.typing as npt
import pytest

from arrowquant_core import ConfigurationError, QuantizationError, dequantize, get_scheme, quantize
from arrowquant_core.gptq import (
    GPTQDampingWarning,
    PRODUCT_ROWS,
    HessianAccumulator,
    gptq_matrix,
    hessian_from_activations,
    prepare_hessian,
    quantize_gptq,
)
from arrowquant_core.clip import DEFAULT_GRID, clip_search_blocks
from arrowquant_core.kernels import asymmetric_params, safe_reciprocal, symmetric_params
from arrowquant_core.tensor import block_codes

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


def reference_gptq(w: F32, h: F32, bits: int, symmetric: bool, group: int, damp: float = 0.01,
                   act_order: bool = False, mse: bool = False) -> tuple[npt.NDArray[np.uint8], F64]:
    """Column-by-column GPTQ in float64; returns codes (rows, cols) and the dequantized weight."""
    qmax = float(2**bits - 1)
    rows, cols = w.shape
    n_groups = -(-cols // group)
    wk = w.astype(np.float64).copy()
    hk = h.astype(np.float64).copy()
    dead = np.diag(hk) == 0
    hk[dead, dead] = 1.0
    perm = np.argsort(-np.diag(h).astype(np.float64), kind="stable") if act_order else np.arange(cols)

    def params(cur: F64) -> tuple[F32, F32]:
        blocks = np.ascontiguousarray(cur, dtype=np.float32)
        if mse:
            _c, s, z = clip_search_blocks(blocks, bits, symmetric, DEFAULT_GRID)
        else:
            s, z = symmetric_params(blocks, bits) if symmetric else asymmetric_params(blocks, bits)
        return s, z.astype(np.float32)

    group_params = [params(wk[:, k * group:(k + 1) * group]) for k in range(n_groups)]
    wk = wk[:, perm]
    hk = hk[perm][:, perm]
    hk += damp * np.mean(np.diag(hk)) * np.eye(cols)
    u = np.linalg.cholesky(np.linalg.inv(hk)).T  # upper, inv(H) = U^T U
    codes = np.zeros((rows, cols), np.uint8)
    deq = np.zeros((rows, cols))
    for j in range(cols):
        k = int(perm[j]) // group
        if not act_order and j % group == 0:
            group_params[k] = params(wk[:, j:j + group])
        s, z = group_params[k]
        col = wk[:, j]
        q = np.clip(np.rint(col * safe_reciprocal(s).astype(np.float64)) + z, 0, qmax)
        codes[:, perm[j]] = q
        deq[:, perm[j]] = (q - z) * s
        err = (col - (q - z) * s) / u[j, j]
        wk[:, j + 1:] -= np.outer(err, u[j, j + 1:])
    return codes, deq


def correlated_activations(rng: np.random.Generator, n: int, cols: int) -> F32:
    """Activations with strongly correlated features and uneven scales (like a transformer's)."""
    base = rng.standard_normal((n, cols // 4 + 1))
    mix = rng.standard_normal((cols // 4 + 1, cols))
    x = base @ mix + 0.1 * rng.standard_normal((n, cols))
    x *= rng.uniform(0.2, 3.0, cols)
    return x.astype(np.float32)


def worst_block(a: npt.NDArray[np.uint8], b: npt.NDArray[np.uint8], group: int) -> str:
    diff = (a != b).reshape(a.shape[0], -1)
    cols = a.shape[1]
    counts = [(int(diff[r, k * group:(k + 1) * group].sum()), r, k)
              for r in range(a.shape[0]) for k in range(-(-cols // group))]
    n, r, k = max(counts)
    return f"{int(diff.sum())} codes differ; worst block row {r} group {k}: {n} of {group}"


def random_spd(rng: np.random.Generator, cols: int) -> F32:
    a = rng.standard_normal((cols, cols))
    return (a @ a.T / cols + 0.05 * np.eye(cols)).astype(np.float32)


CASES = [
    # (rows, cols, scheme, block_size)
    (12, 64, "int4-g32-asym", 128),
    (12, 64, "int4-g32-asym", 16),     # groups span lazy batches: pending updates applied
    (9, 100, "int4-g32-asym", 24),     # ragged last group, unaligned batches
    (8, 96, "int2-g64-asym", 32),
    (8, 64, "int4-g32-sym", 128),
    (6, 80, "int8-channel-asym", 32),  # one group = the whole row, runs past every batch
]


@pytest.mark.parametrize(("rows", "cols", "scheme", "block_size"), CASES)
def test_float64_path_matches_reference_exactly(rows: int, cols: int, scheme: str, block_size: int) -> None:
    rng = np.random.default_rng(rows * 1000 + cols)
    sch = get_scheme(scheme)
    group = sch.group_size or cols
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    h = random_spd(rng, cols)
    ref_codes, _ = reference_gptq(w, h, sch.bits, sch.symmetric, group)
    u, _ = prepare_hessian(h, cols, 0.01, "w")
    codes, _s, _z = gptq_matrix(w, u, sch.bits, sch.symmetric, group, block_size, None, float64=True)
    assert np.array_equal(codes, ref_codes), worst_block(codes, ref_codes, group)


@pytest.mark.parametrize(("rows", "cols", "scheme", "block_size"), CASES[:4])
def test_public_float32_path_matches_reference(rows: int, cols: int, scheme: str, block_size: int) -> None:
    rng = np.random.default_rng(rows * 1000 + cols + 1)
    sch = get_scheme(scheme)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    h = random_spd(rng, cols)
    ref_codes, ref_deq = reference_gptq(w, h, sch.bits, sch.symmetric, sch.group_size)
    qt = quantize_gptq(w, sch, "w", h, block_size=block_size)
    codes = block_codes(qt).reshape(rows, -1)[:, :cols]
    # float32 rounding may flip a code that sits on a rounding boundary; everything
    # downstream of a flip legitimately differs a little, so compare codes loosely and
    # the result tightly.
    same = float(np.mean(codes == ref_codes))
    assert same >= 0.97, worst_block(codes, ref_codes, sch.group_size)
    d = (dequantize(qt) - w).astype(np.float64)
    r = ref_deq - w
    ours = float(np.einsum("ij,jk,ik->", d, h.astype(np.float64), d))
    theirs = float(np.einsum("ij,jk,ik->", r, h.astype(np.float64), r))
    assert ours <= theirs * 1.02


def test_act_order_matches_reference() -> None:
    rng = np.random.default_rng(7)
    rows, cols, group = 10, 96, 32
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    h = random_spd(rng, cols) * rng.uniform(0.1, 5.0, cols).astype(np.float32)
    h = ((h + h.T) / 2).astype(np.float32)
    h += np.eye(cols, dtype=np.float32) * float(np.abs(h).sum(axis=1).max())  # keep it SPD
    ref_codes, _ = reference_gptq(w, h, 4, False, group, act_order=True)
    perm = np.argsort(-np.diag(h).astype(np.float64), kind="stable")
    u, _ = prepare_hessian(h[perm][:, perm], cols, 0.01, "w")
    codes, _s, _z = gptq_matrix(w, u, 4, False, group, 32, perm, float64=True)
    assert np.array_equal(codes, ref_codes), worst_block(codes, ref_codes, group)
    qt = quantize_gptq(w, "int4-g32-asym", "w", h, act_order=True)
    assert qt.method == "gptq"
    assert float(np.mean(block_codes(qt).reshape(rows, cols) == ref_codes)) >= 0.97


@pytest.mark.parametrize("act_order", [False, True])
def test_mse_clip_group_params_match_reference(act_order: bool) -> None:
    rng = np.random.default_rng(12)
    rows, cols, group = 10, 96, 32
    w = rng.standard_t(3.0, (rows, cols)).astype(np.float32)
    h = random_spd(rng, cols)
    ref_codes, ref_deq = reference_gptq(w, h, 2, False, group, act_order=act_order, mse=True)
    perm = np.argsort(-np.diag(h).astype(np.float64), kind="stable") if act_order else None
    hp = h if perm is None else h[perm][:, perm]
    u, _ = prepare_hessian(hp, cols, 0.01, "w")
    codes, _s, _z = gptq_matrix(w, u, 2, False, group, 32, perm, float64=True, mse=True)
    assert np.array_equal(codes, ref_codes), worst_block(codes, ref_codes, group)
    # At INT2 the clipped ranges beat min/max on the layer-output error.
    plain = dequantize(quantize_gptq(w, "int2-g32-asym", "w", h, act_order=act_order))
    clipped = dequantize(quantize_gptq(w, "int2-g32-asym", "w", h, act_order=act_order, mse_clip=True))
    h64 = h.astype(np.float64)

    def out_err(d: npt.NDArray[np.floating]) -> float:
        e = (d - w).astype(np.float64)
        return float(np.einsum("ij,jk,ik->", e, h64, e))

    assert out_err(clipped) < out_err(plain)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("scheme", ["int4-g32-asym", "int2-g32-asym", "int4-channel-sym"])
def test_gptq_reduces_output_error_vs_rtn(scheme: str, act_order: bool) -> None:
    rng = np.random.default_rng(11)
    rows, cols = 48, 128
    x = correlated_activations(rng, 1024, cols)
    w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    h = hessian_from_activations(x)
    ours = dequantize(quantize_gptq(w, scheme, "w", h, act_order=act_order))
    rtn = dequantize(quantize(w, scheme, "w"))
    out_err = float(np.linalg.norm(x @ (w - ours).T))
    rtn_err = float(np.linalg.norm(x @ (w - rtn).T))
    assert out_err < 0.8 * rtn_err, (out_err, rtn_err)


def test_dead_columns_are_rounded_not_zeroed() -> None:
    rng = np.random.default_rng(3)
    rows, cols = 16, 64
    x = correlated_activations(rng, 512, cols)
    dead = [0, 5, 33, 63]
    x[:, dead] = 0.0
    h = hessian_from_activations(x)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    qt = quantize_gptq(w, "int4-g32-asym", "w", h)
    deq = dequantize(qt)
    assert np.all(np.isfinite(deq))
    # A dead column's error is propagated nowhere and nothing is propagated into it:
    # it is plainly rounded with its group's step, and not zeroed as in the reference code.
    steps = np.repeat(qt.scales.reshape(rows, -1), 32, axis=1)
    assert np.all(np.abs(deq[:, dead] - w[:, dead]) <= steps[:, dead] * 0.5 + 1e-6)
    assert np.any(deq[:, dead] != 0)
    rtn = dequantize(quantize(w, "int4-g32-asym", "w"))
    assert np.linalg.norm(x @ (w - deq).T) < np.linalg.norm(x @ (w - rtn).T)


def test_all_dead_hessian_falls_back_to_rtn() -> None:
    w = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    qt = quantize_gptq(w, "int4-g32-asym", "w", np.zeros((64, 64), np.float32))
    rtn = quantize(w, "int4-g32-asym", "w")
    assert np.array_equal(qt.codes, rtn.codes)


def test_indefinite_hessian_gets_more_damping_and_says_so() -> None:
    cols = 32
    h = np.ones((cols, cols), np.float32) * 2.0
    h[np.arange(cols), np.arange(cols)] = 1.0  # positive diagonal, strongly indefinite
    w = np.random.default_rng(0).standard_normal((4, cols)).astype(np.float32)
    with pytest.warns(GPTQDampingWarning, match="'w'.*not positive definite"):
        qt = quantize_gptq(w, "int4-g32-asym", "w", h)
    assert np.all(np.isfinite(dequantize(qt)))


def test_inputs_are_not_modified() -> None:
    rng = np.random.default_rng(5)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    h = random_spd(rng, 64)
    h[3, 3] = 0.0
    h[3, :] = 0.0
    h[:, 3] = 0.0
    w0, h0 = w.copy(), h.copy()
    quantize_gptq(w, "int4-g32-asym", "w", h, act_order=True)
    quantize_gptq(w, "int4-g32-asym", "w", h)
    assert np.array_equal(w, w0) and np.array_equal(h, h0)


def test_codes_in_range_and_integer_zeros() -> None:
    rng = np.random.default_rng(9)
    w = (rng.standard_normal((8, 96)) * 0.02).astype(np.float32)
    h = random_spd(rng, 96)
    for scheme in ("int2-g32-asym", "int4-g32-asym", "int8-g32-asym", "int4-g32-sym"):
        qt = quantize_gptq(w, scheme, "w", h)
        qt.check()
        codes = block_codes(qt)
        assert int(codes.max()) <= qt.scheme.qmax
        assert qt.zeros.dtype == np.uint8


def test_hessian_accumulator_over_batches() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    acc = HessianAccumulator(16)
    for part in np.array_split(x, 7):
        acc.add(part)
    assert acc.count == 300
    np.testing.assert_allclose(acc.hessian(), hessian_from_activations(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(acc.hessian(), 2 * x.T.astype(np.float64) @ x / 300, rtol=1e-5, atol=1e-5)


def test_hessian_products_float32_in_row_blocks_float64_and_overflow_kept_exact() -> None:
    rng = np.random.default_rng(2)
    # more rows than one float32 product takes: split into blocks, each summed in float64
    x = rng.standard_normal((2 * PRODUCT_ROWS + 5, 8)).astype(np.float32)
    exact = 2 * x.T.astype(np.float64) @ x.astype(np.float64) / x.shape[0]
    np.testing.assert_allclose(hessian_from_activations(x), exact, rtol=1e-5, atol=1e-6)
    # float64 activations keep float64 products: equal to the float64 formula to its last bits
    x64 = rng.standard_normal((300, 8))
    acc = HessianAccumulator(8)
    acc.add(x64)
    np.testing.assert_array_equal(acc.sum, x64.T @ x64)
    # a float32 product that overflows (4096 * 1e36 > 3.4e38) is redone in float64: the
    # mean, 2e36, fits float32 and comes out finite and right
    big = np.full((PRODUCT_ROWS, 4), 1e18, np.float32)
    h = hessian_from_activations(big)
    assert np.all(np.isfinite(h))
    np.testing.assert_allclose(h, np.full((4, 4), 2 * float(big[0, 0]) ** 2), rtol=1e-6)


def test_error_paths_name_tensor_value_and_rule() -> None:
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 32)).astype(np.float32)
    h = random_spd(rng, 32)
    with pytest.raises(QuantizationError, match=r"'fc'.*\[16, 16\].*32 input columns"):
        quantize_gptq(w, "int4-g32-asym", "fc", h[:16, :16])
    bad = h.copy()
    bad[1, 2] = np.nan
    with pytest.raises(QuantizationError, match="'fc'.*NaN"):
        quantize_gptq(w, "int4-g32-asym", "fc", bad)
    wn = w.copy()
    wn[0, 0] = np.inf
    with pytest.raises(QuantizationError, match="'fc'.*non-finite"):
        quantize_gptq(wn, "int4-g32-asym", "fc", h)
    with pytest.raises(QuantizationError, match="'fc'.*empty"):
        quantize_gptq(np.zeros((0, 32), np.float32), "int4-g32-asym", "fc", h)
    with pytest.raises(QuantizationError, match=r"'fc'.*H\[\d+,\d+\] = -.* < 0"):
        quantize_gptq(w, "int4-g32-asym", "fc", -h)
    asym = h.copy()
    asym[0, 1] += 1.0
    with pytest.raises(QuantizationError, match="'fc'.*not symmetric"):
        quantize_gptq(w, "int4-g32-asym", "fc", asym)
    with pytest.raises(ConfigurationError, match="'fc'.*one scale per tensor"):
        quantize_gptq(w, "int4-tensor-asym", "fc", h)
    with pytest.raises(QuantizationError, match=r"'fc'.*Linear weight \(out, in\) or a conv weight"):
        quantize_gptq(w.reshape(-1), "int4-g32-asym", "fc", h)
    # a conv weight is its (out, in * kernel) matrix: the Hessian must have that many columns
    with pytest.raises(QuantizationError, match=r"'fc'.*\[32, 32\].*64 input columns"):
        quantize_gptq(w.reshape(2, 2, 32), "int4-g32-asym", "fc", h)
    with pytest.raises(ConfigurationError, match="block_size = 0"):
        quantize_gptq(w, "int4-g32-asym", "fc", h, block_size=0)
    with pytest.raises(QuantizationError, match="activations of shape"):
        HessianAccumulator(32, "fc").add(np.zeros((3, 31), np.float32))
    with pytest.raises(QuantizationError, match="no activations"):
        HessianAccumulator(32, "fc").hessian()


def test_no_warning_on_a_healthy_hessian() -> None:
    rng = np.random.default_rng(4)
    w = rng.standard_normal((4, 64)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_gptq(w, "int4-g64-asym", "w", random_spd(rng, 64))


# --- activation capture on the real MiniLM ------------------------------------------------

CAPTURE_NAMES = ["encoder.layer.0.attention.self.query.weight",
                 "encoder.layer.5.output.dense.weight",
                 "pooler.dense.weight"]


def _hook_count() -> int:
    from fixtures.minilm.model import load_sentence_transformer

    model = load_sentence_transformer()
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.slow
def test_capture_hessians_excludes_padding_and_removes_hooks() -> None:
    from fixtures.minilm.activations import capture_hessians

    sentences = ["A cat.", "The quick brown fox jumps over the lazy dog near the river bank.",
                 "Interest rates rose again this quarter.", "Hi"]
    hooks_before = _hook_count()
    padded = capture_hessians(sentences, CAPTURE_NAMES, batch_size=4)  # batches need padding
    single = capture_hessians(sentences, CAPTURE_NAMES, batch_size=1)  # no padding at all
    assert _hook_count() == hooks_before
    assert padded["encoder.layer.5.output.dense.weight"].shape == (1536, 1536)
    for name in CAPTURE_NAMES:
        h = padded[name]
        assert h.dtype == np.float32 and np.allclose(h, h.T, atol=1e-5 * float(np.abs(h).max()))
        # Padding rows excluded: the padded batch gives the same Hessian as unpadded encoding.
        np.testing.assert_allclose(h, single[name], rtol=1e-3, atol=1e-4 * float(np.abs(h).max()))


@pytest.mark.slow
def test_capture_hessians_errors_leave_no_hooks() -> None:
    from fixtures.minilm.activations import capture_hessians

    hooks_before = _hook_count()
    with pytest.raises(ConfigurationError, match="no nn.Linear or Conv1D weight named"):
        capture_hessians(["x"], ["embeddings.word_embeddings.weight"])
    with pytest.raises(Exception):
        capture_hessians([None, "fine"], CAPTURE_NAMES)  # type: ignore[list-item]
    assert _hook_count() == hooks_before


def test_model_pipeline_gptq_for_linears_clip_for_embeddings() -> None:
    from arrowquant_core import QuantizationConfig, quantize_model
    from arrowquant_core.clip import quantize_clip

    rng = np.random.default_rng(8)
    x = correlated_activations(rng, 256, 64)
    h = hessian_from_activations(x)
    weights = {
        "emb.weight": rng.standard_normal((50, 64)).astype(np.float32),
        "q.weight": rng.standard_normal((16, 64)).astype(np.float32),
        "k.weight": rng.standard_normal((16, 64)).astype(np.float32),
        "q.bias": rng.standard_normal(16).astype(np.float32),
    }
    config = QuantizationConfig("int4-g32-asym", method="gptq")
    model = quantize_model(weights, config, hessians={"q.weight": h, "k.weight": h.copy()})
    assert {n: qt.method for n, qt in model.tensors.items()} == {
        "emb.weight": "clip", "q.weight": "gptq", "k.weight": "gptq"}
    assert list(model.floats) == ["q.bias"] and model.order == tuple(weights)
    alone = quantize_gptq(weights["k.weight"], "int4-g32-asym", "k.weight", h)
    assert np.array_equal(model.tensors["k.weight"].codes, alone.codes)
    assert np.array_equal(model.tensors["emb.weight"].codes,
                          quantize_clip(weights["emb.weight"], "int4-g32-asym", "emb.weight").codes)
    act = quantize_model(weights, QuantizationConfig("int4-g32-asym", method="gptq-act-mse"),
                         hessians={"q.weight": h})
    assert act.tensors["q.weight"].method == "gptq-act-mse" and act.tensors["k.weight"].method == "clip"


def test_extreme_magnitudes_stay_finite() -> None:
    w = np.array([[3e38, -3e38] * 16, [1e-40, -2e-40] * 16, [0.5, -1e-3] * 16], np.float32)
    h = random_spd(np.random.default_rng(6), 32)
    for act_order in (False, True):
        deq = dequantize(quantize_gptq(w, "int4-g32-asym", "w", h, act_order=act_order))
        assert np.all(np.isfinite(deq))
