"""Category 2 — compression, measured on the bytes written to disk."""

from harness.context import RunContext


def test_compression(ctx: RunContext, bits: int) -> None:
    written = ctx.written(bits)
    base = ctx.measure_baselines()
    ctx.gate("test_compression", bits, {
        "size_mb": written.bytes / 1e6,
        "compression_vs_fp32": base.fp32_bytes / written.bytes,
        "compression_vs_fp16": base.fp16_bytes / written.bytes,
        "bits_per_weight": written.bytes * 8 / base.parameters,
    })
