"""``run(config) -> RunResult``: the library call behind ``python -m harness run``.

Loads the model, drives the acceptance suite (pytest, in-process, with
pytest-json-report and pytest-benchmark), assembles results.json from what the tests
measured, renders the report, and returns the exit code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
import math
import os
from dataclasses import asdict, dataclass, replace
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
from arrowquant_core.model import RAW_DTYPES
from harness.criteria import Criteria, criteria_base, default_criteria_path, load_criteria, profiles_for
from harness.context import stored_as
from harness.measures import METRICS
from harness.results import OUTPUTS_MEASURED, SCHEMA_VERSION, WEIGHTS_ONLY, now, provenance, write_json

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



@contextlib.contextmanager
def _not_an_xdist_worker() -> Iterator[None]:
    """pytest-benchmark disables itself in any session that sees ``PYTEST_XDIST_WORKER``;
    a run called in-process from a parallel test session (the project's suite runs on
    pytest-xdist workers) would then time none of its benchmark gates. The acceptance
    suite is one serial session, so the variable is hidden while it runs."""
    worker = os.environ.pop("PYTEST_XDIST_WORKER", None)
    try:
        yield
    finally:
        if worker is not None:
            os.environ["PYTEST_XDIST_WORKER"] = worker

def run(config: RunConfig) -> RunResult:
    """Run the whole validation; raises ConfigurationError on usage problems."""
    import pytest
    from pytest_jsonreport.plugin import JSONReport

    from harness.fixtures_import import fixtures_module

    load_model = fixtures_module("checkpoint").load_model
    runner_kind = fixtures_module("checkpoint").runner_kind
    from harness.context import Progress, RunContext
    from harness.faults import get_fault
    from harness.plugin import SuitePlugin
    from harness.report import render_report

    started, t0 = now(), time.perf_counter()
    progress = Progress(config.quiet)
    fault = get_fault(config.fault) if config.fault and config.artifact is None else None
    if config.fault and config.artifact is not None:
        from harness.external import get_gguf_fault

        get_gguf_fault(config.fault)  # with --artifact, a fault breaks a copy of the file
    kind = runner_kind(config.model, config.runner)  # cheap: no weights read yet
    criteria_path = config.criteria or _default_criteria(config.model, kind, config.profile)
    prepared = None
    if config.baseline is not None:
        # rules such as "output_cosine_mean >= baseline - 0.002" resolved against an earlier
        # run (refused when it was made with another model, criteria or scheme)
        from harness import baseline as regression

        prepared = regression.prepare(criteria_path, config.model, config.baseline, config.out, config.bits)
        criteria_path = prepared.criteria_path
    criteria = load_criteria(criteria_path, config.model)
    bits_how = ""
    if config.artifact is not None:
        # a file made elsewhere is judged by one bit width's criteria: --bits N, or from its header
        if config.bits:
            bits_how = f"--bits {config.bits[0]}"
        else:
            from harness.gguf_artifact import header_bit_width

            inferred, bits_how = header_bit_width(config.artifact, criteria.plans)
            config = replace(config, bits=(inferred,))
    bit_widths = config.bits or tuple(sorted(criteria.plans, reverse=True))
    for bits in bit_widths:
        criteria.plan(bits)  # every requested bit width must have criteria
    _check_gates_cover_outputs(criteria, bit_widths, kind, criteria_path)
    if config.compare and not any(criteria.plan(b).compare for b in bit_widths):
        raise ConfigurationError(f"--compare: {criteria_path} lists no methods to compare for "
                                 f"INT{', INT'.join(map(str, bit_widths))} (a `compare = [...]` list per bit width)")
    integrity.prepare_out(config.out)  # writable --out before any work; stale temp files removed

    progress(f"loading model {config.model!r}")
    checkpoint = load_model(config.model, config.runner)
    progress(f"loaded {checkpoint.name}: {len(checkpoint.weights)} tensors, "
             f"{checkpoint.parameter_count / 1e6:.1f}M parameters; "
             + (f"runner {checkpoint.runner_kind}" if checkpoint.runner else "no runner: WEIGHTS ONLY"))
    for bits in bit_widths if config.artifact is None else ():  # nothing is quantized for --artifact
        plan = criteria.plan(bits)
        if plan.ladder is not None and not hasattr(checkpoint.runner, "calibration_score"):
            raise ConfigurationError(f"{criteria_path}: INT{plan.bits} uses the fallback ladder, which needs a "
                                     f"model runner with a calibration score; {config.model!r} has none")
        _check_calibration(plan, checkpoint, criteria_path, config.compare)
    if fault is not None:
        from harness.faults import FaultTarget

        why = fault.cannot_act(FaultTarget(checkpoint.weights, checkpoint.runner,
                                           tuple(criteria.plan(b) for b in bit_widths), config.compare))
        if why is not None:
            raise ConfigurationError(f"--inject-fault {fault.name} cannot act on {checkpoint.name!r}: {why}. "
                                     "A run with it would change nothing the gates could catch; "
                                     "`python -m harness list` describes every fault")
    out = config.out
    artifacts = out / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(config=config, checkpoint=checkpoint, criteria=criteria, workdir=artifacts,
                     progress=progress, fault=fault)
    if config.artifact is not None:
        from harness.external import open_external

        progress(f"reading {config.artifact} (GGUF) as {checkpoint.name}'s weights; INT{ctx.bits[0]} criteria: "
                 f"{bits_how}")
        ctx.external = open_external(config.artifact, checkpoint.weights, ctx.bits[0], bits_how, config.fault,
                                     artifacts)
        progress(f"read {ctx.external.artifact.bytes / 1e6:.2f} MB: {ctx.external.artifact.produced_by}")
    elif any(criteria.plan(b).needs_calibration for b in ctx.bits):
        ctx.hessians()  # before the suite: a method that cannot run is a usage error, not a failed test
        for bits in ctx.bits:
            _check_hessian_coverage(ctx, bits, criteria_path)
    for bits in ctx.bits:
        if ctx.criteria.plan(bits).hessian_comparison and not hasattr(checkpoint.runner, "hessian_variants"):
            raise ConfigurationError(f"{criteria_path}: INT{bits} lists hessian_comparison, but {config.model!r} has no "
                                     "runner that captures Hessian variants (dream-mini's does)")
    if config.artifact is None:  # nothing is quantized for --artifact: no activation tables to calibrate
        ctx.time_aware_pass()  # before the suite: with --fail-fast a failing pass stops the run here
    plugin = SuitePlugin(ctx)
    json_report = JSONReport()
    bench_tmp = integrity.temp_path(out / BENCHMARKS_NAME)  # pytest-benchmark writes in place
    with tempfile.TemporaryDirectory(prefix="arrowquant-suite-") as tmp:
        args = [str(SUITE_DIR), "-c", str(SUITE_DIR / "suite.ini"), "--rootdir", str(SUITE_DIR),
                "-q", "--no-header", "-rfE",
                # importlib: suite modules never collide with same-named test modules of a
                # pytest session that calls the harness in-process (the project's own tests)
                "--import-mode=importlib",
                # hermetic and quicker: only the plugins the suite uses, whatever else is
                # installed (pytest-randomly, pytest-cov, ...: the suite's order and figures
                # are not theirs to change); loading every entry point cost ~1.2 s a run
                "--disable-plugin-autoload", "-p", "pytest_benchmark.plugin", "-p", "pytest_metadata.plugin",
                "-p", "pytest_jsonreport.plugin",
                "-W", "ignore::pytest.PytestAssertRewriteWarning", "-p", "no:randomly", "--basetemp", str(Path(tmp) / "basetemp"),
                "--json-report-file=none", "--benchmark-disable-gc",
                "--benchmark-json", str(bench_tmp), "--benchmark-quiet"]
        progress(f"running the acceptance suite for INT{', INT'.join(map(str, ctx.bits))} "
                 f"(pytest output: {out / SUITE_LOG})")
        with integrity.atomic_text(out / SUITE_LOG) as log, contextlib.redirect_stdout(log), \
                _not_an_xdist_worker():
            code = pytest.main(args, plugins=[json_report, plugin])
    integrity.commit_file(bench_tmp, out / BENCHMARKS_NAME)
    if code not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
        raise RuntimeError(f"the acceptance suite could not run (pytest exit {int(code)})")

    report = json_report.report or {}
    summary = report.get("summary", {})
    failures = [{"test": nodeid.split("::", 1)[-1], "message": message}
                for nodeid, message in plugin.messages.items()]
    unmeasured = ctx.unmeasured_criteria()
    elsewhere = ctx.elsewhere_criteria()  # deselected for a file made elsewhere: not in the verdict
    counts = {k: sum(1 for v in plugin.outcomes.values() if v == k)
              for k in ("passed", "failed", "error", "skipped")}
    passed = not unmeasured and not failures and counts["failed"] == 0 and counts["error"] == 0 and counts["skipped"] == 0
    verdict = "PASS" if passed else "FAIL"
    scope = OUTPUTS_MEASURED if checkpoint.runner is not None else WEIGHTS_ONLY

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
            "criteria_integrity": integrity.criteria_record(criteria_path, _default_or_none(config.model, kind, config.profile)),
            "out_dir": str(out),
            "fault": config.fault,
            "profile": config.profile,
            "runner": checkpoint.runner_kind,
            # --artifact: the GGUF judged, what produced it, what could not be measured on it
            "artifact": ctx.external.record(ctx.deselected) if ctx.external is not None else None,
        },
        "calibration_seconds": round(ctx.calibration_seconds, 2),
        "provenance": provenance(checkpoint.source_files, {"fault_permutation": 0},
                                 checkpoint.runner.describe() if checkpoint.runner else None),
        "baselines": asdict(base) if base else None,
        "model": {"name": checkpoint.name, "kind": checkpoint.kind,
                  "parameters": checkpoint.parameter_count, "tensors": len(checkpoint.weights),
                  "ties": dict(checkpoint.ties),
                  "buffers": sorted(n for n, a in checkpoint.weights.items() if a.dtype.name in RAW_DTYPES),
                  "conv_grouping": _conv_grouping(ctx)},
        "bit_widths": [_bit_entry(ctx, bits, unmeasured + elsewhere) for bits in ctx.bits],
        "criteria": [asdict(g) for g in ctx.gates] + [asdict(g) for g in elsewhere] + [asdict(g) for g in unmeasured],
        "tests": {
            "total": len(plugin.outcomes),
            "passed": counts["passed"], "failed": counts["failed"], "errors": counts["error"],
            "skipped": counts["skipped"],
            "deselected": [{"test": d.test, "why": d.why} for d in ctx.deselected],
            "duration_seconds": round(float(report.get("duration", 0.0)), 3),
            "failures": failures,
            "pytest_summary": summary,
        },
        "verdict": verdict,
        "verdict_scope": scope,
    }
    if prepared is not None and prepared.baseline is not None:
        results["baseline"] = regression.summary(results, prepared.baseline)
        results["run"]["criteria_source"] = str(prepared.source_criteria)
    results["run"]["wall_seconds"] = round(time.perf_counter() - t0, 2)
    results_path = out / RESULTS_NAME
    report_path = out / REPORT_NAME
    write_json(results, results_path)
    render_report(results, report_path)
    progress(f"verdict {verdict}: {counts['passed']} passed, {counts['failed']} failed, "
             f"{counts['error']} errors; report {report_path}")
    return RunResult(exitcodes.OK if passed else exitcodes.GATE_FAILED, verdict, results_path,
                     report_path, results)


def _default_criteria(model: str, runner: str | None, profile: str | None) -> Path:
    """The criteria file of the model (or of its runner, or weights-only), per profile."""
    base = criteria_base(model, runner)
    path = default_criteria_path(base, profile)
    if path.is_file():
        return path
    have = profiles_for(base)
    raise ConfigurationError(f"no criteria for {model!r} ({base}) with profile {profile!r} ({path.name}); "
                             + (f"profiles with criteria for it: {', '.join(have)}" if have
                                else "it has no profile criteria")
                             + "; or pass --criteria FILE")


def _default_or_none(model: str, kind: str | None, profile: str | None) -> Path | None:
    """The committed default criteria for this model, or None (its digest is compared)."""
    try:
        return _default_criteria(model, kind, profile)
    except ConfigurationError:
        return None


def _check_gates_cover_outputs(criteria: Criteria, bit_widths: tuple[int, ...], runner: str | None,
                               path: Path) -> None:
    """A model that a runner can run is gated on its outputs at every bit width; one that
    no runner can run has no output gates at all (nothing could measure them)."""
    for bits in bit_widths:
        outputs = [c.metric for c in criteria.plan(bits).gates if METRICS[c.metric].level == "output"]
        if runner is not None and not outputs:
            raise ConfigurationError(
                f"{path}: INT{bits} has no output-level gate, but runner {runner!r} measures this model's "
                "outputs; every bit width of a model with a runner is gated on what it outputs")
        if runner is None and outputs:
            raise ConfigurationError(
                f"{path}: gates output metrics {sorted(set(outputs))} at INT{bits}, but no runner can run this "
                "model (weight-level validation only); use a weight-level criteria file or --runner NAME")


def _check_calibration(plan: Any, checkpoint: Any, path: Path, compare: bool) -> None:
    """A Hessian method needs calibration activations from a runner; without them it is
    an error unless the criteria name the fallback."""
    from arrowquant_core.methods import get_method

    methods = {plan.method} | ({m for _s, m in plan.ladder.rungs} if plan.ladder else set())
    if compare:
        methods |= set(plan.compare)
    hessian = sorted(m for m in methods if m in _known_methods() and get_method(m).needs_hessian)
    if hessian and not hasattr(checkpoint.runner, "calibration_hessians") and plan.fallback is None:
        raise ConfigurationError(
            f"{path}: INT{plan.bits} uses {hessian}, which needs calibration activations, but "
            f"{checkpoint.name!r} has no runner to capture them; set `fallback = \"clip\"` to allow clip "
            "search instead (the report then shows clip per tensor), or choose another method")


def _known_methods() -> set[str]:
    from arrowquant_core.methods import METHODS

    return set(METHODS)


def _check_hessian_coverage(ctx: Any, bits: int, path: Path) -> None:
    """Every tensor planned with a Hessian method has a Hessian, or a fallback is allowed."""
    from arrowquant_core.methods import get_method

    plan = ctx.criteria.plan(bits)
    methods = [plan.method] + ([m for _s, m in plan.ladder.rungs] if plan.ladder else [])
    needing = [m for m in methods if m in _known_methods() and get_method(m).needs_hessian]
    if plan.fallback is not None or not needing:
        return
    lacking = [n for n in ctx.matrix_names if n not in ctx.calibrated_names]
    if lacking:
        raise ConfigurationError(
            f"{path}: INT{bits} method {needing[0]!r} needs a Hessian for every tensor, but "
            f"{len(lacking)} have no calibration activations (e.g. {lacking[:3]}); set `fallback = \"clip\"` "
            "to allow clip search for them")


def _conv_grouping(ctx: Any) -> str | None:
    """How 4-D convolution weights were grouped, in words, when the model has any."""
    convs = [n for n in ctx.matrix_names if ctx.checkpoint.weights[n].ndim >= 3]
    if not convs:
        return None
    shape = list(ctx.checkpoint.weights[convs[0]].shape)
    return (f"{len(convs)} tensor(s) of 3+ dimensions (e.g. {convs[0]} {shape}) are quantized as matrices of "
            f"(dim 0) rows x (product of the other dims) columns, groups running along the flattened "
            "columns in C order (for a conv weight: each output channel's in_channels x kh x kw values)")


def _bit_verdict(ctx: Any, bits: int, unmeasured: list[Any]) -> dict[str, Any]:
    """Ship or do not ship this bit width, with the gates that decided it."""
    records = [g for g in ctx.gates if g.bits == bits] + [g for g in unmeasured if g.bits == bits]
    failed = [g.rule for g in records if g.passed is not True and g.passed is not None]
    output_gates = [g for g in records if METRICS[g.metric].level == "output"]
    return {"decision": "do not ship" if failed else "ship",
            "failed_gates": failed,
            # passed None: not measurable on a file produced elsewhere (harness.external), so
            # the decision above is taken on the other gates and says so here
            "not_measured": [g.rule for g in records if g.passed is None],
            "gates": len(records),
            "outputs_measured": bool(output_gates) and all(math.isfinite(g.value) for g in output_gates),
            "output_gates": [g.rule for g in output_gates]}


def _bit_entry(ctx: Any, bits: int, unmeasured: list[Any]) -> dict[str, Any]:
    plan = ctx.criteria.plan(bits)
    ext = ctx.external
    entry: dict[str, Any] = {
        "bits": bits, "scheme": plan.scheme if ext is None else f"gguf {ext.artifact.main_type}",
        "scheme_description": get_scheme(plan.scheme).description if ext is None else
        f"a GGUF file produced elsewhere ({ext.artifact.produced_by}), judged by the INT{bits} criteria",
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
    # every other table the runner measured (lists of rows), shown in the report as it is
    entry["tables"] = {k: v for k, v in tables.items() if k not in ("timestep_groups", "methods")
                       and isinstance(v, list) and v and all(isinstance(r, dict) for r in v)}
    entry["method"] = plan.method if ext is None else "produced elsewhere"
    entry["fallback"] = plan.fallback
    entry["verdict"] = _bit_verdict(ctx, bits, unmeasured)
    entry["fallbacks"] = ctx.fallbacks(bits)
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

