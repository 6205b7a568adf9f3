"""``run(config) -> RunResult``: the library call behind ``python -m harness run``.

Loads the model, drives the acceptance suite (pytest, in-process, with
pytest-json-report and pytest-benchmark), assembles results.json from what the tests
measured, renders the report, and returns the exit code.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from pathlib import Path
import shlex
import sys
import tempfile
import time
from typing import Any

from arrowquant_core.errors import ConfigurationError
from arrowquant_core.schemes import get_scheme
from harness import exitcodes, integrity
from harness.config import RunConfig
from harness.criteria import default_criteria_path, load_criteria
from harness.context import stored_as
from harness.measures import METRICS
from harness.results import SCHEMA_VERSION, now, provenance, write_json

SUITE_DIR = Path(__file__).resolve().parent / "suite"
REPORT_NAME = "QUANTIZATION_VALIDATION_REPORT.md"
SUITE_LOG = "suite.log"
RESULTS_NAME = "results.json"
BENCHMARKS_NAME = "benchmarks.json"


@dataclass(frozen=True)
class RunResult:
    exit_code: int
    verdict: str
    results_path: Path
    report_path: Path
    results: dict[str, Any]


def run(config: RunConfig) -> RunResult:
    """Run the whole validation; raises ConfigurationError on usage problems."""
    import pytest
    from pytest_jsonreport.plugin import JSONReport

    from fixtures.checkpoint import load_model
    from harness.context import Progress, RunContext
    from harness.faults import get_fault
    from harness.plugin import SuitePlugin
    from harness.report import render_report

    started, t0 = now(), time.perf_counter()
    progress = Progress(config.quiet)
    fault = get_fault(config.fault) if config.fault else None
    criteria_path = config.criteria or _default_criteria(config.model, config.profile)
    criteria = load_criteria(criteria_path, config.model)
    for bits in config.bits:
        criteria.plan(bits)  # every requested bit width must have criteria
    integrity.prepare_out(config.out)  # writable --out before any work; stale temp files removed

    progress(f"loading model {config.model!r}")
    checkpoint = load_model(config.model)
    progress(f"loaded {checkpoint.name}: {len(checkpoint.weights)} tensors, "
             f"{checkpoint.parameter_count / 1e6:.1f}M parameters")
    for plan in criteria.plans.values():
        if plan.ladder is not None and not hasattr(checkpoint.runner, "calibration_score"):
            raise ConfigurationError(f"{criteria_path}: INT{plan.bits} uses the fallback ladder, which needs a "
                                     f"model runner with a calibration score; {config.model!r} has none")
    if checkpoint.runner is None:
        needs_runner = sorted({c.metric for p in criteria.plans.values() for c in p.gates
                               if METRICS[c.metric].level == "output"})
        if needs_runner:
            raise ConfigurationError(
                f"{criteria_path}: gates output metrics {needs_runner}, but model {config.model!r} has no "
                "runner (weight-level validation only); use a weight-level criteria file")

    out = config.out
    artifacts = out / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(config=config, checkpoint=checkpoint, criteria=criteria, workdir=artifacts,
                     progress=progress, fault=fault)
    plugin = SuitePlugin(ctx)
    json_report = JSONReport()
    bench_tmp = integrity.temp_path(out / BENCHMARKS_NAME)  # pytest-benchmark writes in place
    with tempfile.TemporaryDirectory(prefix="arrowquant-suite-") as tmp:
        args = [str(SUITE_DIR), "-c", str(SUITE_DIR / "suite.ini"), "--rootdir", str(SUITE_DIR),
                "-q", "--no-header", "-rfE",
                # importlib: suite modules never collide with same-named test modules of a
                # pytest session that calls the harness in-process (the project's own tests)
                "--import-mode=importlib",
                "-W", "ignore::pytest.PytestAssertRewriteWarning", "-p", "no:randomly", "--basetemp", str(Path(tmp) / "basetemp"),
                "--json-report-file=none", "--benchmark-disable-gc",
                "--benchmark-json", str(bench_tmp), "--benchmark-quiet"]
        progress(f"running the acceptance suite for INT{', INT'.join(map(str, ctx.bits))} "
                 f"(pytest output: {out / SUITE_LOG})")
        with integrity.atomic_text(out / SUITE_LOG) as log, contextlib.redirect_stdout(log):
            code = pytest.main(args, plugins=[json_report, plugin])
    integrity.commit_file(bench_tmp, out / BENCHMARKS_NAME)
    if code not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
        raise RuntimeError(f"the acceptance suite could not run (pytest exit {int(code)})")

    report = json_report.report or {}
    summary = report.get("summary", {})
    failures = [{"test": nodeid.split("::", 1)[-1], "message": message}
                for nodeid, message in plugin.messages.items()]
    unmeasured = ctx.unmeasured_criteria()
    counts = {k: sum(1 for v in plugin.outcomes.values() if v == k)
              for k in ("passed", "failed", "error", "skipped")}
    passed = not unmeasured and not failures and counts["failed"] == 0 and counts["error"] == 0 and counts["skipped"] == 0
    verdict = "PASS" if passed else "FAIL"

    base = ctx.baselines
    results: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "arrowquant", "version": provenance_version()},
        "run": {
            "model": config.model,
            "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
            "started_at": started,
            "finished_at": now(),
            "wall_seconds": None,  # filled in below, after the report is rendered
            "criteria_file": str(criteria_path),
            "criteria_integrity": integrity.criteria_record(criteria_path, _default_or_none(config)),
            "out_dir": str(out),
            "fault": config.fault,
            "profile": config.profile,
        },
        "calibration_seconds": round(ctx.calibration_seconds, 2),
        "provenance": provenance(checkpoint.source_files, {"fault_permutation": 0},
                                 checkpoint.runner.describe() if checkpoint.runner else None),
        "baselines": asdict(base) if base else None,
        "bit_widths": [_bit_entry(ctx, bits) for bits in ctx.bits],
        "criteria": [asdict(g) for g in ctx.gates] + [asdict(g) for g in unmeasured],
        "tests": {
            "total": len(plugin.outcomes),
            "passed": counts["passed"], "failed": counts["failed"], "errors": counts["error"],
            "skipped": counts["skipped"],
            "duration_seconds": round(float(report.get("duration", 0.0)), 3),
            "failures": failures,
            "pytest_summary": summary,
        },
        "verdict": verdict,
    }
    results["run"]["wall_seconds"] = round(time.perf_counter() - t0, 2)
    results_path = out / RESULTS_NAME
    report_path = out / REPORT_NAME
    write_json(results, results_path)
    render_report(results, report_path)
    progress(f"verdict {verdict}: {counts['passed']} passed, {counts['failed']} failed, "
             f"{counts['error']} errors; report {report_path}")
    return RunResult(exitcodes.OK if passed else exitcodes.GATE_FAILED, verdict, results_path,
                     report_path, results)


def _default_criteria(model: str, profile: str | None) -> Path:
    path = default_criteria_path(model, profile)
    if path.is_file():
        return path
    if profile is not None:
        from harness.criteria import available

        raise ConfigurationError(f"no criteria for model {model!r} with profile {profile!r} ({path.name}); "
                                 f"criteria files: {', '.join(available())}; or pass --criteria FILE")
    # a user checkpoint: weight-level criteria
    return default_criteria_path("weights")


def _default_or_none(config: RunConfig) -> Path | None:
    try:
        return _default_criteria(config.model, config.profile)
    except ConfigurationError:
        return None


def _bit_entry(ctx: Any, bits: int) -> dict[str, Any]:
    plan = ctx.criteria.plan(bits)
    entry: dict[str, Any] = {
        "bits": bits, "scheme": plan.scheme, "scheme_description": get_scheme(plan.scheme).description,
        "artifact": None, "metrics": ctx.values.get(bits, {}), "layers": [],
        "reported": list(plan.report),
    }
    written = ctx.written_by_bits.get(bits)
    if written is not None:
        entry["artifact"] = integrity.artifact_record(written.path, written.bytes)
    reloaded = ctx.reloaded_by_bits.get(bits)
    if reloaded is not None:
        entry["layers"] = [asdict(row) for row in reloaded.layers]
    tables = ctx.tables_by_bits.get(bits, {})
    entry["timestep_groups"] = tables.get("timestep_groups", [])
    entry["methods"] = tables.get("methods", [])
    entry["method"] = plan.method
    entry["plan"] = None
    mixed = ctx.plans_by_bits.get(bits)
    if mixed is not None:
        cosines = {row.name: row.cosine for row in (reloaded.layers if reloaded else [])}
        stored = stored_as(reloaded.model) if reloaded else {}
        entry["plan"] = {
            "rungs": [r.label for r in mixed.rungs],
            "promotions": mixed.promotions,
            "calibration_score": mixed.score,
            "plan_seconds": ctx.plan_seconds.get(bits),
            "log": list(mixed.log),
            "layers": [{"name": d.name, "rung": mixed.rungs[d.rung].label, "stored": stored.get(d.name, "?"),
                        "reason": d.reason,
                        "damage": [None if math.isnan(x) else x for x in d.damage],
                        "parameters": d.parameters, "weight_cosine": cosines.get(d.name)}
                       for d in mixed.decisions],
        }
    return entry


def provenance_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("arrowquant")
    except importlib.metadata.PackageNotFoundError:
        return "source"

