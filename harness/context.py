"""Everything one run measures, computed once and shared by the acceptance suite.

The suite's tests ask the ``RunContext`` for a bit width's artifact in two stages:
``written(bits)`` quantizes and writes the Parquet v2 file (size is measured on disk),
``reloaded(bits)`` reads that file back and measures quality on what was read. A fault
that breaks loading therefore still lets the size gates speak. Every value a test
checks goes through ``gate()``, which records it with its verdict for results.json.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
from dataclasses import dataclass, field
import hashlib
import math
from pathlib import Path
import shutil
import sys
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

import arrowquant_core as aq
from arrowquant_core.errors import ConfigurationError
from arrowquant_core.methods import get_method
from arrowquant_core.model import RAW_DTYPES, QuantizedModel
from arrowquant_core.schemes import Scheme
from arrowquant_core.tensor import blocks_of
from arrowquant_core.plan import FP16, MixedPlan, Rung, plan_budget, plan_quality, realize
from harness.config import RunConfig
from harness.criteria import BitPlan, Criteria
from harness.faults import Fault
from harness.progress import Progress

if TYPE_CHECKING:  # the fixtures package is installed as arrowquant_fixtures: see harness/fixtures_import.py
    from fixtures.checkpoint import Checkpoint

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
    model: QuantizedModel
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
    passed: bool
    why: str


@dataclass
class Baselines:
    fp32_bytes: int
    fp16_bytes: int
    parameters: int
    how: str


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
    plans_by_bits: dict[int, MixedPlan] = field(default_factory=dict)
    plan_seconds: dict[int, float] = field(default_factory=dict)
    calibration_seconds: float = 0.0
    _hessians: dict[str, npt.NDArray[np.float32]] | None = None
    calibrated_names: frozenset[str] = frozenset()
    source_digests: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.source_digests = _digests(self.checkpoint.weights)

    def modified_source_tensors(self) -> list[str]:
        now = _digests(self.checkpoint.weights)
        return sorted(n for n, d in self.source_digests.items() if now.get(n) != d)

    @property
    def bits(self) -> tuple[int, ...]:
        return self.config.bits or tuple(sorted(self.criteria.plans, reverse=True))

    # --- stages -----------------------------------------------------------------------
    def quantization_config(self, bits: int, method: str | None = None) -> aq.QuantizationConfig:
        plan = self.criteria.plan(bits)
        return aq.QuantizationConfig(plan.scheme, method=method or plan.method)

    def hessians(self) -> dict[str, npt.NDArray[np.float32]]:
        """Calibration Hessians from the model's runner, captured once per run."""
        if self._hessians is None:
            runner = self.checkpoint.runner
            if runner is None or not hasattr(runner, "calibration_hessians"):
                self._hessians = {}
            else:
                self.progress("capturing calibration activations (GPTQ Hessians)")
                t0 = time.perf_counter()
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
            with self.progress.bar(len(names), f"INT{bits} sensitivity pass") as bar:
                def log(message: str) -> None:
                    # one bar step per layer measured; the ladder's promotions as lines
                    if message.startswith("sensitivity "):
                        bar.update(1)
                    else:
                        self.progress(message)
                if spec.budget_mb is not None:
                    self.plans_by_bits[bits] = plan_budget(
                        self.checkpoint.weights, names, rungs, runner.calibration_score(), spec.budget_mb * 1e6,
                        hessians=hessians, progress=log)
                else:
                    self.plans_by_bits[bits] = plan_quality(
                        self.checkpoint.weights, names, rungs, runner.calibration_score(), spec.layer_threshold,
                        spec.target, hessians=hessians, fail_fast=spec.fail_fast, progress=log)
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
            model = realize_fn(self.checkpoint.weights, plan, hessians, ties=ties)
        else:
            with self.progress.bar(len(self.checkpoint.weights), f"INT{bits} quantizing") as bar:
                model = aq.quantize_model(self.checkpoint.weights, self.quantization_config(bits),
                                          hessians=hessians, ties=ties, progress=lambda _d, _t, _n: bar.update(1))
        # the artifact says which weights it was made from, so a stale one is detectable
        model = dataclasses.replace(model, metadata={**model.metadata, SOURCE_KEY: self.source_digest})
        runner = self.checkpoint.runner
        if runner is not None and hasattr(runner, "activation_aux"):
            # activation parameters (per time group) are part of the artifact: the runner
            # evaluates the weight-activation configurations with what the file holds
            model = dataclasses.replace(model, aux={**model.aux, **runner.activation_aux()})
        return self.fault.mutate(model) if self.fault is not None else model

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
        return {n: f"{bp.scheme}/{_expected_method(bp.method, n, self)}" for n in self.matrix_names}

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
        if bits not in self.reloaded_by_bits:
            written = self.written(bits)
            t0 = time.perf_counter()
            model = aq.load(written.path)
            weights = model.dequantize()
            seconds = time.perf_counter() - t0
            layers = []
            source = self.checkpoint.weights
            for name, qt in model.tensors.items():
                if name not in source:
                    continue  # counted as unexpected by the accounting below
                ref = np.asarray(source[name], dtype=np.float32)
                got = np.asarray(weights[name], dtype=np.float32)
                lo, hi = group_range_ratios(*stored_basis(ref, got, qt.method), qt.scheme)
                layers.append(LayerRow(name, qt.scheme.name, qt.method, qt.shape, qt.numel, aq.cosine(ref, got),
                                       aq.sqnr_db(ref, got), aq.relative_error(ref, got),
                                       row_cosine_min(ref, got), lo, hi))
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
            self.progress(f"INT{bits}: running the model on the evaluation set")
            runner = self.checkpoint.runner
            reloaded = self.reloaded(bits)
            raw = (runner.compare(reloaded.weights, aux=reloaded.model.aux) if hasattr(runner, "activation_aux")
                   else runner.compare(reloaded.weights))
            # scalars are metrics (gated or reported); lists are tables for the report
            self.output_by_bits[bits] = {k: float(v) for k, v in raw.items() if isinstance(v, (int, float))}
            self.tables_by_bits[bits] = {k: v for k, v in raw.items() if not isinstance(v, (int, float))}
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
                config = aq.QuantizationConfig(plan.scheme, method=method)
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
                                 runner.compare if runner is not None else None, self.progress)
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
        recorded as failed with a NaN value, so an unverified gate never reads as a pass."""
        seen = {(g.bits, g.rule) for g in self.gates}
        return [GateRecord("not measured", c.bits, c.metric, c.rule, c.threshold, math.nan, False, c.why)
                for b in self.bits for c in self.criteria.plan(b).gates if (b, c.rule) not in seen]


SOURCE_KEY = "source_digest"


def _digests(weights: Mapping[str, FloatArray]) -> dict[str, str]:
    out = {}
    for name, array in weights.items():
        digest = hashlib.blake2b(f"{array.dtype.name}{list(array.shape)}".encode(), digest_size=16)
        digest.update(np.ascontiguousarray(array).view(np.uint8).data)
        out[name] = digest.hexdigest()
    return out


def _expected_method(method: str, name: str, ctx: RunContext) -> str:
    """Hessian methods fall back to their named fallback (clip search for GPTQ) on tensors
    without a Hessian; the criteria must allow it (``fallback = ...``, checked up front)."""
    ctx.hessians()  # make sure calibration ran, so calibrated_names is known
    spec = get_method(method)
    if spec.needs_hessian and name not in ctx.calibrated_names:
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
    """The worst row's cosine (rows = first axis); rows that are zero in the source count
    as 1 when they stay exactly zero and 0 otherwise. A per-tensor cosine hides 64
    swapped rows of a 30,522-row embedding table; this does not."""
    ref = reference.reshape(reference.shape[0], -1).astype(np.float64)
    got = test.reshape(test.shape[0], -1).astype(np.float64)
    dot = np.einsum("ij,ij->i", ref, got)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
    zero_ref = np.linalg.norm(ref, axis=1) == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 0.0)
    cos = np.where(zero_ref, np.where(np.all(got == 0, axis=1), 1.0, 0.0), cos)
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
    ref_range = np.ptp(ref_blocks, axis=1).astype(np.float64)
    got_range = np.ptp(got_blocks, axis=1).astype(np.float64)
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

