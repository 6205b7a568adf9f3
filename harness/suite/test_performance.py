"""Category 5 — performance: quantization timed once (the run that made the artifact); load
and dequantize measured with pytest-benchmark (median of rounds)."""

import pytest

import arrowquant_core as aq
from harness.context import RunContext, map_ordered


@pytest.mark.made_here(metrics=("quantize_seconds",), why="no quantization ran in this run: another tool made the "
                       "file, and its time is not recorded in it")
def test_quantize_time(ctx: RunContext, bits: int) -> None:
    """The wall time of the quantization that produced the artifact under test, timed
    once in that run (re-quantizing only to time it cost a third of the run)."""
    ctx.gate("test_quantize_time", bits, {"quantize_seconds": ctx.written(bits).quantize_seconds})


def test_load_time(ctx: RunContext, bits: int, benchmark) -> None:  # type: ignore[no-untyped-def]
    path = ctx.written(bits).path
    benchmark.group = f"int{bits}"
    if ctx.external is not None:  # a GGUF made elsewhere: gguf-py reads, maps and dequantizes it
        from harness.gguf_artifact import load

        def read() -> object:
            return load(path, ctx.checkpoint.weights)
    else:
        def read() -> object:
            return aq.load(path).dequantize(map_ordered)  # tensors side by side, as reloaded() does
    benchmark.pedantic(read, rounds=ctx.config.benchmark_rounds, iterations=1)
    ctx.gate("test_load_time", bits, {"load_seconds": benchmark.stats.stats.median})
