"""End to end on the real MiniLM, through the real command line.

One subprocess run of ``python -m harness run --model minilm --compare`` (all three bit
widths, every method compared at INT4 and INT2) is shared by the tests below: exit code, results.json content, the report's structure,
and re-rendering the report from results.json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import subprocess
import sys

import pytest

from harness.measures import METRICS
from harness.results import SCHEMA_VERSION

GOLDEN = Path(__file__).parent / "golden"


def matrix_names() -> list[str]:
    from fixtures.minilm.model import original_weights

    return sorted(name for name, array in original_weights().items() if array.ndim >= 2 and array.dtype.kind == "f")


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path_factory.mktemp("minilm-run")
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "harness", "run", "--model", "minilm", "--compare", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    return proc, out


@pytest.fixture(scope="module")
def results(minilm_run: tuple[subprocess.CompletedProcess[str], Path]) -> dict:  # type: ignore[type-arg]
    proc, out = minilm_run
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return json.loads((out / "results.json").read_text())


def test_exit_code_and_outputs(minilm_run: tuple[subprocess.CompletedProcess[str], Path], results: dict) -> None:  # type: ignore[type-arg]
    proc, out = minilm_run
    assert (out / "QUANTIZATION_VALIDATION_REPORT.md").is_file()
    assert results["verdict"] == "PASS"
    assert "PASS" in proc.stdout
    assert "[" in proc.stderr and "verdict PASS" in proc.stderr, "progress lines go to stderr"
    for bits in (8, 4, 2):
        assert (out / "artifacts" / f"minilm-int{bits}.parquet").is_file()


def test_results_schema_and_provenance(results: dict) -> None:  # type: ignore[type-arg]
    assert results["schema_version"] == SCHEMA_VERSION
    prov = results["provenance"]
    assert len(prov["git_commit"] or "") == 40
    assert prov["core_compiled"] is True, "the harness must run the mypyc-compiled core"
    assert prov["packages"]["torch"].startswith("2.13.0")
    (model_file,) = prov["inputs"]
    assert model_file["path"].endswith("model.safetensors") and len(model_file["sha256"]) == 64
    assert prov["runner"]["sentences"] >= 200
    assert [e["bits"] for e in results["bit_widths"]] == [8, 4, 2]
    assert results["tests"]["skipped"] == 0 and results["tests"]["failed"] == 0
    for entry in results["bit_widths"]:
        assert set(entry["metrics"]) <= set(METRICS) | {"top1_cases"}
        # sizes are bytes on disk of the artifact written in this run
        assert entry["artifact"]["bytes"] == Path(entry["artifact"]["path"]).stat().st_size
        assert abs(entry["metrics"]["size_mb"] - entry["artifact"]["bytes"] / 1e6) < 1e-9
        # every 2-D weight of MiniLM, embeddings included
        assert sorted(l["name"] for l in entry["layers"]) == matrix_names()
    int4 = results["bit_widths"][1]
    # issue 13's default: GPTQ on the rotated weight, K-scheme scales (harness/criteria/minilm.toml)
    assert int4["method"] == "gptq-khr" and {m["method"] for m in int4["methods"]} >= {"krtn", "gptq-kr"}
    by_method = {m["method"]: m for m in int4["methods"]}
    assert by_method["gptq-kr"]["output_cosine_mean"] > by_method["krtn"]["output_cosine_mean"]


def test_measured_values_match_golden(results: dict) -> None:  # type: ignore[type-arg]
    """The run is deterministic (one torch thread, seeded): the headline numbers must
    stay within tolerance of the recorded golden values (update them on purpose only)."""
    golden = json.loads((GOLDEN / "minilm_metrics.json").read_text())
    by_bits = {str(e["bits"]): e["metrics"] for e in results["bit_widths"]}
    worst = []
    for bits, metrics in golden.items():
        for name, (value, tol) in metrics.items():
            got = by_bits[bits][name]
            if abs(got - value) > tol:
                worst.append(f"INT{bits} {name}: {got:.6g} vs golden {value:.6g} ± {tol:g}")
    assert not worst, "\n".join(worst)


def test_report_structure(minilm_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    _proc, out = minilm_run
    text = (out / "QUANTIZATION_VALIDATION_REPORT.md").read_text()
    headings = [line for line in text.splitlines() if line.startswith("#")]
    assert headings == (GOLDEN / "report_headings.txt").read_text().splitlines()
    assert "**Verdict: PASS**" in text
    assert "| Bits | Scheme | Method | Size MB | vs FP32 | vs FP16 | Bits/weight |" in text
    assert "| INT2 | **SHIP** | yes |" in text, "INT2 (GPTQ) is gated on its outputs"
    assert "measured mean output cosine" not in text, "INT2 (0.930 since issue 13) is above the 0.9 collapse line"
    assert "![Quality against size](quality_vs_size.png)" in text
    assert (out / "quality_vs_size.png").stat().st_size > 10_000 and (out / "quality_vs_size.svg").is_file()
    for method in ("`krtn`", "`gptq-kr`", "`gptq-kh`", "`gptq-kh128`"):
        assert f"| {method} |" in text, f"method {method} missing from the comparison"


def test_report_rerenders_identically(minilm_run: tuple[subprocess.CompletedProcess[str], Path],
                                      tmp_path: Path) -> None:
    _proc, out = minilm_run
    again = tmp_path / "again.md"
    proc = subprocess.run([sys.executable, "-m", "harness", "report", str(out / "results.json"), "--out", str(again)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert again.read_text() == (out / "QUANTIZATION_VALIDATION_REPORT.md").read_text()
