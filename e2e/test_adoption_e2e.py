"""Adoption end to end: a scratch repository gates dream-mini and fails on a regression.

Outside the default suite (``testpaths = ["tests"]``) because each test runs the whole
gate on dream-mini — about a minute each on the 2-core machine. Run with ``make e2e``
(``pytest e2e/``). The scratch repository, the baseline with its injected regression
(the past ``kl_mean`` halved) and the offline action runner are those of
``tests/test_plugin.py`` and ``tests/test_action.py``.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import pytest

from tests.test_action import run_action, scratch_repo
from tests.test_plugin import run_pytest, scratch  # noqa: F401  (the fixture)


def test_a_scratch_repository_gates_dream_mini_and_fails_on_a_regression(scratch: Path) -> None:
    proc = run_pytest(scratch, "--arrowquant-model", "dream-mini", "--arrowquant-bits", "4",
                      "--arrowquant-criteria", "gates.toml", "--arrowquant-baseline", "last-release.json",
                      "--arrowquant-out", "build/arrowquant", "--json-report", "--json-report-file", "report.json",
                      "-k", "not fixture")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "1 failed, 1 passed" in out, out
    assert "arrowquant-gate[dream-mini]" in out
    assert "violates kl_mean <=" in out and "kl_mean <= baseline * 1.05" in out, out
    report = json.loads((scratch / "report.json").read_text())
    gate = next(t for t in report["tests"] if "arrowquant-gate" in t["nodeid"])
    meta = gate["metadata"]["arrowquant"]
    assert meta["verdict"] == "FAIL" and meta["bits"] == [4] and meta["baseline"].endswith("last-release.json")
    assert [g["rule"].split(" <= ")[0] for g in meta["failed_gates"]] == ["kl_mean"]
    assert report["arrowquant"] == [meta]
    results = json.loads((scratch / "build" / "arrowquant" / "results.json").read_text())
    delta = next(d for d in results["baseline"]["deltas"] if d["metric"] == "kl_mean")
    assert delta["delta"] == pytest.approx(delta["baseline"])  # today is twice the (injected) past value
    passed = {c["rule"] for c in results["criteria"] if c["passed"]}
    assert any(rule.startswith("size_mb <=") for rule in passed)  # the size rule relative to the baseline held
    assert (scratch / "build" / "arrowquant" / "gates.resolved.toml").is_file()


def test_the_action_gates_dream_mini_and_fails_on_a_regression(tmp_path: Path) -> None:
    repo = scratch_repo(tmp_path)
    gated = run_action(repo, {"model": "dream-mini", "bits": "4", "criteria": "gates.toml",
                              "baseline": "last-release.json", "install": "false", "out": "reports"})
    assert gated["outputs"]["verdict"] == "FAIL" and gated["outputs"]["exit-code"] == "1"
    assert Path(repo / gated["outputs"]["results-path"]).is_file()
    assert gated["codes"]["Fail when the gate failed"] == 1
    assert "## ArrowQuant gate for `dream-mini`: FAIL (exit code 1)" in gated["summary"]
    # the summary is Markdown: rule text is escaped there (kl\_mean &lt;= ...); read it as rendered
    assert "kl_mean <= baseline * 1.05" in html.unescape(gated["summary"]).replace("\\", "")
    assert "](quality_vs_size.svg)" not in gated["summary"]  # no relative link that cannot resolve
    if gated["chart"]:  # the report draws a PNG (harness/chart.py wired in): linked from the summary
        assert f"]({gated['chart']['artifact-url']})" in gated["summary"]
    else:  # one measured point (a single bit width) draws no chart: nothing links to one
        assert "quality_vs_size" not in gated["summary"]
