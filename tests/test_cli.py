"""The command line: help, listing, usage errors and their exit codes."""

from __future__ import annotations

import json
from pathlib import Path
import subprocess
import sys

import pytest

from harness import exitcodes
from harness.cli import main

REPO = Path(__file__).resolve().parent.parent


def test_help_has_examples_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["run", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "--model" in out and "exit codes:" in out
    for code in (0, 1, 2, 3):
        assert f"  {code}  " in out


def test_list_names_models_schemes_metrics(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == exitcodes.OK
    out = capsys.readouterr().out
    assert "minilm" in out and "int4-g64-asym" in out and "output_cosine_mean" in out and "rows-permuted" in out


@pytest.mark.parametrize("argv, needle", [
    (["run", "--model", "minilmm"], "did you mean 'minilm'"),
    (["run", "--model", "minilm", "--bits", "3"], "supported bit widths"),
    (["run", "--model", "minilm", "--bits", "x"], "comma-separated"),
    (["run", "--model", "./no/such/dir"], "does not exist"),
    (["run", "--model", "minilm", "--criteria", "/no/such.toml"], "does not exist"),
    (["run", "--model", "minilm", "--inject-fault", "nibble"], "did you mean 'nibbles-swapped'"),
    (["frobnicate"], "invalid choice"),
])
def test_usage_errors_exit_2(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(main(argv))
    assert exc.value.code == exitcodes.USAGE
    assert needle in capsys.readouterr().err


def test_bad_criteria_file_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "c.toml"
    bad.write_text('[bits.4]\nscheme = "int4-g64-asym"\ngates = ["output_cosine_mena >= 0.9"]\n')
    assert main(["run", "--model", "minilm", "--criteria", str(bad)]) == exitcodes.USAGE
    assert "did you mean 'output_cosine_mean'" in capsys.readouterr().err


def test_module_entry_point_runs() -> None:
    proc = subprocess.run([sys.executable, "-m", "harness", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "python -m harness" in proc.stdout


def test_module_entry_point_exit_codes_and_output_survive_the_quick_exit(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # python -m harness ends with os._exit after the atexit handlers (harness/__main__.py):
    # the exit code and every byte written to a pipe must still come through
    assert main(["list"]) == exitcodes.OK
    listing = capsys.readouterr().out
    proc = subprocess.run([sys.executable, "-m", "harness", "list"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == exitcodes.OK and proc.stdout == listing
    proc = subprocess.run([sys.executable, "-m", "harness", "run", "--model", "minilmm"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == exitcodes.USAGE and "did you mean 'minilm'" in proc.stderr
    # a whole (weight-level) run: its last line goes to a block-buffered pipe, flushed only at exit
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "harness", "run", "--model", "dream-mini", "--bits", "8",
                           "--runner", "none", "--criteria", "harness/criteria/weights.toml", "--quiet",
                           "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == exitcodes.OK, proc.stderr
    assert proc.stdout == f"PASS: {out / 'QUANTIZATION_VALIDATION_REPORT.md'}\n"
    results = json.loads((out / "results.json").read_text())
    assert results["verdict"] == "PASS"
    # a NumPy-only run never imports torch, provenance included (it cost 1.4 s a run)
    assert results["provenance"]["threads"]["torch"] == "not loaded by this run"


def test_start_up_leaves_heavy_optional_imports_out() -> None:
    # ml_dtypes 0.7.0 takes ~0.9 s to import (arrowquant_core/bf16.py): the CLI and the core
    # import it only when a bfloat16 tensor is met; torch (~1.3 s) is imported by the runners
    # that use it, never by the harness's own provenance record. The fault this catches: a
    # module-level `import ml_dtypes` (or an `import torch` to ask its thread count) coming
    # back anywhere on the start-up path.
    code = ("import sys, harness.cli, harness.results, arrowquant_core, arrowquant_core.safetensors_io, "
            "fixtures.dream_mini.generator; harness.results.provenance([], {}, None); "
            "print(sorted(m for m in ('ml_dtypes', 'torch', 'matplotlib') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_report_of_missing_results_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "nope.json")]) == exitcodes.USAGE
    assert "does not exist" in capsys.readouterr().err
