"""Collection rule of the benchmarks folder.

``test_bench_runs.py`` runs three whole harness runs (minutes on this machine): it is
collected only when the file itself is named on the command line, as ``make bench``
does, never by the default ``pytest`` run nor by ``make test``'s serial benchmark session
(``pytest tests/benchmarks``). The other benchmarks here are quick and stay in
``make test``."""

from pathlib import Path

import pytest

HEAVY = ("test_bench_runs.py",)


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if collection_path.name not in HEAVY:
        return None
    named = [Path(a.split("::")[0]).resolve() for a in config.args]
    wanted = any(p == collection_path.resolve() for p in named)
    return None if wanted else True
