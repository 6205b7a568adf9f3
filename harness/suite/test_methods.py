"""Method comparison: every method the criteria list for a bit width, on the same inputs.

Reported, not gated (the gates judge the plan that ships); the test fails only if a
method cannot quantize, store and reload the model.
"""

import math

from harness.context import RunContext


def test_method_comparison(ctx: RunContext, bits: int) -> None:
    rows = ctx.compare_methods(bits)
    assert [r["method"] for r in rows] == list(ctx.compared_methods(bits))
    for row in rows:
        assert row["size_mb"] > 0 and math.isfinite(row["quantize_seconds"]), row
