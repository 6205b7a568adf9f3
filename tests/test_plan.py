"""The fallback ladder and mixed precision, on a synthetic model whose score is known.

The score callback is a real function of the weights (no mock): quality falls with the
squared error of each layer, weighted by a per-layer sensitivity we choose, so the
right plan is known in advance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import arrowquant_core as aq
from arrowquant_core.errors import ValidationError
from arrowquant_core.plan import FP16, Rung, plan_budget, plan_quality, realize

RUNGS = (Rung("int2-g32-asym"), Rung("int4-g32-asym"), Rung("int8-g32-asym"), Rung(FP16))
SENSITIVITY = {"a.weight": 0.01, "b.weight": 1.0, "c.weight": 200.0}


def model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal((16, 64)).astype(np.float32) for name in SENSITIVITY}


ORIGINAL = model()


def score(weights: dict[str, np.ndarray]) -> float:
    damage = sum(SENSITIVITY[n] * float(np.mean((weights[n] - ORIGINAL[n]) ** 2)) for n in SENSITIVITY)
    return float(np.exp(-damage))


def test_ladder_promotes_exactly_the_sensitive_layers() -> None:
    plan = plan_quality(ORIGINAL, list(SENSITIVITY), RUNGS, score, layer_threshold=0.5, target=0.5)
    chosen = {d.name: plan.rungs[d.rung].label for d in plan.decisions}
    assert chosen["a.weight"].startswith("int2"), chosen
    assert not chosen["c.weight"].startswith("int2"), chosen
    assert plan.promotions >= 1 and any("promote c.weight" in line for line in plan.log)
    damage_c = plan.decisions[2].damage
    assert damage_c[0] > 0.5 and not np.isnan(damage_c[plan.decisions[2].rung])


def test_target_forces_further_promotions_and_is_met() -> None:
    loose = plan_quality(ORIGINAL, list(SENSITIVITY), RUNGS, score, layer_threshold=1.0, target=0.01)
    strict = plan_quality(ORIGINAL, list(SENSITIVITY), RUNGS, score, layer_threshold=1.0, target=0.999)
    assert strict.score >= 0.999 > loose.score
    assert strict.promotions > loose.promotions


def test_fail_fast_raises_with_the_tensor_and_threshold() -> None:
    with pytest.raises(ValidationError, match=r"c\.weight.*exceeds the layer threshold 0\.5"):
        plan_quality(ORIGINAL, list(SENSITIVITY), RUNGS, score, layer_threshold=0.5, target=0.5, fail_fast=True)


def test_budget_mode_spends_bytes_on_the_sensitive_layer() -> None:
    smallest = sum(RUNGS[0].planned_bytes((16, 64)) for _ in SENSITIVITY)
    plan = plan_budget(ORIGINAL, list(SENSITIVITY), RUNGS, score, budget_bytes=smallest + 600)
    chosen = {d.name: d.rung for d in plan.decisions}
    assert chosen["c.weight"] >= 1 and chosen["a.weight"] == 0
    with pytest.raises(ValidationError, match="below the smallest plan"):
        plan_budget(ORIGINAL, list(SENSITIVITY), RUNGS, score, budget_bytes=smallest - 1)


def test_realized_plan_round_trips_with_fp16_rungs(tmp_path: Path) -> None:
    plan = plan_quality(ORIGINAL, list(SENSITIVITY), RUNGS, score, layer_threshold=0.0, target=0.5)
    qmodel = realize({**ORIGINAL, "bias": np.zeros(16, np.float32)}, plan)
    assert qmodel.floats["c.weight"].dtype == np.float16  # threshold 0: climbs to the top rung
    back = aq.load(aq.save(qmodel, tmp_path / "m.parquet"))
    assert back.floats["c.weight"].dtype == np.float16 and "c.weight=FP16" in back.metadata["plan"]
