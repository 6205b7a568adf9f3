"""The ArrowQuant gate inside your own pytest run (``pytest11`` entry point ``arrowquant``).

Installed with the package, so another team's test suite gets it with no code::

    pytest --arrowquant-model dream-mini --arrowquant-bits 4 \
           --arrowquant-criteria gates.toml --arrowquant-baseline last-release/results.json \
           --arrowquant-out build/arrowquant

adds one test item, ``arrowquant::gate[<model>]``, that runs the whole validation
(``harness.api.validate``) and fails with every failed gate's message (metric, measured
value, rule, reason). Or, from a test of your own::

    def test_int4_gate(arrowquant_validate):
        result = arrowquant_validate("path/to/checkpoint", bits=4)
        assert result.verdict == "PASS", result.results["tests"]["failures"]

The fixture's defaults come from the same command-line options; its ``out`` defaults to
a fresh temporary folder. Either way the outcome (verdict, results/report paths, failed
gates, baseline deltas) is added to the test's pytest-json-report metadata under
``"arrowquant"`` and to the report's top level under ``"arrowquant"`` (with
``--json-report``).

Not to be confused with ``harness/plugin.py``, the acceptance suite's internal plugin.
Without ``--arrowquant-model`` this plugin adds no test and changes nothing, so it is
inert in any other pytest run, including the harness's own in-process suite.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from harness.progress import remember_real_stderr

if TYPE_CHECKING:  # importing the runner pulls in numpy, pyarrow and the core: only when a gate runs
    from harness.runner import RunResult

# pytest imports plugins before it starts capturing: keep the real stderr now, so the
# harness's progress bars stay visible while the gate runs inside a test (harness/progress.py)
remember_real_stderr()

GATE_NAME = "arrowquant-gate"
_RECORDS = pytest.StashKey[list[dict[str, Any]]]()
_ITEM_RECORDS = pytest.StashKey[list[dict[str, Any]]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("arrowquant", "ArrowQuant quantization gate")
    group.addoption("--arrowquant-model", default=None,
                    help="gate this model (a name from `python -m harness list` or a checkpoint folder); "
                         "adds the test item arrowquant::gate")
    group.addoption("--arrowquant-bits", default="", help="comma-separated bit widths, e.g. 8,4 (default: all "
                                                          "in the criteria file)")
    group.addoption("--arrowquant-criteria", default=None, help="criteria TOML (default: the model's own)")
    group.addoption("--arrowquant-baseline", default=None,
                    help="results.json of an earlier run for rules like 'kl_mean <= baseline * 1.05'")
    group.addoption("--arrowquant-profile", default=None, help="deployment profile: edge, local or cloud")
    group.addoption("--arrowquant-artifact", default=None,
                    help="judge this GGUF file made elsewhere (llama.cpp, gguf-py) as the model's artifact instead "
                         "of quantizing it (python -m harness run --artifact)")
    group.addoption("--arrowquant-out", default=None,
                    help="folder for the report and results.json (default: <rootdir>/arrowquant-reports)")


def _bits(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise pytest.UsageError(f"--arrowquant-bits {text!r}: expected comma-separated bit widths, e.g. 8,4") from None


def _options(config: pytest.Config) -> dict[str, Any]:
    return {
        "bits": _bits(config.getoption("arrowquant_bits") or ""),
        "criteria": config.getoption("arrowquant_criteria"),
        "baseline": config.getoption("arrowquant_baseline"),
        "profile": config.getoption("arrowquant_profile"),
        "artifact": config.getoption("arrowquant_artifact"),
    }


def outcome(result: RunResult) -> dict[str, Any]:
    """The JSON-able summary recorded in pytest-json-report's metadata."""
    results = result.results
    return {
        "model": results["run"]["model"],
        "verdict": result.verdict,
        "exit_code": result.exit_code,
        "results_path": str(result.results_path),
        "report_path": str(result.report_path),
        "bits": [e["bits"] for e in results["bit_widths"]],
        "gates_total": len(results["criteria"]),
        "failed_gates": [{"bits": c["bits"], "rule": c["rule"], "value": c["value"], "why": c["why"]}
                         for c in results["criteria"] if c["passed"] is False],
        # criteria a GGUF made elsewhere cannot have (--artifact): neither passed nor failed
        "not_measured": [{"bits": c["bits"], "rule": c["rule"], "why": c["why"]}
                         for c in results["criteria"] if c["passed"] is None],
        "failures": results["tests"]["failures"],
        "baseline": (results.get("baseline") or {}).get("path"),
        "baseline_deltas": (results.get("baseline") or {}).get("deltas", []),
    }


def _record(config: pytest.Config, item: pytest.Item, result: RunResult) -> None:
    record = outcome(result)
    config.stash.setdefault(_RECORDS, []).append(record)
    item.stash.setdefault(_ITEM_RECORDS, []).append(record)


class GateFailed(Exception):
    """The model failed the gate; the message lists every failed rule."""


class GateItem(pytest.Item):
    """``arrowquant::gate[<model>]``: one validation run as a test."""

    def __init__(self, *, model: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = model

    def runtest(self) -> None:
        from harness.api import validate

        config = self.config
        out = config.getoption("arrowquant_out") or Path(str(config.rootpath)) / "arrowquant-reports"
        result = validate(self.model, out=out, **_options(config))
        _record(config, self, result)
        if result.exit_code != 0:
            failures = result.results["tests"]["failures"]
            lines = [f"ArrowQuant gate {result.verdict} for {self.model!r} (report: {result.report_path})"]
            lines += [f"  {f['message']}" for f in failures] or ["  (see the report)"]
            raise GateFailed("\n".join(lines))

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, GateFailed):
            return str(excinfo.value)
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[Path, int, str]:
        return self.path, 0, f"arrowquant::gate[{self.model}]"


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    model = config.getoption("arrowquant_model", None)
    if model:
        _bits(config.getoption("arrowquant_bits") or "")  # a usage error before any test runs
        items.append(GateItem.from_parent(session, name=f"{GATE_NAME}[{model}]", model=model))


@pytest.fixture
def arrowquant_validate(request: pytest.FixtureRequest,
                        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., RunResult]]:
    """``arrowquant_validate(model=None, **options) -> RunResult``.

    Defaults come from the ``--arrowquant-*`` options; ``out`` defaults to a fresh
    temporary folder. Accepts every keyword of ``harness.api.validate``."""
    from harness.api import validate

    config = request.config

    def call(model: str | Path | None = None, **kwargs: Any) -> RunResult:
        chosen = model or config.getoption("arrowquant_model")
        if not chosen:
            raise pytest.UsageError("arrowquant_validate(): pass a model or --arrowquant-model")
        options = {k: v for k, v in _options(config).items() if v not in (None, ())}
        options.update(kwargs)
        options.setdefault("out", config.getoption("arrowquant_out") or tmp_path_factory.mktemp("arrowquant"))
        result = validate(chosen, **options)
        _record(config, request.node, result)
        return result

    yield call


@pytest.hookimpl(optionalhook=True)
def pytest_json_runtest_metadata(item: pytest.Item, call: pytest.CallInfo[None]) -> dict[str, Any]:
    """pytest-json-report: the item's validations, under ``metadata.arrowquant``."""
    records = item.stash.get(_ITEM_RECORDS, None)
    if call.when != "call" or not records:
        return {}
    return {"arrowquant": records[0] if len(records) == 1 else records}


@pytest.hookimpl(optionalhook=True)
def pytest_json_modifyreport(json_report: dict[str, Any]) -> None:
    """pytest-json-report: every validation of the session, at the report's top level."""
    # the hook has no config argument; the records ride on the json_report's session
    records = _SESSION_RECORDS[-1] if _SESSION_RECORDS else []
    if records:
        json_report["arrowquant"] = records


_SESSION_RECORDS: list[list[dict[str, Any]]] = []


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_RECORDS] = []
    _SESSION_RECORDS.append(config.stash[_RECORDS])


def pytest_unconfigure(config: pytest.Config) -> None:
    records = config.stash.get(_RECORDS, None)
    if records is not None and _SESSION_RECORDS and _SESSION_RECORDS[-1] is records:
        _SESSION_RECORDS.pop()
