"""--model PATH: user checkpoints are validated at the weight level.

Real files: safetensors (single and sharded with an index) written with our writer,
a legacy .npy folder, and a Parquet v1 file, each run through the real suite.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import arrowquant_core as aq
from arrowquant_core.errors import ConfigurationError, FormatError
from fixtures.checkpoint import load_model
from arrowquant_core.safetensors_io import write_safetensors
from harness import exitcodes
from harness.cli import main
from harness.config import RunConfig
from harness.runner import run


def tiny_weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    w = {}
    for i in range(2):
        w[f"layers.{i}.fc1.weight"] = (rng.standard_normal((256, 192)) * 0.05).astype(np.float32)
        w[f"layers.{i}.fc1.bias"] = np.zeros(256, np.float32)
        w[f"layers.{i}.fc2.weight"] = (rng.standard_t(5, (192, 256)) * 0.05).astype(np.float32)
    return w


def make_sharded(folder: Path, weights: dict[str, np.ndarray]) -> None:
    folder.mkdir()
    names = sorted(weights)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for shard, members in shards.items():
        write_safetensors(folder / shard, {n: weights[n] for n in members})
    index = {"metadata": {}, "weight_map": {n: s for s, members in shards.items() for n in members}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "npy", "parquet-v1"])
def test_path_checkpoint_runs_weight_level_suite(layout: str, tmp_path: Path) -> None:
    weights = tiny_weights()
    if layout == "safetensors":
        source = tmp_path / "ckpt"
        source.mkdir()
        write_safetensors(source / "model.safetensors", weights)
    elif layout == "sharded":
        source = tmp_path / "ckpt"
        make_sharded(source, weights)
    elif layout == "npy":
        source = tmp_path / "ckpt"
        source.mkdir()
        for name, array in weights.items():
            np.save(source / f"{name}.npy", array)
    else:
        source = tmp_path / "weights.parquet"
        aq.save_weights(weights, source)
    checkpoint = load_model(str(source))
    assert checkpoint.runner is None
    assert set(checkpoint.weights) == set(weights)
    for name, array in weights.items():
        np.testing.assert_array_equal(checkpoint.weights[name], array)
    result = run(RunConfig(model=str(source), bits=(8, 4), out=tmp_path / "out", quiet=True, benchmark_rounds=1))
    assert result.verdict == "PASS", result.results["tests"]["failures"]
    assert result.results["run"]["criteria_file"].endswith("weights.toml")
    entry = result.results["bit_widths"][1]
    assert {l["name"] for l in entry["layers"]} == {n for n, a in weights.items() if a.ndim == 2}
    assert "output_cosine_mean" not in entry["metrics"]


def test_output_gates_need_a_runner(tmp_path: Path) -> None:
    source = tmp_path / "w.parquet"
    aq.save_weights(tiny_weights(), source)
    minilm_criteria = Path(__file__).parents[1] / "harness" / "criteria" / "minilm.toml"
    with pytest.raises(ConfigurationError, match="no runner"):
        run(RunConfig(model=str(source), criteria=minilm_criteria, out=tmp_path / "o", quiet=True))


def test_quantized_artifact_is_not_a_source(tmp_path: Path) -> None:
    path = tmp_path / "q.parquet"
    aq.save(aq.quantize_model(tiny_weights(), aq.QuantizationConfig("int8-channel-sym")), path)
    with pytest.raises(ConfigurationError, match="already a quantized"):
        load_model(str(path))


def test_empty_folder_and_missing_shard(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FormatError, match="no \\*.safetensors or \\*.npy"):
        load_model(str(empty))
    sharded = tmp_path / "ckpt"
    make_sharded(sharded, tiny_weights())
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FormatError, match="model-00002-of-00002"):
        load_model(str(sharded))


def test_nan_weight_is_bad_input_named_with_file_and_tensor(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    weights = tiny_weights()
    weights["layers.1.fc2.weight"][3, 5] = np.nan
    source = tmp_path / "w.parquet"
    aq.save_weights(weights, source)
    out = tmp_path / "o"
    assert main(["run", "--model", str(source), "--out", str(out), "--quiet"]) == exitcodes.USAGE
    err = capsys.readouterr().err
    assert str(source) in err and "layers.1.fc2.weight" in err and "non-finite" in err and "[3, 5]" in err
    assert not (out / "results.json").exists(), "no half-made results for bad input"
