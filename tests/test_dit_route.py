"""The orchestrator's image / audio route on dit-mini: ``quantize_diffusion_model`` takes
GPTQ + Spatial with the runner's calibration, and falls back to per-channel quantization,
counted, without it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import arrowquant_core as aq
from arrowquant_core import ArrowQuantV2
from fixtures.dit_mini.config import DiTConfig
from fixtures.dit_mini.runner import DiTRunner, ensure_fixture


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> DiTRunner:
    return DiTRunner(ensure_fixture(0, DiTConfig.image(), tmp_path_factory.mktemp("dit")))


def test_gptq_spatial_route(runner: DiTRunner, tmp_path: Path) -> None:
    out = tmp_path / "dit-local.parquet"
    result = ArrowQuantV2().quantize_diffusion_model(runner.folder, out, "local",
                                                     calibration=runner.spatial_calibration())
    assert result.modality == "image" and result.scheme == "int4-g128-asym"
    meta = aq.load(out).metadata
    assert meta["strategy"] == "gptq+spatial" and int(meta["spatial_smoothed_sites"]) > 0
    assert int(meta["spatial_fallbacks"]) == len(result.fallbacks)
    stored = aq.load(out)
    assert {t.method for n, t in stored.tensors.items() if "attn.qkv" in n} == {"gptq"}
    # the artifact holds the smoothed model: the runner rebuilds it from the file alone and it
    # predicts the original's noise (the smoothing was folded, not lost)
    weights = aq.load_weights(out)
    assert any(n.endswith("mlp.fc2.input_scale") for n in weights)
    noise, _ = runner.evaluate(weights)
    assert noise["noise_cosine_mean"] > 0.96
    # weight-level quality is measured against the smoothed original, recorded in the artifact
    assert result.min_cosine_similarity > 0.95
    report = ArrowQuantV2().validate_quality(runner.folder, out)
    assert report.min_cosine == pytest.approx(result.min_cosine_similarity)


def test_without_calibration_every_weight_falls_back_per_channel(runner: DiTRunner, tmp_path: Path) -> None:
    out = tmp_path / "dit-cloud.parquet"
    result = ArrowQuantV2().quantize_diffusion_model(runner.folder, out, "cloud")
    model = aq.load(out)
    assert {t.scheme.name for t in model.tensors.values()} == {"int8-channel-sym"}
    assert len(result.fallbacks) == len(model.tensors) == int(model.metadata["spatial_fallbacks"])
    assert "no calibration activations" in json.loads(model.metadata["spatial"])["fallbacks"]["*"]
    assert "x_embedder.proj.weight" in model.tensors and model.tensors["x_embedder.proj.weight"].shape == (128, 4, 2, 2)
    assert runner.evaluate(model.dequantize())[0]["noise_cosine_mean"] > 0.999


def test_audio_folder_is_accepted(tmp_path: Path) -> None:
    folder = ensure_fixture(0, DiTConfig.audio(), tmp_path / "fixture")
    result = ArrowQuantV2().quantize_diffusion_model(folder, tmp_path / "a.parquet", "cloud")
    assert result.modality == "audio" and np.isfinite(result.cosine_similarity)


def test_runner_protocol_refuses_a_wrong_layout_and_describes_itself(runner: DiTRunner) -> None:
    from arrowquant_core.errors import ConfigurationError

    weights = dict(runner.original)
    del weights["final_layer.linear.weight"]
    with pytest.raises(ConfigurationError, match="final_layer.linear.weight"):
        runner.compare(weights)
    with pytest.raises(ConfigurationError, match="unexpected tensor 'lm_head.weight'"):
        runner.compare({**runner.original, "lm_head.weight": np.zeros((2, 2), np.float32)})
    info = runner.describe()
    assert info["eval_seed"] != 0 and info["modality"] == "image" and info["calibration_samples"] == 64
