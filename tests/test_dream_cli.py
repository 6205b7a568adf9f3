"""The dream fixture's size knob and its command line."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from arrowquant_core.errors import ConfigurationError
from fixtures.dream_mini.__main__ import main
from fixtures.dream_mini.config import DreamConfig
from fixtures.dream_mini.generator import load


def test_sizes_grow_to_the_real_shapes() -> None:
    counts = [sum(math.prod(s) for s in DreamConfig.sized(size).parameter_shapes().values())
              for size in ("mini", "small", "medium", "7b")]
    assert counts == sorted(counts) and counts[0] < 4e6 and counts[-1] > 7e9
    with pytest.raises(ConfigurationError, match="did you mean 'mini'"):
        DreamConfig.sized("mimi")


def test_cli_writes_a_loadable_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--size", "mini", "--out", str(tmp_path / "m"), "--seed", "2"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "m")
    assert load(tmp_path / "m").config == DreamConfig.mini()
