"""``python -m harness sweep``: models x bit widths x methods (x profiles) as Ray tasks.

Every cell of the sweep is one ordinary harness run (``harness.runner.run``) into its
own folder, so a cell's report, results.json and artifact are exactly what
``python -m harness run`` would write for it; the sweep adds one combined report
(``SWEEP_REPORT.md``: every cell's size, bits per weight, output quality and verdict),
``sweep.json`` and a quality-versus-size chart (``sweep_quality_vs_size.svg``).

A cell's method is applied by deriving its criteria file: the model's default criteria
(or the profile's) with ``method`` of that bit width replaced and the ``compare`` list
dropped, written next to the cell's report as ``criteria.toml`` so the run can be
repeated by hand. Gates stay those of the model: a cell whose method does not meet them
says FAIL, which is the information a sweep is for.

Ray is an optional extra (``pip install 'arrowquant[ray]'``). Without ``--address`` the
sweep starts a private local Ray instance (``num_cpus`` workers, no dashboard, bound to
127.0.0.1) and stops it at the end; with ``--address`` it joins a running cluster,
whose workers must have this project installed.

``quantize_model_ray`` quantizes the tensors of one checkpoint in parallel chunks (one
``arrowquant_core.quantize_model`` call per chunk, as Ray tasks) and merges the results
in source order, so the saved artifact is byte-identical to the serial one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
import contextlib
import dataclasses
from dataclasses import asdict, dataclass
import itertools
import json
import math
import os
from pathlib import Path
import sys
import time
import tomllib
from typing import Any

import numpy as np
import numpy.typing as npt

from arrowquant_core.errors import ConfigurationError
from arrowquant_core.model import QuantizationConfig, QuantizedModel, quantize_model
from arrowquant_core.tensor import QuantizedTensor
from harness import exitcodes
from harness.criteria import default_criteria_path, load_criteria

SWEEP_REPORT = "SWEEP_REPORT.md"
SWEEP_JSON = "sweep.json"
SWEEP_CHART = "sweep_quality_vs_size.svg"
RAY_HINT = "install the optional extra: pip install 'arrowquant[ray]' (or pip install 'ray[default]')"
# Environment every Ray worker gets: one BLAS thread per task (two OpenBLAS threads per
# process on a 2-core machine are ~60x slower, docs/MYPYC.md) and one measurement thread
# (Ray runs a cell per CPU), offline model loading.
WORKER_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "ARROWQUANT_THREADS": "1", "HF_HUB_OFFLINE": "1",
              "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}

FloatArray = npt.NDArray[np.floating]


@dataclass(frozen=True)
class SweepConfig:
    """The grid and where it runs. ``profiles`` holds ``None`` for the default criteria."""

    models: tuple[str, ...]
    bits: tuple[int, ...]
    methods: tuple[str, ...] = ("rtn",)
    profiles: tuple[str | None, ...] = (None,)
    out: Path = Path("reports/sweep")
    address: str | None = None  # None: a private local Ray instance
    num_cpus: int = 2
    quiet: bool = False
    benchmark_rounds: int = 3  # timing-gate rounds of each cell's run (RunConfig.benchmark_rounds)

    def __post_init__(self) -> None:
        for label, values in (("models", self.models), ("bits", self.bits), ("methods", self.methods),
                              ("profiles", self.profiles)):
            if not values:
                raise ConfigurationError(f"sweep: {label} is empty; give at least one")
            if len(set(values)) != len(values):
                raise ConfigurationError(f"sweep: {label} {list(values)} repeats a value")
        if self.num_cpus < 1:
            raise ConfigurationError(f"sweep: num_cpus = {self.num_cpus} must be >= 1")
        if self.benchmark_rounds < 1:
            raise ConfigurationError(f"sweep: benchmark_rounds = {self.benchmark_rounds} must be >= 1")


@dataclass(frozen=True)
class Cell:
    """One harness run of the sweep."""

    model: str
    bits: int
    method: str
    profile: str | None
    out: Path
    criteria: Path
    benchmark_rounds: int = 3

    @property
    def label(self) -> str:
        return f"{self.model} INT{self.bits} {self.method}" + (f" {self.profile}" if self.profile else "")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text).strip("_") or "model"


def base_criteria(model: str, profile: str | None) -> Path:
    """The criteria file ``harness run`` would use for this model and profile."""
    path = default_criteria_path(model, profile)
    if path.is_file():
        return path
    if profile is not None:
        raise ConfigurationError(f"sweep: no criteria for model {model!r} with profile {profile!r} ({path.name})")
    return default_criteria_path("weights")  # a user checkpoint: weight-level criteria


def plan_cells(config: SweepConfig) -> list[Cell]:
    """Every cell of the grid, with its derived criteria file written and validated.

    Raises ConfigurationError (before any Ray task starts) for a bit width the criteria
    do not cover or a method that does not fit the bit width's scheme.
    """
    cells = []
    for model, profile, bits, method in itertools.product(config.models, config.profiles, config.bits,
                                                          config.methods):
        name = f"{_slug(Path(model).name if os.sep in model else model)}-int{bits}-{method}"
        out = config.out / (name + (f"-{profile}" if profile else ""))
        source = base_criteria(model, profile)
        data = tomllib.loads(source.read_text(encoding="utf-8"))
        section = data.get("bits", {}).get(str(bits))
        if not isinstance(section, dict):
            raise ConfigurationError(f"sweep: {source} has no [bits.{bits}] section for model {model!r}")
        section["method"] = method
        section.pop("compare", None)
        section.pop("method_overrides", None)  # the cell's method on every tensor
        data["bits"] = {str(bits): section}
        out.mkdir(parents=True, exist_ok=True)
        criteria = out / "criteria.toml"
        criteria.write_text(f"# derived by `harness sweep` from {source}: method = {method!r}\n"
                            + to_toml(data), encoding="utf-8")
        try:
            load_criteria(criteria, model)
        except ConfigurationError as exc:
            raise ConfigurationError(f"sweep cell {model} INT{bits} {method}: {exc}") from None
        cells.append(Cell(model, bits, method, profile, out, criteria, config.benchmark_rounds))
    return cells


# --- a minimal TOML writer for criteria data (strings, numbers, lists, tables) ----------

def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + " }"
    raise ConfigurationError(f"cannot write {type(v).__name__} value {v!r} to TOML")


def _key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)


def to_toml(data: Mapping[str, Any], prefix: str = "") -> str:
    """TOML text for ``data``: scalars and arrays first, then one ``[table]`` per dict."""
    lines = [f"{_key(k)} = {_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    text = "\n".join(lines) + ("\n" if lines else "")
    for k, v in data.items():
        if isinstance(v, dict):
            name = f"{prefix}.{_key(k)}" if prefix else _key(k)
            if any(not isinstance(x, dict) for x in v.values()):
                text += f"\n[{name}]\n"
            text += to_toml(v, name)
    return text


# --- Ray ------------------------------------------------------------------------------

def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigurationError(f"the sweep and parallel quantization run on Ray, which is not installed: "
                                 f"{RAY_HINT}") from None
    return ray


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int = 2) -> Iterator[Any]:
    """Join a cluster (``address``) or start a private local instance; stop what we started.

    The local instance listens on 127.0.0.1 only and has no dashboard. If Ray is already
    initialised in this process (a caller's own session), it is used as it is.
    """
    ray = _ray()
    if ray.is_initialized():
        yield ray
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # workers import harness/fixtures from wherever the driver does (a source checkout too)
    env = dict(WORKER_ENV, PYTHONPATH=os.pathsep.join(p for p in sys.path if p and Path(p).is_dir()))
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                              "runtime_env": {"env_vars": env}, "configure_logging": False}
    if address is None:
        kwargs.update(num_cpus=num_cpus, _node_ip_address="127.0.0.1")
    else:
        kwargs["address"] = address
    ray.init(**kwargs)
    try:
        yield ray
    finally:
        ray.shutdown()


def run_cell(cell: Cell) -> dict[str, Any]:
    """One harness run (executed inside a Ray worker); a small, picklable summary back."""
    from harness.config import RunConfig
    from harness.report import quality_key
    from harness.runner import run

    t0 = time.perf_counter()
    summary: dict[str, Any] = {"model": cell.model, "bits": cell.bits, "method": cell.method,
                               "profile": cell.profile, "out": str(cell.out)}
    try:
        result = run(RunConfig(model=cell.model, bits=(cell.bits,), criteria=cell.criteria, out=cell.out,
                               profile=cell.profile, benchmark_rounds=cell.benchmark_rounds, quiet=True))
    except ConfigurationError as exc:
        return {**summary, "verdict": "ERROR", "exit_code": exitcodes.USAGE, "error": str(exc),
                "seconds": round(time.perf_counter() - t0, 2)}
    except Exception as exc:  # the cell's harness failed; the sweep reports it and goes on
        return {**summary, "verdict": "ERROR", "exit_code": exitcodes.HARNESS_ERROR,
                "error": f"{type(exc).__name__}: {exc}", "seconds": round(time.perf_counter() - t0, 2)}
    entry = next(e for e in result.results["bit_widths"] if e["bits"] == cell.bits)
    metrics = entry["metrics"]
    key = quality_key(metrics)
    artifact = entry.get("artifact") or {}
    return {**summary, "verdict": result.verdict, "exit_code": result.exit_code, "error": None,
            "scheme": entry["scheme"], "artifact_bytes": artifact.get("bytes"),
            "bits_per_weight": metrics.get("bits_per_weight"), "size_mb": metrics.get("size_mb"),
            "quality_metric": key if key in metrics else None, "quality": metrics.get(key),
            "failures": [f["message"] for f in result.results["tests"]["failures"]],
            "report": str(result.report_path), "seconds": round(time.perf_counter() - t0, 2)}


def sweep(config: SweepConfig) -> tuple[int, Path]:
    """Run every cell as a Ray task; write the combined report. Returns (exit code, report).

    Exit code: 0 every cell passed its gates, 1 a cell failed a gate, 3 a cell's harness
    failed (exitcodes.py).
    """
    cells = plan_cells(config)
    say = (lambda msg: None) if config.quiet else (lambda msg: print(f"[sweep] {msg}", file=sys.stderr))
    t0 = time.perf_counter()
    with ray_session(config.address, config.num_cpus) as ray:
        say(f"{len(cells)} cell(s) on Ray ({'cluster ' + config.address if config.address else 'local instance'}, "
            f"{int(ray.cluster_resources().get('CPU', 0))} CPUs)")
        task = ray.remote(num_cpus=1, max_retries=0)(run_cell)
        pending = {task.remote(cell): cell for cell in cells}
        done: dict[str, dict[str, Any]] = {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(ready[0])
            done[cell.label] = ray.get(ready[0])
            say(f"{cell.label}: {done[cell.label]['verdict']} ({done[cell.label]['seconds']:.1f} s)")
    rows = [done[c.label] for c in cells]  # grid order, not completion order
    results = {"cells": rows, "grid": {k: [str(x) if isinstance(x, Path) else x for x in v]
                                      for k, v in asdict(config).items() if isinstance(v, tuple)},
               "ray": {"address": config.address or "local", "num_cpus": config.num_cpus},
               "wall_seconds": round(time.perf_counter() - t0, 2)}
    config.out.mkdir(parents=True, exist_ok=True)
    (config.out / SWEEP_JSON).write_text(json.dumps(results, indent=1, allow_nan=False,
                                                    default=_json_default) + "\n", encoding="utf-8")
    return exit_code(rows), write_report(results, config.out)


def exit_code(rows: Sequence[Mapping[str, Any]]) -> int:
    """3 if a cell's harness failed, else 1 if a cell failed a gate, else 0."""
    if any(r["verdict"] == "ERROR" for r in rows):
        return exitcodes.HARNESS_ERROR
    if any(r["verdict"] != "PASS" for r in rows):
        return exitcodes.GATE_FAILED
    return exitcodes.OK


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    raise TypeError(f"not JSON: {value!r}")


def _num(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def write_report(results: dict[str, Any], out: Path) -> Path:
    """SWEEP_REPORT.md (every cell) and the quality-versus-size chart, from sweep.json data."""
    import jinja2

    from harness.report import TEMPLATES

    rows = []
    for r in results["cells"]:
        quality, bpw = _num(r.get("quality")), _num(r.get("bits_per_weight"))
        rows.append({
            "model": r["model"], "bits": r["bits"], "method": r["method"], "profile": r["profile"] or "—",
            "scheme": r.get("scheme") or "—",
            "size": f"{r['artifact_bytes'] / 1e6:.2f} MB" if r.get("artifact_bytes") else "—",
            "bpw": f"{bpw:.2f}" if bpw is not None else "—",
            "quality": f"{quality:.4f} ({r['quality_metric']})" if quality is not None else "— (weights only)",
            "verdict": r["verdict"], "seconds": f"{r['seconds']:.1f}",
            "why": "; ".join(r.get("failures") or ([r["error"]] if r.get("error") else [])),
            "report": os.path.relpath(r["report"], out) if r.get("report") else "—"})
    chart = render_chart(results["cells"])
    if chart is not None:
        (out / SWEEP_CHART).write_text(chart, encoding="utf-8")
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
                             autoescape=False, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    text = env.get_template("sweep.md.j2").render(
        rows=rows, chart=SWEEP_CHART if chart is not None else None, ray=results["ray"],
        wall=f"{results['wall_seconds']:.1f}", passed=sum(r["verdict"] == "PASS" for r in results["cells"]),
        total=len(results["cells"]))
    path = out / SWEEP_REPORT
    path.write_text(text, encoding="utf-8")
    return path


def render_chart(cells: Sequence[Mapping[str, Any]]) -> str | None:
    """SVG scatter: bits per weight on disk against each cell's output quality."""
    import jinja2

    from harness.report import TEMPLATES

    points = [{"label": f"{c['model']} INT{c['bits']} {c['method']}" + (f" {c['profile']}" if c["profile"] else ""),
               "x": _num(c.get("bits_per_weight")), "y": _num(c.get("quality"))} for c in cells]
    points = [p for p in points if p["x"] is not None and p["y"] is not None]
    if not points:
        return None
    width, height, left, bottom, top, right = 900, 440, 70, 50, 30, 380
    x1 = max(float(p["x"]) for p in points) * 1.1
    y0 = min(0.0, min(float(p["y"]) for p in points))

    def sx(v: float) -> float:
        return left + v / x1 * (width - left - right)

    def sy(v: float) -> float:
        return height - bottom - (v - y0) / (1.0 - y0) * (height - bottom - top)

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
                             autoescape=True, trim_blocks=True, lstrip_blocks=True)
    return env.get_template("chart.svg.j2").render(
        width=width, height=height, left=left, bottom=bottom, top=top, right=right,
        ylabel="output quality (cosine mean or masked top-1)",
        xticks=[(f"{x1 * i / 5:.1f}", sx(x1 * i / 5)) for i in range(6)],
        yticks=[(f"{y0 + (1 - y0) * i / 5:.2f}", sy(y0 + (1 - y0) * i / 5)) for i in range(6)],
        points=[{**p, "cx": sx(float(p["x"])), "cy": sy(float(p["y"])), "ly": 40 + 16 * i}
                for i, p in enumerate(points)],
        legend_x=width - right + 20)


# --- layer-parallel quantization of one checkpoint ------------------------------------

def _quantize_chunk(weights: dict[str, FloatArray], config: dict[str, Any],
                    hessians: dict[str, npt.NDArray[np.float32]] | None) -> tuple[dict[str, Any], dict[str, Any],
                                                                                   dict[str, str]]:
    # the config travels as its fields: a compiled frozen dataclass does not unpickle
    model = quantize_model(weights, QuantizationConfig(**config), hessians=hessians)
    # plain dicts back: a compiled frozen QuantizedModel does not unpickle (docs/MYPYC.md)
    return dict(model.tensors), dict(model.floats), dict(model.skipped)


def chunk_names(names: Sequence[str], weights: Mapping[str, FloatArray], chunks: int) -> list[list[str]]:
    """Contiguous runs of tensor names with about equal parameter counts."""
    total = sum(int(weights[n].size) for n in names) or 1
    out: list[list[str]] = [[]]
    seen = 0
    for name in names:
        if out[-1] and seen >= total * len(out) / chunks and len(out) < chunks:
            out.append([])
        out[-1].append(name)
        seen += int(weights[name].size)
    return out


def quantize_model_ray(weights: Mapping[str, FloatArray], config: QuantizationConfig, chunks: int = 2,
                       hessians: Mapping[str, npt.NDArray[np.float32]] | None = None,
                       address: str | None = None, num_cpus: int = 2) -> QuantizedModel:
    """``quantize_model`` with the tensors split into ``chunks`` Ray tasks, merged in source order.

    Each tensor is quantized by the same code on the same input as in the serial call,
    so ``arrowquant_core.save`` of the result is byte-identical to the serial artifact.
    Uses the caller's Ray session if one is running, else a private local one.
    """
    if chunks < 1:
        raise ConfigurationError(f"chunks = {chunks} must be >= 1")
    if not weights:
        return quantize_model(weights, config)  # the core's own error for an empty model
    names = list(weights)
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    with ray_session(address, num_cpus) as ray:
        task = ray.remote(num_cpus=1, max_retries=0)(_quantize_chunk)
        refs = []
        for part in chunk_names(names, weights, chunks):
            sub_h = {n: hessians[n] for n in part if n in hessians} if hessians is not None else None
            refs.append(task.remote({n: weights[n] for n in part}, fields, sub_h))
        tensors: dict[str, QuantizedTensor] = {}
        floats: dict[str, FloatArray] = {}
        skipped: dict[str, str] = {}
        for t, f, s in ray.get(refs):
            # copies: arrays from ray.get map the object store, which ray.shutdown() unmaps
            tensors.update({n: dataclasses.replace(
                qt, codes=qt.codes.copy(), scales=qt.scales.copy(), zeros=qt.zeros.copy(),
                params=qt.params.copy()) for n, qt in t.items()})
            floats.update({n: np.array(a, copy=True) for n, a in f.items()})
            skipped.update(s)
    return QuantizedModel(tensors={n: tensors[n] for n in names if n in tensors},
                          floats={n: floats[n] for n in names if n in floats},
                          order=tuple(names), skipped={n: skipped[n] for n in names if n in skipped})
