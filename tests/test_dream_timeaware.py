"""dream-mini time-aware quantization: activation capture, GPTQ Hessians, activation tables
in the artifact, frontier flips, the text strategy's fallback, and the faults of the
activation tables (each must fail a named gate of harness/criteria/dream-mini.toml)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import arrowquant_core as aq
from arrowquant_core.diffusion import ArrowQuantV2, DiffusionQuantConfig, TIME_AWARE_SCHEMES
from arrowquant_core.errors import QuantizationError
from arrowquant_core.methods import METHODS, quantize_tensor
from arrowquant_core.schemes import get_scheme
from arrowquant_core.timeaware import TimeAwareCalibrator, TimeGroupTable, aux_prefix
from fixtures.dream_mini.activations import ActQuant, Capture
from fixtures.dream_mini.denoiser import forward, linear_sites
from fixtures.dream_mini.quality import compare as quality_compare
from fixtures.dream_mini.runner import ACT_CONFIGS, MIN_PER_GROUP, DreamRunner, ensure_fixture
from harness.criteria import load_criteria
from harness.faults import AUX_FAULTS

A8_STATIC = tuple(c for c in ACT_CONFIGS if c.scheme.bits == 8 and c.scheme.static)
CRITERIA = Path(__file__).resolve().parents[1] / "harness" / "criteria" / "dream-mini.toml"


@pytest.fixture(scope="module")
def runner() -> DreamRunner:
    return DreamRunner(ensure_fixture(seed=0), seed=0, act_configs=A8_STATIC)


@pytest.fixture(scope="module")
def int8(runner: DreamRunner) -> aq.QuantizedModel:
    model = aq.quantize_model(runner.original, aq.QuantizationConfig("int8-g64-asym"))
    return dataclasses.replace(model, aux=runner.activation_aux())


def test_capture_hook_observes_without_changing_the_logits(runner: DreamRunner) -> None:
    ids = runner.calibration_set().ids[:2]
    plain = forward(runner.original, runner.config, ids)
    cap = Capture(runner.config)
    cap.batch(500, None)
    assert forward(runner.original, runner.config, ids, hook=cap).tobytes() == plain.tobytes()
    assert set(cap.plain) == set(linear_sites(runner.config))


def test_calibration_covers_every_time_group(runner: DreamRunner) -> None:
    cal = runner.calibration_set()
    counts = cal.rows_per_group(runner.time_grouping())
    assert len(counts) == 10 and min(counts) >= MIN_PER_GROUP
    assert cal.ids.shape[0] == len(runner.calibration) + cal.synthetic and cal.synthetic > 0
    table = runner.act_table(A8_STATIC[1].scheme, time_aware=True)
    assert table.groups == 10 and all(table.stats[s].shape == (10, 4) for s in table.sites)


def test_hessians_cover_every_linear_and_every_gptq_method_runs(runner: DreamRunner) -> None:
    plain, aware = runner.calibration_hessians(), runner.mask_aware_hessians()
    linears = {w for ws in linear_sites(runner.config).values() for w in ws}
    assert set(plain) == set(aware) == linears
    name = "model.layers.1.self_attn.k_proj.weight"  # (128, 512): the smallest Linear, GPTQ is quick
    h = plain[name]
    assert h.dtype == np.float32 and h.shape == (512, 512) and np.allclose(h, h.T)
    assert not np.allclose(h, aware[name], rtol=1e-3), "mask-aware weighting changed nothing"
    w = runner.original[name]
    rtn_err = aq.dequantize(quantize_tensor(w, get_scheme("int4-g128-asym"), name)) - w
    for method in (m for m in METHODS.values() if m.needs_hessian):
        qt = quantize_tensor(w, get_scheme("int4-g128-asym"), name, method.name, h)
        assert qt.method == method.name
        err = aq.dequantize(qt) - w
        # GPTQ trades weight error for output error on the calibration activations
        x_err = float(np.einsum("ij,jk,ik->", err, h, err))
        x_rtn = float(np.einsum("ij,jk,ik->", rtn_err, h, rtn_err))
        assert x_err < x_rtn, method.name


def test_activation_tables_reload_bit_exact_logits(runner: DreamRunner, int8: aq.QuantizedModel,
                                                   tmp_path: Path) -> None:
    path = aq.save(int8, tmp_path / "w8.parquet")
    back = aq.load(path)
    assert set(back.aux) == set(int8.aux)
    weights = back.dequantize()
    ids = runner.calibration_set().ids[:2]
    for cfg in A8_STATIC:
        memory = runner.act_quant(cfg)
        stored = runner.act_quant(cfg, back.aux)
        for group in range(stored.grouping.groups):
            a = forward(weights, runner.config, ids, hook=memory.for_group(group))
            b = forward(weights, runner.config, ids, hook=stored.for_group(group))
            assert a.tobytes() == b.tobytes(), (cfg.key, group)


def _failed_gates(measured: dict[str, Any], bits: int) -> set[str]:
    """Gates of dream-mini.toml on the metrics of the A8 static configurations that fail,
    or that read "not measured" because their metric is absent (the harness records
    those as failed)."""
    plan = load_criteria(CRITERIA).plan(bits)
    ours = tuple(c.key for c in A8_STATIC) + ("a8_timeaware",)
    out = set()
    for gate in plan.gates:
        if gate.metric not in measured:
            if gate.metric.startswith(ours):
                out.add(gate.metric)
            continue
        if gate.check(float(measured[gate.metric])) is not None:
            out.add(gate.metric)
    return out


EXPECTED = {
    "time-groups-reversed": {"a8_timeaware_kl_ratio"},
    "act-scales-other-layer": {"a8_tensor_timeaware_kl_mean", "a8_timeaware_kl_ratio"},
    "time-group-table-dropped": {"a8_tensor_timeaware_kl_mean", "a8_timeaware_kl_ratio"},
}


def test_clean_tables_pass_and_every_table_fault_fails_a_named_gate(runner: DreamRunner,
                                                                    int8: aq.QuantizedModel) -> None:
    assert set(EXPECTED) == set(AUX_FAULTS)
    weights = int8.dequantize()
    clean = runner.compare(weights, aux=int8.aux)
    assert clean["activation_tables_stored"] == 1 and clean["activation_tables_match"] == 1
    assert 0.0 <= clean["frontier_flip_rate4"] <= 1.0 and 0.0 <= clean["frontier_flip_rate8"] <= 1.0
    assert {r["sampler_steps"] for r in clean["frontier_flips"]} == {4, 8}
    assert {r["params"] for r in clean["time_aware_comparison"]} == {"time-agnostic", "time-aware"}
    assert not {g for g in _failed_gates(clean, 8) if g.startswith(("a8_", "frontier"))}
    for name, fault in AUX_FAULTS.items():
        broken = fault(int8)
        measured = runner.compare(broken.dequantize(), aux=broken.aux)
        failed = _failed_gates(measured, 8)
        assert failed & EXPECTED[name], f"{name}: failed gates {failed}"
        assert measured["activation_tables_stored"] == (0 if name == "time-group-table-dropped" else 1)
        assert measured["activation_tables_match"] == 0, name  # the integrity check sees every fault


def test_cached_reference_gives_the_numbers_of_quality_compare(runner: DreamRunner) -> None:
    small = DreamRunner(runner.folder, seed=3, act_configs=())
    small.samples = small.samples[:6]
    w = aq.quantize_model(runner.original, aq.QuantizationConfig("int4-g128-asym")).dequantize()
    got = small.compare(w)
    ref = quality_compare(runner.original, w, runner.config, small.samples, seed=3, buckets=5)
    assert got["kl_mean"] == ref["kl_mean"] and got["masked_top1_agreement"] == ref["top1_agreement"]
    assert got["sampler8_agreement"] == ref["sampler_8_token_agreement"]
    assert got["sampler4_first_divergence"] == ref["sampler_4_first_divergence_step"]


def test_weights_only_comparison_is_compare_without_the_trajectories(runner: DreamRunner) -> None:
    """The Hessian comparison's measurement: every figure it reports is compare's, bit for
    bit (the cached reference rows, KL taken in place), and the free-running sampler
    figures it does not compute are absent, not filled in."""
    small = DreamRunner(runner.folder, seed=3, act_configs=())
    small.samples = small.samples[:6]
    w = aq.quantize_model(runner.original, aq.QuantizationConfig("int2-g16-asym")).dequantize()
    full = small.compare(w)
    only = small.compare_weights_only(w)
    trajectory_keys = {k for k in full if k.startswith("sampler")}
    assert trajectory_keys == {"sampler4_agreement", "sampler8_agreement",
                               "sampler4_first_divergence", "sampler8_first_divergence"}
    assert set(only) == set(full) - trajectory_keys
    for key in only:
        assert only[key] == full[key], key
    assert only["kl_mean"] > 0 and only["frontier_flip_rate8"] > 0  # INT2: the figures are not trivially equal


def _tiny() -> dict[str, np.ndarray]:
    return {"blk.weight": np.linspace(-1, 1, 512, dtype=np.float32).reshape(2, 256)}


def _feed(calibrators: list[TimeAwareCalibrator]) -> None:
    for cal in calibrators:
        for g in range(cal.grouping.groups):
            cal.observe(g, "blk", np.full((2, 4), float(g + 1), np.float32))


def test_text_strategy_stores_time_aware_tables_and_uses_r2q_at_2_bits() -> None:
    aq2 = ArrowQuantV2()
    model = aq2.quantize(_tiny(), DiffusionQuantConfig.from_profile("edge"), time_aware=_feed)
    assert model.tensors["blk.weight"].method == "residual2"
    assert model.metadata["activation_params"].startswith("computed")
    table = TimeGroupTable.from_arrays(model.aux, prefix=aux_prefix(TIME_AWARE_SCHEMES[0], 5))
    assert table.groups == 5 and table.sites == ("blk",)
    assert aq2.fallback_rates()["residual2"] == {"attempts": 1.0, "fallbacks": 0.0, "fallback_rate": 0.0}


def test_failing_time_aware_pass_falls_back_logged_and_counted_or_raises(caplog: pytest.LogCaptureFixture) -> None:
    def broken(calibrators: list[TimeAwareCalibrator]) -> None:
        raise RuntimeError("calibration set unreadable: disk error")

    aq2 = ArrowQuantV2()
    lenient = DiffusionQuantConfig.from_profile("local", fail_fast=False)
    with caplog.at_level("WARNING", logger="arrowquant.diffusion"):
        model = aq2.quantize(_tiny(), lenient, time_aware=broken)
        aq2.quantize(_tiny(), lenient, time_aware=_feed)
    assert "calibration set unreadable: disk error" in caplog.text
    assert "disk error" in model.metadata["activation_params"] and not model.aux
    assert model.tensors["blk.weight"].method == "rtn"  # base quantization kept
    assert aq2.fallback_rates()["rtn"] == {"attempts": 2.0, "fallbacks": 1.0, "fallback_rate": 0.5}
    with pytest.raises(QuantizationError, match="time-aware pass .* disk error"):
        aq2.quantize(_tiny(), DiffusionQuantConfig.from_profile("local"), time_aware=broken)
