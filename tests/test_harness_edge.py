"""The edge profile on the real MiniLM, through the command line: INT2 requested, the
fallback ladder and mixed precision reach the quality bar, and the report shows the mix,
its bits per weight and the quality-versus-size chart."""

from __future__ import annotations

import json
import os
from pathlib import Path
import subprocess
import sys


def test_minilm_edge_profile(tmp_path: Path) -> None:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "harness", "run", "--model", "minilm", "--profile", "edge",
                           "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"
    results = json.loads((tmp_path / "results.json").read_text())
    (entry,) = results["bit_widths"]
    plan = entry["plan"]
    metrics = entry["metrics"]
    assert results["run"]["profile"] == "edge" and entry["bits"] == 2
    assert metrics["output_cosine_mean"] >= 0.90
    assert plan["promotions"] == metrics["promotions"] > 0
    assert metrics["plan_mismatches"] == 0
    assert 2.0 < metrics["bits_per_weight"] < 4.5, "a mix, mostly INT2, measured on disk"
    stored = {layer["stored"] for layer in plan["layers"]}
    assert any(s.startswith("int2-") for s in stored) and any(s.startswith(("int4-", "int8-", "fp16")) for s in stored)
    report = (tmp_path / "QUANTIZATION_VALIDATION_REPORT.md").read_text()
    assert "## Mixed precision: the fallback ladder" in report
    # one configuration measured (the plan): a table row, no chart (--compare adds points)
    assert "## Verdict by bit width" in report and "| INT2 | **SHIP** | yes |" in report
