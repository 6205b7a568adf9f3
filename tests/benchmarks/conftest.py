"""Collection rule of the benchmarks folder.

``test_bench_runs.py`` runs three whole harness runs (minutes on this machine): it is
collected only when ``tests/benchmarks`` (or the file) is named on the command line, as
``make bench`` does, never by the default ``pytest`` run (testpaths = tests). The other
benchmarks here are quick and stay in the default run as before."""

from pathlib import Path

import pytest

HEAVY = ("test_bench_runs.py",)
HERE = Path(__file__).resolve().parent


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if collection_path.name not in HEAVY:
        return None
    named = [Path(a.split("::")[0]).resolve() for a in config.args]
    wanted = any(p == HERE or p == collection_path.resolve() for p in named)
    return None if wanted else True
