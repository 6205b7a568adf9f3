"""Tests of fixtures.dream_mini.denoiser: an oracle test against a slow, obviously correct
per-position / per-head reference, then the properties that define Dream's network
(GQA head mapping, Qwen2 rotate-half RoPE, bidirectional attention, shifted logits)."""

from __future__ import annotations

from collections.abc import Mapping

import ml_dtypes
import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arrowquant_core.errors import ConfigurationError, FormatError
from fixtures.dream_mini.config import DreamConfig
from fixtures.dream_mini.denoiser import apply_rope, forward, rope_tables, shifted
from fixtures.dream_mini.generator import generate_weights

F64 = npt.NDArray[np.float64]

TINY = DreamConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, mask_token_id=39)


# --------------------------------------------------------------------------- reference


def _ref_rope(vec: F64, pos: int, theta: float) -> F64:
    """Rotate pairs (j, j + d/2) by pos * theta**(-2j/d): Qwen2's rotate-half, one scalar at a time."""
    d = vec.shape[0]
    out = np.empty(d)
    for j in range(d // 2):
        angle = pos * theta ** (-2.0 * j / d)
        a, b = vec[j], vec[j + d // 2]
        out[j] = a * np.cos(angle) - b * np.sin(angle)
        out[j + d // 2] = b * np.cos(angle) + a * np.sin(angle)
    return out


def _ref_rms(x: F64, g: F64, eps: float) -> F64:
    out: F64 = x / np.sqrt(np.mean(x * x) + eps) * g
    return out


def reference_forward(weights: Mapping[str, np.ndarray], cfg: DreamConfig, ids: np.ndarray) -> F64:
    """Slow float64 Dream forward: loops over sequences, positions, heads and keys."""
    w = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    d, hq, hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    batch, seq = ids.shape
    out = np.zeros((batch, seq, cfg.vocab_size))
    for b in range(batch):
        x = np.stack([w["model.embed_tokens.weight"][t] for t in ids[b]])
        for layer in range(cfg.num_hidden_layers):
            p = f"model.layers.{layer}."
            n = [_ref_rms(x[i], w[p + "input_layernorm.weight"], cfg.rms_norm_eps) for i in range(seq)]
            q = [w[p + "self_attn.q_proj.weight"] @ n[i] + w[p + "self_attn.q_proj.bias"] for i in range(seq)]
            k = [w[p + "self_attn.k_proj.weight"] @ n[i] + w[p + "self_attn.k_proj.bias"] for i in range(seq)]
            v = [w[p + "self_attn.v_proj.weight"] @ n[i] + w[p + "self_attn.v_proj.bias"] for i in range(seq)]
            ctx = np.zeros((seq, hq * d))
            for h in range(hq):
                kv = h // (hq // hkv)  # HF repeat_kv: query head h reads KV head h // n_rep
                for i in range(seq):
                    qi = _ref_rope(q[i][h * d:(h + 1) * d], i, cfg.rope_theta)
                    scores = np.array([qi @ _ref_rope(k[j][kv * d:(kv + 1) * d], j, cfg.rope_theta) / np.sqrt(d)
                                       for j in range(seq)])  # every j: no causal mask
                    probs = np.exp(scores - scores.max())
                    probs /= probs.sum()
                    ctx[i, h * d:(h + 1) * d] = sum(probs[j] * v[j][kv * d:(kv + 1) * d] for j in range(seq))
            x = x + np.stack([w[p + "self_attn.o_proj.weight"] @ ctx[i] for i in range(seq)])
            for i in range(seq):
                m = _ref_rms(x[i], w[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
                gate = w[p + "mlp.gate_proj.weight"] @ m
                up = w[p + "mlp.up_proj.weight"] @ m
                x[i] = x[i] + w[p + "mlp.down_proj.weight"] @ (gate / (1.0 + np.exp(-gate)) * up)
        head = w["model.embed_tokens.weight"] if cfg.tie_word_embeddings else w["lm_head.weight"]
        for i in range(seq):
            out[b, i] = head @ _ref_rms(x[i], w["model.norm.weight"], cfg.rms_norm_eps)
    return out


def _assert_close(got: np.ndarray, want: np.ndarray, tol: float) -> None:
    err = np.abs(got.astype(np.float64) - want)
    worst = np.unravel_index(int(np.argmax(err)), err.shape)
    scale = max(1.0, float(np.abs(want).max()))
    assert err.max() <= tol * scale, (
        f"worst (batch, position, token) = {tuple(int(i) for i in worst)}: got {got[worst]:.6f}, "
        f"reference {want[worst]:.6f}, |diff| {err.max():.2e} > {tol * scale:.2e}")


# --------------------------------------------------------------------------- oracle


@pytest.mark.parametrize("tied", [False, True])
def test_forward_matches_slow_reference(tied: bool) -> None:
    cfg = DreamConfig(**{**TINY.__dict__, "tie_word_embeddings": tied})
    weights = generate_weights(cfg, seed=3)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 7))
    got = forward(weights, cfg, ids)
    assert got.shape == (2, 7, cfg.vocab_size) and got.dtype == np.float32
    _assert_close(got, reference_forward(weights, cfg, ids), tol=1e-4)


def test_forward_matches_reference_with_masks_and_long_rope_theta() -> None:
    cfg = DreamConfig(**{**TINY.__dict__, "rope_theta": 1_000_000.0})  # Dream/Qwen2.5-7B's theta
    weights = generate_weights(cfg, seed=5)
    ids = np.array([[cfg.mask_token_id, 3, cfg.mask_token_id, cfg.mask_token_id, 17, 2]])
    _assert_close(forward(weights, cfg, ids), reference_forward(weights, cfg, ids), tol=1e-4)


# --------------------------------------------------------------------------- properties


def test_gqa_query_head_h_reads_kv_head_h_over_group() -> None:
    """With V = a constant per KV head and o_proj selecting one query head, the output is
    that head's KV constant: this pins the head-to-group mapping (h // group)."""
    cfg = DreamConfig(vocab_size=32, hidden_size=16, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    d, group = cfg.head_dim, 2
    base = {name: np.zeros(shape, np.float32) for name, shape in cfg.parameter_shapes().items()}
    for name in ("model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
                 "model.norm.weight"):
        base[name][:] = 1.0
    base["model.embed_tokens.weight"][:] = 1e-3  # tiny: the residual is the attention output
    kv_const = np.random.default_rng(0).standard_normal((cfg.num_key_value_heads, d)).astype(np.float32)
    base["model.layers.0.self_attn.v_proj.bias"][:] = kv_const.reshape(-1)
    base["lm_head.weight"][:16] = np.eye(16, dtype=np.float32)  # logits[:16] = normed residual
    for h in range(cfg.num_attention_heads):
        w = {k: v.copy() for k, v in base.items()}
        w["model.layers.0.self_attn.o_proj.weight"][:d, h * d:(h + 1) * d] = np.eye(d)
        logits = forward(w, cfg, np.array([[1, 2, 3]]))[0, :, :d]
        for kv in range(cfg.num_key_value_heads):
            cos = float(logits[0] @ kv_const[kv] / np.linalg.norm(logits[0]) / np.linalg.norm(kv_const[kv]))
            assert (cos > 0.999) == (kv == h // group), f"query head {h}, kv head {kv}: cosine {cos:.4f}"


@settings(derandomize=True, max_examples=25, deadline=None)
@given(m=st.integers(0, 50), n=st.integers(0, 50), shift=st.integers(0, 40))
def test_rope_scores_depend_only_on_position_difference(m: int, n: int, shift: int) -> None:
    rng = np.random.default_rng(7)
    q, k = rng.standard_normal((2, 1, 16)).astype(np.float32)
    cos, sin = rope_tables(100, 16, 10000.0)

    def score(i: int, j: int) -> float:
        return float(apply_rope(q, cos[i:i + 1], sin[i:i + 1])[0] @ apply_rope(k, cos[j:j + 1], sin[j:j + 1])[0])

    assert score(m, n) == pytest.approx(score(m + shift, n + shift), rel=1e-4, abs=1e-4)


def test_rope_is_rotate_half_not_interleaved() -> None:
    """Pairs are (j, j + d/2) (HF/Qwen2 rotate_half), checked against complex rotation."""
    d, pos = 8, 5
    x = np.random.default_rng(1).standard_normal(d).astype(np.float32)
    cos, sin = rope_tables(pos + 1, d, 10000.0)
    got = apply_rope(x[None], cos[pos:pos + 1], sin[pos:pos + 1])[0]
    z = (x[: d // 2] + 1j * x[d // 2:]) * np.exp(1j * pos * 10000.0 ** (-np.arange(0, d, 2) / d))
    np.testing.assert_allclose(got, np.concatenate([z.real, z.imag]), rtol=1e-5, atol=1e-5)


def test_attention_is_bidirectional() -> None:
    cfg = DreamConfig.mini()
    w = generate_weights(cfg, seed=0)
    ids = np.random.default_rng(2).integers(0, 999, size=(1, 16))
    changed = ids.copy()
    changed[0, -1] = (ids[0, -1] + 1) % 999
    a, b = forward(w, cfg, ids), forward(w, cfg, changed)
    # a causal model would leave positions 0..14 untouched; Dream's must change
    assert float(np.abs(a[0, 0] - b[0, 0]).max()) > 1e-4
    assert bool(np.all(np.abs(a[0, :-1] - b[0, :-1]).max(axis=-1) > 1e-5))


def test_shifted_aligns_predictions_with_positions() -> None:
    logits = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
    out = shifted(logits)
    np.testing.assert_array_equal(out[:, 1:], logits[:, :-1])  # position j reads logits[j - 1]
    np.testing.assert_array_equal(out[:, 0], logits[:, 0])  # Dream keeps position 0's own logits
    with pytest.raises(ConfigurationError, match="expected"):
        shifted(np.zeros(3))


def test_forward_is_deterministic_and_batch_independent() -> None:
    cfg = DreamConfig.mini()
    w = generate_weights(cfg, seed=0)
    ids = np.random.default_rng(4).integers(0, 1000, size=(3, 12))
    a = forward(w, cfg, ids)
    np.testing.assert_array_equal(a, forward(w, cfg, ids))
    for row in range(3):
        np.testing.assert_allclose(forward(w, cfg, ids[row:row + 1])[0], a[row], rtol=1e-4, atol=1e-4)


def test_low_precision_weights_are_upcast() -> None:
    cfg = TINY
    w = generate_weights(cfg, seed=0)
    ids = np.array([[1, 2, 3, 4]])
    ref = forward(w, cfg, ids)
    for dtype in (np.float16, ml_dtypes.bfloat16):
        low = {k: v.astype(dtype) for k, v in w.items()}
        got = forward(low, cfg, ids)
        assert got.dtype == np.float32
        assert float(np.abs(got - ref).max()) < 0.1 * max(1.0, float(np.abs(ref).max()))


# --------------------------------------------------------------------------- errors


def test_missing_or_misshaped_tensor_is_a_format_error_naming_it() -> None:
    w = dict(generate_weights(TINY, seed=0))
    ids = np.array([[1, 2]])
    missing = {k: v for k, v in w.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(FormatError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        forward(missing, TINY, ids)
    bad = {**w, "model.norm.weight": np.ones(3, np.float32)}
    with pytest.raises(FormatError, match=r"model\.norm\.weight.*shape \(3,\)"):
        forward(bad, TINY, ids)
    ints = {**w, "model.norm.weight": np.ones(16, np.int32)}
    with pytest.raises(FormatError, match="not a float"):
        forward(ints, TINY, ids)


@pytest.mark.parametrize(("ids", "rule"), [
    (np.array([1, 2, 3]), "expected shape"),
    (np.array([[0, 40]]), "outside the vocabulary"),
    (np.array([[-1, 2]]), "outside the vocabulary"),
    (np.array([[0.5, 1.0]]), "not an integer"),
    (np.zeros((1, 0), np.int64), "empty"),
])
def test_bad_input_ids_are_configuration_errors(ids: np.ndarray, rule: str) -> None:
    with pytest.raises(ConfigurationError, match=rule):
        forward(generate_weights(TINY, seed=0), TINY, ids)
