"""The pytest plugin that hands the run's context to the acceptance suite.

The runner passes an instance to ``pytest.main(..., plugins=[JSONReport(), plugin])``.
It puts the run's context on the pytest config (``harness/suite/conftest.py`` turns
it into the ``ctx`` fixture), parametrizes every test that takes ``bits`` over the
run's bit widths, and prints one progress line per finished test. When the run
judges a file produced elsewhere (``--artifact``), it deselects the tests marked
``@pytest.mark.made_here(metrics=..., why=...)`` and records each with its reason on the
context (``harness.external``): their criteria are reported as not measured.
"""

from __future__ import annotations

from typing import Any

from pathlib import Path

import pytest

from harness.context import RunContext


CONTEXT_KEY = pytest.StashKey[RunContext]()


class SuitePlugin:
    def __init__(self, ctx: RunContext) -> None:
        self.context = ctx
        self.outcomes: dict[str, str] = {}
        self.messages: dict[str, str] = {}

    def pytest_configure(self, config: pytest.Config) -> None:
        config.stash[CONTEXT_KEY] = self.context

    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        # Only the suite's own tests judge a model: a test module of the calling pytest session
        # that shares a suite module's name (tests/test_methods.py) once stood in for it silently.
        suite = Path(__file__).resolve().parent / "suite"
        files = {str(getattr(getattr(item, "module", None), "__file__", None) or item.path) for item in items}
        foreign = sorted(f for f in files if suite not in Path(f).resolve().parents)
        if foreign:
            raise RuntimeError(f"the acceptance suite collected tests from outside {suite}: {foreign[:3]}")
        if self.context.external is None:
            return
        from harness.external import MARKER, Deselected

        keep, drop = [], []
        for item in items:
            mark = item.get_closest_marker(MARKER)
            if mark is None:
                keep.append(item)
                continue
            drop.append(item)
            name = getattr(item, "originalname", item.name)
            if all(d.test != name for d in self.context.deselected):
                self.context.deselected.append(Deselected(name, tuple(mark.kwargs.get("metrics", ())),
                                                          str(mark.kwargs.get("why", ""))))
        if drop:
            config.hook.pytest_deselected(items=drop)
            items[:] = keep

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "bits" in metafunc.fixturenames:
            metafunc.parametrize("bits", list(self.context.bits), ids=[f"int{b}" for b in self.context.bits])

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call":
            outcome = report.outcome
        elif report.failed:
            outcome = "error"  # setup or teardown failed: the gate could not be checked
        else:
            return
        if self.outcomes.get(report.nodeid) in ("failed", "error"):
            return
        self.outcomes[report.nodeid] = outcome
        if report.failed:
            self.messages[report.nodeid] = _message(report)
        self.context.progress(f"{outcome.upper():7s} {report.nodeid.split('::', 1)[-1]}")


def _message(report: pytest.TestReport) -> str:
    crash: Any = getattr(report.longrepr, "reprcrash", None)
    if crash is not None and getattr(crash, "message", None):
        text = str(crash.message)
        return text.removeprefix("AssertionError: ")
    return str(report.longrepr).strip().splitlines()[-1] if report.longrepr else report.outcome

