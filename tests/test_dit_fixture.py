"""dit-mini: the generator, the cache, the NumPy forward pass against a slow loop oracle,
the DDIM sampler, and the activation statistics the generator documents."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from arrowquant_core.errors import ConfigurationError
from fixtures.dit_mini.config import DiTConfig
from fixtures.dit_mini.generator import generate, generate_weights, load, make_samples
from fixtures.dit_mini.model import alphas_cumprod, ddim_sample, forward, timestep_embedding, pos_embed
from fixtures.dit_mini.quality import activation_stats
from fixtures.dit_mini.runner import ensure_fixture

TINY = {"image": DiTConfig(hidden_size=32, depth=2, num_heads=2, frequency_embedding_size=16),
        "audio": DiTConfig(modality="audio", in_channels=6, input_size=8, hidden_size=32, depth=2, num_heads=2,
                           frequency_embedding_size=16)}


def _oracle(w: dict[str, np.ndarray], x: np.ndarray, t: np.ndarray, y: np.ndarray, cfg: DiTConfig) -> np.ndarray:
    """DiT written out with loops: the conv by output position and kernel tap, attention by
    sample, head, query and key; float64 throughout."""
    d, p, g = cfg.hidden_size, cfg.patch_size, cfg.input_size // cfg.patch_size
    heads, hd = cfg.num_heads, cfg.head_dim
    w64 = {k: v.astype(np.float64) for k, v in w.items()}
    conv = w64["x_embedder.proj.weight"]
    pos = pos_embed(cfg).astype(np.float64)
    out = np.zeros(x.shape)

    def lin(name: str, v: np.ndarray) -> np.ndarray:
        return np.array([sum(w64[name + ".weight"][o, i] * v[i] for i in range(v.shape[0]))
                         for o in range(w64[name + ".weight"].shape[0])]) + w64[name + ".bias"]

    def ln(v: np.ndarray) -> np.ndarray:
        mu = sum(v) / len(v)
        var = sum((a - mu) ** 2 for a in v) / len(v)
        return (v - mu) / math.sqrt(var + 1e-6)

    def silu(v: np.ndarray) -> np.ndarray:
        return v / (1 + np.exp(-v))

    def gelu(v: np.ndarray) -> np.ndarray:
        return 0.5 * v * (1 + np.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))

    for n in range(x.shape[0]):
        positions = [(i, j) for i in range(g) for j in range(g)] if cfg.spatial_dims == 2 else [(i,) for i in range(g)]
        tokens = []
        for k, pos_ij in enumerate(positions):
            v = w64["x_embedder.proj.bias"].copy()
            for o in range(d):
                for c in range(cfg.in_channels):
                    if cfg.spatial_dims == 2:
                        for a in range(p):
                            for b in range(p):
                                v[o] += conv[o, c, a, b] * x[n, c, pos_ij[0] * p + a, pos_ij[1] * p + b]
                    else:
                        for a in range(p):
                            v[o] += conv[o, c, a] * x[n, c, pos_ij[0] * p + a]
            tokens.append(v + pos[k])
        h = np.array(tokens)
        freq = timestep_embedding(t[n:n + 1], cfg.frequency_embedding_size)[0].astype(np.float64)
        c_vec = lin("t_embedder.mlp.2", silu(lin("t_embedder.mlp.0", freq))) + w64["y_embedder.embedding_table.weight"][y[n]]
        sc = silu(c_vec)
        for blk in range(cfg.depth):
            b = f"blocks.{blk}."
            mod = lin(b + "adaLN_modulation.1", sc)
            sh1, s1, g1, sh2, s2, g2 = (mod[i * d:(i + 1) * d] for i in range(6))
            qkv = np.array([lin(b + "attn.qkv", ln(tok) * (1 + s1) + sh1) for tok in h])
            att = np.zeros((len(h), d))
            for head in range(heads):
                cols = slice(head * hd, (head + 1) * hd)
                q, k, v = qkv[:, cols], qkv[:, d:][:, cols], qkv[:, 2 * d:][:, cols]
                for i in range(len(h)):
                    logits = [sum(q[i] * k[j]) / math.sqrt(hd) for j in range(len(h))]
                    m = max(logits)
                    e = [math.exp(l - m) for l in logits]
                    att[i, cols] = sum(e[j] / sum(e) * v[j] for j in range(len(h)))
            h = h + g1 * np.array([lin(b + "attn.proj", a) for a in att])
            h = h + g2 * np.array([lin(b + "mlp.fc2", gelu(lin(b + "mlp.fc1", ln(tok) * (1 + s2) + sh2))) for tok in h])
        mod = lin("final_layer.adaLN_modulation.1", sc)
        res = np.array([lin("final_layer.linear", ln(tok) * (1 + mod[d:]) + mod[:d]) for tok in h])
        for k, pos_ij in enumerate(positions):  # DiT's (p, q, c) output order
            for c in range(cfg.in_channels):
                if cfg.spatial_dims == 2:
                    for a in range(p):
                        for b2 in range(p):
                            out[n, c, pos_ij[0] * p + a, pos_ij[1] * p + b2] = res[k, (a * p + b2) * cfg.in_channels + c]
                else:
                    for a in range(p):
                        out[n, c, pos_ij[0] * p + a] = res[k, a * cfg.in_channels + c]
    return out


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_forward_matches_loop_oracle(modality: str) -> None:
    cfg = TINY[modality]
    w = generate_weights(cfg, seed=3)
    s = make_samples(cfg, 2, seed=5)
    got = forward(w, s.x_t, s.t, s.y, cfg).astype(np.float64)
    want = _oracle(w, s.x_t.astype(np.float64), s.t, s.y, cfg)
    err = np.abs(got - want) / (np.abs(want).max() + 1e-12)
    worst = np.unravel_index(int(np.argmax(err)), err.shape)
    assert err.max() < 1e-4, f"worst element {worst}: fast {got[worst]} vs oracle {want[worst]}"


@pytest.mark.parametrize("config", [DiTConfig.image(), DiTConfig.audio()], ids=["image", "audio"])
def test_generator_is_byte_deterministic_and_self_describing(config: DiTConfig, tmp_path: Path) -> None:
    a = generate(tmp_path / "a", config=config, seed=0)
    b = generate(tmp_path / "b", config=config, seed=0)
    names = sorted(p.name for p in a.iterdir())
    assert names == ["calibration.safetensors", "config.json", "metadata.json", "model.safetensors"]
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    other = generate(tmp_path / "c", config=config, seed=1)
    assert (other / "model.safetensors").read_bytes() != (a / "model.safetensors").read_bytes()
    loaded = load(a)
    assert loaded.metadata["modality"] == config.modality and loaded.config == config
    conv = loaded.weights["x_embedder.proj.weight"]
    assert conv.ndim == 2 + config.spatial_dims  # 4-D conv for images, 3-D for audio
    # calibration covers every fifth of the schedule
    assert sorted(set((loaded.calibration.t * 5 // config.num_train_timesteps).tolist())) == [0, 1, 2, 3, 4]


def test_cache_reuses_and_regenerates(tmp_path: Path) -> None:
    folder = ensure_fixture(0, DiTConfig.audio(), tmp_path)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert ensure_fixture(0, DiTConfig.audio(), tmp_path) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rewritten
    (folder / "config.json").write_text("{}")
    again = ensure_fixture(0, DiTConfig.audio(), tmp_path)
    assert again == folder and load(again).config == DiTConfig.audio()  # tampered file: regenerated


def test_weights_must_match_the_layout() -> None:
    from fixtures.dit_mini.model import check_weights

    cfg = TINY["image"]
    w = generate_weights(cfg)
    missing = {k: v for k, v in w.items() if k != "blocks.1.mlp.fc2.weight"}
    with pytest.raises(ConfigurationError, match="blocks.1.mlp.fc2.weight"):
        check_weights(missing, cfg)
    with pytest.raises(ConfigurationError, match="unexpected tensor 'extra'"):
        check_weights({**w, "extra": np.zeros(3, np.float32)}, cfg)


def test_ddim_sampler_is_deterministic_and_ends_in_range() -> None:
    cfg = TINY["image"]
    w = generate_weights(cfg)
    noise = np.random.default_rng(0).standard_normal((2,) + cfg.latent_shape).astype(np.float32)
    y = np.array([1, 2])
    a = ddim_sample(w, noise, y, cfg, steps=5)
    assert np.array_equal(a, ddim_sample(w, noise, y, cfg, steps=5))
    assert a.shape == noise.shape and float(np.abs(a).max()) <= 1.0
    # one step: the clipped x0 prediction from t = 999
    ab = alphas_cumprod(cfg)[cfg.num_train_timesteps - 1]
    eps = forward(w, noise, np.full(2, cfg.num_train_timesteps - 1), y, cfg)
    x0 = np.clip((noise - math.sqrt(1 - ab) * eps) / math.sqrt(ab), -1, 1)
    assert np.allclose(ddim_sample(w, noise, y, cfg, steps=1), x0, atol=1e-5)


@pytest.mark.parametrize("config", [DiTConfig.image(), DiTConfig.audio()], ids=["image", "audio"])
def test_planted_activation_statistics(config: DiTConfig, tmp_path: Path) -> None:
    """Salient channels at the qkv and fc2 inputs, and a qkv range that grows with t
    (the generator docstring's table)."""
    f = load(ensure_fixture(0, config, tmp_path))
    qkv = activation_stats(f.weights, f.calibration, config, "blocks.0.attn.qkv.weight")
    fc2 = activation_stats(f.weights, f.calibration, config, "blocks.0.mlp.fc2.weight")
    proj = activation_stats(f.weights, f.calibration, config, "blocks.0.attn.proj.weight")
    assert 5 < qkv["channel_ratio"] < 15 and 8 < fc2["channel_ratio"] < 20 and proj["channel_ratio"] < 3.5
    assert qkv["group_max"][-1] > 1.4 * qkv["group_max"][0]  # late timesteps: wider range
