"""Everything one run measures, computed once and shared by the acceptance suite.

The suite's tests ask the ``RunContext`` for a bit width's artifact in two stages:
``written(bits)`` quantizes and writes the Parquet v2 file (size is measured on disk),
``reloaded(bits)`` reads that file back and measures quality on what was read. A fault
that breaks loading therefore still lets the size gates speak. Every value a test
checks goes through ``gate()``, which records it with its verdict for results.json.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
from dataclasses import dataclass, field
import hashlib
import math
from pathlib import Path
import shutil
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

import arrowquant_core as aq
from arrowquant_core.errors import ConfigurationError, QuantizationError
from arrowquant_core.methods import get_method
from arrowquant_core.metrics import cosines_from_sums
from arrowquant_core.model import RAW_DTYPES, QuantizedModel
from arrowquant_core.schemes import Scheme
from arrowquant_core.tensor import blocks_of
from arrowquant_core.plan import FP16, MixedPlan, Rung, plan_budget, plan_quality, realize
from harness.config import RunConfig
from harness.criteria import BitPlan, Criteria
from harness.faults import Fault
from harness.fixtures_import import fixtures_module
from harness.progress import Progress

if TYPE_CHECKING:  # the fixtures package is installed as arrowquant_fixtures: see harness/fixtures_import.py
    from fixtures.checkpoint import Checkpoint
    from harness.external import Deselected, ExternalArtifact

FloatArray = npt.NDArray[np.floating]

# the fixtures package's name differs when installed (harness/fixtures_import.py)
_parallel = fixtures_module("parallel")
map_ordered: Callable[..., list[Any]] = _parallel.map_ordered
threads: Callable[[], int] = _parallel.threads


@dataclass
class Written:
    bits: int
    plan: BitPlan
    model: QuantizedModel | None  # None: a file produced elsewhere (--artifact, harness.external)
    path: Path
    bytes: int
    quantize_seconds: float


@dataclass
class LayerRow:
    name: str
    scheme: str
    method: str  # the method actually stored for this tensor (a fallback says so here)
    shape: tuple[int, ...]
    parameters: int
    cosine: float
    sqnr_db: float
    relative_error: float
    row_cosine_min: float  # worst single row (an embedding table's token vector)
    group_range_ratio_min: float  # dequantized / source value range, over the tensor's groups
    group_range_ratio_max: float


@dataclass
class Accounting:
    """Every tensor of the source, checked in the artifact as read back."""

    missing: list[str]  # in the source, not in the artifact
    unexpected: list[str]  # in the artifact, not in the source
    changed: list[str]  # stored unquantized (float or buffer) but not bit-exact to the source
    dtype_mismatches: list[str]  # dequantized dtype differs from the source's
    nonfinite: list[str]  # dequantized values that are NaN or infinite
    tie_mismatches: list[str]  # ties recorded differently from the ones found in the source


@dataclass
class Reloaded:
    bits: int
    model: QuantizedModel | None  # None: a file produced elsewhere (--artifact, harness.external)
    weights: dict[str, FloatArray]
    load_seconds: float
    layers: list[LayerRow]
    unquantized: list[str]
    roundtrip_exact: bool
    plan_mismatches: list[str]
    source_match: bool
    accounting: Accounting


@dataclass
class GateRecord:
    test: str
    bits: int
    metric: str
    rule: str
    threshold: float
    value: float
    passed: bool | None  # None: not measured because the artifact was produced elsewhere (harness.external)
    why: str


@dataclass
class Baselines:
    fp32_bytes: int
    fp16_bytes: int
    parameters: int
    how: str


@dataclass(repr=False)
class RunContext:
    """The run's shared state. ``repr`` is one line: pytest prints a failing test's
    arguments in its long traceback, and the generated repr printed every weight array,
    reloaded model and table of the run (13 s of a 270 s profiled dream-mini run, which
    fails INT2 by design; every fault-injection run pays it too)."""

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
    plans_by_bits: dict[int, MixedPlan] = field(default_factory=dict)
    plan_seconds: dict[int, float] = field(default_factory=dict)
    calibration_seconds: float = 0.0
    _hessians: dict[str, npt.NDArray[np.float32]] | None = None
    calibrated_names: frozenset[str] = frozenset()
    source_digests: dict[str, str] = field(default_factory=dict)
    _time_aware: dict[str, Any] | None = None  # the time-aware pass's tables, once per run
    time_aware_passes: list[dict[str, Any]] = field(default_factory=list)  # attempts and fallbacks
    _hessian_variants: dict[str, dict[str, npt.NDArray[np.float32]]] | None = None
    hessian_rows: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    external: ExternalArtifact | None = None  # --artifact: a GGUF made elsewhere, judged in place of ours
    deselected: list[Deselected] = field(default_factory=list)  # suite tests that cannot apply to it

    def __post_init__(self) -> None:
        self.source_digests = _digests(self.checkpoint.weights)

    def __repr__(self) -> str:
        return (f"RunContext(model={self.config.model!r}, bits={list(self.bits)}, "
                f"fault={self.config.fault!r}, workdir={str(self.workdir)!r})")

    def modified_source_tensors(self) -> list[str]:
        now = _digests(self.checkpoint.weights)
        return sorted(n for n, d in self.source_digests.items() if now.get(n) != d)

    @property
    def bits(self) -> tuple[int, ...]:
        return self.config.bits or tuple(sorted(self.criteria.plans, reverse=True))

    # --- stages -----------------------------------------------------------------------
    def quantization_config(self, bits: int, method: str | None = None) -> aq.QuantizationConfig:
        config: aq.QuantizationConfig = self.criteria.plan(bits).quantization_config(method)
        return config

    def hessians(self) -> dict[str, npt.NDArray[np.float32]]:
        """Calibration Hessians from the model's runner, captured once per run."""
        if self._hessians is None:
            runner = self.checkpoint.runner
            if runner is None or not hasattr(runner, "calibration_hessians"):
                self._hessians = {}
            else:
                self.progress("capturing calibration activations (GPTQ Hessians)")
                t0 = time.perf_counter()
                if hasattr(runner, "expect_hessians") and self.external is None:
                    runner.expect_hessians()  # the time-aware pass's tables come from the same pass
                self._hessians = runner.calibration_hessians()
                self.calibration_seconds = time.perf_counter() - t0
                self.progress(f"captured {len(self._hessians)} Hessians in {self.calibration_seconds:.1f} s")
            # what the model's runner provides, before any fault: the plan's expectation
            self.calibrated_names = frozenset(self._hessians)
            if self.fault is not None and self.fault.hessians is not None:
                self._hessians = self.fault.hessians(self._hessians)
        return self._hessians

    def mixed_plan(self, bits: int) -> MixedPlan | None:
        """The ladder's plan for ``bits`` (None without a ladder), computed once."""
        spec = self.criteria.plan(bits).ladder
        if spec is None:
            return None
        if bits not in self.plans_by_bits:
            runner = self.checkpoint.runner
            if runner is None or not hasattr(runner, "calibration_score"):
                raise ConfigurationError(f"the ladder needs a model runner with a calibration score; "
                                         f"{self.checkpoint.name!r} has none")
            names = self.matrix_names
            rungs = tuple(Rung(scheme, method) for scheme, method in spec.rungs)
            self.progress(f"INT{bits}: sensitivity pass and ladder over {len(names)} tensors "
                          f"({' -> '.join(r.label for r in rungs)})")
            t0 = time.perf_counter()
            hessians = self.hessians()
            # a runner whose score may run on several threads gets the sensitivity pass's
            # layers side by side (fixtures.parallel); the plan is the same either way
            mapper = map_ordered if getattr(runner, "thread_safe", False) else None
            lock = threading.Lock()
            with self.progress.bar(len(names), f"INT{bits} sensitivity pass") as bar:
                def log(message: str) -> None:
                    # one bar step per layer measured; the ladder's promotions as lines
                    with lock:  # called from the measurement threads
                        if message.startswith("sensitivity "):
                            bar.update(1)
                        else:
                            self.progress(message)
                if spec.budget_mb is not None:
                    self.plans_by_bits[bits] = plan_budget(
                        self.checkpoint.weights, names, rungs, runner.calibration_score(), spec.budget_mb * 1e6,
                        hessians=hessians, progress=log, mapper=mapper)
                else:
                    self.plans_by_bits[bits] = plan_quality(
                        self.checkpoint.weights, names, rungs, runner.calibration_score(), spec.layer_threshold,
                        spec.target, hessians=hessians, fail_fast=spec.fail_fast, progress=log, mapper=mapper)
            self.plan_seconds[bits] = time.perf_counter() - t0
        return self.plans_by_bits[bits]

    def quantize(self, bits: int) -> QuantizedModel:
        """Quantize the checkpoint at ``bits`` (what the benchmark times, too).

        With a ladder, the plan (sensitivity pass) is computed once and not timed here;
        what is timed is quantizing every tensor at its planned rung.
        """
        plan = self.mixed_plan(bits)
        hessians = self.hessians() if self.criteria.plan(bits).needs_calibration else None
        ties = self.checkpoint.ties
        if plan is not None:
            realize_fn = self.fault.realize if self.fault is not None and self.fault.realize else realize
            # planned tensors side by side (fixtures.parallel): the same artifact, byte for byte
            model = realize_fn(self.checkpoint.weights, plan, hessians, ties=ties, mapper=map_ordered)
        else:
            with self.progress.bar(len(self.checkpoint.weights), f"INT{bits} quantizing") as bar:
                # tensors side by side (fixtures.parallel): the same artifact, byte for byte
                model = aq.quantize_model(self.checkpoint.weights, self.quantization_config(bits),
                                          hessians=hessians, ties=ties, progress=lambda _d, _t, _n: bar.update(1),
                                          mapper=map_ordered)
        # the artifact says which weights it was made from, so a stale one is detectable
        model = dataclasses.replace(model, metadata={**model.metadata, SOURCE_KEY: self.source_digest})
        # activation parameters (per time group) are part of the artifact: the runner
        # evaluates the weight-activation configurations with what the file holds
        aux = self.time_aware_pass()
        if aux:
            model = dataclasses.replace(model, aux={**model.aux, **aux})
        if self.fault is not None and self.fault.source is not None:
            self.fault.source(model, self.checkpoint.weights)
        return self.fault.mutate(model) if self.fault is not None else model

    def time_aware_pass(self) -> dict[str, Any]:
        """The runner's activation tables per time group (dream-mini), calibrated once.

        A failing pass raises with ``--fail-fast``; otherwise the run falls back to base
        quantization (weights only, no tables in the artifact), logs the original error
        and counts the fallback (results.json ``fallbacks``); the artifact then lacks its
        tables and the ``activation_tables_stored`` gate says so."""
        runner = self.checkpoint.runner
        if runner is None or not hasattr(runner, "activation_aux"):
            return {}
        if self._time_aware is None:
            if hasattr(runner, "expect_hessians") and any(
                    self.criteria.plan(b).needs_calibration or self.criteria.plan(b).hessian_comparison
                    for b in self.bits):
                runner.expect_hessians()  # one calibration pass for the tables and the Hessians
            produce: Callable[[], dict[str, Any]] = runner.activation_aux
            if self.fault is not None and self.fault.time_aware is not None:
                produce = self.fault.time_aware(produce)
            record: dict[str, Any] = {"pass": "time-aware activation tables", "fell_back": False, "error": None}
            self.time_aware_passes.append(record)
            try:
                self._time_aware = dict(produce())
            except Exception as exc:  # the runner runs the model: any failure is the pass failing
                error = f"{type(exc).__name__}: {exc}"
                if self.config.fail_fast:
                    raise QuantizationError(f"time-aware pass failed (--fail-fast): {error}") from exc
                record.update(fell_back=True, error=error)
                self.progress(f"time-aware pass failed, falling back to base quantization "
                              f"(no activation tables in the artifact): {error}")
                self._time_aware = {}
        return self._time_aware

    def fallbacks(self, bits: int) -> dict[str, Any]:
        """What fell back in this bit width's artifact: per planned weight method, the
        tensors stored with the method's fallback instead (no calibration activations),
        and the time-aware pass (attempted once per run, shared by every bit width)."""
        reloaded = self.reloaded_by_bits.get(bits)
        if reloaded is None or self.external is not None:  # another tool chose a GGUF's types: no plan
            return {"methods": {}, "time_aware": list(self.time_aware_passes)}
        planned = _planned_methods(self, bits)
        stored = {row.name: row.method for row in reloaded.layers}
        methods: dict[str, dict[str, Any]] = {}
        for name, method in planned.items():
            if name not in stored:
                continue
            spec = get_method(method) if method in _method_table() else None
            entry = methods.setdefault(method, {"tensors": 0, "fell_back": 0, "tensors_fell_back": [],
                                                "fallback": spec.fallback if spec and spec.needs_hessian else None})
            entry["tensors"] += 1
            if stored[name] != method:
                entry["fell_back"] += 1
                entry["tensors_fell_back"].append(name)
        for entry in methods.values():
            entry["fallback_rate"] = entry["fell_back"] / entry["tensors"] if entry["tensors"] else 0.0
        return {"methods": methods, "time_aware": list(self.time_aware_passes)}

    def hessian_variants(self) -> dict[str, dict[str, npt.NDArray[np.float32]]]:
        """Every Hessian set the runner captures (dream-mini: plain and mask-aware), once;
        an injected calibration fault corrupts each, as it does the plan's own."""
        if self._hessian_variants is None:
            runner = self.checkpoint.runner
            if runner is None or not hasattr(runner, "hessian_variants"):
                raise ConfigurationError(f"hessian_comparison needs a runner that captures Hessian variants; "
                                         f"{self.checkpoint.name!r} has none")
            self.progress("capturing calibration activations (Hessian variants)")
            variants = {name: fn() for name, fn in runner.hessian_variants().items()}
            if self.fault is not None and self.fault.hessians is not None:
                variants = {name: self.fault.hessians(h) for name, h in variants.items()}
            self._hessian_variants = variants
        return self._hessian_variants

    def hessian_comparison(self, bits: int) -> list[dict[str, Any]]:
        """Each method of the plan's ``hessian_comparison`` with every Hessian variant, at
        this bit width's scheme: quantized, written, reloaded and run on the evaluation set
        (weight-only outputs), one row each, with KL per mask-ratio bucket."""
        if bits in self.hessian_rows:
            return self.hessian_rows[bits]
        plan = self.criteria.plan(bits)
        rows: list[dict[str, Any]] = []
        if plan.hessian_comparison:
            runner = self.checkpoint.runner
            variants = self.hessian_variants()
            folder = self.workdir / "hessians"
            cells = [(m, v) for m in plan.hessian_comparison for v in variants]
            # A batch of as many cells as measurement threads: quantized one after another
            # (each is timed alone, its tensors side by side as the plan's own are), then
            # run on the evaluation set side by side (fixtures.parallel: the figures do not
            # depend on the thread count). A batch holds at most that many reloaded weight sets.
            measure = getattr(runner, "compare_weights_only", None) or runner.compare
            batch = max(1, threads()) if getattr(runner, "thread_safe", False) else 1
            with self.progress.bar(len(cells), f"INT{bits} GPTQ Hessian variants") as bar:
                for start in range(0, len(cells), batch):
                    made: list[tuple[str, str, float, int, dict[str, npt.NDArray[Any]]]] = []
                    for method, variant in cells[start:start + batch]:
                        t0 = time.perf_counter()
                        model = aq.quantize_model(self.checkpoint.weights,
                                                  aq.QuantizationConfig(plan.scheme, method=method),
                                                  hessians=variants[variant], ties=self.checkpoint.ties,
                                                  mapper=map_ordered)
                        seconds = time.perf_counter() - t0
                        path = aq.save(model, folder / f"{self.checkpoint.name}-int{bits}-{method}-{variant}.parquet")
                        calibrated = sum(1 for t in model.tensors.values() if t.method == method)
                        made.append((method, variant, seconds, calibrated, aq.load_weights(path, mapper=map_ordered)))
                    raws = map_ordered(lambda cell: measure(cell[4]), made)
                    for (method, variant, seconds, calibrated, _weights), raw in zip(made, raws):
                        row: dict[str, Any] = {"method": method, "hessian": variant, "scheme": plan.scheme,
                                               "quantize_seconds": seconds, "calibrated_tensors": calibrated}
                        row.update({k: float(raw[k]) for k in HESSIAN_ROW_METRICS
                                    if isinstance(raw.get(k), (int, float))})
                        for group in raw.get("timestep_groups", []):
                            row[f"kl {group['mask_ratio']}"] = group["kl_mean"]
                        rows.append(row)
                        bar.update(1)
        self.hessian_rows[bits] = rows
        self.tables_by_bits.setdefault(bits, {})["hessian_comparison"] = rows
        return rows

    @property
    def matrix_names(self) -> list[str]:
        """Float tensors of 2+ dimensions, each tied tensor once: what gets quantized."""
        ck = self.checkpoint
        return [n for n, a in ck.weights.items()
                if a.ndim >= 2 and n not in ck.ties and a.dtype.name not in RAW_DTYPES]

    @property
    def source_digest(self) -> str:
        """One digest of every source tensor (name, dtype, shape, bytes), fixed at load."""
        digest = hashlib.sha256()
        for name in sorted(self.source_digests):
            digest.update(f"{name}={self.source_digests[name]};".encode())
        return digest.hexdigest()

    def expected_storage(self, bits: int) -> dict[str, str]:
        """What each 2+-D tensor must be stored as: "scheme/method" or "fp16"."""
        plan = self.mixed_plan(bits)
        if plan is not None:
            return {d.name: ("fp16" if plan.rungs[d.rung].scheme == FP16 else
                             f"{plan.rungs[d.rung].scheme}/{_expected_method(plan.rungs[d.rung].method, d.name, self)}")
                    for d in plan.decisions}
        bp = self.criteria.plan(bits)
        config = bp.quantization_config()
        return {n: f"{config.scheme_for(n).name}/{_expected_method(config.method_for(n), n, self)}"
                for n in self.matrix_names}

    def measure_baselines(self) -> Baselines:
        """Write FP32 and FP16 safetensors copies of the weights and measure their bytes."""
        if self.baselines is None:
            from arrowquant_core.safetensors_io import write_safetensors

            folder = self.workdir / ".baselines"
            folder.mkdir(parents=True, exist_ok=True)
            try:
                sizes = {}
                ck = self.checkpoint
                for dtype in (np.float32, np.float16):
                    path = folder / f"{ck.name}-{np.dtype(dtype).name}.safetensors"
                    # tied tensors once; integer buffers as they are (they are not weights)
                    write_safetensors(path, {k: (v if v.dtype.name in RAW_DTYPES else np.asarray(v, dtype=dtype))
                                             for k, v in ck.weights.items() if k not in ck.ties})
                    sizes[np.dtype(dtype).name] = path.stat().st_size
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            self.baselines = Baselines(
                fp32_bytes=sizes["float32"], fp16_bytes=sizes["float16"],
                parameters=self.checkpoint.parameter_count,
                how="FP32 and FP16 safetensors copies of the same weights (tied tensors once, integer buffers as "
                    "they are) written and measured in this run")
        return self.baselines

    def written(self, bits: int) -> Written:
        if self.external is not None and bits not in self.written_by_bits:
            from harness import external

            self.written_by_bits[bits] = external.written(self.external, self, bits)
        if bits not in self.written_by_bits:
            plan = self.criteria.plan(bits)
            # the sensitivity pass and calibration capture are timed and reported apart;
            # quantize_seconds is the quantization that produced this artifact
            self.mixed_plan(bits)
            if plan.needs_calibration:
                self.hessians()
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
        if self.external is not None and bits not in self.reloaded_by_bits:
            from harness import external

            self.reloaded_by_bits[bits] = external.reloaded(self.external, self, bits)
        if bits not in self.reloaded_by_bits:
            written = self.written(bits)
            t0 = time.perf_counter()
            model = aq.load(written.path)
            assert written.model is not None  # our own artifact: written in this run
            weights = model.dequantize(map_ordered)  # tensors side by side (fixtures.parallel)
            seconds = time.perf_counter() - t0
            source = self.checkpoint.weights

            def layer_row(name: str) -> LayerRow:
                qt = model.tensors[name]
                ref = np.asarray(source[name], dtype=np.float32)
                got = np.asarray(weights[name], dtype=np.float32)
                lo, hi = group_range_ratios(*stored_basis(ref, got, qt.method), qt.scheme)
                return LayerRow(name, qt.scheme.name, qt.method, qt.shape, qt.numel, aq.cosine(ref, got),
                                aq.sqnr_db(ref, got), aq.relative_error(ref, got), row_cosine_min(ref, got), lo, hi)
            # per-tensor metrics after the timed load, tensors side by side (fixtures.parallel);
            # a tensor the source lacks is counted as unexpected by the accounting below
            layers = map_ordered(layer_row, [n for n in model.tensors if n in source])
            expected = self.expected_storage(bits)
            stored = stored_as(model)
            unquantized = [n for n, a in model.floats.items() if a.ndim >= 2 and expected.get(n) != "fp16"]
            mismatches = sorted(n for n in expected if stored.get(n) != expected[n])
            self.reloaded_by_bits[bits] = Reloaded(bits, model, weights, seconds, layers, unquantized,
                                                   _same_codes(written.model, model), mismatches,
                                                   model.metadata.get(SOURCE_KEY) == self.source_digest,
                                                   self.account(model, weights, expected))
        return self.reloaded_by_bits[bits]

    def account(self, model: QuantizedModel, weights: Mapping[str, Any], expected: Mapping[str, str]) -> Accounting:
        """Compare the artifact's tensor set, kept tensors, dtypes and ties with the source."""
        source = self.checkpoint.weights
        missing = [n for n in source if n not in weights]
        unexpected = [n for n in weights if n not in source]
        changed = []
        for name in [*model.floats, *model.buffers]:
            if name not in source:
                continue
            kept = model.floats.get(name, model.buffers.get(name))
            want = source[name]
            if expected.get(name) == "fp16":  # the ladder's FP16 rung: a deliberate float16 copy
                want = np.asarray(want, dtype=np.float16)
            if kept is None or kept.dtype != want.dtype or kept.shape != want.shape or \
                    np.ascontiguousarray(kept).tobytes() != np.ascontiguousarray(want).tobytes():
                changed.append(name)
        dtype_mismatches = [n for n, a in weights.items() if n in source and expected.get(n) != "fp16"
                            and a.dtype != source[n].dtype]
        nonfinite = [n for n, a in weights.items()
                     if (a.dtype.kind == "f" or a.dtype.name == "bfloat16") and not bool(np.all(np.isfinite(a)))]
        ties = self.checkpoint.ties
        tie_mismatches = sorted({n for n in set(ties) | set(model.ties) if ties.get(n) != model.ties.get(n)})
        return Accounting(missing, unexpected, changed, dtype_mismatches, nonfinite, tie_mismatches)

    def output_metrics(self, bits: int) -> dict[str, float]:
        if self.checkpoint.runner is None:
            raise RuntimeError("no runner for this model: output-level metrics are not available")
        if bits not in self.output_by_bits:
            runner = self.checkpoint.runner
            # A runner whose compare may run on several threads (and does not already use
            # them itself) measures every bit width already reloaded side by side
            # (fixtures.parallel); the others' tests then read the figures. A failure
            # belongs to its own bit width's test: one seen here for another bit width is
            # dropped and met again in that test.
            self.reloaded(bits)  # loaded here, alone: its load time is a gate
            todo = [bits]
            side_by_side = getattr(runner, "thread_safe", False) and not getattr(runner, "parallel_compare", False)
            if side_by_side:
                todo += [b for b in self.bits
                         if b != bits and b not in self.output_by_bits and b in self.reloaded_by_bits]
            self.progress(f"INT{', INT'.join(map(str, todo))}: running the model on the evaluation set")

            # A thread-safe runner's prepare (e.g. the original model's outputs, which every
            # comparison reads) is one more task beside the comparisons, not a wait before
            # them -- with one bit width too (the edge profile's INT2, --bits 4).
            prepare = getattr(runner, "prepare", None) if side_by_side else None
            tasks: list[int | None] = ([None] if prepare is not None else []) + list(todo)

            def measure(b: int | None) -> tuple[dict[str, Any] | None, Exception | None]:
                try:
                    if b is None:  # the prepare task
                        assert prepare is not None
                        prepare()
                        return {}, None
                    reloaded = self.reloaded(b)
                    aux = reloaded.model.aux if reloaded.model is not None else {}
                    raw = (runner.compare(reloaded.weights, aux=aux) if hasattr(runner, "activation_aux")
                           else runner.compare(reloaded.weights))
                    return raw, None
                except Exception as exc:  # re-raised below for this test's bit width only
                    return None, exc
            for b, (raw, error) in zip(tasks, map_ordered(measure, tasks)):
                if b is None:
                    continue  # a failure to prepare shows again in the comparisons that need it
                if error is not None:
                    if b == bits:
                        raise error
                    continue
                assert raw is not None
                # scalars are metrics (gated or reported); lists are tables for the report
                self.output_by_bits[b] = {k: float(v) for k, v in raw.items() if isinstance(v, (int, float))}
                self.tables_by_bits.setdefault(b, {}).update(
                    {k: v for k, v in raw.items() if not isinstance(v, (int, float))})
        return self.output_by_bits[bits]

    def compared_methods(self, bits: int) -> tuple[str, ...]:
        """Row labels of the comparison: our methods, then llama.cpp's peer formats."""
        from harness.peers import LABEL_PREFIX

        plan = self.criteria.plan(bits)
        return (*plan.compare, *(LABEL_PREFIX + p for p in plan.peers)) if self.config.compare else ()

    def compare_methods(self, bits: int) -> list[dict[str, Any]]:
        """Quantize the whole model with each compared method at this bit width's scheme,
        write it, reload it, and measure size, time and quality on the same inputs."""
        rows: list[dict[str, Any]] = []
        folder = self.workdir / "compare"
        plan = self.criteria.plan(bits)
        methods = plan.compare if self.config.compare else ()
        with self.progress.bar(len(methods), f"INT{bits} comparing methods") as bar:
            for method in methods:
                config = self.quantization_config(bits, method)  # same per-tensor overrides
                hessians = self.hessians() if get_method(method).needs_hessian else None
                self.progress(f"INT{bits}: comparing method {method}")
                t0 = time.perf_counter()
                model = aq.quantize_model(self.checkpoint.weights, config, hessians=hessians,
                                          ties=self.checkpoint.ties)
                seconds = time.perf_counter() - t0
                path = aq.save(model, folder / f"{self.checkpoint.name}-int{bits}-{method}.parquet")
                size = path.stat().st_size
                weights = aq.load_weights(path)
                matrices = [n for n in model.tensors]
                signal = sum(float(np.sum(np.square(self.checkpoint.weights[n], dtype=np.float64))) for n in matrices)
                noise = sum(float(np.sum(np.square(np.asarray(weights[n], np.float64) - self.checkpoint.weights[n])))
                            for n in matrices)
                row: dict[str, Any] = {
                    "method": method, "scheme": plan.scheme, "quantize_seconds": seconds,
                    "size_mb": size / 1e6, "bits_per_weight": size * 8 / self.checkpoint.parameter_count,
                    "weight_sqnr_db": 10 * math.log10(signal / noise) if noise > 0 else math.inf,
                    "calibrated_tensors": sum(1 for t in model.tensors.values() if t.method == method),
                }
                if self.checkpoint.runner is not None:
                    raw = self.checkpoint.runner.compare(weights)
                    row.update({k: float(v) for k, v in raw.items() if isinstance(v, (int, float))})
                rows.append(row)
                bar.update(1)
        if self.config.compare and plan.peers:  # llama.cpp's formats (gguf-py), same tensors and sentences
            from harness.peers import compare_rows

            runner = self.checkpoint.runner
            rows += compare_rows(self.checkpoint.weights, plan.peers, folder, self.checkpoint.name,
                                 runner.compare if runner is not None else None, self.progress, self.hessians)
        self.tables_by_bits.setdefault(bits, {})["methods"] = rows
        return rows

    # --- gates ------------------------------------------------------------------------
    def gate(self, test: str, bits: int, measured: Mapping[str, float],
             not_applicable: Mapping[str, str] | None = None) -> None:
        """Record ``measured`` and check every criterion on those metrics; fail with all
        violations at once so one run shows every broken gate. ``not_applicable`` names
        metrics that do not exist for this model (with the reason): their criteria are
        recorded as not applicable, never as measured values."""
        plan = self.criteria.plan(bits)
        self.values.setdefault(bits, {}).update({k: float(v) for k, v in measured.items()})
        for criterion in plan.gates:
            if not_applicable and criterion.metric in not_applicable:
                self.gates.append(GateRecord(test, bits, criterion.metric, criterion.rule, criterion.threshold,
                                             math.nan, True, f"NOT APPLICABLE: {not_applicable[criterion.metric]}"))
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
        recorded as failed with a NaN value, so an unverified gate never reads as a pass.
        Those of tests deselected for a file made elsewhere are ``elsewhere_criteria``."""
        seen = {(g.bits, g.rule) for g in self.gates} | {(g.bits, g.rule) for g in self.elsewhere_criteria()}
        return [GateRecord("not measured", c.bits, c.metric, c.rule, c.threshold, math.nan, False, c.why)
                for b in self.bits for c in self.criteria.plan(b).gates if (b, c.rule) not in seen]

    def elsewhere_criteria(self) -> list[GateRecord]:
        """Criteria on the metrics of suite tests deselected for a file produced elsewhere
        (``harness.external``): NaN value, ``passed`` None, the reason in ``why``."""
        from harness.external import NOT_MEASURED

        seen = {(g.bits, g.rule) for g in self.gates}
        out = []
        for b in self.bits:
            for c in self.criteria.plan(b).gates:
                test = next((d for d in self.deselected if c.metric in d.metrics), None)
                if test is not None and (b, c.rule) not in seen:
                    out.append(GateRecord(test.test, b, c.metric, c.rule, c.threshold, math.nan, None,
                                          f"{NOT_MEASURED} ({test.why}); the criterion: {c.why}"))
        return out


SOURCE_KEY = "source_digest"
# the columns of the Hessian comparison's rows (besides KL per mask-ratio bucket)
HESSIAN_ROW_METRICS = ("kl_mean", "masked_top1_agreement", "top1_agreement_worst_group", "frontier_flip_rate4",
                       "frontier_flip_rate8", "output_cosine_mean")


def _digests(weights: Mapping[str, FloatArray]) -> dict[str, str]:
    """blake2b of each tensor's dtype, shape and bytes, tensors side by side (hashlib
    releases the GIL on large buffers: 90 MB of MiniLM in ~0.13 s on two threads, 0.24 s
    on one)."""
    def digest(array: FloatArray) -> str:
        h = hashlib.blake2b(f"{array.dtype.name}{list(array.shape)}".encode(), digest_size=16)
        h.update(np.ascontiguousarray(array).view(np.uint8).data)
        return h.hexdigest()

    return dict(zip(weights, map_ordered(digest, list(weights.values()))))


def _method_table() -> set[str]:
    from arrowquant_core.methods import METHODS

    return set(METHODS)


def _planned_methods(ctx: RunContext, bits: int) -> dict[str, str]:
    """The weight method the plan (config or ladder) chose for each quantized tensor,
    before any fallback."""
    plan = ctx.mixed_plan(bits)
    if plan is not None:
        return {d.name: plan.rungs[d.rung].method for d in plan.decisions if plan.rungs[d.rung].scheme != FP16}
    config = ctx.criteria.plan(bits).quantization_config()
    return {n: config.method_for(n) for n in ctx.matrix_names}


def _expected_method(method: str, name: str, ctx: RunContext) -> str:
    """Hessian methods fall back to their named fallback (clip search for GPTQ) on tensors
    without a Hessian; the criteria must allow it (``fallback = ...``, checked up front)."""
    spec = get_method(method)
    if not spec.needs_hessian:
        return method
    ctx.hessians()  # make sure calibration ran, so calibrated_names is known
    if name not in ctx.calibrated_names:
        return spec.fallback
    return method


def stored_as(model: QuantizedModel) -> dict[str, str]:
    out = {n: f"{t.scheme.name}/{t.method}" for n, t in model.tensors.items()}
    out.update({n: "fp16" for n, a in model.floats.items() if a.ndim >= 2 and a.dtype == np.float16})
    return out


def _same_codes(a: QuantizedModel, b: QuantizedModel) -> bool:
    """Bit-exact equality of codes, scales and zero points between two models."""
    if set(a.tensors) != set(b.tensors):
        return False
    for name, qa in a.tensors.items():
        qb = b.tensors[name]
        if (qa.scheme != qb.scheme or qa.shape != qb.shape or qa.method != qb.method
                or qa.codes.tobytes() != qb.codes.tobytes()
                or qa.scales.tobytes() != qb.scales.tobytes()
                or qa.zeros.tobytes() != qb.zeros.tobytes()
                or qa.params.tobytes() != qb.params.tobytes()):
            return False
    return True


EMBEDDING_NAMES = ("embeddings.", "embed_tokens", "embedding_table", "word_embeddings", "tok_embeddings",
                   "wte.weight", "wpe.weight")


def is_embedding_table(name: str) -> bool:
    """Tables looked up by row (token, position, type, class embeddings): a swapped row
    there is another token's vector, which no per-tensor figure can see. Known by the
    names transformers, sentence-transformers, GPT-2, Llama and DiT give them."""
    return any(key in name for key in EMBEDDING_NAMES)


def row_cosine_min(reference: npt.NDArray[np.float32], test: npt.NDArray[np.float32]) -> float:
    """The worst row's cosine (rows = first axis; ``arrowquant_core.metrics.cosines_from_sums``):
    rows that are zero in the source count as 1 when they stay exactly zero and 0 otherwise,
    a row with a NaN or an infinity makes it NaN. A per-tensor cosine hides 64
    swapped rows of a 30,522-row embedding table; this does not."""
    ref = reference.reshape(reference.shape[0], -1).astype(np.float64)
    got = test.reshape(test.shape[0], -1).astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):  # a non-finite row is NaN: the minimum is NaN
        cos = cosines_from_sums(np.einsum("ij,ij->i", ref, got), np.sum(ref * ref, axis=1),
                                np.sum(got * got, axis=1))
    return float(cos.min()) if cos.size else 1.0


def group_range_ratios(reference: npt.NDArray[np.float32], test: npt.NDArray[np.float32],
                       scheme: Scheme) -> tuple[float, float]:
    """(min, max) over the tensor's quantization groups of dequantized range / source range.

    A correct quantizer keeps each group's range close to the source's (clipping shrinks
    it a little, rounding moves it by at most a step); a few groups with a wrong scale
    stand out here although the tensor's cosine barely moves. Groups whose source range
    is zero are left out."""
    ref_blocks, _ = blocks_of(np.ascontiguousarray(reference, dtype=np.float32), scheme)
    got_blocks, _ = blocks_of(np.ascontiguousarray(test, dtype=np.float32), scheme)
    return block_range_ratios(ref_blocks, got_blocks)


def block_range_ratios(reference: npt.NDArray[np.float32], test: npt.NDArray[np.float32]) -> tuple[float, float]:
    """(min, max) over the rows of two ``(blocks, block)`` arrays of dequantized range /
    source range, leaving out blocks whose source range is zero (1, 1 when all are)."""
    ref_range = np.ptp(reference, axis=1).astype(np.float64)
    got_range = np.ptp(test, axis=1).astype(np.float64)
    keep = ref_range > 0
    if not bool(np.any(keep)):
        return 1.0, 1.0
    ratio = got_range[keep] / ref_range[keep]
    return float(ratio.min()), float(ratio.max())


def stored_basis(reference: npt.NDArray[np.float32], test: npt.NDArray[np.float32],
                 method: str) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Source and dequantized weights in the basis the codes' groups live in.

    A Hadamard-rotated method (``rotation.ROTATED_METHODS``) groups the *rotated* weight
    ``W R``; unrotating spreads each group's rounding error over its block, so a group of
    ``Q(W R) R^T`` may span several times its source range although every stored scale is
    right (MiniLM INT4 gptq-kh measured 3.2, INT2 18). The ratio is taken where the scales
    act: ``W R`` against ``Q(W R) R^T R``, so a wrong scale still stands out."""
    from arrowquant_core.rotation import ROTATED_METHODS, rotate

    block = ROTATED_METHODS.get(method)
    if block is None or reference.ndim != 2 or int(reference.shape[1]) % block:
        return reference, test
    return (rotate(reference, block).astype(np.float32, copy=False),
            rotate(np.asarray(test, dtype=np.float32), block).astype(np.float32, copy=False))


def finite_mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan

