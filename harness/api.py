"""The Python API: gate a model from your own code or tests.

>>> from harness.api import validate
>>> result = validate("dream-mini", bits=4, out="build/aq")        # doctest: +SKIP
>>> result.verdict, result.exit_code, result.results_path           # doctest: +SKIP
('PASS', 0, PosixPath('build/aq/results.json'))

``validate`` is the same run as ``python -m harness run`` (and the ``arrowquant`` console
script): it quantizes the model, runs the acceptance suite, writes
``QUANTIZATION_VALIDATION_REPORT.md`` and ``results.json`` into ``out`` and returns a
``RunResult``. It does not raise on a failed gate — check ``result.verdict`` ("PASS" /
"FAIL") or ``result.exit_code`` (0 pass, 1 a gate failed). Bad input (unknown model, bad criteria
file, incomparable baseline) raises ``arrowquant_core.errors.ConfigurationError`` or
another ``ArrowQuantError`` that names the file and the rule.

From pytest, the ``arrowquant_validate`` fixture of ``harness.pytest_plugin`` wraps this
function and records the outcome in pytest-json-report's metadata.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
import json
from pathlib import Path

from harness.config import RunConfig
from harness.runner import RunResult

__all__ = ["RunConfig", "RunResult", "run_config", "validate"]


def _bits(bits: int | Iterable[int]) -> tuple[int, ...]:
    return (bits,) if isinstance(bits, int) else tuple(int(b) for b in bits)


def validate(model: str | Path, *, bits: int | Iterable[int] = (), criteria: str | Path | None = None,
             out: str | Path = "reports", baseline: str | Path | None = None, profile: str | None = None,
             compare: bool = False, benchmark_rounds: int = 3, quiet: bool = False,
             fail_fast: bool = False, artifact: str | Path | None = None) -> RunResult:
    """Quantize ``model``, run every gate, write the report; return the outcome.

    ``model``: a registered name (``python -m harness list``) or a checkpoint folder.
    ``bits``: one bit width or several (default: every bit width the criteria cover).
    ``criteria``: a criteria TOML (default: the model's own, ``harness/criteria/``).
    ``baseline``: a results.json of an earlier run, for rules such as
    ``output_cosine_mean >= baseline - 0.002``.
    ``profile``: ``edge``, ``local`` or ``cloud`` (selects ``<model>-<profile>.toml``).
    ``fail_fast``: a failing time-aware activation pass raises instead of falling back.
    ``artifact``: a GGUF file produced elsewhere (llama.cpp, gguf-py), judged by the same
    suite instead of quantizing ``model``; ``bits`` then picks the criteria (default:
    inferred from the file's main tensor type).
    """
    config = RunConfig(model=str(model), bits=_bits(bits), criteria=Path(criteria) if criteria else None,
                       out=Path(out), profile=profile, compare=compare, benchmark_rounds=benchmark_rounds,
                       quiet=quiet, baseline=Path(baseline) if baseline else None,
                       artifact=Path(artifact) if artifact else None, fail_fast=fail_fast)
    return run_config(config)


def run_config(config: RunConfig) -> RunResult:
    """``harness.runner.run`` (what the CLI calls).

    With ``config.baseline`` the runner resolves the criteria against it first
    (``harness.baseline.prepare``: refuses an incomparable baseline, writes
    ``<out>/<criteria>.resolved.toml``), judges the run by the resolved file, and adds
    the per-bit deltas to results.json under ``"baseline"`` and to the report.
    """
    from harness.runner import run

    return run(config)


def load_results(path: str | Path) -> dict[str, object]:
    """A results.json as a dict (for asserting on numbers in your own tests)."""
    data: dict[str, object] = json.loads(Path(path).read_text(encoding="utf-8"))
    return data
