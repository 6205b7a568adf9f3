"""Regression against a baseline run: ``--baseline results.json``.

A release gate must be able to say "INT4 got worse than the last release". The
baseline is the ``results.json`` of an earlier run; criteria files may then hold rules
relative to it (``harness.criteria``)::

    "output_cosine_mean >= baseline - 0.002"
    "quantize_seconds <= baseline * 1.10"

This module

* reads a baseline results file (``load_baseline``; a typed error naming the file for
  anything malformed),
* decides whether it is comparable with the run about to start (``comparable`` /
  ``check_comparable``): same model, same criteria file (by name) and, per bit width, the
  same quantization scheme; otherwise
  ``BaselineNotComparable`` says "baseline not comparable: made with model X ...",
* turns relative rules into absolute ones for that baseline (``resolve_criteria``), and
  writes them as a criteria file of their own (``write_resolved_criteria``) so the runner
  judges the run with thresholds anyone can read afterwards,
* computes per-bit deltas of every metric measured in both runs (``deltas``) for the
  report's delta column, and the ``baseline`` block of results.json (``summary``).

The runner hook is ``prepare(config) -> Prepared``: it returns the criteria file the run
must use (the resolved copy when a baseline was given) and the loaded baseline; after the
run, ``summary(results, prepared.baseline)`` is the block to store under
``results["baseline"]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
import hashlib
import json
import math
from pathlib import Path
from typing import Any

from arrowquant_core.errors import ConfigurationError, FormatError
from harness.criteria import Criteria, Criterion, load_criteria, parse_rule

RESOLVED_SUFFIX = ".resolved.toml"


class BaselineNotComparable(ConfigurationError):
    """The baseline run was made with another model, criteria file or scheme."""


@dataclass(frozen=True)
class Baseline:
    """What a regression check needs from an earlier run's results.json."""

    path: Path
    model: str
    criteria_file: str
    schemes: dict[int, str]
    metrics: dict[int, dict[str, float]]
    verdict: str
    git_commit: str = ""
    started_at: str = ""

    def __post_init__(self) -> None:
        if not self.model:
            raise FormatError(f"baseline {self.path}: run.model is empty")
        if not self.schemes:
            raise FormatError(f"baseline {self.path}: no bit widths were measured in it")

    @property
    def label(self) -> str:
        when = f", {self.started_at}" if self.started_at else ""
        commit = f", commit {self.git_commit[:10]}" if self.git_commit else ""
        return f"baseline {self.path.name} ({self.model}{when}{commit})"


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value in {"inf", "-inf", "nan"}:  # as written by results._clean
        return float(value)
    return None


def load_baseline(path: Path) -> Baseline:
    """Read a baseline results.json; FormatError / ConfigurationError name the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigurationError(f"baseline file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"baseline {path}: not a results.json ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("run"), dict) or not isinstance(
            data.get("bit_widths"), list):
        raise FormatError(f"baseline {path}: not a results.json of `python -m harness run` "
                          "(needs 'run' and 'bit_widths')")
    run = data["run"]
    schemes: dict[int, str] = {}
    metrics: dict[int, dict[str, float]] = {}
    for entry in data["bit_widths"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("bits"), int) or not isinstance(
                entry.get("scheme"), str):
            raise FormatError(f"baseline {path}: bit_widths entry {entry!r:.80} lacks bits/scheme")
        bits = entry["bits"]
        schemes[bits] = entry["scheme"]
        raw = entry.get("metrics") or {}
        metrics[bits] = {k: v for k, v in ((k, _number(v)) for k, v in raw.items()) if v is not None}
    prov = data.get("provenance") or {}
    return Baseline(path=Path(path), model=str(run.get("model", "")), criteria_file=str(run.get("criteria_file", "")),
                    schemes=schemes, metrics=metrics,
                    verdict=str(data.get("verdict", "")), git_commit=str(prov.get("git_commit", "")),
                    started_at=str(run.get("started_at", "")))


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _criteria_name(path: str) -> str:
    name = Path(path).name
    return name[: -len(RESOLVED_SUFFIX)] + ".toml" if name.endswith(RESOLVED_SUFFIX) else name


def comparable(baseline: Baseline, model: str, criteria: Criteria, bits: tuple[int, ...] = ()) -> list[str]:
    """Why the baseline cannot be compared with this run (empty: it can).

    The criteria file is compared by name, not content: a release usually adds or
    tightens rules (relative ones included) in the same file, and that must stay
    comparable; a baseline from another file (``minilm-edge.toml`` against
    ``minilm.toml``) is not."""
    problems: list[str] = []
    if baseline.model != model:
        problems.append(f"made with model {baseline.model!r}, this run is {model!r}")
    if _criteria_name(baseline.criteria_file) != _criteria_name(str(criteria.source)):
        problems.append(f"made with criteria {_criteria_name(baseline.criteria_file)}, this run uses "
                        f"{_criteria_name(str(criteria.source))}")
    for b in bits or tuple(sorted(criteria.plans)):
        scheme = criteria.plan(b).scheme
        if b not in baseline.schemes:
            if any(g.relative for g in criteria.plan(b).gates):
                problems.append(f"has no INT{b}, which this run's relative rules need")
        elif baseline.schemes[b] != scheme:
            problems.append(f"made INT{b} with scheme {baseline.schemes[b]}, this run uses {scheme}")
    return problems


def check_comparable(baseline: Baseline, model: str, criteria: Criteria, bits: tuple[int, ...] = ()) -> None:
    problems = comparable(baseline, model, criteria, bits)
    if problems:
        raise BaselineNotComparable(f"baseline not comparable: {baseline.path} " + "; ".join(problems))


def resolve_criteria(criteria: Criteria, baseline: Baseline) -> Criteria:
    """The same criteria with every relative rule made absolute for ``baseline``."""
    plans = {}
    for bits, plan in criteria.plans.items():
        gates = tuple(g.resolve(baseline.metrics.get(bits, {}), baseline.label) if g.relative else g
                      for g in plan.gates)
        plans[bits] = replace(plan, gates=gates)
    return replace(criteria, plans=plans)


# -- the resolved criteria file ----------------------------------------------------------
#
# The runner loads criteria from a path. Rather than teach it a second source, the
# relative rules are resolved into a criteria file of their own, written next to the
# report: the thresholds a run was judged by stay readable after the run.


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON's escapes are a subset of TOML basic-string escapes
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise ConfigurationError(f"cannot write {value!r} to a criteria file")


def _toml_key(key: str) -> str:
    return key if key and all(c.isalnum() or c in "-_" for c in key) else json.dumps(key)


def dump_toml(data: Mapping[str, Any], header: str = "") -> str:
    """TOML text for a criteria-shaped document: top-level scalars, ``[all]``, ``[bits.N]``
    (tables nested deeper, such as a ladder, are written inline)."""
    lines = [f"# {line}" for line in header.splitlines()]
    lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    sections: list[tuple[str, Mapping[str, Any]]] = []
    for key, value in data.items():
        if key == "bits" and isinstance(value, dict):
            sections += [(f"bits.{_toml_key(str(n))}", section) for n, section in value.items()]
        elif isinstance(value, dict):
            sections.append((_toml_key(key), value))
    for name, table in sections:
        lines += ["", f"[{name}]"] + [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def _gate_entry(g: Criterion) -> dict[str, Any]:
    return {"rule": f"{g.metric} {g.op} {_toml_value(g.threshold)}", "why": g.why}


def resolved_document(path: Path, baseline: Baseline, model: str = "") -> dict[str, Any]:
    """The criteria file at ``path`` as data, relative rules made absolute for ``baseline``.

    A relative rule under ``[all]`` is resolved per bit width (each has its own baseline
    value) and moves into every ``[bits.N]`` section."""
    from harness.criteria import _read_toml, _with_parent

    # an ``inherit = "parent.toml"`` file is written out whole: the resolved copy lives in
    # another folder, where the parent could not be found
    data = _with_parent(_read_toml(Path(path)), Path(path))
    data.pop("inherit", None)
    criteria = load_criteria(path, model, allow_relative=True)
    shared = data.get("all", {}).get("gates", [])
    keep_shared: list[Any] = []
    moved: list[Any] = []
    for entry in shared:
        rule = entry if isinstance(entry, str) else entry["rule"]
        (moved if parse_rule(rule, 0).relative else keep_shared).append(entry)
    if "all" in data:
        data["all"]["gates"] = keep_shared
    for key, section in data["bits"].items():
        bits = int(key)
        values = baseline.metrics.get(bits, {})
        entries: list[Any] = []
        for entry in [*section.get("gates", []), *moved]:
            text = entry if isinstance(entry, str) else entry["rule"]
            why = "" if isinstance(entry, str) else str(entry.get("why", ""))
            gate = parse_rule(text, bits, why)
            entries.append(_gate_entry(gate.resolve(values, baseline.label)) if gate.relative else entry)
        section["gates"] = entries
    data["model"] = criteria.model or model
    return data


def write_resolved_criteria(path: Path, baseline: Baseline, out_dir: Path, model: str = "") -> Path:
    """Write ``<out>/<name>.resolved.toml`` and return its path."""
    document = resolved_document(path, baseline, model)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / (Path(path).stem + RESOLVED_SUFFIX)
    header = (f"Criteria resolved against {baseline.path} (model {baseline.model}).\n"
              f"Source: {path} (sha256 {sha256_file(path)}).\n"
              "Generated by harness/baseline.py: relative rules are absolute here; edit the source, not this file.")
    from harness.results import write_text_atomic

    write_text_atomic(target, dump_toml(document, header))
    load_criteria(target, model)  # what was written must read back as plain criteria
    return target


@dataclass(frozen=True)
class Prepared:
    """What ``prepare`` hands the runner."""

    criteria_path: Path          # the file the run must load (resolved copy with a baseline)
    source_criteria: Path        # the criteria file as given / chosen by default
    baseline: Baseline | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)


def prepare(criteria_path: Path, model: str, baseline_path: Path | None, out_dir: Path,
            bits: tuple[int, ...] = ()) -> Prepared:
    """Load the baseline, refuse an incomparable one, resolve relative rules.

    Without a baseline this only checks that the criteria hold no relative rule (a
    ConfigurationError saying "pass --baseline" otherwise)."""
    if baseline_path is None:
        load_criteria(criteria_path, model)
        return Prepared(criteria_path, criteria_path)
    baseline = load_baseline(baseline_path)
    criteria = load_criteria(criteria_path, model, allow_relative=True)
    check_comparable(baseline, model, criteria, bits)
    resolved = write_resolved_criteria(criteria_path, baseline, out_dir, model)
    return Prepared(resolved, criteria_path, baseline,
                    (f"regression rules resolved against {baseline.label}: {resolved}",))


def deltas(results: Mapping[str, Any], baseline: Baseline) -> list[dict[str, Any]]:
    """Per bit width and metric measured in both runs: value, baseline, delta, relative delta."""
    rows: list[dict[str, Any]] = []
    for entry in results.get("bit_widths", []):
        bits = entry["bits"]
        before = baseline.metrics.get(bits)
        if before is None:
            continue
        for metric, raw in sorted((entry.get("metrics") or {}).items()):
            value, base = _number(raw), before.get(metric)
            if value is None or base is None:
                continue
            delta = value - base
            rel = delta / abs(base) if base not in (0.0,) and math.isfinite(base) else None
            rows.append({"bits": bits, "metric": metric, "value": value, "baseline": base,
                         "delta": delta if math.isfinite(delta) else None,
                         "relative": rel if rel is None or math.isfinite(rel) else None})
    return rows


def summary(results: Mapping[str, Any], baseline: Baseline) -> dict[str, Any]:
    """The ``baseline`` block for results.json: which run, and every delta."""
    return {"path": str(baseline.path), "model": baseline.model, "verdict": baseline.verdict,
            "git_commit": baseline.git_commit, "started_at": baseline.started_at,
            "criteria_file": baseline.criteria_file, "schemes": {str(b): s for b, s in baseline.schemes.items()},
            "deltas": deltas(results, baseline)}
