"""Integrity of what a run writes and of the verdict it records.

A release gate's output is only worth what stops it from being forged or quietly
weakened (issue 10). This module holds every check of that kind, so the runner and the
CLI only call it:

- ``prepare_out``: the ``--out`` folder is created and proven writable *before* the
  model loads (a read-only folder is a usage error, exit 2, not a traceback after
  minutes of work), and temp files left by killed writes are removed.
- ``atomic_text`` / ``commit_file``: every file in ``--out`` appears whole or not at
  all (``arrowquant_core.atomic``: temp file, fsync, rename, folder fsync), including
  ``suite.log`` and pytest-benchmark's ``benchmarks.json``, which that plugin writes in
  place (a kill truncated it to 0 bytes in 5 of 5 tries).
- ``criteria_record`` / ``artifact_record``: results.json names the criteria file by
  sha256 and says whether it differs from the committed default
  (``harness/criteria/<model>.toml`` at git HEAD), and each artifact by sha256.
- ``consistency_problems``: recomputes each gate's pass flag from its recorded rule and
  value, the gate values from the recorded metrics, and the verdict from the gates and
  test counts; ``python -m harness report`` refuses a results file that disagrees.
- ``verify``: ``python -m harness verify results.json`` re-checks a results file against
  its artifacts (sha256) and its criteria file (sha256, and each gate re-evaluated
  under the file's own rules).
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
from dataclasses import dataclass
import hashlib
import io
import math
import os
from pathlib import Path
import subprocess
from typing import Any, TextIO

from arrowquant_core.atomic import commit, discard, fsync_dir, open_temp, remove_stale_temps
from arrowquant_core.errors import ConfigurationError
from arrowquant_core.limits import short
from harness.results import sha256_file

REPO_ROOT = Path(__file__).resolve().parent.parent
NOT_APPLICABLE = "NOT APPLICABLE:"  # the ``why`` prefix harness.context.gate records


# --------------------------------------------------------------------------- the --out folder


def prepare_out(out: Path) -> list[Path]:
    """Create ``out`` (and ``out/artifacts``), prove it writable, remove stale temp files.

    Raises ConfigurationError naming the folder and the reason; returns the stale temp
    files removed (from killed earlier runs: one run per ``--out`` at a time).
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "artifacts").mkdir(exist_ok=True)
        for folder in (out, out / "artifacts"):
            handle, tmp = open_temp(folder / "write-check")
            discard(handle, tmp)
    except FileExistsError:
        raise ConfigurationError(f"--out {out}: exists and is not a folder") from None
    except OSError as exc:
        raise ConfigurationError(f"--out {out}: not writable ({exc.strerror or exc}); "
                                 "choose a folder you can write to") from None
    return remove_stale_temps(out) + remove_stale_temps(out / "artifacts")


@contextlib.contextmanager
def atomic_text(path: Path) -> Iterator[TextIO]:
    """A text file that appears at ``path`` only when the block ends (error or not: a
    log is worth keeping when the suite fails); a kill leaves the previous version."""
    handle, tmp = open_temp(path)
    text = io.TextIOWrapper(handle, encoding="utf-8", write_through=True)
    try:
        yield text
    except BaseException:
        text.flush()
        text.detach()
        commit(handle, tmp, path)
        raise
    text.flush()
    text.detach()
    try:
        commit(handle, tmp, path)
    except BaseException:
        discard(handle, tmp)
        raise


def temp_path(path: Path) -> Path:
    """A fresh temp path next to ``path`` for a writer we do not control (pytest-benchmark)."""
    handle, tmp = open_temp(path)
    handle.close()
    return tmp


def commit_file(tmp: Path, path: Path) -> None:
    """fsync a finished temp file, rename it over ``path``, fsync the folder."""
    if not tmp.is_file() or tmp.stat().st_size == 0:
        tmp.unlink(missing_ok=True)
        return
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


# --------------------------------------------------------------------------- records


def _committed_sha256(path: Path) -> tuple[str | None, str]:
    """sha256 of ``path`` as committed at git HEAD, else of the file on disk."""
    try:
        rel = path.resolve().relative_to(REPO_ROOT)
        out = subprocess.run(["git", "show", f"HEAD:{rel.as_posix()}"], cwd=REPO_ROOT, capture_output=True,
                             timeout=10)
        if out.returncode == 0:
            return hashlib.sha256(out.stdout).hexdigest(), "git HEAD"
    except (ValueError, OSError, subprocess.TimeoutExpired):
        pass
    if path.is_file():
        return sha256_file(path), "working tree (not in git)"
    return None, "missing"


def criteria_record(used: Path, default: Path | None) -> dict[str, Any]:
    """What results.json records about the criteria: the file used, its sha256, the
    committed default for this model and whether the used file differs from it."""
    from harness.criteria import inherited_path

    sha = sha256_file(used)
    parent = inherited_path(used)
    record: dict[str, Any] = {"file": str(used), "sha256": sha, "default_file": None,
                              "default_sha256": None, "default_source": None, "differs_from_default": True,
                              "inherits": None}
    if parent is not None and parent.is_file():
        record["inherits"] = {"file": str(parent), "sha256": sha256_file(parent)}
    if default is not None:
        default_sha, source = _committed_sha256(default)
        record.update(default_file=str(default), default_sha256=default_sha, default_source=source,
                      differs_from_default=default_sha != sha)
    return record


def artifact_record(path: Path, nbytes: int) -> dict[str, Any]:
    return {"path": str(path), "bytes": nbytes, "sha256": sha256_file(path)}


# --------------------------------------------------------------------------- checks

_OPS = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
        "<": lambda a, b: a < b, "==": lambda a, b: a == b}


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if value in ("nan", "inf", "-inf"):
        return float(value)
    return None


def _gate_passes(gate: dict[str, Any]) -> bool | None:
    """The pass flag a gate's rule gives its value, or None when the record is malformed."""
    from harness.criteria import Criterion, parse_rule

    try:
        parsed = parse_rule(str(gate.get("rule")), 0)
    except ConfigurationError:
        return None
    threshold = _number(gate.get("threshold"))
    if threshold is None or parsed.metric != gate.get("metric"):
        return None
    # the recorded threshold must be the one the rule text shows (rule uses :g)
    if Criterion(0, parsed.metric, parsed.op, threshold).rule != gate.get("rule"):
        return None
    value = _number(gate.get("value"))
    if value is None:
        return None
    if math.isnan(value) and _not_applicable(gate):
        return True  # a metric this model does not have (harness.context.gate, not_applicable)
    return not math.isnan(value) and _OPS[parsed.op](value, threshold)


def _not_applicable(gate: dict[str, Any]) -> bool:
    """A gate recorded as not applicable: NaN value, passed, ``why`` says why. Only the
    suite can decide that; ``verify`` lists such gates so a reader sees each one."""
    return str(gate.get("why", "")).startswith(NOT_APPLICABLE) and gate.get("test") != "not measured"


def _elsewhere(gate: dict[str, Any], results: dict[str, Any]) -> bool:
    """A criterion recorded as not measured because the run judged a file produced
    elsewhere (``harness.external``): passed null, NaN value, the reason in ``why``, one
    of the metrics only ArrowQuant's own artifacts have, in a run with ``run.artifact``."""
    from harness.external import ELSEWHERE_METRICS, NOT_MEASURED

    run = results.get("run")
    value = _number(gate.get("value"))
    return (gate.get("passed") is None and str(gate.get("why", "")).startswith(NOT_MEASURED)
            and gate.get("metric") in ELSEWHERE_METRICS and value is not None and math.isnan(value)
            and isinstance(run, dict) and bool(run.get("artifact")))


@dataclass(frozen=True)
class Problem:
    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


def consistency_problems(results: dict[str, Any]) -> list[Problem]:
    """Everything in a results document that disagrees with itself: a gate whose pass
    flag is not what its rule gives its value, a gate value that is not the recorded
    metric, a verdict that is not what the gates and the test counts give."""
    problems: list[Problem] = []
    gates = results.get("criteria")
    if not isinstance(gates, list):
        return [Problem("criteria", "missing or not a list")]
    metrics = {e.get("bits"): e.get("metrics", {}) for e in results.get("bit_widths", []) if isinstance(e, dict)}
    all_pass = True
    for i, gate in enumerate(gates):
        if not isinstance(gate, dict):
            problems.append(Problem(f"criteria[{i}]", "not an object"))
            all_pass = False
            continue
        where = f"criteria[{i}] INT{short(gate.get('bits'), 8)} {short(gate.get('rule'), 80)}"
        if _elsewhere(gate, results):
            continue  # neither a pass nor a fail: listed apart in the bit width's verdict
        expected = _gate_passes(gate)
        if expected is None:
            problems.append(Problem(where, "rule, metric, threshold or value is malformed"))
            all_pass = False
            continue
        if gate.get("passed") is not expected:
            problems.append(Problem(where, f"recorded passed={short(gate.get('passed'), 20)} but the rule gives "
                                           f"{expected} for value {short(gate.get('value'), 40)}"))
        recorded = metrics.get(gate.get("bits"), {})
        if gate.get("test") != "not measured" and isinstance(recorded, dict) and gate.get("metric") in recorded:
            a, b = _number(recorded[gate["metric"]]), _number(gate.get("value"))
            if not (a == b or (a is not None and b is not None and math.isnan(a) and math.isnan(b))):
                problems.append(Problem(where, f"value {short(gate.get('value'), 40)} differs from the measured "
                                               f"metric {short(recorded[gate['metric']], 40)} in bit_widths"))
        all_pass = all_pass and expected
    for entry in results.get("bit_widths", []):
        verdict = entry.get("verdict") if isinstance(entry, dict) else None
        if not isinstance(verdict, dict):
            continue
        bits = entry.get("bits")
        failed = sorted(str(g.get("rule")) for g in gates
                        if isinstance(g, dict) and g.get("bits") == bits and g.get("passed") is not True
                        and not _elsewhere(g, results))
        decision = "do not ship" if failed else "ship"
        where = f"bit_widths INT{short(bits, 8)} verdict"
        if verdict.get("decision") != decision:
            problems.append(Problem(where, f"recorded {short(verdict.get('decision'), 20)} but its gates give "
                                           f"{decision!r}"))
        recorded_failed = verdict.get("failed_gates")
        if not isinstance(recorded_failed, list) or sorted(map(str, recorded_failed)) != failed:
            problems.append(Problem(where, "failed_gates differ from the gates recorded as failed"))
    tests = results.get("tests") if isinstance(results.get("tests"), dict) else {}
    counts_clean = all(tests.get(k) == 0 for k in ("failed", "errors", "skipped")) and not tests.get("failures")
    expected_verdict = "PASS" if all_pass and counts_clean and gates else "FAIL"
    if results.get("verdict") != expected_verdict:
        problems.append(Problem("verdict", f"recorded {short(results.get('verdict'), 20)} but the recorded gates "
                                           f"and test counts give {expected_verdict}"))
    return problems


def verify(results: dict[str, Any], results_path: Path) -> list[Problem]:
    """``consistency_problems`` plus the outside world: every artifact's sha256, the
    criteria file's sha256, and each recorded gate re-evaluated under that file's rules
    (a gate the file has but the results lack, or a different threshold, is a problem)."""
    from harness.criteria import load_criteria

    problems = consistency_problems(results)
    base = results_path.parent
    for entry in results.get("bit_widths", []):
        artifact = entry.get("artifact") if isinstance(entry, dict) else None
        if not artifact:
            continue
        where = f"INT{short(entry.get('bits'), 8)} artifact"
        path = Path(str(artifact.get("path")))
        if not path.is_absolute() and not path.is_file():
            path = base / path
        if "sha256" not in artifact:
            problems.append(Problem(where, "results record no sha256 (written before integrity records)"))
        elif not path.is_file():
            problems.append(Problem(where, f"{short(str(path))} does not exist"))
        elif sha256_file(path) != artifact["sha256"]:
            problems.append(Problem(where, f"{short(str(path))}: sha256 differs from the one recorded"))
    record = (results.get("run") or {}).get("criteria_integrity")
    if not isinstance(record, dict):
        problems.append(Problem("criteria", "results record no criteria sha256 (run.criteria_integrity)"))
        return problems
    criteria_path = Path(str(record.get("file")))
    if not criteria_path.is_file():
        problems.append(Problem("criteria", f"{short(str(criteria_path))} does not exist"))
        return problems
    if sha256_file(criteria_path) != record.get("sha256"):
        problems.append(Problem("criteria", f"{short(str(criteria_path))}: sha256 differs from the one recorded "
                                            "(the criteria file changed since the run)"))
    parent = record.get("inherits")
    if isinstance(parent, dict):
        parent_path = Path(str(parent.get("file")))
        if not parent_path.is_file() or sha256_file(parent_path) != parent.get("sha256"):
            problems.append(Problem("criteria", f"{short(str(parent_path))} (inherited): missing or changed "
                                                "since the run"))
    criteria = load_criteria(criteria_path)
    recorded = {(g.get("bits"), g.get("rule")): g for g in results.get("criteria", []) if isinstance(g, dict)}
    ran = {e.get("bits") for e in results.get("bit_widths", []) if isinstance(e, dict)}
    for bits, plan in criteria.plans.items():
        if bits not in ran:
            continue
        for criterion in plan.gates:
            gate = recorded.get((bits, criterion.rule))
            where = f"INT{bits} {criterion.rule}"
            if gate is None:
                problems.append(Problem(where, "gate of the criteria file is missing from the results"))
                continue
            if _elsewhere(gate, results):
                continue
            value = _number(gate.get("value"))
            expected = value is not None and (criterion.check(value) is None
                                              or (math.isnan(value) and _not_applicable(gate)))
            if gate.get("passed") is not expected:
                problems.append(Problem(where, f"recorded passed={short(gate.get('passed'), 20)}, the criteria "
                                               f"file's rule gives {expected}"))
    return problems
