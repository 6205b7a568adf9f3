"""The cache of generated fixture folders (fixtures/cache.py) under concurrent use.

The project's suite runs on two pytest-xdist workers, and two harness runs may share a
machine: both may ask for the same fixture folder at once. One must build it while the
other waits and reuses it; nobody may see a half-written folder; a failed build leaves
nothing behind.
"""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path
import time

import pytest

from fixtures.cache import MANIFEST, ensure_generated

KEY = {"fixture": "cache-test", "version": 1}


def _slow_generate(folder: Path, log: Path) -> None:
    with log.open("a") as handle:
        handle.write("built\n")
    folder.mkdir(parents=True)
    (folder / "weights.bin").write_bytes(b"a" * 1000)
    time.sleep(1.0)  # long enough for the other process to arrive while this one builds
    (folder / "config.json").write_text("{}")


def _ask(root: str, log: str, out: str) -> None:
    folder = ensure_generated("cached", KEY, lambda f: _slow_generate(f, Path(log)), Path(root))
    Path(out).write_text(json.dumps({"folder": str(folder), "files": sorted(p.name for p in folder.iterdir())}))


def test_two_processes_build_a_folder_once_and_both_see_it_whole(tmp_path: Path) -> None:
    log = tmp_path / "log"
    context = multiprocessing.get_context("fork")  # two real processes, each with its own lock handle
    procs = [context.Process(target=_ask, args=(str(tmp_path / "root"), str(log), str(tmp_path / f"out{i}")))
             for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    outs = [json.loads((tmp_path / f"out{i}").read_text()) for i in range(2)]
    assert outs[0] == outs[1] and outs[0]["files"] == ["config.json", MANIFEST, "weights.bin"]
    assert log.read_text() == "built\n", "the second process reused the first one's build"
    assert sorted(p.name for p in (tmp_path / "root").iterdir() if not p.name.endswith(".lock")) == \
        [Path(outs[0]["folder"]).name], "no staging folder left behind"


def test_a_damaged_file_is_rebuilt_and_a_failed_build_leaves_nothing(tmp_path: Path) -> None:
    log = tmp_path / "log"
    folder = ensure_generated("cached", KEY, lambda f: _slow_generate(f, log), tmp_path)
    assert ensure_generated("cached", KEY, lambda f: _slow_generate(f, log), tmp_path) == folder
    assert log.read_text() == "built\n"
    (folder / "weights.bin").write_bytes(b"damaged")
    ensure_generated("cached", KEY, lambda f: _slow_generate(f, log), tmp_path)
    assert log.read_text() == "built\nbuilt\n" and (folder / "weights.bin").read_bytes() == b"a" * 1000

    def broken(f: Path) -> None:
        f.mkdir(parents=True)
        (f / "weights.bin").write_bytes(b"half")
        raise RuntimeError("generator failed")

    with pytest.raises(RuntimeError, match="generator failed"):
        ensure_generated("other", KEY, broken, tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("other") and not p.name.endswith(".lock")]
