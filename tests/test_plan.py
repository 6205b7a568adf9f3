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
from arrowquant_core.plan import FP16, Mapper, Rung, plan_budget, plan_quality, realize
from fixtures.parallel import map_ordered

RUNGS = (Rung("int2-g32-asym"), Rung("int4-g32-asym"), Rung("int8-g32-asym"), Rung(FP16))
SENSITIVITY = {"a.weight": 0.01, "b.weight": 1.0, "c.weight": 200.0}


def model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal((16, 64)).astype(np.float32) for name in SENSITIVITY}


ORIGINAL = model()


def score(weights: dict[str, np.ndarray]) -> float:
    damage = sum(SENSITIVITY[n] * float(np.mean((weights[n] - ORIGINAL[n]) ** 2)) for n in SENSITIVITY)
    return float(np.exp(-damage))


def two_threads(fn, items):  # type: ignore[no-untyped-def]
    return map_ordered(fn, items, workers=2)


# every plan is made serially and with the layers' scores side by side (the harness's
# mapper): the same plan either way
MAPPERS = pytest.mark.parametrize("mapper", [None, two_threads], ids=["serial", "two-threads"])


@MAPPERS
def test_ladder_promotes_exactly_the_sensitive_layers(mapper: Mapper | None) -> None:
    plan = plan_quality(ORIGINAL, list(SENSITIVITY), RUNGS, score, layer_threshold=0.5, target=0.5, mapper=mapper)
    chosen = {d.name: plan.rungs[d.rung].label for d in plan.decisions}
    assert chosen["a.weight"].startswith("int2"), chosen
    assert not chosen["c.weight"].startswith("int2"), chosen
    assert plan.promotions >= 1 and any("promote c.weight" in line for line in plan.log)
    damage_c = plan.decisions[2].damage
    assert damage_c[0] > 0.5 and not np.isnan(damage_c[plan.decisions[2].rung])


@MAPPERS
def test_target_forces_further_promotions_and_is_met(mapper: Mapper | None) -> None:
    loose = plan_quality(ORIGINAL, list(SENSITIVITY), RUNGS, score, layer_threshold=1.0, target=0.01, mapper=mapper)
    strict = plan_quality(ORIGINAL, list(SENSITIVITY), RUNGS, score, layer_threshold=1.0, target=0.999, mapper=mapper)
    assert strict.score >= 0.999 > loose.score
    assert strict.promotions > loose.promotions


@MAPPERS
def test_fail_fast_raises_with_the_tensor_and_threshold(mapper: Mapper | None) -> None:
    with pytest.raises(ValidationError, match=r"c\.weight.*exceeds the layer threshold 0\.5"):
        plan_quality(ORIGINAL, list(SENSITIVITY), RUNGS, score, layer_threshold=0.5, target=0.5, fail_fast=True,
                     mapper=mapper)


@MAPPERS
def test_budget_mode_spends_bytes_on_the_sensitive_layer(mapper: Mapper | None) -> None:
    smallest = sum(RUNGS[0].planned_bytes((16, 64)) for _ in SENSITIVITY)
    plan = plan_budget(ORIGINAL, list(SENSITIVITY), RUNGS, score, budget_bytes=smallest + 600, mapper=mapper)
    chosen = {d.name: d.rung for d in plan.decisions}
    assert chosen["c.weight"] >= 1 and chosen["a.weight"] == 0
    with pytest.raises(ValidationError, match="below the smallest plan"):
        plan_budget(ORIGINAL, list(SENSITIVITY), RUNGS, score, budget_bytes=smallest - 1, mapper=mapper)


def test_realized_plan_round_trips_with_fp16_rungs(tmp_path: Path) -> None:
    plan = plan_quality(ORIGINAL, list(SENSITIVITY), RUNGS, score, layer_threshold=0.0, target=0.5)
    qmodel = realize({**ORIGINAL, "bias": np.zeros(16, np.float32)}, plan)
    assert qmodel.floats["c.weight"].dtype == np.float16  # threshold 0: climbs to the top rung
    back = aq.load(aq.save(qmodel, tmp_path / "m.parquet"))
    assert back.floats["c.weight"].dtype == np.float16 and "c.weight=FP16" in back.metadata["plan"]


def test_a_plan_made_side_by_side_equals_the_serial_one() -> None:
    """Layers scored on two threads (sensitivity, ladder climbs, a promotion's two scores)
    give the serial plan: decisions, damages, log and score."""
    for threshold, target in ((0.5, 0.5), (1.0, 0.999), (0.0, 0.9)):
        serial = plan_quality(ORIGINAL, list(SENSITIVITY), RUNGS, score, layer_threshold=threshold, target=target)
        side = plan_quality(ORIGINAL, list(SENSITIVITY), RUNGS, score, layer_threshold=threshold, target=target,
                            mapper=two_threads)
        assert repr(serial) == repr(side)  # repr: NaN (rungs never scored) never equals itself
        assert serial.promotions == sum(d.rung for d in serial.decisions)
