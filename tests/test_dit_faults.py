"""The dit-mini gates must be able to say no to a broken spatial path.

Each fault runs through the real pieces the harness uses (criteria file, quantizer, Parquet
artifact, the runner's evaluation), and a named gate of ``harness/criteria/dit-mini.toml``
must fail; the clean path must pass the same gates. The spatial faults act inside the
runner (``DiTRunner(spatial_fault=...)``) because the harness has no hook that reaches the
runner's smoothing yet; the conv fault is an ordinary ``--inject-fault`` fault.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import arrowquant_core as aq
from fixtures.dit_mini.config import DiTConfig
from fixtures.dit_mini.runner import PRECISIONS, VARIANTS, DiTRunner, ensure_fixture
from harness.criteria import Criteria, load_criteria
from harness.config import RunConfig
from harness.faults import FAULTS, SPATIAL_FAULTS
from harness.runner import run
from tests.gate_keys import keys

CRITERIA = Path(__file__).resolve().parents[1] / "harness" / "criteria"


def _failed(criteria: Criteria, bits: int, measured: dict[str, float]) -> set[str]:
    gates = [c for c in criteria.plan(bits).gates if c.metric in measured]
    assert gates, f"no INT{bits} gate on any of {sorted(measured)}"
    return {c.metric for c in gates if c.check(measured[c.metric]) is not None}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_fixture(0, DiTConfig.image(), tmp_path_factory.mktemp("dit"))


@pytest.fixture(scope="module")
def criteria() -> Criteria:
    return load_criteria(CRITERIA / "dit-mini.toml", "dit-mini")


# the gates each fault must fail (all of them); measured on seed 0: the conv stored in the
# wrong order gives noise cosine 0.83 and worst sample PSNR 10.2 dB at INT8 (gates 0.999,
# 28 dB), mean sample PSNR 11.6 dB at INT4 with GPTQ (gate 16.5 dB); unfolded smoothing
# gives W8A8 / W4A8 noise cosines 0.70 / 0.68, smoothing on the wrong block 0.86 / 0.85
CONV_INT8 = {"noise_cosine_mean", "noise_cosine_worst_group", "sample_psnr_db_min"}
CONV_INT4 = {"noise_cosine_mean", "noise_cosine_worst_group", "sample_psnr_db_mean"}
SPATIAL = {"w8a8_gptq_smooth_noise_cosine", "w4a8_gptq_smooth_noise_cosine"}
# (measured by, metric) of every gate shown failing here (tests/test_gate_audit.py)
SHOWN_FAILING = keys("dit-mini", CONV_INT8 | CONV_INT4 | SPATIAL)


@pytest.mark.parametrize("config", [DiTConfig.image(), DiTConfig.audio()], ids=["image", "audio"])
def test_conv_reshaped_in_the_wrong_order_fails(config: DiTConfig, tmp_path: Path) -> None:
    runner = DiTRunner(ensure_fixture(0, config, tmp_path / "fixture"))
    crit = load_criteria(CRITERIA / f"{config.name}.toml", config.name)
    plan = crit.plan(8)
    model = aq.quantize_model(runner.original, aq.QuantizationConfig(plan.scheme, method=plan.method))
    clean = aq.load_weights(aq.save(model, tmp_path / "clean.parquet"))
    broken = FAULTS["conv-reshaped-wrong-order"].mutate(model)
    bad = aq.load_weights(aq.save(broken, tmp_path / "broken.parquet"))
    assert not _failed(crit, 8, runner.evaluate(clean)[0])
    assert CONV_INT8 <= _failed(crit, 8, runner.evaluate(bad)[0])


@pytest.mark.parametrize("fault", sorted(SPATIAL_FAULTS))
def test_spatial_fault_fails_a_gate(fault: str, folder: Path, criteria: Criteria) -> None:
    measured = DiTRunner(folder, spatial_fault=SPATIAL_FAULTS[fault].corrupt).gated_spatial()
    assert SPATIAL <= _failed(criteria, 8, measured)


def test_clean_spatial_path_passes_and_smoothing_gains(folder: Path, criteria: Criteria) -> None:
    """The same gates pass without a fault; and at W8A8 with static per-tensor activation
    scales, smoothing cuts GPTQ's noise-prediction error (measured MSE 0.022 -> 0.007 on
    seed 0)."""
    runner = DiTRunner(folder)
    measured = runner.gated_spatial()
    assert set(measured) >= SPATIAL and not _failed(criteria, 8, measured)
    w8a8 = next(p for p in PRECISIONS if p.label == "W8A8")
    plain = runner.spatial_row(w8a8, next(v for v in VARIANTS if v.label == "gptq"))
    smooth = runner.spatial_row(w8a8, next(v for v in VARIANTS if v.label == "gptq+smooth"))
    assert smooth["smoothed_sites"] > 0
    assert smooth["noise_mse_mean"] < 0.5 * plain["noise_mse_mean"]
    assert smooth["noise_cosine_mean"] > plain["noise_cosine_mean"]


@pytest.mark.parametrize("fault", [None, "conv-reshaped-wrong-order"])
def test_conv_fault_fails_int4_through_the_harness(fault: str | None, tmp_path: Path) -> None:
    """The whole harness at INT4 (GPTQ with the runner's calibration, the shipped plan):
    the conv fault fails the noise and sample gates; the same run without it passes."""
    result = run(RunConfig(model="dit-mini", bits=(4,), out=tmp_path, fault=fault, quiet=True, benchmark_rounds=1,
                           compare=False))
    failed = {c["metric"] for c in result.results["criteria"] if not c["passed"]}
    if fault is None:
        assert result.verdict == "PASS", (failed, result.results["tests"]["failures"])
    else:
        assert result.verdict == "FAIL" and CONV_INT4 <= failed, sorted(failed)
