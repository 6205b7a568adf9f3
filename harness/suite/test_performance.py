"""Category 5 — performance, measured with pytest-benchmark (median of rounds)."""

import arrowquant_core as aq
from harness.context import RunContext


def test_quantize_time(ctx: RunContext, bits: int, benchmark) -> None:  # type: ignore[no-untyped-def]
    benchmark.group = f"int{bits}"
    benchmark.extra_info["scheme"] = ctx.criteria.plan(bits).scheme
    benchmark.pedantic(ctx.quantize, args=(bits,), rounds=ctx.config.benchmark_rounds, iterations=1)
    ctx.gate("test_quantize_time", bits, {"quantize_seconds": benchmark.stats.stats.median})


def test_load_time(ctx: RunContext, bits: int, benchmark) -> None:  # type: ignore[no-untyped-def]
    path = ctx.written(bits).path
    benchmark.group = f"int{bits}"
    benchmark.pedantic(lambda: aq.load(path).dequantize(), rounds=ctx.config.benchmark_rounds, iterations=1)
    ctx.gate("test_load_time", bits, {"load_seconds": benchmark.stats.stats.median})
