"""Category 3 — accuracy: weight level per layer, and output level on the real model."""

import math

import pytest

from harness.context import RunContext, finite_mean, is_embedding_table
from harness.measures import METRICS


def test_weight_quality(ctx: RunContext, bits: int) -> None:
    layers = ctx.reloaded(bits).layers
    assert layers, "no quantized tensors to compare"
    tables = [l.row_cosine_min for l in layers if is_embedding_table(l.name)]
    rows = {"embedding_row_cosine_min": min(tables)} if tables else {}
    ctx.gate("test_weight_quality", bits, {**rows,
        "weight_cosine_mean": finite_mean([l.cosine for l in layers]),
        "weight_cosine_min": min(l.cosine for l in layers),
        "weight_sqnr_db_mean": finite_mean([l.sqnr_db for l in layers]),
        "weight_sqnr_db_min": min(l.sqnr_db for l in layers),
        "group_range_ratio_min": min(l.group_range_ratio_min for l in layers),
        "group_range_ratio_max": max(l.group_range_ratio_max for l in layers),
    }, not_applicable=None if tables else {"embedding_row_cosine_min": "the model has no quantized embedding table"})


def test_output_quality(ctx: RunContext, bits: int, request: pytest.FixtureRequest) -> None:
    if ctx.checkpoint.runner is None:
        # Not a skip: a weight-only checkpoint has no output gates to check (the criteria
        # loader refuses output gates for such a model), so this test asserts exactly that.
        output_gates = [c for c in ctx.criteria.plan(bits).gates if METRICS[c.metric].level == "output"]
        assert not output_gates, f"output gates {output_gates} but model has no runner"
        return
    metrics = ctx.output_metrics(bits)
    ctx.gate("test_output_quality", bits, {k: v for k, v in metrics.items() if not math.isnan(v)})
