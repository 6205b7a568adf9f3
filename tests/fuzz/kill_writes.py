"""kill -9 during every write of a run: what is left in ``--out`` must be whole.

A warm parent (everything imported once) forks a writer that repeats, forever, every
write a run makes into ``--out`` with the very functions the runner uses: the artifact
(``storage.save``), a safetensors baseline, ``benchmarks.json`` (temp path + commit,
as pytest-benchmark's output is handled), ``suite.log`` (``integrity.atomic_text``),
``results.json`` and the report. The parent SIGKILLs the writer at a random moment,
then checks every file in the folder: it is absent, or complete (parses, ends with its
last line, loads with checksums and the manifest verified). Temp files left by the kill
must be removed by ``integrity.prepare_out`` (what a run does first).

    python tests/fuzz/kill_writes.py OUT_DIR KILLS SEED   -> prints one JSON line
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import random
import signal
import sys
import time
from typing import Any

import numpy as np

from arrowquant_core import storage
from arrowquant_core.model import QuantizationConfig, quantize_model
from arrowquant_core.safetensors_io import read_safetensors, write_safetensors
from harness import integrity
from harness.report import render_report
from harness.results import write_json

LAST_LOG_LINE = "END OF LOG"


def _results(i: int) -> dict[str, Any]:
    return {"schema_version": 1, "iteration": i, "verdict": "FAIL", "padding": "x" * 200_000,
            "criteria": [], "bit_widths": [], "tests": {"failures": []}}


def _writer(out: Path, model: Any, weights: dict[str, np.ndarray], report_results: dict[str, Any]) -> None:
    i = 0
    while True:
        i += 1
        storage.save(model, out / "artifacts" / "model-int4.parquet")
        write_safetensors(out / "artifacts" / "fp32.safetensors", weights)
        tmp = integrity.temp_path(out / "benchmarks.json")
        tmp.write_text(json.dumps({"iteration": i, "padding": "b" * 100_000}))
        integrity.commit_file(tmp, out / "benchmarks.json")
        with integrity.atomic_text(out / "suite.log") as log:
            for n in range(2000):
                log.write(f"line {n} of iteration {i}\n")
            log.write(LAST_LOG_LINE + "\n")
        write_json(_results(i), out / "results.json")
        if report_results:
            render_report(report_results, out / "QUANTIZATION_VALIDATION_REPORT.md")


def _check(out: Path) -> list[str]:
    """Problems with the files in ``out`` (empty: every file absent or whole)."""
    problems = []
    for path in sorted(p for p in out.rglob("*") if p.is_file() and not p.name.endswith(".tmp")):
        try:
            if path.suffix == ".json":
                json.loads(path.read_text())
            elif path.name == "suite.log":
                if not path.read_text().endswith(LAST_LOG_LINE + "\n"):
                    raise ValueError("log cut short")
            elif path.suffix == ".md":
                if "Every figure above was measured" not in path.read_text():
                    raise ValueError("report cut short")
            elif path.suffix == ".parquet":
                storage.load(path)
            elif path.suffix == ".safetensors":
                read_safetensors(path)
        except Exception as exc:  # noqa: BLE001 - any failure to read is the finding
            problems.append(f"{path.relative_to(out)}: {type(exc).__name__}: {str(exc)[:200]}")
    return problems


def main(out: Path, kills: int, seed: int, report_json: Path | None) -> dict[str, Any]:
    rng = random.Random(seed)
    gen = np.random.default_rng(seed)
    weights = {f"layer.{k}.weight": gen.standard_normal((256, 256)).astype(np.float32) for k in range(4)}
    model = quantize_model(weights, QuantizationConfig("int4-g64-asym"))
    report_results = json.loads(report_json.read_text()) if report_json else {}
    (out / "artifacts").mkdir(parents=True, exist_ok=True)
    found: list[str] = []
    temps_seen = 0
    files_seen: set[str] = set()
    for _ in range(kills):
        pid = os.fork()
        if pid == 0:  # the writer: never returns
            try:
                _writer(out, model, weights, report_results)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.02, 0.6))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        found += _check(out)
        files_seen |= {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and not p.name.endswith(".tmp")}
        temps_seen += len(integrity.prepare_out(out))
    leftovers = [str(p) for p in out.rglob("*.tmp")]
    return {"kills": kills, "problems": found, "temps_removed": temps_seen, "leftover_temps": leftovers,
            "files_seen": sorted(files_seen)}


if __name__ == "__main__":
    report = Path(sys.argv[4]) if len(sys.argv) > 4 else None
    print(json.dumps(main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), report)))
