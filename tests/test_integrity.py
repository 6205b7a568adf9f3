"""Integrity of a run's output and of its verdict, on one real weights-only run.

The run quantizes a tiny safetensors checkpoint whose tensor name carries Markdown
("x\\n# Heading ![](http://evil)"), drives the real acceptance suite, and writes
results.json and the report. Then: the digests it records check out; ``report`` refuses
forged results; ``verify`` re-checks results against artifacts and criteria; the name
renders inert; ``--out`` problems are exit 2 before the model loads; a closed stdout
pipe keeps exit 0; and kill -9 during every kind of write leaves only whole files.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
import shutil
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from arrowquant_core.safetensors_io import write_safetensors
from harness import exitcodes
from harness.cli import main
from harness.escape import md_code, md_text
from harness.integrity import consistency_problems, sha256_file, verify
from harness.report import render

REPO = Path(__file__).resolve().parent.parent
HOSTILE = "x\n# Heading ![](http://evil)"


@pytest.fixture(scope="module")
def run_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("integrity")
    rng = np.random.default_rng(11)
    model = root / "tiny.safetensors"
    write_safetensors(model, {"layer.0.weight": rng.standard_normal((64, 128)).astype(np.float32),
                              HOSTILE: rng.standard_normal((32, 64)).astype(np.float32)})
    out = root / "out"
    (out / "artifacts").mkdir(parents=True)
    stale = out / ".results.json.0123456789abcdef.tmp"  # left by a killed earlier run
    stale.write_bytes(b"{half")
    code = main(["run", "--model", str(model), "--bits", "4", "--out", str(out), "--rounds", "1", "--quiet"])
    assert code in (exitcodes.OK, exitcodes.GATE_FAILED)
    assert not stale.exists()
    return out


def results_of(out: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / "results.json").read_text())
    return data


def write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_results_record_criteria_and_artifact_digests(run_out: Path) -> None:
    results = results_of(run_out)
    record = results["run"]["criteria_integrity"]
    assert record["sha256"] == sha256_file(Path(record["file"]))
    assert record["differs_from_default"] is False and record["default_source"] == "git HEAD"
    for entry in results["bit_widths"]:
        artifact = entry["artifact"]
        assert artifact["sha256"] == sha256_file(Path(artifact["path"]))
    assert not consistency_problems(results)
    assert "identical to the committed default" in (run_out / "QUANTIZATION_VALIDATION_REPORT.md").read_text()


def test_verify_confirms_the_run_and_gives_its_verdict(run_out: Path) -> None:
    verdict = results_of(run_out)["verdict"]
    assert main(["verify", str(run_out / "results.json")]) == (exitcodes.OK if verdict == "PASS"
                                                              else exitcodes.GATE_FAILED)


FORGERIES = {
    "verdict-flipped": lambda r: r.update(verdict="PASS" if r["verdict"] == "FAIL" else "FAIL"),
    "gate-flag-flipped": lambda r: r["criteria"][0].update(passed=not r["criteria"][0]["passed"]),
    "gate-value-edited": lambda r: r["criteria"][0].update(value=-12345.0),
    "threshold-weakened": lambda r: r["criteria"][0].update(threshold=-1e9),
    "bit-decision-flipped": lambda r: r["bit_widths"][0]["verdict"].update(
        decision="ship" if r["bit_widths"][0]["verdict"]["decision"] != "ship" else "do not ship"),
    "all-passed": lambda r: (r.update(verdict="PASS"), [c.update(passed=True) for c in r["criteria"]],
                             r["tests"].update(failed=0, failures=[])),
}


@pytest.mark.parametrize("forgery", list(FORGERIES))
def test_report_refuses_forged_results(run_out: Path, tmp_path: Path, forgery: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    results = copy.deepcopy(results_of(run_out))
    if forgery == "all-passed" and all(c["passed"] for c in results["criteria"]):
        results["criteria"][0]["value"] = -1.0  # make one gate fail so "all passed" is a lie
    FORGERIES[forgery](results)
    path = write(tmp_path / "results.json", results)
    assert main(["report", str(path)]) == exitcodes.USAGE
    assert "integrity problem" in capsys.readouterr().err
    assert not (tmp_path / "QUANTIZATION_VALIDATION_REPORT.md").exists()
    assert main(["verify", str(path)]) == exitcodes.USAGE


def test_verify_catches_a_changed_artifact_and_weakened_criteria(run_out: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    results = copy.deepcopy(results_of(run_out))
    artifact = Path(results["bit_widths"][0]["artifact"]["path"])
    copy_of_artifact = tmp_path / artifact.name
    shutil.copy(artifact, copy_of_artifact)
    criteria = Path(results["run"]["criteria_integrity"]["file"])
    copy_of_criteria = tmp_path / "criteria.toml"
    shutil.copy(criteria, copy_of_criteria)
    results["bit_widths"][0]["artifact"]["path"] = str(copy_of_artifact)
    results["run"]["criteria_integrity"]["file"] = str(copy_of_criteria)
    path = write(tmp_path / "results.json", results)
    assert main(["verify", str(path)]) in (exitcodes.OK, exitcodes.GATE_FAILED)  # the copies are identical

    with open(copy_of_artifact, "ab") as handle:
        handle.write(b"\0")
    assert main(["verify", str(path)]) == exitcodes.USAGE
    assert "sha256 differs" in capsys.readouterr().err
    shutil.copy(artifact, copy_of_artifact)

    text = copy_of_criteria.read_text()
    weakened = text.replace("compression_vs_fp32 >= 5.5", "compression_vs_fp32 >= 0.5")
    assert weakened != text
    copy_of_criteria.write_text(weakened)
    assert main(["verify", str(path)]) == exitcodes.USAGE
    err = capsys.readouterr().err
    assert "criteria file changed since the run" in err and "INT4 compression_vs_fp32 >= 0.5" in err


def test_tensor_names_and_user_text_render_inert(run_out: Path) -> None:
    report = (run_out / "QUANTIZATION_VALIDATION_REPORT.md").read_text()
    assert HOSTILE not in report
    assert "# Heading" not in [line.lstrip("# ") and line for line in report.splitlines() if line.startswith("#")]
    assert md_code(HOSTILE) in report
    # every outside string of a (possibly forged) results file, at once
    results = copy.deepcopy(results_of(run_out))
    clean = render(results)
    evil = "a|b\n# H1 ![x](http://e/x.png) <img src=x> [l](javascript:x) `c` **b**"
    results["run"]["model"] = evil
    results["run"]["criteria_file"] = evil
    results["provenance"]["platform"] = evil
    results["tests"]["failures"] = [{"test": evil, "message": evil}]
    for gate in results["criteria"]:
        gate["why"] = evil
    for entry in results["bit_widths"]:
        entry["scheme"] = evil
        for layer in entry["layers"]:
            layer["name"] = evil
    text = render(results)
    headings = [line for line in text.splitlines() if line.startswith("#")]
    clean_headings = [line for line in clean.splitlines() if line.startswith("#")]
    assert headings[1:] == clean_headings[1:]  # no heading injected; the title names the (escaped) model
    assert headings[0] == "# Quantization validation report — " + md_text(evil)
    outside_code = text.replace(md_code(evil), "")  # inside a code span nothing is markup
    assert "<img" not in outside_code and "](" not in outside_code.replace("](quality_vs_size.png)", "")
    def columns(markdown: str) -> list[int]:  # cells per table row: an escaped pipe splits nothing
        return [line.count("|") - line.count("\\|") for line in markdown.splitlines() if line.startswith("| INT")]

    assert columns(text) == columns(clean)
    assert md_text(evil).count("\n") == 0


def test_out_that_cannot_be_written_is_exit_2_before_the_model_loads(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    corrupt = tmp_path / "m.safetensors"
    corrupt.write_bytes(b"\x08\0\0\0\0\0\0\0{}      ")  # would be a FormatError if it were read
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out, needle in [(blocker, "exists and is not a folder"), (blocker / "sub", "not writable")]:
        assert main(["run", "--model", str(corrupt), "--out", str(out), "--quiet"]) == exitcodes.USAGE
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err


def test_closed_stdout_pipe_keeps_exit_code(run_out: Path, tmp_path: Path) -> None:
    """``python -m harness report ... | head -0``: the reader is gone before the one line
    is printed; the command did its work, so exit 0, and no traceback."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "harness", "report", str(run_out / "results.json"),
                             "--out", str(tmp_path / "r.md")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=REPO)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    with proc.stderr:
        err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == exitcodes.OK, err
    assert "Traceback" not in err and "Exception ignored" not in err
    assert (tmp_path / "r.md").is_file()


def test_kill_9_during_every_write_leaves_only_whole_files(run_out: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
           "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "tests" / "fuzz" / "kill_writes.py"), str(tmp_path / "out"),
                           "5", "20261201", str(run_out / "results.json")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["problems"] == [] and report["leftover_temps"] == [], report
    assert {"results.json", "suite.log", "benchmarks.json", "artifacts/model-int4.parquet"} <= set(report["files_seen"])


@pytest.mark.parametrize("text", [HOSTILE, "a`b``c", "|x|", "<script>alert(1)</script>", "1. item", "- item",
                                  "www.evil.com http://evil", "\x1b[31mred\r\n", "n" * 10_000])
def test_escapers_keep_one_inert_line(text: str) -> None:
    from harness.escape import LIMIT, svg_text

    for out in (md_text(text), md_code(text), svg_text(text)):
        assert "\n" not in out and "\r" not in out and "\x1b" not in out
        assert len(out) < 3 * LIMIT + 100
    assert "<" not in md_text(text) and "<" not in svg_text(text)
    code = md_code(text)
    fence = code[:len(code) - len(code.lstrip("`"))]
    assert fence not in code[len(fence):-len(fence)]  # the span cannot be closed early
