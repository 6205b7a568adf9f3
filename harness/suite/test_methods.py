"""Method comparison: every method the criteria list for a bit width, on the same inputs.

Reported, not gated (the gates judge the plan that ships); the test fails only if a
method cannot quantize, store and reload the model.
"""

import math

import pytest

from harness.context import RunContext


def test_method_comparison(ctx: RunContext, bits: int) -> None:
    rows = ctx.compare_methods(bits)
    assert [r["method"] for r in rows] == list(ctx.compared_methods(bits))
    for row in rows:
        assert row["size_mb"] > 0 and math.isfinite(row["quantize_seconds"]), row


@pytest.mark.made_here(metrics=("hessian_plain_kl_mean", "hessian_mask_aware_kl_mean", "hessian_mask_aware_kl_ratio",
                                "hessian_plain_vs_shipped_kl_ratio"),
                       why="it compares ArrowQuant's own GPTQ variants on the model, which says nothing about a "
                           "file another tool made")
def test_hessian_comparison(ctx: RunContext, bits: int) -> None:
    """Every Hessian method the criteria list under ``hessian_comparison``, run with each
    Hessian the model's runner captures (dream-mini: plain and mask-aware GPTQ), measured
    on the evaluation set in this run. The first method's figures are metrics (gateable);
    the rows are the report's table. A bit width that lists none has nothing to compare."""
    rows = ctx.hessian_comparison(bits)
    plan = ctx.criteria.plan(bits)
    if not plan.hessian_comparison:
        assert rows == []
        return
    variants = list(ctx.hessian_variants())
    assert [(r["method"], r["hessian"]) for r in rows] == [(m, v) for m in plan.hessian_comparison for v in variants]
    first = {r["hessian"]: r for r in rows if r["method"] == plan.hessian_comparison[0]}
    measured: dict[str, float] = {}
    if "plain" in first:
        measured["hessian_plain_kl_mean"] = first["plain"]["kl_mean"]
        shipped = ctx.output_metrics(bits).get("kl_mean")
        if shipped:
            measured["hessian_plain_vs_shipped_kl_ratio"] = first["plain"]["kl_mean"] / shipped
    if "mask-aware" in first:
        measured["hessian_mask_aware_kl_mean"] = first["mask-aware"]["kl_mean"]
        if "plain" in first and first["plain"]["kl_mean"] > 0:
            measured["hessian_mask_aware_kl_ratio"] = first["mask-aware"]["kl_mean"] / first["plain"]["kl_mean"]
    ctx.gate("test_hessian_comparison", bits, measured)
