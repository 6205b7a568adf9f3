"""Benchmarks: RTN vs GPTQ at INT4 g64 on the real MiniLM weights, captured Hessians.

GPTQ covers every Linear weight (37, with calibration Hessians from
``calibration_sentences.txt``); the embedding tables have no input activations and
fall back to MSE clip search (``methods.quantize_tensor``). The budget: the whole
model in <= 5 s on this 2-core machine with one BLAS thread (docs/MYPYC.md: 2 OpenBLAS
threads make small products ~60x slower here). The GPTQ/RTN time ratio measured in
the same run goes to ``benchmark.extra_info``.

Run: ``.venv/bin/python -m pytest tests/benchmarks -q -p no:cacheprovider``
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
import time

import numpy as np
import numpy.typing as npt
import pytest
from pytest_benchmark.fixture import BenchmarkFixture
from threadpoolctl import threadpool_limits

from arrowquant_core import QuantizationConfig, QuantizedModel, quantize_model

SCHEME = "int4-g64-asym"
GPTQ_BUDGET_S = 5.0
F32 = npt.NDArray[np.float32]


@pytest.fixture(scope="module")
def minilm() -> tuple[dict[str, F32], dict[str, F32]]:
    from fixtures.minilm.activations import calibration_hessians
    from fixtures.minilm.model import original_weights

    return original_weights(), calibration_hessians()


@pytest.fixture(autouse=True)
def one_blas_thread() -> Iterator[None]:
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def rtn(weights: Mapping[str, F32]) -> QuantizedModel:
    return quantize_model(weights, QuantizationConfig(SCHEME))


def gptq(weights: Mapping[str, F32], hessians: Mapping[str, F32]) -> QuantizedModel:
    return quantize_model(weights, QuantizationConfig(SCHEME, method="gptq"), hessians=hessians)


def best_of(fn: object, rounds: int) -> float:
    assert callable(fn)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def test_bench_rtn_int4_g64(benchmark: BenchmarkFixture, minilm: tuple[dict[str, F32], dict[str, F32]]) -> None:
    weights, _ = minilm
    model = benchmark.pedantic(rtn, args=(weights,), rounds=3, iterations=1)
    assert len(model.tensors) == 40


def test_bench_gptq_int4_g64(benchmark: BenchmarkFixture, minilm: tuple[dict[str, F32], dict[str, F32]]) -> None:
    weights, hessians = minilm
    assert len(hessians) == 37
    model = benchmark.pedantic(gptq, args=(weights, hessians), rounds=2, iterations=1)
    assert len(model.tensors) == 40
    assert {qt.method for qt in model.tensors.values()} == {"gptq", "clip"}
    assert benchmark.stats is not None
    gptq_s = float(benchmark.stats.stats.min)
    rtn_s = best_of(lambda: rtn(weights), 3)  # same run, same machine state
    benchmark.extra_info.update({
        "scheme": SCHEME, "gptq_s": round(gptq_s, 3), "rtn_s": round(rtn_s, 3),
        "gptq_over_rtn": round(gptq_s / rtn_s, 1), "budget_s": GPTQ_BUDGET_S,
        "linear_weights": len(hessians)})
    # The 5 s budget is recorded, not asserted: an absolute wall time fails on a busy 2-core
    # machine (7.8 s measured while other jobs ran). The time rules are checked as ratios
    # measured in one run by test_bench_time_rules_of_the_shipped_methods below.
    assert gptq_s > rtn_s, "GPTQ cannot be cheaper than round-to-nearest on the same tensors"


# --- issue 13's time rules for the methods MiniLM ships -----------------------------------
# The shipped configuration per bit width (scheme, method and the per-tensor overrides) is
# read from harness/criteria/minilm.toml and minilm-3bit.toml, so moving a default re-checks
# its time. Rules (issue 13, item 4):
#   INT8: the shipped method within 10x of round-to-nearest;
#   INT4 / INT2: within the current GPTQ budget, <= 5 s on MiniLM on a quiet machine.
# Seconds on this shared 2-core machine move 2-3x with the other sessions' load, so the
# rules are checked as ratios measured in this one run: INT8 against RTN (best of 5, it
# takes ~0.07 s), INT4 / INT2 against the GPTQ run the 5 s budget was set for
# (``gptq`` at int4-g64-asym, ``test_bench_gptq_int4_g64``: 3-4 s quiet). Absolute
# seconds and both ratios go to ``benchmark.extra_info`` for the record.
RTN_SCHEME = "int8-g128-asym"  # the project's round-to-nearest baseline (the INT8 default before issue 13)
INT8_OVER_RTN_MAX = 10.0
BUDGET_REFERENCE = ("int4-g64-asym", "gptq")
LOW_BIT_OVER_REFERENCE_MAX = 1.0


SHIPPED_PROFILES = ((None, 4), (None, 2), ("3bit", 4))  # (minilm-SUFFIX.toml or minilm.toml, bits) within the GPTQ budget


def shipped(bits: int, profile: str | None = None) -> QuantizationConfig:
    """The configuration MiniLM's criteria (or one profile's) ship at ``bits``, overrides included."""
    from harness.criteria import default_criteria_path, load_criteria

    plan = load_criteria(default_criteria_path("minilm", profile), "minilm").plan(bits)
    return QuantizationConfig(plan.scheme, method=plan.method, overrides=plan.overrides,
                              method_overrides=plan.method_overrides)


def seconds(weights: Mapping[str, F32], hessians: Mapping[str, F32], config: QuantizationConfig) -> float:
    start = time.perf_counter()
    quantize_model(weights, config, hessians=hessians)
    return time.perf_counter() - start


def test_bench_time_rules_of_the_shipped_methods(benchmark: BenchmarkFixture,
                                                 minilm: tuple[dict[str, F32], dict[str, F32]]) -> None:
    weights, hessians = minilm
    config8 = shipped(8)
    int8_s = float(benchmark.pedantic(seconds, args=(weights, hessians, config8), rounds=1, iterations=1))
    rtn_s = best_of(lambda: quantize_model(weights, QuantizationConfig(RTN_SCHEME)), 5)
    # best of 4, like RTN's best of 5: the first call pays a warm-up (0.52 s, then 0.31-0.36 s)
    int8_s = min(int8_s, best_of(lambda: quantize_model(weights, config8, hessians=hessians), 3))
    # best of 2 on both sides of the <= 1x rule (measured 0.55-0.8x on the EPYC machine;
    # on the Intel one 0.95-1.02x until b02a4ff rewrote the Hessian rotation, 0.73-0.76x
    # since): one pause of the machine inside a single 2-3 s run would otherwise decide it
    reference = QuantizationConfig(BUDGET_REFERENCE[0], method=BUDGET_REFERENCE[1])
    reference_s = best_of(lambda: quantize_model(weights, reference, hessians=hessians), 2)
    low = {f"int{bits}" + (f"-{profile}" if profile else ""): (shipped(bits, profile),
                                                               best_of(lambda: quantize_model(
                                                                   weights, shipped(bits, profile), hessians=hessians), 2))
           for profile, bits in SHIPPED_PROFILES}
    benchmark.extra_info.update({
        "rtn": RTN_SCHEME, "rtn_s": round(rtn_s, 3),
        "int8": f"{config8.scheme}/{config8.method}" + "".join(f" {p}:{m}" for p, m in config8.method_overrides),
        "int8_s": round(int8_s, 3),
        "int8_over_rtn": round(int8_s / rtn_s, 1),
        "reference": "/".join(BUDGET_REFERENCE), "reference_s": round(reference_s, 3), "budget_s": GPTQ_BUDGET_S,
        **{k: f"{c.scheme}/{c.method}" + (f" +{len(c.overrides)} overrides" if c.overrides else "")
           for k, (c, _t) in low.items()},
        **{f"{k}_s": round(t, 3) for k, (_c, t) in low.items()},
        **{f"{k}_over_rtn": round(t / rtn_s, 1) for k, (_c, t) in low.items()},
        **{f"{k}_over_reference": round(t / reference_s, 2) for k, (_c, t) in low.items()},
    })
    assert int8_s / rtn_s <= INT8_OVER_RTN_MAX, (
        f"INT8 {config8.scheme}/{config8.method} took {int8_s:.3f} s = {int8_s / rtn_s:.1f}x round-to-nearest "
        f"({RTN_SCHEME}, {rtn_s:.3f} s); rule: <= {INT8_OVER_RTN_MAX:g}x")
    for key, (config, t) in low.items():
        assert t / reference_s <= LOW_BIT_OVER_REFERENCE_MAX, (
            f"{key} {config.scheme}/{config.method} took {t:.2f} s = {t / reference_s:.2f}x the GPTQ run the {GPTQ_BUDGET_S:g} s "
            f"budget was set for ({'/'.join(BUDGET_REFERENCE)}, {reference_s:.2f} s in this run); rule: <= "
            f"{LOW_BIT_OVER_REFERENCE_MAX:g}x")
