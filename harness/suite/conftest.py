"""Fixtures of the acceptance suite: the run's context, put on the config by SuitePlugin."""

import pytest

from harness.context import RunContext
from harness.plugin import CONTEXT_KEY


@pytest.fixture(scope="session")
def ctx(pytestconfig: pytest.Config) -> RunContext:
    return pytestconfig.stash[CONTEXT_KEY]
