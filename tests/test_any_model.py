"""Issue 7: any model a user brings is judged by its outputs when a runner can run it,
rebuilt from the artifact alone, and a verdict never claims what was not measured.

Real folders: MiniLM's own sentence-transformers folder from the installed package,
the same weights without any config (no runner: weights only), a checkpoint with a
tied copy of its embedding, and a CNN with BatchNorm's integer counter.
"""

from __future__ import annotations

from pathlib import Path
import shutil

import numpy as np
import pytest

from arrowquant_core.safetensors_io import write_safetensors
from harness import exitcodes
from harness.cli import main
from harness.config import RunConfig
from harness.runner import run


@pytest.fixture(scope="module")
def minilm_folder() -> Path:
    from fixtures.minilm.model import model_dir

    return model_dir()


def test_sentence_transformers_folder_is_judged_by_its_outputs(minilm_folder: Path, tmp_path: Path) -> None:
    """MiniLM's own folder (int64 position_ids buffer included) as a PATH: detected as
    sentence-transformers, every tensor accounted for, embeddings measured."""
    result = run(RunConfig(model=str(minilm_folder), bits=(8,), out=tmp_path, quiet=True, benchmark_rounds=1))
    assert result.exit_code in (exitcodes.OK, exitcodes.GATE_FAILED)
    assert result.results["run"]["runner"] == "sentence-transformers"
    assert result.results["verdict_scope"] == "outputs measured"
    assert Path(result.results["run"]["criteria_file"]).name == "runner-sentence-transformers.toml"
    assert result.results["model"]["buffers"] == ["embeddings.position_ids"]
    (entry,) = result.results["bit_widths"]
    assert entry["verdict"]["outputs_measured"] and entry["metrics"]["output_cosine_mean"] > 0.999
    assert entry["metrics"]["missing_tensors"] == 0 and entry["metrics"]["kept_tensors_changed"] == 0
    assert result.exit_code == exitcodes.OK, result.results["tests"]["failures"]


def _weights_only_folder(minilm_folder: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "bare"
    folder.mkdir()
    shutil.copy(minilm_folder / "model.safetensors", folder / "model.safetensors")
    return folder


def test_a_folder_no_runner_can_run_says_weights_only(minilm_folder: Path, tmp_path: Path) -> None:
    """The MiniLM weights without their configs: nothing can run them, so the verdict
    reads WEIGHTS ONLY and no recommendation speaks of outputs."""
    folder = _weights_only_folder(minilm_folder, tmp_path)
    result = run(RunConfig(model=str(folder), bits=(8, 2), out=tmp_path / "out", quiet=True, benchmark_rounds=1))
    assert result.exit_code in (exitcodes.OK, exitcodes.GATE_FAILED)
    assert result.results["verdict_scope"] == "WEIGHTS ONLY: outputs not measured"
    assert result.results["run"]["runner"] is None
    for entry in result.results["bit_widths"]:
        assert not entry["verdict"]["outputs_measured"] and not entry["verdict"]["output_gates"]
        assert not any(k.startswith("output_") for k in entry["metrics"])
    report = result.report_path.read_text()
    assert "(WEIGHTS ONLY: outputs not measured)" in report
    recommendations = report.split("## Recommendations", 1)[1].split("## Criteria", 1)[0]
    assert "usable outputs" not in recommendations and "outputs included" not in recommendations
    assert "WEIGHTS ONLY" in recommendations


def test_runner_none_forces_weights_only(minilm_folder: Path, tmp_path: Path) -> None:
    result = run(RunConfig(model=str(minilm_folder), bits=(8,), out=tmp_path, quiet=True, benchmark_rounds=1,
                           runner="none"))
    assert result.results["verdict_scope"] == "WEIGHTS ONLY: outputs not measured"
    assert Path(result.results["run"]["criteria_file"]).name == "weights.toml"


def test_tied_copy_is_stored_and_counted_once(tmp_path: Path) -> None:
    """A GPT-2-style checkpoint whose lm_head is a copy of the token embedding: stored once,
    recorded as a tie, and the FP32 baseline counts it once."""
    rng = np.random.default_rng(3)
    wte = (rng.standard_normal((512, 128)) * 0.02).astype(np.float32)
    weights = {"transformer.wte.weight": wte, "transformer.h.0.mlp.c_fc.weight":
               (rng.standard_normal((128, 512)) * 0.02).astype(np.float32),
               "transformer.ln_f.weight": np.ones(128, np.float32), "lm_head.weight": wte.copy()}
    folder = tmp_path / "gpt"
    folder.mkdir()
    write_safetensors(folder / "model.safetensors", weights)
    result = run(RunConfig(model=str(folder), bits=(8,), out=tmp_path / "out", quiet=True, benchmark_rounds=1))
    ties = result.results["model"]["ties"]  # the first of the two in file order is the canonical one
    assert len(ties) == 1 and set(ties.items()) <= {("lm_head.weight", "transformer.wte.weight"),
                                                     ("transformer.wte.weight", "lm_head.weight")}
    unique = wte.size + 128 * 512 + 128
    assert result.results["baselines"]["parameters"] == unique
    (entry,) = result.results["bit_widths"]
    assert entry["metrics"]["tie_mismatches"] == 0 and entry["metrics"]["missing_tensors"] == 0
    assert result.exit_code == exitcodes.OK, result.results["tests"]["failures"]
    alias, canonical = next(iter(ties.items()))
    assert f"`{alias}` → `{canonical}`" in result.report_path.read_text()


def test_cnn_with_batchnorm_counter_runs(tmp_path: Path) -> None:
    """BatchNorm's int64 num_batches_tracked passes through; 4-D conv weights are said to
    be grouped along in_channels x kh x kw."""
    rng = np.random.default_rng(5)
    weights = {"conv1.weight": (rng.standard_normal((64, 32, 3, 3)) * 0.05).astype(np.float32),
               "bn1.weight": np.ones(64, np.float32), "bn1.bias": np.zeros(64, np.float32),
               "bn1.running_mean": np.zeros(64, np.float32), "bn1.running_var": np.ones(64, np.float32),
               "bn1.num_batches_tracked": np.array(1000, np.int64),
               "fc.weight": (rng.standard_normal((10, 256)) * 0.05).astype(np.float32)}
    folder = tmp_path / "cnn"
    folder.mkdir()
    write_safetensors(folder / "model.safetensors", weights)
    result = run(RunConfig(model=str(folder), bits=(8, 4), out=tmp_path / "out", quiet=True, benchmark_rounds=1))
    assert result.exit_code in (exitcodes.OK, exitcodes.GATE_FAILED), result.results["tests"]["failures"]
    assert result.results["model"]["buffers"] == ["bn1.num_batches_tracked"]
    assert "in_channels x kh x kw" in result.results["model"]["conv_grouping"]
    for entry in result.results["bit_widths"]:
        assert entry["metrics"]["kept_tensors_changed"] == 0 and entry["metrics"]["dtype_mismatches"] == 0


def _criteria(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(body)
    return path


def test_gptq_without_activations_is_an_error_unless_fallback_allowed(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    folder = tmp_path / "m"
    folder.mkdir()
    write_safetensors(folder / "model.safetensors", {"fc.weight": rng.standard_normal((64, 128)).astype(np.float32)})
    gates = 'gates = ["weight_cosine_min >= 0.9", "missing_tensors == 0"]\n'
    strict = _criteria(tmp_path, f'[bits.4]\nscheme = "int4-g64-asym"\nmethod = "gptq"\n{gates}')
    assert main(["run", "--model", str(folder), "--criteria", str(strict), "--out", str(tmp_path / "a"),
                 "--quiet"]) == exitcodes.USAGE
    allowed = tmp_path / "allowed.toml"
    allowed.write_text(f'[bits.4]\nscheme = "int4-g64-asym"\nmethod = "gptq"\nfallback = "clip"\n{gates}')
    result = run(RunConfig(model=str(folder), criteria=allowed, out=tmp_path / "b", quiet=True, benchmark_rounds=1))
    assert result.exit_code == exitcodes.OK, result.results["tests"]["failures"]
    (entry,) = result.results["bit_widths"]
    assert [l["method"] for l in entry["layers"]] == ["clip"], "the report shows the method actually stored"
    assert "clip × 1" in result.report_path.read_text()


@pytest.mark.parametrize(("argv", "needle"), [
    (["--profile", "local"], "invalid choice"),
    (["--profile", "edge"], "no criteria for"),
    (["--compare", "--criteria", "{nocompare}"], "lists no methods to compare"),
    (["--criteria", "{outputs}"], "no runner can run this model"),
    (["--runner", "sentence-transformer"], "did you mean"),
])
def test_usage_errors_for_a_path_model(argv: list[str], needle: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    write_safetensors(folder / "model.safetensors", {"fc.weight": np.ones((8, 64), np.float32)})
    files = {"{nocompare}": '[bits.8]\nscheme = "int8-g128-asym"\ngates = ["missing_tensors == 0"]\n',
             "{outputs}": '[bits.8]\nscheme = "int8-g128-asym"\ngates = ["output_cosine_mean >= 0.9"]\n'}
    argv = [str(_criteria(tmp_path, files[a])) if a in files else a for a in argv]
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(main(["run", "--model", str(folder), "--out", str(tmp_path / "o"), *argv]))
    assert exc.value.code == exitcodes.USAGE
    assert needle in capsys.readouterr().err


def test_a_runner_model_must_be_gated_on_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    criteria = _criteria(tmp_path, '[bits.8]\nscheme = "int8-g64-asym"\ngates = ["weight_cosine_min >= 0.9"]\n')
    assert main(["run", "--model", "dream-mini", "--criteria", str(criteria), "--out", str(tmp_path / "o")]) \
        == exitcodes.USAGE
    assert "no output-level gate" in capsys.readouterr().err


def test_list_shows_runners(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == exitcodes.OK
    out = capsys.readouterr().out
    for name in ("sentence-transformers", "hf-encoder", "hf-causal-lm", "dream-mini"):
        assert name in out
