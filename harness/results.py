"""The typed, versioned ``results.json`` and its provenance.

Schema (``schema_version`` 1); every number is measured in the run or read from a file
named next to it::

    schema_version          int    bumped on any incompatible change
    tool                    {name, version}
    run
      model                 str    model name or path given to --model
      command               str    the command line
      started_at, finished_at  ISO-8601 UTC
      wall_seconds          float  whole run, set-up to report
      criteria_file         str    criteria TOML used
      criteria_integrity    {file, sha256, default_file, default_sha256, default_source,
                             differs_from_default, inherits {file, sha256} | null}
                             (harness.integrity.criteria_record)
      out_dir               str
      fault                 str|null  injected fault (self-test runs only)
      profile               str|null  deployment profile
      runner                str|null  the runner that measured outputs (null: weights only)
      artifact              null, or (--artifact) the GGUF file judged in place of quantizing:
                            {path, bytes, sha256, format, reader, produced_by, general {general.* keys},
                             file_type, main_type, quantization_version, tensor_types {type: count},
                             tensor_names ("llama.cpp" | "source"), filled_from_source [names],
                             llama_cpp_rule_mismatches [..] | null, judged_as_bits, bits_how,
                             fault, original, not_measured [{test, metrics, why}]}
                            (harness.external.ExternalArtifact.record)
    provenance
      git_commit, git_dirty  the harness's own source tree
      python, platform, cpu, cores
      packages              {name: version} of every package that shapes a number
      core_compiled         bool   arrowquant_core imported from mypyc extension modules
      threads               {torch, OPENBLAS_NUM_THREADS, measurement (fixtures.parallel)}
      seeds                 {name: int}
      inputs                [{path, bytes, sha256}] model files hashed in this run
      runner                output-level evaluation set-up (corpus, sizes) or null
    model                   {name, kind, parameters (float, tied once), tensors, ties {alias: canonical},
                             buffers [integer/boolean tensor names], conv_grouping (words) | null}
    baselines               {fp32_bytes, fp16_bytes, parameters, how}
    bit_widths[]            one entry per bit width
      bits, scheme, scheme_description, method, fallback (allowed fallback method or null)
      verdict               {decision: "ship" | "do not ship", failed_gates [rules],
                             not_measured [rules: produced elsewhere, not part of the decision],
                             gates (count), outputs_measured bool, output_gates [rules]}
      artifact              {path, bytes, sha256}
      metrics               {metric: value}  (names: harness.measures.METRICS)
      layers[]              {name, scheme, method (as stored), shape, parameters, cosine, sqnr_db,
                             relative_error, row_cosine_min, group_range_ratio_min/max}
    criteria[]              {test, bits, metric, rule, threshold, value, passed, why}
                            passed null: not measured, the artifact was produced elsewhere
                            (why starts "NOT MEASURED: the artifact was produced elsewhere")
    tests                   {total, passed, failed, errors, skipped, deselected [{test, why}]
                             (--artifact only), duration_seconds, failures: [{test, message}]}
    verdict                 "PASS" | "FAIL"
    verdict_scope           "outputs measured" | "WEIGHTS ONLY: outputs not measured"
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timezone
import hashlib
import importlib.metadata
import json
import math
import os
from pathlib import Path
import platform
import subprocess
import sys

from arrowquant_core.atomic import write_bytes_atomic
from typing import Any

SCHEMA_VERSION = 1
MAX_RESULTS_BYTES = 64 * 1024 * 1024  # a results.json is tens of KB; bounded read (issue 10)
OUTPUTS_MEASURED = "outputs measured"
WEIGHTS_ONLY = "WEIGHTS ONLY: outputs not measured"
PACKAGES = ("arrowquant", "numpy", "pyarrow", "torch", "sentence-transformers", "transformers",
            "pytest", "pytest-benchmark", "pytest-json-report", "jinja2", "mypy", "ml_dtypes")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def provenance(inputs: Iterable[Path], seeds: dict[str, int], runner: dict[str, Any] | None) -> dict[str, Any]:
    import arrowquant_core

    from harness.fixtures_import import fixtures_module

    threads: dict[str, Any] = {"OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
                               "measurement": fixtures_module("parallel").threads()}
    # torch's thread count only where this run loaded torch (the MiniLM and transformers
    # runners): importing it here just to ask cost a NumPy-only run (dream-mini) 1.4 s
    torch = sys.modules.get("torch")
    threads["torch"] = torch.get_num_threads() if torch is not None else "not loaded by this run"
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu(),
        "cores": os.cpu_count(),
        "packages": _versions(),
        "core_compiled": arrowquant_core.is_compiled(),
        "threads": threads,
        "seeds": seeds,
        "inputs": [{"path": str(p), "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in inputs],
        "runner": runner,
    }


def _clean(value: Any) -> Any:
    """JSON has no NaN/Infinity: write them as strings a reader can still parse."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_text_atomic(path: Path, text: str) -> Path:
    """Write a UTF-8 text file atomically: readers never see half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json(data: dict[str, Any], path: Path) -> None:
    """Atomic write of a results document."""
    write_text_atomic(path, json.dumps(_clean(data), indent=2) + "\n")


def read_results(path: Path) -> dict[str, Any]:
    from arrowquant_core.errors import ConfigurationError

    from arrowquant_core.errors import FormatError
    from arrowquant_core.limits import read_capped

    try:
        data = json.loads(read_capped(path, MAX_RESULTS_BYTES, "results file").decode("utf-8"))
    except FileNotFoundError:
        raise ConfigurationError(f"results file {path} does not exist") from None
    except FormatError as exc:
        raise ConfigurationError(str(exc)) from None
    except UnicodeDecodeError:
        raise ConfigurationError(f"results file {path}: not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"results file {path}: invalid JSON at line {exc.lineno}") from None
    except (ValueError, RecursionError) as exc:
        raise ConfigurationError(f"results file {path}: invalid JSON ({type(exc).__name__})") from None
    if isinstance(data, dict) and "streaming_results_version" in data:
        return data  # a streaming run's results (harness.streaming), checked by its own verify
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        raise ConfigurationError(
            f"results file {path}: schema_version {data.get('schema_version') if isinstance(data, dict) else None!r}"
            f" is not {SCHEMA_VERSION}")
    return data


def plan_method(entry: dict[str, Any]) -> str:
    """The plan's method as its stored tensors show it: the criteria's method, plus how many
    schemes and which other methods (criteria overrides) the artifact holds, so a label
    never names one method for a file that mixes several."""
    method = str(entry.get("method", "rtn"))
    layers = [layer for layer in entry.get("layers", []) if isinstance(layer, dict)]
    schemes = {layer.get("scheme") for layer in layers if layer.get("scheme")}
    others = sorted({str(layer.get("method")) for layer in layers if layer.get("method")}
                    - {method, entry.get("fallback")})
    extra = ([f"{len(schemes)} schemes"] if len(schemes) > 1 else []) + ([f"+{', '.join(others)}"] if others else [])
    return f"{method} ({'; '.join(extra)})" if extra else method
