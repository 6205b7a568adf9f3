"""Category 1 — real-model quantization: every weight quantized, nothing left behind."""

import pytest

from harness.context import RunContext


def test_every_weight_quantized(ctx: RunContext, bits: int) -> None:
    """Every tensor of 2+ dimensions is stored quantized in the artifact (read back)."""
    reloaded = ctx.reloaded(bits)
    ctx.gate("test_every_weight_quantized", bits, {"unquantized_weights": len(reloaded.unquantized)})
    assert not reloaded.unquantized, f"left in floating point: {reloaded.unquantized}"


def test_quantization_keeps_source_untouched(ctx: RunContext, bits: int) -> None:
    """Quantizing never modifies the caller's arrays: the source tensors still hash to
    what they hashed to when the model was loaded, after this bit width's quantization."""
    ctx.written(bits)
    changed = ctx.modified_source_tensors()
    assert not changed, f"quantize_model modified the source tensors {changed[:5]}"


@pytest.mark.made_here(metrics=("plan_mismatches", "promotions", "calibration_score"),
                       why="the plan is ArrowQuant's per-tensor choice of scheme and method; llama.cpp's rules chose "
                       "the file's types (listed with the artifact, with any tensor that breaks them)")
def test_artifact_matches_the_plan(ctx: RunContext, bits: int) -> None:
    """Every tensor is stored with the scheme and method the plan (config or ladder) chose."""
    reloaded = ctx.reloaded(bits)
    measured = {"plan_mismatches": len(reloaded.plan_mismatches)}
    plan = ctx.mixed_plan(bits)
    if plan is not None:
        measured.update({"promotions": plan.promotions, "calibration_score": plan.score})
    ctx.gate("test_artifact_matches_the_plan", bits, measured)
    assert not reloaded.plan_mismatches, f"stored differently from the plan: {reloaded.plan_mismatches[:5]}"


def test_every_tensor_accounted_for(ctx: RunContext, bits: int) -> None:
    """The artifact holds exactly the source's tensors: the same names, float tensors kept
    and integer buffers bit-exact, every dequantized dtype the source's, every value
    finite, and ties recorded as found."""
    acc = ctx.reloaded(bits).accounting
    ctx.gate("test_every_tensor_accounted_for", bits, {
        "missing_tensors": len(acc.missing), "unexpected_tensors": len(acc.unexpected),
        "kept_tensors_changed": len(acc.changed), "dtype_mismatches": len(acc.dtype_mismatches),
        "nonfinite_tensors": len(acc.nonfinite), "tie_mismatches": len(acc.tie_mismatches),
    })
    problems = {"missing": acc.missing, "unexpected": acc.unexpected, "changed": acc.changed,
                "dtype": acc.dtype_mismatches, "non-finite": acc.nonfinite, "ties": acc.tie_mismatches}
    bad = {k: v[:5] for k, v in problems.items() if v}
    assert not bad, f"tensors not accounted for: {bad}"
