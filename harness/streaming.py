"""Weight-level validation of a checkpoint too big to hold: the streaming run (issue 11).

``python -m harness run --model PATH`` streams when the model's safetensors weights
exceed ``STREAM_THRESHOLD_BYTES`` (1 GiB on disk) or ``--stream`` is given (``--no-stream``
forces the in-memory suite). The in-memory harness measured 8-9.5x the FP32 model size at
peak (issue 11: 15.8 GB at 492M parameters), so a 1 GiB bf16 file (~0.5B parameters)
is already where it stops fitting a 24 GiB runner.

What the streaming run does, per bit width (``arrowquant_core.stream``):

1. quantize the safetensors file tensor by tensor (row blocks), writing the Parquet v2
   artifact one row group per tensor, digesting each source tensor on the way;
2. read the artifact back one row group at a time, dequantize each tensor a row block at
   a time and compare it with the source rows re-read from disk: cosine, SQNR, relative
   error, worst row cosine, group range ratios (float64 per block), the kept tensors
   bit-exact, each row's checksum against the one written, the source digests again;
3. for a Dream folder, the output-level KL through the layer-streaming denoiser on
   ``KL_SAMPLES`` calibration samples (``fixtures/dream_mini/streaming.py``), reported;
4. check every gate of the criteria file (default ``harness/criteria/streaming.toml``)
   that names a metric measured here; a gate on any other metric (output-level KL, a
   load benchmark) is recorded as NOT MEASURED and fails, so a verdict never claims more
   than was measured;
5. write ``STREAMING_VALIDATION_REPORT.md`` and ``streaming_results.json`` to ``--out``.

The FP32 / FP16 baselines are not written (30 GB + 15 GB at 7B): their sizes are
computed from the safetensors layout (8-byte length + the header ``SafetensorsStreamWriter``
would write + the data bytes), which is what such a file's size is by construction; the
results' ``how`` says so.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
import dataclasses
import json
import math
from pathlib import Path
import sys
import time
from typing import TYPE_CHECKING, Any, Final

import numpy as np

import arrowquant_core as aq
from arrowquant_core import stream
from arrowquant_core.atomic import write_bytes_atomic
from arrowquant_core.errors import ConfigurationError
from arrowquant_core.limits import short
from arrowquant_core.safetensors_io import _dtype_for, _header_bytes  # the writer's exact layout
from harness.memory import peak_rss_bytes, reset_peak_rss, rss_bytes

if TYPE_CHECKING:  # imported where used: the probe subprocess must start fast (tests/test_stream.py)
    from harness.criteria import Criteria
    from harness.integrity import Problem

STREAM_THRESHOLD_BYTES: Final[int] = 1 << 30
DEFAULT_CRITERIA: Final[Path] = Path(__file__).resolve().parent / "criteria" / "streaming.toml"
RESULTS_NAME: Final[str] = "streaming_results.json"
REPORT_NAME: Final[str] = "STREAMING_VALIDATION_REPORT.md"
RESULTS_VERSION: Final[int] = 1


def weights_file(model: str) -> Path | None:
    """What the streaming reader opens for a model path: a ``.safetensors`` file, or a folder
    with ``model.safetensors`` or a sharded checkpoint's ``model.safetensors.index.json``;
    None when the path is something else (a model name, .npy files, a Parquet file)."""
    path = Path(model)
    if path.is_file() and path.suffix == ".safetensors":
        return path
    if path.is_dir() and ((path / "model.safetensors").is_file() or (path / stream.INDEX_NAME).is_file()):
        return path
    return None


def should_stream(model: str, flag: bool | None) -> bool:
    """``--stream`` / ``--no-stream`` decide; without either, safetensors weights (one file
    or the shards of an index) larger than ``STREAM_THRESHOLD_BYTES`` stream."""
    file = weights_file(model)
    if flag is True:
        if file is None:
            raise ConfigurationError(f"--stream: {model!r} is not a .safetensors file or a folder with "
                                     "model.safetensors or model.safetensors.index.json")
        return True
    if flag is False or file is None:
        return False
    return sum(f.stat().st_size for f in stream.shard_files(file)) > STREAM_THRESHOLD_BYTES


class RunPeak:
    """The streaming run's own peak RSS: the process's peak since the reset at the run's
    start (a run called in a process that did other work first, a notebook or a test
    session, would otherwise report that work's peak); without a reset, the process's
    peak only once it has risen during the run (before that the run's own peak is not
    known: ``None``)."""

    def __init__(self) -> None:
        self.reset = reset_peak_rss()
        self.before = peak_rss_bytes()

    def __call__(self) -> int | None:
        now = peak_rss_bytes()
        return now if self.reset or now > self.before else None


def layout_size(source: stream.SafetensorsSource, dtype: np.dtype[Any], skip: frozenset[str] = frozenset()) -> int:
    """Bytes of a safetensors copy of ``source`` with every float tensor in ``dtype``
    (integer buffers as they are; the tied aliases in ``skip`` left out, as the in-memory
    baselines count a tie once), computed from the format's layout, not written."""
    entries: list[tuple[str, str, tuple[int, ...], int, int]] = []
    offset = 0
    for name in sorted(source.names):
        if name in skip:
            continue
        info = source.info(name)
        row = _dtype_for(info.numpy_dtype if info.numpy_dtype.kind in "iub" else dtype)
        if row is None:
            raise ConfigurationError(f"{source.path}: tensor {name!r}: no safetensors dtype for {dtype}")
        nbytes = math.prod(info.shape) * row.numpy.itemsize
        entries.append((name, row.code, info.shape, offset, offset + nbytes))
        offset += nbytes
    return 8 + len(_header_bytes(entries, None)) + offset


def source_ties(source: stream.SafetensorsSource, digests: dict[str, str]) -> dict[str, str]:
    """``{alias: canonical}`` found in the source from the digests the read-back pass took
    (independently of what the writer recorded): ``fixtures.checkpoint.find_ties``' rule,
    a float tensor of 2+ dimensions identical to an earlier one in sorted-name order."""
    first: dict[str, str] = {}
    ties: dict[str, str] = {}
    for name in sorted(digests):
        if source.has(name) and stream.may_tie(source.info(name)):
            canonical = first.setdefault(digests[name], name)
            if canonical != name:
                ties[name] = canonical
    return ties


def tie_mismatches(found: dict[str, str], recorded: dict[str, str]) -> list[str]:
    """Tensors whose tie in the artifact differs from the one found in the source (as
    ``RunContext.reloaded`` counts them)."""
    return sorted(n for n in set(found) | set(recorded) if found.get(n) != recorded.get(n))


@dataclasses.dataclass(frozen=True)
class BitsOutcome:
    bits: int
    scheme: str
    artifact: str
    artifact_bytes: int
    artifact_sha256: str  # of the file as written, read back in 16 MB chunks
    baseline_bytes: dict[str, int]  # FP32 / FP16 safetensors sizes, each tie once
    ties: dict[str, str]  # alias -> canonical as found in the source
    metrics: dict[str, float]
    gates: list[dict[str, Any]]
    layers: list[dict[str, Any]]

    def __post_init__(self) -> None:
        if self.artifact_bytes < 0:
            raise ConfigurationError(f"INT{self.bits}: artifact size {self.artifact_bytes} < 0")

    @property
    def passed(self) -> bool:
        return all(g["passed"] for g in self.gates)


def validate_bits(source: stream.SafetensorsSource, bits: int, criteria: Criteria, out: Path,
                  block_values: int, say: Callable[[str], None],
                  dream: Callable[[stream.SafetensorsSource, Path], dict[str, float]] | None = None,
                  fault: str | None = None, *, peak: Callable[[], int | None]) -> BitsOutcome:
    from harness.context import SOURCE_KEY, is_embedding_table

    plan = criteria.plan(bits)
    config = aq.QuantizationConfig(plan.scheme, method=plan.method)
    name = source.path.name if source.path.is_dir() else (
        source.path.parent.name if source.path.name == "model.safetensors" else source.path.stem)
    path = out / "artifacts" / f"{name}-int{bits}.parquet"
    def tick(stage: str) -> Callable[[int, int, str], None]:
        last = [time.perf_counter()]

        def report(i: int, n: int, tensor: str) -> None:  # a line every 15 s and at the end
            now = time.perf_counter()
            if now - last[0] >= 15.0 or i == n:
                last[0] = now
                say(f"INT{bits} {stage}: {i}/{n} tensors ({tensor}), peak RSS {peak_rss_bytes() / 2**30:.2f} GiB")
        return report

    say(f"INT{bits}: streaming {len(source.names)} tensors with {plan.scheme}/{plan.method} -> {path}")
    t0 = time.perf_counter()
    streamed = stream.quantize_file(source, config, path, metadata={"model": name},
                                    block_values=block_values, progress=tick("quantizing"))
    quantize_seconds = time.perf_counter() - t0
    if fault is not None:  # the self-test: the written artifact broken row by row (harness.faults)
        from harness.faults import get_fault, rewrite_streamed

        say(f"INT{bits}: injecting fault {fault!r} into {path.name}")
        streamed = rewrite_streamed(get_fault(fault), path, streamed)
    size = path.stat().st_size
    say(f"INT{bits}: wrote {size / 1e6:.1f} MB in {quantize_seconds:.1f} s; reading back and measuring")
    back = stream.measure(source, path, block_values=block_values, progress=tick("measuring"))
    written = {t.name: t for t in streamed}
    found = source_ties(source, back.digests)
    baseline_bytes = {"float32": layout_size(source, np.dtype(np.float32), frozenset(found)),
                      "float16": layout_size(source, np.dtype(np.float16), frozenset(found))}
    measures = back.measures
    quantized = [m for m in measures]
    embedding_rows = [m.row_cosine_min for m in measures if is_embedding_table(m.name)]
    metrics: dict[str, float] = {
        "size_mb": size / 1e6,
        "compression_vs_fp32": baseline_bytes["float32"] / size,
        "compression_vs_fp16": baseline_bytes["float16"] / size,
        "bits_per_weight": size * 8 / sum(math.prod(t.shape) for t in streamed if t.kind not in ("buffer", "tied")),
        "unquantized_weights": float(sum(1 for t in streamed if t.kind == "float" and len(t.shape) >= 2)),
        "missing_tensors": float(len(back.missing)),
        "unexpected_tensors": float(len(back.unexpected)),
        "kept_tensors_changed": float(len(back.changed)),
        "dtype_mismatches": float(len(back.dtype_mismatches)),
        "nonfinite_tensors": float(sum(1 for m in measures if m.nonfinite) + len(back.nonfinite_kept)),
        "tie_mismatches": float(len(tie_mismatches(found, back.ties))),
        "weight_cosine_mean": float(np.mean([m.cosine for m in quantized])) if quantized else math.nan,
        "weight_cosine_min": min((m.cosine for m in quantized), default=math.nan),
        "weight_sqnr_db_mean": float(np.mean([m.sqnr_db for m in quantized])) if quantized else math.nan,
        "weight_sqnr_db_min": min((m.sqnr_db for m in quantized), default=math.nan),
        "group_range_ratio_min": min((m.group_range_ratio_min for m in quantized), default=math.nan),
        "group_range_ratio_max": max((m.group_range_ratio_max for m in quantized), default=math.nan),
        "roundtrip_exact": float(all(back.checksums.get(n) == t.checksum for n, t in written.items())),
        # the artifact says it was made from the source as re-read now
        "source_match": float(back.metadata.get(SOURCE_KEY) == stream.source_digest(back.digests)),
        "quantize_seconds": quantize_seconds,
        "readback_seconds": back.seconds,
    }
    _record_peak(metrics, peak)
    if embedding_rows:
        metrics["embedding_row_cosine_min"] = min(embedding_rows)
    if dream is not None:
        say(f"INT{bits}: output-level KL through the layer-streaming denoiser ({KL_SAMPLES} calibration samples)")
        t1 = time.perf_counter()
        metrics.update(dream(source, path))
        metrics["kl_seconds"] = time.perf_counter() - t1
        _record_peak(metrics, peak)
    gates = []
    for criterion in plan.gates:
        value = metrics.get(criterion.metric)
        if value is None:
            gates.append({"rule": criterion.rule, "metric": criterion.metric, "value": None, "passed": False,
                          "why": f"NOT MEASURED by the streaming run; {criterion.why}"})
            continue
        problem = criterion.check(value)
        gates.append({"rule": criterion.rule, "metric": criterion.metric, "value": value,
                      "passed": problem is None, "why": criterion.why})
    layers = [{"name": m.name, "scheme": m.scheme, "method": m.method, "shape": list(m.shape),
               "parameters": m.parameters, "cosine": m.cosine, "sqnr_db": m.sqnr_db,
               "relative_error": m.relative_error, "row_cosine_min": m.row_cosine_min,
               "group_range_ratio_min": m.group_range_ratio_min, "group_range_ratio_max": m.group_range_ratio_max}
              for m in measures]
    return BitsOutcome(bits, plan.scheme, str(path), size, stream.digest_file(path), baseline_bytes, found, metrics,
                       gates, layers)


@dataclasses.dataclass(frozen=True)
class StreamingConfig:
    model: str
    bits: tuple[int, ...]
    out: Path
    criteria: Path | None = None
    block_values: int = stream.BLOCK_VALUES
    quiet: bool = False
    outputs: bool = True  # output-level KL when the folder is a Dream model (--runner none: off)
    fault: str | None = None  # --inject-fault: a self-test of the gates (harness.faults, streaming form)

    def __post_init__(self) -> None:
        if self.block_values < 1:
            raise ConfigurationError(f"block_values = {self.block_values}: must be >= 1")


KL_SAMPLES: Final[int] = 4


def dream_kl(folder: Path) -> Callable[[stream.SafetensorsSource, Path], dict[str, float]] | None:
    """The output-level measurement for a Dream folder (config.json ``model_type`` Dream and
    calibration.jsonl): KL through the layer-streaming denoiser; None for anything else."""
    config_path = folder / "config.json"
    if not (config_path.is_file() and (folder / "calibration.jsonl").is_file()):
        return None
    try:
        kind = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    if kind != "Dream":
        return None
    from harness.fixtures_import import fixtures_module

    config = fixtures_module("dream_mini.config").DreamConfig.load(folder)
    samples = fixtures_module("calibration").read_jsonl(folder / "calibration.jsonl", vocab_size=config.vocab_size)
    streaming = fixtures_module("dream_mini.streaming")

    def measure(source: stream.SafetensorsSource, artifact: Path) -> dict[str, float]:
        result: dict[str, float] = streaming.streamed_kl(source, artifact, config, samples, count=KL_SAMPLES)
        return result
    return measure


def _record_peak(metrics: dict[str, float], peak: Callable[[], int | None]) -> None:
    """``peak_rss_gib`` when the run's own peak is known; left out otherwise, so its gate
    reads NOT MEASURED rather than another piece of work's peak."""
    value = peak()
    if value is not None:
        metrics["peak_rss_gib"] = value / 2**30


def run_streaming(config: StreamingConfig) -> tuple[int, Path]:
    """The streaming run: returns (exit code, report path); 0 = every gate passed, 1 = not."""
    file = weights_file(config.model)
    if file is None:
        raise ConfigurationError(f"--stream: {config.model!r} is not a .safetensors file or a folder with "
                                 "model.safetensors")
    from harness.criteria import load_criteria

    criteria_path = config.criteria or DEFAULT_CRITERIA
    criteria = load_criteria(criteria_path, model=Path(config.model).name)
    bits = config.bits or tuple(sorted(criteria.plans, reverse=True))

    def say(text: str) -> None:
        if not config.quiet:
            print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    t0 = time.perf_counter()
    peak = RunPeak()
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    with stream.SafetensorsSource(file) as source:
        params = sum(math.prod(source.info(n).shape) for n in source.names)
        largest = max(source.info(n).nbytes for n in source.names)
        say(f"streaming {file} ({source.file_bytes / 1e9:.2f} GB in {len(source.files)} file(s), "
            f"{params / 1e6:.1f}M parameters, largest tensor {largest / 1e6:.0f} MB) with criteria {criteria_path}")
        if config.fault is not None:  # before any work: a fault with nothing to act on tests nothing
            from harness.faults import check_streaming, get_fault

            shapes = {n: (tuple(source.info(n).shape), source.info(n).numpy_dtype.name) for n in source.names}
            check_streaming(get_fault(config.fault), shapes, str(file))
        dream = dream_kl(file if file.is_dir() else file.parent) if config.outputs else None
        outcomes = [validate_bits(source, b, criteria, out, config.block_values, say, dream, config.fault, peak=peak)
                    for b in bits]
        # ties are found in the read-back pass; before any, the sizes count every tensor
        baseline = outcomes[0].baseline_bytes if outcomes else {
            "float32": layout_size(source, np.dtype(np.float32)), "float16": layout_size(source, np.dtype(np.float16))}
        file_bytes = source.file_bytes
    verdict = "PASS" if all(o.passed for o in outcomes) else "FAIL"
    results = {
        "streaming_results_version": RESULTS_VERSION,
        "run": {"model": config.model, "weights_file": str(file), "command": " ".join(sys.argv),
                "started_at": started, "wall_seconds": round(time.perf_counter() - t0, 2),
                "criteria_file": str(criteria_path), "criteria_sha256": stream.digest_file(criteria_path),
                "block_values": config.block_values,
                "peak_rss_bytes": peak_rss_bytes(),
                "peak_rss_from": "the run's start" if peak.reset else "the process's start (it could not be reset)",
                "mode": "streaming (weight level)", "fault": config.fault},
        "model": {"parameters": params, "tensors": len(outcomes[0].layers) if outcomes else 0,
                  "file_bytes": file_bytes, "largest_tensor_bytes": largest},
        "baselines": {"fp32_bytes": baseline["float32"], "fp16_bytes": baseline["float16"],
                      "how": "sizes of FP32 and FP16 safetensors copies computed from the safetensors layout "
                             "(8-byte length + the header SafetensorsStreamWriter writes + the data bytes; "
                             "tied tensors once), "
                             "not written (30 GB + 15 GB at 7B)"},
        "bit_widths": [dataclasses.asdict(o) | {"decision": "ship" if o.passed else "do not ship"} for o in outcomes],
        "not_measured": ("load benchmark (readback_seconds is the read-back pass including the measurements)"
                         + ("" if dream is not None else "; output-level metrics (layer-streaming forward pass only "
                                                          "for Dream folders, and not with --runner none)")),
        "verdict": verdict,
    }
    text = json.dumps(results, indent=1, default=_json_default, allow_nan=True)
    write_bytes_atomic(out / RESULTS_NAME, text.encode())
    report = out / REPORT_NAME
    write_bytes_atomic(report, render(results).encode())
    say(f"{verdict}: {report} (wall {results['run']['wall_seconds']} s, peak RSS "
        f"{results['run']['peak_rss_bytes'] / 2**30:.2f} GiB)")
    return (0 if verdict == "PASS" else 1), report


def _json_default(value: object) -> object:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _num(value: object) -> str:
    if value is None:
        return "not measured"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def render(results: dict[str, Any]) -> str:
    """The Markdown report of a streaming run (every number from ``results``)."""
    from harness.escape import md_code, md_text

    run, model = results["run"], results["model"]
    lines = [f"# Streaming validation report: {md_text(str(run['model']))}", "",
             f"**Verdict: {results['verdict']}** (weight-level validation, streamed tensor by tensor)"
             + (f" (self-test run with injected fault {md_code(run['fault'])})" if run.get("fault") else ""), "",
             f"- weights: {md_code(run['weights_file'])}, {model['file_bytes'] / 1e9:.2f} GB, "
             f"{model['parameters'] / 1e6:.1f}M parameters, largest tensor {model['largest_tensor_bytes'] / 1e6:.0f} MB",
             f"- criteria: {md_code(run['criteria_file'])} (sha256 {md_code(run['criteria_sha256'])})",
             f"- wall time {run['wall_seconds']} s, peak RSS {run['peak_rss_bytes'] / 2**30:.2f} GiB "
             f"(row blocks of {run['block_values']} values)",
             f"- baselines: {md_text(results['baselines']['how'])}",
             f"- not measured: {md_text(results['not_measured'])}", ""]
    for entry in results["bit_widths"]:
        lines += [f"## INT{entry['bits']} ({md_text(entry['scheme'])}): {entry['decision']}", "",
                  f"Artifact {md_code(entry['artifact'])}, {entry['artifact_bytes'] / 1e6:.1f} MB, "
                  f"sha256 {md_code(entry['artifact_sha256'])}.", "",
                  (f"Stored as ties (identical to an earlier tensor in the source): "
                   + ", ".join(f"{md_code(a)} -> {md_code(c)}" for a, c in sorted(entry["ties"].items())) + "."
                   if entry.get("ties") else "No tensor of the source is identical to another (no ties)."), "",
                  "| gate | value | result | why |", "|---|---|---|---|"]
        for gate in entry["gates"]:
            lines.append(f"| {md_code(gate['rule'])} | {_num(gate['value'])} | "
                         f"{'pass' if gate['passed'] else 'FAIL'} | {md_text(gate['why'])} |")
        lines += ["", "| metric | value |", "|---|---|"]
        lines += [f"| {md_text(k)} | {_num(v)} |" for k, v in sorted(entry["metrics"].items())]
        worst = sorted(entry["layers"], key=lambda r: r["cosine"])[:10]
        lines += ["", "Ten worst tensors by cosine:", "",
                  "| tensor | method | cosine | SQNR dB | worst row cosine | group range ratio max |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {md_code(r['name'])} | {md_text(r['method'])} | {r['cosine']:.6f} | {r['sqnr_db']:.2f} | "
                  f"{r['row_cosine_min']:.4f} | {r['group_range_ratio_max']:.4f} |" for r in worst]
        lines.append("")
    return "\n".join(lines)


def is_streaming_results(results: dict[str, Any]) -> bool:
    """Whether a results document is a streaming run's (``harness report`` / ``verify`` tell
    the two kinds apart by this key)."""
    return "streaming_results_version" in results


def verify_streaming(results: dict[str, Any], results_path: Path) -> list[Problem]:
    """``harness verify`` for a streaming run: each gate re-evaluated from its rule and
    recorded value (a gate without a value must be a failed NOT MEASURED one), each value
    equal to the bit width's measured metric, each decision and the verdict what the gates
    give, every artifact's sha256, the criteria file's sha256 and its gates (none missing,
    none added) for every bit width run."""
    from harness.criteria import load_criteria, parse_rule
    from harness.integrity import Problem

    problems: list[Problem] = []
    if results.get("streaming_results_version") != RESULTS_VERSION:
        return [Problem("streaming_results_version", f"{short(results.get('streaming_results_version'))} is not "
                                                     f"{RESULTS_VERSION}")]
    entries = results.get("bit_widths")
    if not isinstance(entries, list) or not entries:
        return [Problem("bit_widths", "missing, empty or not a list")]
    all_pass = True
    for entry in entries:
        bits = entry.get("bits") if isinstance(entry, dict) else None
        if not isinstance(bits, int) or not isinstance(entry.get("gates"), list) \
                or not isinstance(entry.get("metrics"), dict):
            problems.append(Problem("bit_widths", f"entry {short(entry, 60)} is malformed"))
            all_pass = False
            continue
        failed = False
        for gate in entry["gates"]:
            where = f"INT{bits} {short(gate.get('rule') if isinstance(gate, dict) else gate, 80)}"
            try:
                criterion = parse_rule(str(gate["rule"]), bits)
            except (ConfigurationError, KeyError, TypeError):
                problems.append(Problem(where, "rule is malformed"))
                failed = True
                continue
            value = gate.get("value")
            if value is None:
                expected = False
                if not str(gate.get("why", "")).startswith("NOT MEASURED"):
                    problems.append(Problem(where, "no value, but not recorded as NOT MEASURED"))
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                expected = criterion.check(float(value)) is None
                measured = entry["metrics"].get(criterion.metric)
                if not (measured == value or (isinstance(measured, float) and math.isnan(measured)
                                              and math.isnan(float(value)))):
                    problems.append(Problem(where, f"value {short(value, 40)} differs from the measured metric "
                                                   f"{short(measured, 40)}"))
            else:
                problems.append(Problem(where, f"value {short(value, 40)} is not a number"))
                expected = False
            if gate.get("passed") is not expected:
                problems.append(Problem(where, f"recorded passed={short(gate.get('passed'), 20)} but the rule "
                                               f"gives {expected}"))
            failed = failed or not expected
        decision = "do not ship" if failed else "ship"
        if entry.get("decision") != decision:
            problems.append(Problem(f"INT{bits} decision", f"recorded {short(entry.get('decision'), 20)} but its "
                                                           f"gates give {decision!r}"))
        all_pass = all_pass and not failed
        artifact = Path(str(entry.get("artifact")))
        if not artifact.is_absolute() and not artifact.is_file():
            artifact = results_path.parent / artifact
        if not artifact.is_file():
            problems.append(Problem(f"INT{bits} artifact", f"{short(str(artifact))} does not exist"))
        elif stream.digest_file(artifact) != entry.get("artifact_sha256"):
            problems.append(Problem(f"INT{bits} artifact", f"{short(str(artifact))}: sha256 differs from the one "
                                                           "recorded"))
    verdict = "PASS" if all_pass else "FAIL"
    if results.get("verdict") != verdict:
        problems.append(Problem("verdict", f"recorded {short(results.get('verdict'), 20)} but the gates give {verdict}"))
    recorded_run = results.get("run")
    run: dict[str, Any] = recorded_run if isinstance(recorded_run, dict) else {}
    criteria_path = Path(str(run.get("criteria_file")))
    if not criteria_path.is_file():
        problems.append(Problem("criteria", f"{short(str(criteria_path))} does not exist"))
        return problems
    if stream.digest_file(criteria_path) != run.get("criteria_sha256"):
        problems.append(Problem("criteria", f"{short(str(criteria_path))}: sha256 differs from the one recorded "
                                            "(the criteria file changed since the run)"))
        return problems
    criteria = load_criteria(criteria_path)
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("bits") not in criteria.plans:
            continue
        want = sorted(c.rule for c in criteria.plan(entry["bits"]).gates)
        got = sorted(str(g.get("rule")) for g in entry["gates"] if isinstance(g, dict))
        if want != got:
            problems.append(Problem(f"INT{entry['bits']} gates", f"differ from {short(str(criteria_path))}'s: "
                                                                 f"missing {sorted(set(want) - set(got))[:3]}, "
                                                                 f"added {sorted(set(got) - set(want))[:3]}"))
    return problems


def probe(model: str, scheme: str, out: Path, block_values: int) -> dict[str, Any]:
    """Quantize, write, read back and measure one file; the figures the memory-bound test
    and the scaling benchmark need (one process per call: peak RSS is per process)."""
    rss_start = rss_bytes()
    file = weights_file(model)
    if file is None:
        raise ConfigurationError(f"{model!r}: not a .safetensors file or a folder with model.safetensors")
    t0 = time.perf_counter()
    with stream.SafetensorsSource(file) as source:
        streamed = stream.quantize_file(source, aq.QuantizationConfig(scheme), out, block_values=block_values)
        t1 = time.perf_counter()
        back = stream.measure(source, out, block_values=block_values)
        largest = max(source.info(n).nbytes for n in source.names)
        largest_values = max(math.prod(source.info(n).shape) for n in source.names)
    t2 = time.perf_counter()
    return {"file": str(file), "file_bytes": sum(f.stat().st_size for f in stream.shard_files(file)),
            "scheme": scheme,
            "parameters": sum(math.prod(t.shape) for t in streamed), "tensors": len(streamed),
            "largest_tensor_bytes": largest, "largest_tensor_values": largest_values,
            "artifact_bytes": out.stat().st_size, "quantize_seconds": t1 - t0, "readback_seconds": t2 - t1,
            "rss_start_bytes": rss_start, "peak_rss_bytes": peak_rss_bytes(),
            "weight_cosine_min": min(m.cosine for m in back.measures), "changed": len(back.changed),
            "missing": len(back.missing)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.streaming",
                                     description="probe: stream one safetensors file and print time and peak RSS")
    parser.add_argument("--model", required=True)
    parser.add_argument("--scheme", default="int4-g64-asym")
    parser.add_argument("--out", type=Path, required=True, help="artifact path")
    parser.add_argument("--block-values", type=int, default=stream.BLOCK_VALUES)
    args = parser.parse_args(argv)
    print(json.dumps(probe(args.model, args.scheme, args.out, args.block_values)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
