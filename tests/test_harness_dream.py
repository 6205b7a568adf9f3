"""dream-mini end to end: the run passes, reports per timestep group, and is deterministic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import arrowquant_core as aq
from fixtures.dream_mini.runner import ensure_fixture
from harness.config import RunConfig
from harness.runner import RunResult, run


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunResult, RunResult]:
    first = run(RunConfig(model="dream-mini", out=tmp_path_factory.mktemp("a"), quiet=True, benchmark_rounds=1))
    # the determinism check repeats the INT4 row only (every stage runs there, the Hessian
    # comparison included): a whole second run cost a minute of the default suite
    second = run(RunConfig(model="dream-mini", bits=(4,), out=tmp_path_factory.mktemp("b"), quiet=True,
                           benchmark_rounds=1))
    return first, second


def test_dream_mini_fails_honestly_at_int2_with_timestep_groups(two_runs: tuple[RunResult, RunResult]) -> None:
    """INT8 and INT4 ship; plain INT2 round-to-nearest is gated on the denoiser's outputs
    and fails them, so the run's verdict is FAIL and says which bit width not to ship."""
    result = two_runs[0]
    assert result.exit_code == 1 and result.verdict == "FAIL"
    entries = result.results["bit_widths"]
    decisions = {e["bits"]: e["verdict"] for e in entries}
    assert decisions[8]["decision"] == "ship" and decisions[4]["decision"] == "ship", decisions
    assert decisions[2]["decision"] == "do not ship" and decisions[2]["outputs_measured"]
    assert {r.split()[0] for r in decisions[2]["failed_gates"]} <= {"masked_top1_agreement", "kl_mean"}
    assert "| INT2 | **DO NOT SHIP** | yes |" in result.report_path.read_text()
    assert [e["bits"] for e in entries] == [8, 4, 2]
    assert [e["scheme"] for e in entries] == ["int8-g64-asym", "int4-g128-asym", "int2-g256-asym"]
    for entry in entries:
        groups = entry["timestep_groups"]
        assert len(groups) == 5 and all(g["positions"] > 0 for g in groups)
        for key in ("kl_mean", "masked_top1_agreement", "sampler4_agreement", "sampler8_agreement"):
            assert key in entry["metrics"], key
    int2 = entries[2]["metrics"]
    assert int2["size_mb"] < 1.0 and int2["weight_cosine_mean"] >= 0.70  # measured 0.57 MB; FP16 matrices alone are 7 MB
    report = result.report_path.read_text()
    assert "## By timestep group (mask ratio)" in report and "| Mask ratio | KL mean |" in report
    # quality gets worse as bits drop, and the report has the numbers to show it
    kl = [e["metrics"]["kl_mean"] for e in entries]
    assert kl[0] < kl[1] < kl[2]


def test_gptq_plain_and_mask_aware_at_int4_and_int2(two_runs: tuple[RunResult, RunResult]) -> None:
    """Every dream-mini run measures GPTQ with the plain and the mask-aware Hessian at the
    INT4 and INT2 schemes: KL per mask-ratio bucket in the report, the figures as metrics,
    and which tensors GPTQ could calibrate (all but the embedding table) in the rows."""
    result = two_runs[0]
    entries = {e["bits"]: e for e in result.results["bit_widths"]}
    assert "hessian_comparison" not in entries[8]["tables"]
    for bits in (4, 2):
        rows = entries[bits]["tables"]["hessian_comparison"]
        assert [(r["method"], r["hessian"]) for r in rows] == [("gptq", "plain"), ("gptq", "mask-aware")]
        plain, masked = rows
        assert plain["scheme"] == entries[bits]["scheme"] and plain["calibrated_tensors"] >= 15
        assert plain["kl_mean"] != masked["kl_mean"], "the two Hessians must give different models"
        assert sum(1 for k in plain if k.startswith("kl 0.")) == 5
        metrics = entries[bits]["metrics"]
        assert metrics["hessian_plain_kl_mean"] == plain["kl_mean"]
        assert metrics["hessian_mask_aware_kl_ratio"] == masked["kl_mean"] / plain["kl_mean"]
        assert metrics["hessian_plain_vs_shipped_kl_ratio"] == plain["kl_mean"] / metrics["kl_mean"]
    # GPTQ beats round-to-nearest at INT4 (gated there)
    assert entries[4]["metrics"]["hessian_plain_vs_shipped_kl_ratio"] < 0.8
    report = result.report_path.read_text()
    assert "### INT4: hessian comparison" in report and "### INT2: hessian comparison" in report
    assert "## Fallbacks" in report and "time-aware activation tables: ran (no fallback)" in report


def test_same_seed_same_codes_and_same_figures(two_runs: tuple[RunResult, RunResult]) -> None:
    first, second = two_runs
    again = {e["bits"]: e for e in second.results["bit_widths"]}
    assert list(again) == [4]
    for a in first.results["bit_widths"]:
        if a["bits"] not in again:
            continue
        b = again[a["bits"]]
        ma, mb = aq.load(a["artifact"]["path"]), aq.load(b["artifact"]["path"])
        assert list(ma.tensors) == list(mb.tensors)
        for name, qa in ma.tensors.items():
            qb = mb.tensors[name]
            np.testing.assert_array_equal(qa.codes, qb.codes, err_msg=name)
            np.testing.assert_array_equal(qa.scales, qb.scales, err_msg=name)
            np.testing.assert_array_equal(qa.zeros, qb.zeros, err_msg=name)
        timing = {"quantize_seconds", "load_seconds"}
        assert {k: v for k, v in a["metrics"].items() if k not in timing} == \
               {k: v for k, v in b["metrics"].items() if k not in timing}
        assert a["timestep_groups"] == b["timestep_groups"]
        untimed = [[{k: v for k, v in row.items() if k != "quantize_seconds"} for row in e["tables"]["hessian_comparison"]]
                   for e in (a, b)]
        assert untimed[0] == untimed[1] and len(untimed[0]) == 2


def test_fixture_is_reused_by_hash_and_regenerated_when_changed(tmp_path: Path) -> None:
    folder = ensure_fixture(seed=3, root=tmp_path)
    weights = folder / "model.safetensors"
    original = weights.read_bytes()
    stamp = weights.stat().st_mtime_ns
    assert ensure_fixture(seed=3, root=tmp_path) == folder and weights.stat().st_mtime_ns == stamp, "reused"
    weights.write_bytes(original[:-8] + bytes(8))  # tamper with the cached weights
    again = ensure_fixture(seed=3, root=tmp_path)
    assert again == folder and again.joinpath("model.safetensors").read_bytes() == original
    other = ensure_fixture(seed=4, root=tmp_path)
    assert other != folder and other.joinpath("model.safetensors").read_bytes() != original


def test_size_budget_mode_on_dream_mini(tmp_path: Path) -> None:
    """The other automatic mixed-precision mode: best quality within a planned size."""
    criteria = tmp_path / "budget.toml"
    criteria.write_text(
        '[bits.2]\nscheme = "int2-g256-asym"\nmethod = "clip"\n'
        'gates = [{ rule = "plan_mismatches == 0", why = "ships the plan" }, '
        '{ rule = "size_mb < 2.5", why = "budget 2 MB planned, plus float tensors and metadata" }, '
        '{ rule = "masked_top1_agreement >= 0.3", why = "a model with a runner is gated on outputs" }]\n'
        'report = ["promotions", "calibration_score"]\n'
        '[bits.2.ladder]\nrungs = [["int4-g128-asym", "clip"], ["int8-g64-asym", "rtn"]]\nbudget_mb = 2.0\n')
    result = run(RunConfig(model="dream-mini", criteria=criteria, out=tmp_path / "o", quiet=True, benchmark_rounds=1))
    assert result.verdict == "PASS", result.results["tests"]["failures"]
    (entry,) = result.results["bit_widths"]
    assert entry["plan"]["promotions"] > 0
    int2_only = run(RunConfig(model="dream-mini", bits=(2,), out=tmp_path / "p", quiet=True, benchmark_rounds=1))
    assert int2_only.verdict == "FAIL", "plain INT2 fails its output gates"
    assert entry["metrics"]["masked_top1_agreement"] > int2_only.results["bit_widths"][0]["metrics"][
        "masked_top1_agreement"], "spending the budget must buy quality"
