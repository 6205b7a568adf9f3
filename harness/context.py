"""Everything one run measures, computed once and shared by the acceptance suite.

The suite's tests ask the ``RunContext`` for a bit width's artifact in two stages:
``written(bits)`` quantizes and writes the Parquet v2 file (size is measured on disk),
``reloaded(bits)`` reads that file back and measures quality on what was read. A fault
that breaks loading therefore still lets the size gates speak. Every value a test
checks goes through ``gate()``, which records it with its verdict for results.json.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
import math
from pathlib import Path
import shutil
import sys
import time
from typing import Any

import numpy as np
import numpy.typing as npt

import arrowquant_core as aq
from arrowquant_core.model import QuantizedModel
from fixtures.checkpoint import Checkpoint
from harness.config import RunConfig
from harness.criteria import BitPlan, Criteria
from harness.faults import Fault

FloatArray = npt.NDArray[np.floating]


@dataclass
class Written:
    bits: int
    plan: BitPlan
    model: QuantizedModel
    path: Path
    bytes: int
    quantize_seconds: float


@dataclass
class LayerRow:
    name: str
    scheme: str
    shape: tuple[int, ...]
    parameters: int
    cosine: float
    sqnr_db: float
    relative_error: float


@dataclass
class Reloaded:
    bits: int
    model: QuantizedModel
    weights: dict[str, FloatArray]
    load_seconds: float
    layers: list[LayerRow]
    unquantized: list[str]
    roundtrip_exact: bool


@dataclass
class GateRecord:
    test: str
    bits: int
    metric: str
    rule: str
    threshold: float
    value: float
    passed: bool
    why: str


@dataclass
class Baselines:
    fp32_bytes: int
    fp16_bytes: int
    parameters: int
    how: str


class Progress:
    """Progress lines on stderr, so stdout stays clean for pipes."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.start:6.1f}s] {message}", file=sys.stderr, flush=True)


@dataclass
class RunContext:
    config: RunConfig
    checkpoint: Checkpoint
    criteria: Criteria
    workdir: Path
    progress: Progress
    fault: Fault | None = None
    baselines: Baselines | None = None
    values: dict[int, dict[str, float]] = field(default_factory=dict)
    gates: list[GateRecord] = field(default_factory=list)
    written_by_bits: dict[int, Written] = field(default_factory=dict)
    reloaded_by_bits: dict[int, Reloaded] = field(default_factory=dict)
    output_by_bits: dict[int, dict[str, float]] = field(default_factory=dict)
    tables_by_bits: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def bits(self) -> tuple[int, ...]:
        return self.config.bits or tuple(sorted(self.criteria.plans, reverse=True))

    # --- stages -----------------------------------------------------------------------
    def quantization_config(self, bits: int) -> aq.QuantizationConfig:
        return aq.QuantizationConfig(self.criteria.plan(bits).scheme)

    def quantize(self, bits: int) -> QuantizedModel:
        """Quantize the checkpoint at ``bits`` (what the benchmark times, too)."""
        model = aq.quantize_model(self.checkpoint.weights, self.quantization_config(bits))
        return self.fault.mutate(model) if self.fault is not None else model

    def measure_baselines(self) -> Baselines:
        """Write FP32 and FP16 safetensors copies of the weights and measure their bytes."""
        if self.baselines is None:
            from arrowquant_core.safetensors_io import write_safetensors

            folder = self.workdir / ".baselines"
            folder.mkdir(parents=True, exist_ok=True)
            try:
                sizes = {}
                for dtype in (np.float32, np.float16):
                    path = folder / f"{self.checkpoint.name}-{np.dtype(dtype).name}.safetensors"
                    write_safetensors(path, {k: np.asarray(v, dtype=dtype)
                                             for k, v in self.checkpoint.weights.items()})
                    sizes[np.dtype(dtype).name] = path.stat().st_size
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            self.baselines = Baselines(
                fp32_bytes=sizes["float32"], fp16_bytes=sizes["float16"],
                parameters=self.checkpoint.parameter_count,
                how="FP32 and FP16 safetensors copies of the same weights written and measured in this run")
        return self.baselines

    def written(self, bits: int) -> Written:
        if bits not in self.written_by_bits:
            plan = self.criteria.plan(bits)
            self.progress(f"INT{bits}: quantizing {len(self.checkpoint.weights)} tensors with {plan.scheme}")
            t0 = time.perf_counter()
            model = self.quantize(bits)
            seconds = time.perf_counter() - t0
            path = self.workdir / f"{self.checkpoint.name}-int{bits}.parquet"
            if self.fault is not None and self.fault.save is not None:
                self.fault.save(model, path)
            else:
                aq.save(model, path)
            size = path.stat().st_size
            self.progress(f"INT{bits}: wrote {path} ({size / 1e6:.2f} MB) in {seconds:.2f} s")
            self.written_by_bits[bits] = Written(bits, plan, model, path, size, seconds)
        return self.written_by_bits[bits]

    def reloaded(self, bits: int) -> Reloaded:
        if bits not in self.reloaded_by_bits:
            written = self.written(bits)
            t0 = time.perf_counter()
            model = aq.load(written.path)
            weights = model.dequantize()
            seconds = time.perf_counter() - t0
            layers = []
            for name, qt in model.tensors.items():
                ref = np.asarray(self.checkpoint.weights[name], dtype=np.float32)
                got = np.asarray(weights[name], dtype=np.float32)
                layers.append(LayerRow(name, qt.scheme.name, qt.shape, qt.numel, aq.cosine(ref, got),
                                       aq.sqnr_db(ref, got), aq.relative_error(ref, got)))
            unquantized = [n for n, a in model.floats.items() if a.ndim >= 2]
            self.reloaded_by_bits[bits] = Reloaded(bits, model, weights, seconds, layers, unquantized,
                                            _same_codes(written.model, model))
        return self.reloaded_by_bits[bits]

    def output_metrics(self, bits: int) -> dict[str, float]:
        if self.checkpoint.runner is None:
            raise RuntimeError("no runner for this model: output-level metrics are not available")
        if bits not in self.output_by_bits:
            self.progress(f"INT{bits}: running the model on the evaluation set")
            raw = self.checkpoint.runner.compare(self.reloaded(bits).weights)
            # scalars are metrics (gated or reported); lists are tables for the report
            self.output_by_bits[bits] = {k: float(v) for k, v in raw.items() if isinstance(v, (int, float))}
            self.tables_by_bits[bits] = {k: v for k, v in raw.items() if not isinstance(v, (int, float))}
        return self.output_by_bits[bits]

    # --- gates ------------------------------------------------------------------------
    def gate(self, test: str, bits: int, measured: Mapping[str, float]) -> None:
        """Record ``measured`` and check every criterion on those metrics; fail with all
        violations at once so one run shows every broken gate."""
        plan = self.criteria.plan(bits)
        self.values.setdefault(bits, {}).update({k: float(v) for k, v in measured.items()})
        failures = []
        for criterion in plan.gates:
            if criterion.metric not in measured:
                continue
            value = float(measured[criterion.metric])
            problem = criterion.check(value)
            self.gates.append(GateRecord(test, bits, criterion.metric, criterion.rule,
                                         criterion.threshold, value, problem is None, criterion.why))
            if problem is not None:
                failures.append(problem)
        if failures:
            raise AssertionError("\n".join(failures))

    def unmeasured_criteria(self) -> list[GateRecord]:
        """Criteria no test checked (their test errored first, or the suite lacks one):
        recorded as failed with a NaN value, so an unverified gate never reads as a pass."""
        seen = {(g.bits, g.rule) for g in self.gates}
        return [GateRecord("not measured", c.bits, c.metric, c.rule, c.threshold, math.nan, False, c.why)
                for b in self.bits for c in self.criteria.plan(b).gates if (b, c.rule) not in seen]


def _same_codes(a: QuantizedModel, b: QuantizedModel) -> bool:
    """Bit-exact equality of codes, scales and zero points between two models."""
    if set(a.tensors) != set(b.tensors):
        return False
    for name, qa in a.tensors.items():
        qb = b.tensors[name]
        if (qa.scheme != qb.scheme or qa.shape != qb.shape
                or qa.codes.tobytes() != qb.codes.tobytes()
                or qa.scales.tobytes() != qb.scales.tobytes()
                or qa.zeros.tobytes() != qb.zeros.tobytes()):
            return False
    return True


def finite_mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


Hook = Callable[[QuantizedModel], QuantizedModel]
__all__ = ["RunContext", "Written", "Reloaded", "LayerRow", "GateRecord", "Baselines", "Progress",
           "Hook", "Any"]
