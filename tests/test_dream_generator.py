"""Tests of fixtures.dream_mini.generator: determinism, file layout, streaming memory,
the planted statistics and edge cases, and the prediction-statistics band."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import types

import fixtures.dream_mini as dream_mini
from arrowquant_core.errors import ConfigurationError, FormatError
from fixtures.calibration import read_jsonl, synthetic_samples
from fixtures.dream_mini.config import DreamConfig
from fixtures.dream_mini.generator import (
    CALIBRATION_SAMPLES,
    EDGE_CASES,
    GENERATOR_VERSION,
    RECIPES,
    Scales,
    edge_case_tensor,
    generate,
    generate_tensor,
    generate_weights,
    iter_weights,
    load,
    metadata,
    outlier_channels,
)
from fixtures.dream_mini.quality import prediction_stats
from arrowquant_core.safetensors_io import read_metadata, read_npy_folder, read_safetensors

MINI = DreamConfig.mini()


@pytest.fixture(scope="module")
def mini_weights() -> dict[str, np.ndarray]:
    return generate_weights(MINI, seed=0)


@pytest.fixture(scope="module")
def mini_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("dream") / "dream-mini", seed=0)


def test_package_exports_match_all() -> None:
    exported = {name for name in dir(dream_mini) if not name.startswith("_")
                and not isinstance(getattr(dream_mini, name), types.ModuleType)} - {"annotations"}
    assert exported == set(dream_mini.__all__)


# --------------------------------------------------------------------------- files


def test_generate_writes_the_documented_files(mini_folder: Path, mini_weights: dict[str, np.ndarray]) -> None:
    assert sorted(p.name for p in mini_folder.iterdir()) == [
        "calibration.jsonl", "config.json", "metadata.json", "model.safetensors"]
    meta = json.loads((mini_folder / "metadata.json").read_text())
    assert (meta["modality"], meta["model_family"], meta["generator_version"], meta["seed"]) == (
        "text", "dream", GENERATOR_VERSION, 0)
    assert meta["num_parameters"] == sum(int(np.prod(a.shape)) for a in mini_weights.values())
    assert DreamConfig.load(mini_folder) == MINI
    assert json.loads((mini_folder / "config.json").read_text()) == MINI.to_json()
    tensors = read_safetensors(mini_folder / "model.safetensors")
    assert set(tensors) == set(MINI.parameter_shapes())
    for name, array in mini_weights.items():
        assert tensors[name].dtype == np.float32
        np.testing.assert_array_equal(tensors[name], array, err_msg=name)
    assert read_metadata(mini_folder / "model.safetensors")["generator_version"] == GENERATOR_VERSION


def test_the_official_safetensors_library_reads_the_file(mini_folder: Path,
                                                         mini_weights: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import load_file

    loaded = load_file(str(mini_folder / "model.safetensors"))
    assert set(loaded) == set(mini_weights)
    np.testing.assert_array_equal(loaded["lm_head.weight"], mini_weights["lm_head.weight"])


def test_load_reads_back_both_layouts(mini_folder: Path, tmp_path: Path,
                                      mini_weights: dict[str, np.ndarray]) -> None:
    model = load(mini_folder)
    assert model.config == MINI and model.metadata["seed"] == 0 and len(model.samples) == 32
    npy = load(generate(tmp_path / "npy", seed=0, legacy_npy=True))
    for name, array in mini_weights.items():
        np.testing.assert_array_equal(model.weights[name], array, err_msg=name)
        np.testing.assert_array_equal(npy.weights[name], array, err_msg=name)
    (tmp_path / "npy" / "model.norm.weight.npy").unlink()
    with pytest.raises(FormatError, match=r"model\.norm\.weight.*missing"):
        load(tmp_path / "npy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match="config.json"):
        load(tmp_path / "empty")


def test_calibration_file_has_32_samples_over_all_mask_ratios(mini_folder: Path) -> None:
    samples = read_jsonl(mini_folder / "calibration.jsonl", vocab_size=MINI.vocab_size)
    assert len(samples) == CALIBRATION_SAMPLES
    ratios = sorted(s.mask_ratio for s in samples)
    assert ratios[0] > 0 and ratios[-1] == 1.0
    assert all(not np.any(s.input_ids == MINI.mask_token_id) for s in samples)  # clean tokens
    assert samples == synthetic_samples(MINI.vocab_size, 32, 64, 0, MINI.mask_token_id)


def test_same_seed_gives_byte_identical_files(mini_folder: Path, tmp_path: Path) -> None:
    again = generate(tmp_path / "again", seed=0)
    for path in sorted(mini_folder.iterdir()):
        assert path.read_bytes() == (again / path.name).read_bytes(), path.name


def test_other_seed_gives_other_weights(mini_weights: dict[str, np.ndarray]) -> None:
    other = generate_tensor(MINI, "model.layers.1.self_attn.q_proj.weight", seed=1)
    assert not np.array_equal(other, mini_weights["model.layers.1.self_attn.q_proj.weight"])


def test_legacy_npy_layout_holds_the_same_weights(tmp_path: Path, mini_weights: dict[str, np.ndarray]) -> None:
    folder = generate(tmp_path / "npy", seed=0, legacy_npy=True)
    assert not (folder / "model.safetensors").exists()
    assert json.loads((folder / "metadata.json").read_text())["weights_format"] == "npy"
    loaded = read_npy_folder(folder)
    assert set(loaded) == set(mini_weights)
    for name, array in mini_weights.items():
        np.testing.assert_array_equal(loaded[name], array, err_msg=name)


def test_tensor_values_do_not_depend_on_order_or_other_tensors(mini_weights: dict[str, np.ndarray]) -> None:
    names = list(MINI.parameter_shapes())[::-1]
    for name, array in iter_weights(MINI, seed=0, names=names):
        np.testing.assert_array_equal(array, mini_weights[name], err_msg=name)
    # a deeper model shares layer 0's q_proj exactly (derived from (seed, name) only)
    deeper = DreamConfig(**{**MINI.__dict__, "num_hidden_layers": 3})
    name = "model.layers.0.self_attn.q_proj.weight"
    np.testing.assert_array_equal(generate_tensor(deeper, name, seed=0), mini_weights[name])


def test_streaming_keeps_memory_at_about_one_tensor(tmp_path: Path) -> None:
    medium = DreamConfig(vocab_size=4000, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, mask_token_id=3999)
    total = 4 * sum(int(np.prod(s)) for s in medium.parameter_shapes().values())
    largest = 4 * max(int(np.prod(s)) for s in medium.parameter_shapes().values())
    tracemalloc.start()
    try:
        generate(tmp_path / "medium", config=medium, seed=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (tmp_path / "medium" / "model.safetensors").stat().st_size > total
    # the LM head needs the embedding (bigram) plus chunk temporaries: ~2-3 tensors, not 62 MB
    assert peak < 3 * largest < total, f"peak {peak / 2**20:.1f} MiB, model {total / 2**20:.1f} MiB"


def test_dream_7b_shapes_are_described_without_generating() -> None:
    meta = metadata(DreamConfig.dream_7b(), seed=0, legacy_npy=False)
    assert 7.0e9 < meta["num_parameters"] < 8.0e9  # type: ignore[operator]
    idx, factor = outlier_channels(DreamConfig.dream_7b(), seed=0)
    assert len(idx) == 18 and factor.dtype == np.float32


# --------------------------------------------------------------------------- statistics


def test_every_tensor_has_a_recipe_and_is_finite(mini_weights: dict[str, np.ndarray]) -> None:
    for name, array in mini_weights.items():
        suffix = name.split(".", 3)[3] if name.startswith("model.layers.") else name
        assert suffix in RECIPES, name
        assert array.dtype == np.float32 and bool(np.all(np.isfinite(array))), name


def test_outlier_input_channels_are_shared_across_layers(mini_weights: dict[str, np.ndarray]) -> None:
    idx, factor = outlier_channels(MINI, seed=0)
    for layer in range(MINI.num_hidden_layers):
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            w = mini_weights[f"model.layers.{layer}.{proj}.weight"]
            col_rms = np.sqrt(np.mean(w.astype(np.float64) ** 2, axis=0))
            ratio = col_rms[idx] / np.median(col_rms)
            assert set(np.argsort(col_rms)[-len(idx):]) == set(idx), f"layer {layer} {proj}"
            assert bool(np.all(ratio > 6)), f"layer {layer} {proj}: outlier/typical column rms {ratio}"
            # the largest outlier entries are tens of times the typical magnitude
            assert np.abs(w[:, idx]).max() > 20 * np.median(np.abs(w))
        # SmoothQuant balance: the norm gain carries the inverse factor
        gain = mini_weights[f"model.layers.{layer}.input_layernorm.weight"]
        np.testing.assert_allclose(gain[idx] * factor, 2.0, rtol=0.25)


def test_rows_have_log_normal_scale_spread(mini_weights: dict[str, np.ndarray]) -> None:
    w = mini_weights["model.layers.1.self_attn.q_proj.weight"]
    row_rms = np.sqrt(np.mean(w.astype(np.float64) ** 2, axis=1))
    assert row_rms.max() / row_rms.min() > 3
    log_rms = np.log(row_rms)
    assert 0.25 < log_rms.std() < 0.6  # sigma 0.4 plus sampling noise


def test_down_projections_are_heavy_tailed(mini_weights: dict[str, np.ndarray]) -> None:
    for layer in range(MINI.num_hidden_layers):
        w = mini_weights[f"model.layers.{layer}.mlp.down_proj.weight"].astype(np.float64)
        z = w / np.sqrt(np.mean(w**2, axis=1, keepdims=True))  # per row, so the row spread is not counted
        kurtosis = float(np.mean(z**4) / np.mean(z**2) ** 2)
        assert kurtosis > 4.0, f"layer {layer}: kurtosis {kurtosis:.2f} (Gaussian 3)"


def test_norm_gains_are_near_one(mini_weights: dict[str, np.ndarray]) -> None:
    idx, _ = outlier_channels(MINI, seed=0)
    for name, array in mini_weights.items():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            rest = np.delete(array, idx) if "layers" in name else array
            assert abs(float(np.median(rest)) - 1.0) < 0.05 and float(np.abs(rest - 1).max()) < 0.3, name


def test_edge_cases_are_planted(mini_weights: dict[str, np.ndarray]) -> None:
    assert edge_case_tensor(EDGE_CASES["single_spike"], MINI) == "model.layers.1.mlp.down_proj.weight"
    zero = mini_weights[edge_case_tensor(EDGE_CASES["zero_row"], MINI)]
    assert bool(np.all(zero[3] == 0)) and bool(np.all(np.any(np.delete(zero, 3, axis=0) != 0, axis=1)))
    const = mini_weights[edge_case_tensor(EDGE_CASES["constant_row"], MINI)]
    assert bool(np.all(const[5] == np.float32(0.01)))
    spike = mini_weights[edge_case_tensor(EDGE_CASES["single_spike"], MINI)]
    others = np.delete(spike.reshape(-1), 7 * spike.shape[1] + 11)
    assert abs(float(spike[7, 11])) >= 9.9 * float(np.abs(others).max())


def test_prediction_stats_stay_in_the_tuned_band(mini_folder: Path) -> None:
    """Neither uniform (entropy ln 1000 = 6.9) nor one-hot: confident and unsure positions."""
    weights = read_safetensors(mini_folder / "model.safetensors")
    samples = read_jsonl(mini_folder / "calibration.jsonl")
    stats = prediction_stats(weights, MINI, samples, seed=0)
    assert 2.0 < stats["mean_entropy"] < 4.5, stats
    assert stats["std_entropy"] > 1.0, stats
    assert 0.3 < stats["mean_top1"] < 0.6, stats
    assert 0.15 < stats["frac_top1_gt_0_5"] < 0.6, stats
    assert 0.03 < stats["frac_top1_lt_0_1"] < 0.3, stats


def test_untuned_scales_are_nearly_uniform() -> None:
    """The band is not free: without the bigram the same architecture is near ln(vocab)."""
    flat = generate_weights(MINI, seed=0, scales=Scales(bigram=0.0, lm_head_gain=1.0))
    samples = synthetic_samples(MINI.vocab_size, 8, 32, 0, MINI.mask_token_id)
    assert prediction_stats(flat, MINI, samples)["mean_entropy"] > 6.0


# --------------------------------------------------------------------------- errors


def test_bad_arguments_are_readable_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="did you mean 'model.norm.weight'"):
        generate_tensor(MINI, "model.norm.weights", seed=0)
    with pytest.raises(ConfigurationError, match="seed = -1"):
        generate(tmp_path, seed=-1)
    with pytest.raises(ConfigurationError, match="Scales.bigram"):
        Scales(bigram=-1.0)


def test_refuses_to_mix_layouts_in_one_folder(mini_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="model.safetensors"):
        generate(mini_folder, seed=0, legacy_npy=True)
    tiny = DreamConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, mask_token_id=15)
    npy = generate(tmp_path / "npy", config=tiny, seed=0, legacy_npy=True)
    with pytest.raises(ConfigurationError, match=r"legacy \.npy"):
        generate(npy, config=tiny, seed=0)
