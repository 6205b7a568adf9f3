"""Per-layer sensitivity, the fallback ladder, and automatic mixed precision.

A *rung* is one way to store a tensor: a scheme plus a method, or ``FP16`` (kept in
floating point, half precision). The ladder of the seed documents is
``INT2 -> INT4 -> INT8 -> FP16``: a layer whose damage at its rung exceeds the layer
threshold climbs to the next rung. Damage is measured, not estimated: the caller's
``score(weights)`` runs the model (higher is better, 1.0 = the original), and a layer's
damage at a rung is ``1 - score`` with only that layer quantized (one layer at a time,
the sensitivity pass). The core never runs a model itself; the score is a callback.

Two automatic modes share that data:

- ``plan_quality``: the ladder per layer, then, if the whole model still scores below
  the target, promote the layer whose next rung removes the most damage per added
  byte, re-scoring after each promotion, until the target is met (smallest model that
  meets the bar);
- ``plan_budget``: start every layer on the lowest rung and promote by the same
  benefit-per-byte order while the planned size stays within the budget (best model
  that fits).

Planned sizes use code bits plus per-block scale/zero (or lattice) bytes. They rank
choices only; the harness reports the size measured on disk.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
import math

import numpy as np
import numpy.typing as npt

from arrowquant_core.errors import ConfigurationError, ValidationError
from arrowquant_core.methods import check_method, quantize_tensor
from arrowquant_core.model import Mapper, QuantizedModel, each, passthrough
from arrowquant_core.schemes import SUPER_BLOCK, get_scheme
from arrowquant_core.tensor import QuantizedTensor, as_float32, dequantize, layout

FloatArray = npt.NDArray[np.floating]
F32 = npt.NDArray[np.float32]
Score = Callable[[dict[str, FloatArray]], float]
Log = Callable[[str], None]
FP16 = "fp16"


@dataclass(frozen=True)
class Rung:
    """One storage choice: ``scheme`` + ``method``, or ``FP16`` (scheme == "fp16")."""

    scheme: str
    method: str = "rtn"

    def __post_init__(self) -> None:
        if self.scheme != FP16:
            check_method(self.method, get_scheme(self.scheme))

    @property
    def label(self) -> str:
        return "FP16" if self.scheme == FP16 else f"{self.scheme}/{self.method}"

    def planned_bytes(self, shape: tuple[int, ...]) -> float:
        numel = math.prod(shape)
        if self.scheme == FP16:
            return 2.0 * numel
        scheme = get_scheme(self.scheme)
        rows, _cols, _block, n_groups = layout(shape, scheme)
        # a K-scheme stores a 1-byte scale code per group and an int16 exponent per
        # super-block (kquant.py); others a float32 scale
        scale = (1.0 + 2.0 * scheme.group_size / SUPER_BLOCK) if scheme.scale_bits else 4.0
        per_block = 12.0 if self.method == "residual2" else (scale + (0.0 if scheme.symmetric else 1.0))
        return numel * scheme.bits / 8.0 + rows * n_groups * per_block

    def apply(self, array: FloatArray, name: str, hessian: F32 | None) -> QuantizedTensor | FloatArray:
        if self.scheme == FP16:
            values, _dtype = as_float32(array, name)
            return values.astype(np.float16)
        return quantize_tensor(array, get_scheme(self.scheme), name, self.method, hessian)


@dataclass(frozen=True)
class LayerDecision:
    name: str
    rung: int  # index into the ladder's rungs
    reason: str
    damage: tuple[float, ...]  # measured damage per rung, NaN where not measured
    parameters: int


@dataclass(frozen=True)
class MixedPlan:
    rungs: tuple[Rung, ...]
    decisions: tuple[LayerDecision, ...]
    promotions: int
    score: float  # the whole planned model's score, measured
    log: tuple[str, ...]

    def rung_of(self, name: str) -> Rung:
        for d in self.decisions:
            if d.name == name:
                return self.rungs[d.rung]
        raise ConfigurationError(f"tensor {name!r} is not in the plan")


def _dequantized(item: QuantizedTensor | FloatArray) -> FloatArray:
    if isinstance(item, QuantizedTensor):
        return dequantize(item)
    return item


class _Evaluator:
    """Quantized versions cached per (layer, rung); the sensitivity pass may call
    ``quantized`` and ``score`` from several threads, for different layers."""

    def __init__(self, weights: Mapping[str, FloatArray], rungs: tuple[Rung, ...],
                 hessians: Mapping[str, F32] | None, score: Score) -> None:
        self.weights = dict(weights)
        self.rungs = rungs
        self.hessians = hessians or {}
        self.score_fn = score
        self.cache: dict[tuple[str, int], QuantizedTensor | FloatArray] = {}

    def quantized(self, name: str, rung: int) -> QuantizedTensor | FloatArray:
        key = (name, rung)
        if key not in self.cache:
            self.cache[key] = self.rungs[rung].apply(self.weights[name], name, self.hessians.get(name))
        return self.cache[key]

    def score(self, choice: Mapping[str, int]) -> float:
        trial: dict[str, FloatArray] = dict(self.weights)
        for name, rung in choice.items():
            trial[name] = _dequantized(self.quantized(name, rung))
        return float(self.score_fn(trial))


def sensitivity(weights: Mapping[str, FloatArray], names: list[str], rungs: tuple[Rung, ...],
                score: Score, hessians: Mapping[str, F32] | None = None,
                levels: tuple[int, ...] = (0, 1), progress: Log | None = None,
                mapper: Mapper | None = None) -> dict[str, list[float]]:
    """Damage ``1 - score`` of quantizing each layer alone, at the rungs in ``levels``.

    >>> w = {"a": np.ones((4, 32), np.float32), "b": np.ones((4, 32), np.float32) * 2}
    >>> s = sensitivity(w, ["a"], (Rung("int8-g32-asym"),), lambda t: 1.0, levels=(0,))
    >>> s["a"][0]
    0.0
    """
    return _sensitivity(_Evaluator(weights, rungs, hessians, score), names, levels, progress, mapper)


def _sensitivity(ev: _Evaluator, names: list[str], levels: tuple[int, ...],
                 progress: Log | None, mapper: Mapper | None = None) -> dict[str, list[float]]:
    index = {name: i for i, name in enumerate(names, start=1)}

    def one(name: str) -> list[float]:
        row = [math.nan] * len(ev.rungs)
        for level in levels:
            row[level] = 1.0 - ev.score({name: level})
        if progress is not None:  # with a mapper, from the worker threads (the harness's log locks)
            progress(f"sensitivity {index[name]}/{len(names)} {name}: " + ", ".join(
                f"{ev.rungs[lv].label} {row[lv]:.5f}" for lv in levels))
        return row

    rows = (mapper or each)(one, names)
    return dict(zip(names, rows))


def _next_gain(ev: _Evaluator, damage: dict[str, list[float]], name: str, current: int) -> float:
    """Damage removed per added planned byte by moving ``name`` one rung up.

    Where the next rung's damage is not measured yet it is taken as 0 (each rung up
    removes most of the error: INT4's step is 1/5 of INT2's); this ranks layers by
    damage per byte without a model run per candidate, and every promotion is then
    measured on the whole model.
    """
    nxt = current + 1
    if nxt >= len(ev.rungs):
        return -math.inf
    after = damage[name][nxt]
    shape = tuple(int(d) for d in ev.weights[name].shape)
    extra = ev.rungs[nxt].planned_bytes(shape) - ev.rungs[current].planned_bytes(shape)
    return (damage[name][current] - (0.0 if math.isnan(after) else after)) / max(extra, 1.0)


def plan_quality(weights: Mapping[str, FloatArray], names: list[str], rungs: tuple[Rung, ...],
                 score: Score, layer_threshold: float, target: float,
                 hessians: Mapping[str, F32] | None = None, fail_fast: bool = False,
                 max_promotions: int = 200, progress: Log | None = None,
                 mapper: Mapper | None = None) -> MixedPlan:
    """The ladder per layer, then greedy promotions until the whole model meets ``target``.

    ``fail_fast`` raises ValidationError at the first layer that fails its rung instead
    of promoting it. Every promotion is logged with its measured reason.
    """
    if not 0.0 < target <= 1.0:
        raise ConfigurationError(f"target score {target}: must be in (0, 1]")
    if layer_threshold < 0.0:
        raise ConfigurationError(f"layer_threshold {layer_threshold}: must be >= 0")
    ev = _Evaluator(weights, rungs, hessians, score)
    log: list[str] = []
    damage = _sensitivity(ev, names, (0,), progress, mapper)
    choice: dict[str, int] = {}
    reasons: dict[str, str] = {}

    def climb(name: str) -> tuple[int, str, list[str]]:
        """One layer's ladder (independent of the others': they may climb side by side):
        its rung, the reason, and its log lines, joined in layer order below."""
        rung = 0
        lines: list[str] = []
        reason = f"{rungs[0].label}: damage {damage[name][0]:.5f} <= {layer_threshold:g}"
        while damage[name][rung] > layer_threshold and rung + 1 < len(rungs):
            if fail_fast:
                raise ValidationError(
                    f"tensor {name!r}: damage {damage[name][rung]:.5f} at {rungs[rung].label} exceeds the layer "
                    f"threshold {layer_threshold:g} (fail-fast ladder)")
            rung += 1
            if math.isnan(damage[name][rung]):
                damage[name][rung] = 1.0 - ev.score({name: rung})
            reason = (f"ladder: {rungs[rung - 1].label} damage {damage[name][rung - 1]:.5f} > "
                      f"{layer_threshold:g}, {rungs[rung].label} {damage[name][rung]:.5f}")
            lines.append(f"promote {name} -> {rungs[rung].label} ({reason})")
        return rung, reason, lines

    for name, (rung, reason, lines) in zip(names, (mapper or each)(climb, names)):
        choice[name] = rung
        reasons[name] = reason
        log.extend(lines)
    promotions = sum(choice.values())
    current = ev.score(choice)
    log.append(f"after the ladder: score {current:.5f} (target {target:g}), {promotions} promotion(s)")
    while current < target and promotions < max_promotions:
        gains = {n: _next_gain(ev, damage, n, choice[n]) for n in names}
        best = max(gains, key=lambda n: gains[n])
        if gains[best] == -math.inf:
            break
        choice[best] += 1
        promotions += 1
        trial = dict(choice)
        rung_of_best = choice[best]
        measure_damage = math.isnan(damage[best][rung_of_best])
        ev.quantized(best, rung_of_best)  # once, here: both scores below read it

        def one_score(which: str) -> float:
            # the promoted layer's own damage at its new rung and the whole plan's score
            # do not depend on each other: with a mapper they run side by side
            if which == "layer":
                return 1.0 - ev.score({best: rung_of_best})
            return ev.score(trial)
        scored = (mapper or each)(one_score, ["layer", "plan"] if measure_damage else ["plan"])
        if measure_damage:
            damage[best][rung_of_best] = scored[0]
        current = scored[-1]
        reasons[best] = (f"to reach score {target:g}: most damage removed per byte "
                         f"({damage[best][choice[best] - 1]:.5f} -> {damage[best][choice[best]]:.5f})")
        log.append(f"promote {best} -> {rungs[choice[best]].label}: score {current:.5f}")
        if progress is not None:
            progress(log[-1])
    if current < target:
        log.append(f"target {target:g} not reached: score {current:.5f} with every useful promotion made")
    decisions = tuple(LayerDecision(n, choice[n], reasons[n], tuple(damage[n]), int(ev.weights[n].size))
                      for n in names)
    return MixedPlan(rungs, decisions, promotions, current, tuple(log))


def plan_budget(weights: Mapping[str, FloatArray], names: list[str], rungs: tuple[Rung, ...],
                score: Score, budget_bytes: float, hessians: Mapping[str, F32] | None = None,
                progress: Log | None = None, mapper: Mapper | None = None) -> MixedPlan:
    """Best quality within a planned size: promote by damage removed per byte while it fits."""
    ev = _Evaluator(weights, rungs, hessians, score)
    damage = _sensitivity(ev, names, (0,), progress, mapper)
    choice = {n: 0 for n in names}
    shapes = {n: tuple(int(d) for d in ev.weights[n].shape) for n in names}
    size = sum(rungs[0].planned_bytes(shapes[n]) for n in names)
    if size > budget_bytes:
        raise ValidationError(f"budget {budget_bytes:.0f} bytes is below the smallest plan ({size:.0f} bytes at "
                              f"{rungs[0].label})")
    log: list[str] = []
    promotions = 0
    while True:
        gains = {n: _next_gain(ev, damage, n, choice[n]) for n in names}
        fitting = [n for n in names if gains[n] > 0 and size - rungs[choice[n]].planned_bytes(shapes[n])
                   + rungs[choice[n] + 1].planned_bytes(shapes[n]) <= budget_bytes]
        if not fitting:
            break
        best = max(fitting, key=lambda n: gains[n])
        size += rungs[choice[best] + 1].planned_bytes(shapes[best]) - rungs[choice[best]].planned_bytes(shapes[best])
        choice[best] += 1
        promotions += 1
        log.append(f"promote {best} -> {rungs[choice[best]].label}: planned {size / 1e6:.2f} MB")
    current = ev.score(choice)
    decisions = tuple(LayerDecision(n, choice[n], "budget" if choice[n] else "lowest rung fits",
                                    tuple(damage[n]), int(ev.weights[n].size)) for n in names)
    return MixedPlan(rungs, decisions, promotions, current, tuple(log))


def realize(weights: Mapping[str, FloatArray], plan: MixedPlan, hessians: Mapping[str, F32] | None = None,
            metadata: dict[str, str] | None = None, ties: Mapping[str, str] | None = None,
            mapper: Mapper | None = None) -> QuantizedModel:
    """Quantize every planned tensor at its rung; other tensors stay as they are.

    FP16-rung tensors are stored as float16 float rows; the plan is recorded in the
    model metadata so a reader can check the artifact against it. ``mapper`` may quantize
    the planned tensors side by side (see ``model.Mapper``); the model is the same.
    """
    planned = {d.name: d for d in plan.decisions}
    floating, buffers, tie_map = passthrough(weights, ties)
    tensors: dict[str, QuantizedTensor] = {}
    floats: dict[str, FloatArray] = {}
    names = [name for name in floating if name in planned]

    def apply(name: str) -> QuantizedTensor | FloatArray:
        return plan.rungs[planned[name].rung].apply(floating[name], name, (hessians or {}).get(name))

    done = dict(zip(names, (mapper or each)(apply, names)))
    for name, array in floating.items():
        if name not in done:
            floats[name] = np.array(array, copy=True)
            continue
        item = done[name]
        if isinstance(item, QuantizedTensor):
            tensors[name] = item
        else:
            floats[name] = item
    meta = dict(metadata or {})
    meta["plan"] = ";".join(f"{d.name}={plan.rungs[d.rung].label}" for d in plan.decisions)
    return QuantizedModel(tensors=tensors, floats=floats, order=tuple(weights), metadata=meta,
                          buffers=buffers, ties=tie_map)
