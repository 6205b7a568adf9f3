"""The streaming run's gates must be able to say no.

The streaming run (``--stream``: the 7B path) measures with its own read-back
(``arrowquant_core.stream.measure``), not the suite's code, so its gates get their own
faults: each one rewrites the streamed artifact row by row (``harness.faults.rewrite_streamed``,
the same per-tensor breakage as in memory) and must fail every gate named here, on the
real MiniLM weights streamed from disk with ``harness/criteria/streaming.toml``. The clean
runs pass the same gates (the control).
"""

from __future__ import annotations

import json
from pathlib import Path
import subprocess
import sys
from typing import Any

import pytest

from harness.streaming import RESULTS_NAME, StreamingConfig, run_streaming
from tests.gate_keys import keys

# (bits, fault) -> the streaming gates that must all fail
STREAM_FAILS = {
    (8, "scales-doubled"): {"weight_sqnr_db_min", "group_range_ratio_max"},
    (8, "rows-permuted"): {"weight_cosine_min"},
    (2, "zero-off-by-one"): {"weight_cosine_mean"},
    (8, "embedding-rows-swapped"): {"embedding_row_cosine_min"},
    (8, "group-scales-off"): {"group_range_ratio_max"},
    (8, "norm-gain-nan"): {"nonfinite_tensors", "kept_tensors_changed"},
    (8, "float-tensor-dropped"): {"missing_tensors"},
    (8, "extra-tensor-stored"): {"unexpected_tensors"},
    (8, "nothing-quantized"): {"unquantized_weights", "compression_vs_fp32"},
    (8, "dtype-recorded-wrong"): {"dtype_mismatches"},
    (8, "tie-invented"): {"tie_mismatches"},
    (8, "stale-artifact"): {"source_match"},
    (8, "one-code-changed-on-write"): {"roundtrip_exact"},
}
SHOWN_FAILING = set().union(*(keys("streaming", gates) for gates in STREAM_FAILS.values()),
                            keys("streaming", {"peak_rss_gib"}))  # test_holding_the_model_fails_the_peak_rss_gate


@pytest.fixture(scope="module")
def minilm() -> str:
    from fixtures.minilm.model import model_dir

    return str(model_dir())


def _run(model: str, bits: int, fault: str | None, out: Path) -> tuple[int, dict[str, Any]]:
    code, _report = run_streaming(StreamingConfig(model=model, bits=(bits,), out=out, quiet=True, fault=fault))
    results: dict[str, Any] = json.loads((out / RESULTS_NAME).read_text())
    return code, results


def _failed(results: dict[str, Any]) -> set[str]:
    return {g["metric"] for g in results["bit_widths"][0]["gates"] if not g["passed"]}


@pytest.mark.parametrize(("bits", "fault"), sorted(STREAM_FAILS))
def test_streaming_fault_fails_the_gate(minilm: str, bits: int, fault: str, tmp_path: Path) -> None:
    code, results = _run(minilm, bits, fault, tmp_path)
    assert code == 1 and results["verdict"] == "FAIL" and results["run"]["fault"] == fault
    assert STREAM_FAILS[(bits, fault)] <= _failed(results), (sorted(STREAM_FAILS[(bits, fault)] - _failed(results)),
                                                             sorted(_failed(results)))
    assert f"injected fault `{fault}`" in (tmp_path / "STREAMING_VALIDATION_REPORT.md").read_text()


@pytest.mark.parametrize("bits", sorted({b for b, _f in STREAM_FAILS}))
def test_clean_streaming_run_passes(minilm: str, bits: int, tmp_path: Path) -> None:
    code, results = _run(minilm, bits, None, tmp_path)
    assert code == 0 and not _failed(results) and results["run"]["fault"] is None


def test_the_peak_rss_gate_reads_the_runs_own_peak(minilm: str, tmp_path: Path) -> None:
    """The peak is the process's high-water mark, and a run called in a process that did
    other work first read that work's peak: the clean INT2 run above failed its 3 GiB gate
    in one CI run, in a pytest worker an earlier test had taken past 3 GiB. The run now
    starts the mark over. Here 2 GiB is touched and freed first; the run must not see it."""
    import numpy as np

    from harness.streaming import peak_rss_bytes

    held = np.ones(2**28)  # 2 GiB of float64, every page written
    del held
    before = peak_rss_bytes()
    _code, results = _run(minilm, 8, None, tmp_path)
    assert results["run"]["peak_rss_from"] == "the run's start"
    got = results["bit_widths"][0]["metrics"]["peak_rss_gib"] * 2**30
    assert 0 < got < before - 1.5 * 2**30, (got / 2**30, before / 2**30)


@pytest.mark.parametrize(("fault", "why"), [("gptq-wrong-hessian", "has no streaming form"),
                                            ("conv-reshaped-wrong-order", "no conv weight")])
def test_fault_the_streaming_run_cannot_inject_is_refused(minilm: str, fault: str, why: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Before any work: nothing quantized, nothing written."""
    from harness import exitcodes
    from harness.cli import main

    code = main(["run", "--model", minilm, "--stream", "--bits", "8", "--inject-fault", fault,
                 "--out", str(tmp_path), "--quiet"])
    assert code == exitcodes.USAGE and why in capsys.readouterr().err
    assert not (tmp_path / RESULTS_NAME).exists() and not (tmp_path / "artifacts").exists()


def _cli(model: str, out: Path, *extra: str) -> dict[str, Any]:
    """A streaming run in its own process: peak RSS is the process's own high-water mark."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "harness", "run", "--model", model, "--stream", "--bits", "8",
                           "--out", str(out), "--quiet", *extra], capture_output=True, text=True, cwd=root,
                          timeout=300)
    assert done.returncode in (0, 1), done.stderr
    results: dict[str, Any] = json.loads((out / RESULTS_NAME).read_text())
    return results


def test_holding_the_model_fails_the_peak_rss_gate(minilm: str, tmp_path: Path) -> None:
    """The 3 GiB gate would need a model over 3 GiB to fail here, so the bound is set from
    a clean run of the same command: its own peak plus 50 MB. The fault keeps every
    tensor as float64 until the file is written (MiniLM: 180 MB; measured peak RSS 272 MB
    clean, 373 MB with the fault, twice each) and must fail that gate and no other."""
    from harness.streaming import DEFAULT_CRITERIA

    clean = _cli(minilm, tmp_path / "clean")
    assert clean["verdict"] == "PASS"
    bound = (clean["run"]["peak_rss_bytes"] + 50e6) / 2**30
    text = DEFAULT_CRITERIA.read_text()
    assert text.count('rule = "peak_rss_gib <= 3"') == 1, "streaming.toml's peak RSS gate moved: update this test"
    criteria = tmp_path / "streaming-tight.toml"
    criteria.write_text(text.replace('rule = "peak_rss_gib <= 3"', f'rule = "peak_rss_gib <= {bound:.4f}"'))
    held = _cli(minilm, tmp_path / "held", "--criteria", str(criteria), "--inject-fault", "model-held-in-memory")
    assert held["run"]["fault"] == "model-held-in-memory"
    assert _failed(held) == {"peak_rss_gib"}, (_failed(held), held["run"]["peak_rss_bytes"], bound)
