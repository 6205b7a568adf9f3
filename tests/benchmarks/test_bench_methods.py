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
    assert gptq_s <= GPTQ_BUDGET_S, (
        f"GPTQ {SCHEME} on MiniLM took {gptq_s:.2f} s (best of 2), budget {GPTQ_BUDGET_S} s")
