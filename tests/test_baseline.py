"""Baseline regression: relative rules, the comparability verdict, resolved criteria, deltas.

The baseline is a real results.json (``tests/golden/adoption/dream-mini-int4-results.json``,
written by ``python -m harness run --model dream-mini --bits 4 --criteria
tests/golden/adoption/gates.toml``). The end-to-end regression (a run that fails against
it) is in ``tests/test_plugin.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
import tomllib

import pytest

from arrowquant_core.errors import ConfigurationError, FormatError
from harness import baseline as bl
from harness import exitcodes
from harness.cli import main
from harness.criteria import CRITERIA_DIR, load_criteria, parse_rule

GOLDEN = Path(__file__).resolve().parent / "golden" / "adoption"
BASELINE = GOLDEN / "dream-mini-int4-results.json"
MEASURED = json.loads(BASELINE.read_text())["bit_widths"][0]["metrics"]


def relative_gates(tmp_path: Path, extra: str = "", name: str = "gates.toml") -> Path:
    text = (GOLDEN / "gates.toml").read_text()
    text = text.replace('[all]\ngates = [', '[all]\ngates = [\n    "load_seconds <= baseline * 3",')
    text = text.replace('    { rule = "kl_mean <= 1.5"', '    "size_mb <= baseline * 1.05",\n'
                        '    { rule = "kl_mean <= baseline + 0.01", why = "no worse than the last release"},\n'
                        + extra + '    { rule = "kl_mean <= 1.5"')
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(("text", "relative", "offset"), [
    ("kl_mean <= baseline", "=", 0.0),
    ("output_cosine_mean >= baseline - 0.002", "-", 0.002),
    ("quantize_seconds <= baseline * 1.10", "*", 1.10),
    ("top1_agreement >= baseline + 1e-3", "+", 1e-3),
])
def test_relative_rules_parse_and_resolve(text: str, relative: str, offset: float) -> None:
    gate = parse_rule(text, 4)
    assert (gate.relative, gate.offset, gate.rule.replace("0.001", "1e-3")) == (
        relative, offset, text.replace("1.10", "1.1"))
    assert math.isnan(gate.threshold)
    assert "needs a baseline" in (gate.check(0.5) or "")
    resolved = gate.resolve({gate.metric: 2.0}, "baseline r.json")
    expected = {"=": 2.0, "-": 2.0 - offset, "*": 2.0 * offset, "+": 2.0 + offset}[relative]
    assert resolved.threshold == pytest.approx(expected) and not resolved.relative
    assert "baseline 2 (baseline r.json)" in resolved.why
    assert resolved.check(expected) is None


def test_a_regression_fails_with_the_baseline_in_the_message() -> None:
    gate = parse_rule("output_cosine_mean >= baseline - 0.002", 4, why="release gate")
    resolved = gate.resolve({"output_cosine_mean": 0.9650}, "baseline v1/results.json")
    message = resolved.check(0.9620)
    assert message is not None
    assert "INT4 output_cosine_mean = 0.962 violates output_cosine_mean >= 0.963" in message
    assert "output_cosine_mean >= baseline - 0.002 with baseline 0.965 (baseline v1/results.json)" in message
    assert resolved.check(0.9635) is None


@pytest.mark.parametrize("text", ["kl_mean <= baseline -", "kl_mean <= baseline / 2", "kl_mean <= baseline * x",
                                  "kl_mean <= 2 * baseline", "nonsense <= baseline"])
def test_malformed_relative_rules_are_configuration_errors(text: str) -> None:
    with pytest.raises(ConfigurationError):
        parse_rule(text, 4)


def test_resolving_needs_the_metric_in_the_baseline() -> None:
    with pytest.raises(ConfigurationError, match="has no measured kl_mean for INT4"):
        parse_rule("kl_mean <= baseline", 4).resolve({"size_mb": 1.0}, "baseline")


def test_relative_rules_without_a_baseline_are_refused_at_load(tmp_path: Path) -> None:
    path = relative_gates(tmp_path)
    with pytest.raises(ConfigurationError, match="relative to a baseline; pass --baseline"):
        load_criteria(path, "dream-mini")
    assert any(g.relative for g in load_criteria(path, "dream-mini", allow_relative=True).plan(4).gates)


def test_load_baseline_reads_a_real_results_file() -> None:
    base = bl.load_baseline(BASELINE)
    assert (base.model, base.schemes, base.verdict) == ("dream-mini", {4: "int4-g128-asym"}, "PASS")
    assert base.metrics[4]["kl_mean"] == MEASURED["kl_mean"]


@pytest.mark.parametrize(("content", "error", "match"), [
    (None, ConfigurationError, "does not exist"),
    ("{not json", FormatError, "not a results.json"),
    ('{"run": {}}', FormatError, "needs 'run' and 'bit_widths'"),
    ('{"run": {"model": "m"}, "bit_widths": [{"bits": 4}]}', FormatError, "lacks bits/scheme"),
    ('{"run": {"model": "m"}, "bit_widths": []}', FormatError, "no bit widths"),
])
def test_bad_baseline_files_name_the_file(tmp_path: Path, content: str | None, error: type[Exception],
                                          match: str) -> None:
    path = tmp_path / "results.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(error, match=match) as info:
        bl.load_baseline(path)
    assert str(path) in str(info.value)


def test_incomparable_baselines_get_a_clear_verdict(tmp_path: Path) -> None:
    base = bl.load_baseline(BASELINE)
    ours = load_criteria(relative_gates(tmp_path), "dream-mini", allow_relative=True)
    assert bl.comparable(base, "dream-mini", ours) == []
    with pytest.raises(bl.BaselineNotComparable, match="baseline not comparable: .* made with model 'dream-mini', "
                                                       "this run is 'minilm'"):
        bl.check_comparable(base, "minilm", ours)
    other_scheme = tmp_path / "other"
    other_scheme.mkdir()
    path = relative_gates(other_scheme)
    path.write_text(path.read_text().replace("int4-g128-asym", "int4-g64-asym"))
    problems = bl.comparable(base, "dream-mini", load_criteria(path, "dream-mini", allow_relative=True))
    assert problems == ["made INT4 with scheme int4-g128-asym, this run uses int4-g64-asym"]
    problems = bl.comparable(base, "dream-mini", load_criteria(CRITERIA_DIR / "dream-mini.toml", "dream-mini"))
    assert "made with criteria gates.toml, this run uses dream-mini.toml" in problems
    assert "made INT8 with" not in " ".join(problems)  # INT8 is absent from the baseline but has no relative rule


def test_resolved_criteria_file_holds_absolute_thresholds(tmp_path: Path) -> None:
    source = relative_gates(tmp_path)
    prepared = bl.prepare(source, "dream-mini", BASELINE, tmp_path / "out", (4,))
    assert prepared.criteria_path == tmp_path / "out" / "gates.resolved.toml"
    resolved = load_criteria(prepared.criteria_path, "dream-mini")  # plain criteria: no relative rule left
    rules = {g.metric: g for g in resolved.plan(4).gates if "baseline" in g.why}
    assert rules["size_mb"].threshold == pytest.approx(MEASURED["size_mb"] * 1.05)
    assert rules["kl_mean"].threshold == pytest.approx(MEASURED["kl_mean"] + 0.01)
    assert rules["load_seconds"].threshold == pytest.approx(MEASURED["load_seconds"] * 3)  # from [all]
    assert "no worse than the last release" in rules["kl_mean"].why
    text = prepared.criteria_path.read_text()
    assert text.startswith("# Criteria resolved against") and str(source) in text
    assert tomllib.loads(text)["all"]["gates"] == [
        {"rule": "roundtrip_exact == 1", "why": "codes, scales and zero points must reload bit-exact"}]


def test_prepare_without_baseline_keeps_the_file_and_refuses_relative_rules(tmp_path: Path) -> None:
    plain = bl.prepare(GOLDEN / "gates.toml", "dream-mini", None, tmp_path)
    assert plain.criteria_path == GOLDEN / "gates.toml" and plain.baseline is None
    with pytest.raises(ConfigurationError, match="pass --baseline"):
        bl.prepare(relative_gates(tmp_path), "dream-mini", None, tmp_path)


@pytest.mark.parametrize("path", sorted(CRITERIA_DIR.glob("*.toml")), ids=lambda p: p.name)
def test_dump_toml_round_trips_every_shipped_criteria_file(path: Path) -> None:
    data = tomllib.loads(path.read_text())
    assert tomllib.loads(bl.dump_toml(data, "header")) == data


def test_deltas_and_summary() -> None:
    base = bl.load_baseline(BASELINE)
    current = json.loads(BASELINE.read_text())
    current["bit_widths"][0]["metrics"] = {**MEASURED, "kl_mean": MEASURED["kl_mean"] + 0.25, "extra": "text"}
    rows = {r["metric"]: r for r in bl.deltas(current, base)}
    assert rows["kl_mean"]["delta"] == pytest.approx(0.25)
    assert rows["kl_mean"]["relative"] == pytest.approx(0.25 / MEASURED["kl_mean"])
    assert rows["size_mb"]["delta"] == 0.0
    assert "extra" not in rows
    summary = bl.summary(current, base)
    assert summary["path"] == str(BASELINE) and summary["schemes"] == {"4": "int4-g128-asym"}
    json.dumps(summary, allow_nan=False)  # JSON-clean as results.json requires


def test_cli_refuses_an_incomparable_baseline_before_loading_the_model(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", "--model", "dream-mini", "--bits", "4", "--baseline", str(BASELINE),
                 "--out", str(tmp_path), "--quiet"])  # default criteria dream-mini.toml, baseline used gates.toml
    assert code == exitcodes.USAGE
    err = capsys.readouterr().err
    assert "baseline not comparable" in err and "made with criteria gates.toml, this run uses dream-mini.toml" in err


def test_cli_names_a_missing_baseline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--model", "dream-mini", "--baseline", str(tmp_path / "nope.json")]) == exitcodes.USAGE
    assert "no such file" in capsys.readouterr().err
