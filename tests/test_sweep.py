"""``harness sweep`` on a real local Ray instance, and layer-parallel quantization.

One private Ray instance serves the module (start-up is seconds on this machine): the
sweep runs dream-mini at INT8 and INT4 with round-to-nearest, two real harness runs as
Ray tasks, and must write one combined report whose numbers are those of each cell's
own results.json. Parallel quantization must give an artifact byte-identical to the
serial one.
"""

from __future__ import annotations

from collections.abc import Iterator
import json
from pathlib import Path
import sys
import tomllib
from typing import Any

import numpy as np
import pytest

import arrowquant_core as aq
from arrowquant_core.errors import ConfigurationError
from harness import exitcodes
from harness.cli import parser
from harness.criteria import default_criteria_path
from harness.sweep import (
    SWEEP_CHART,
    SWEEP_JSON,
    SweepConfig,
    exit_code,
    plan_cells,
    quantize_model_ray,
    ray_session,
    sweep,
    to_toml,
    write_report,
)
from tests.conftest import SEED, make_weights

# one local Ray instance at a time: these tests share one pytest-xdist worker
pytestmark = pytest.mark.xdist_group("ray")


@pytest.fixture(scope="module")
def ray_local() -> Iterator[Any]:
    with ray_session(num_cpus=2) as ray:
        yield ray


@pytest.fixture(scope="module")
def swept(ray_local: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    out = tmp_path_factory.mktemp("sweep")
    # one timing round per cell: the sweep is under test here, not the timing gates
    return sweep(SweepConfig(models=("dream-mini",), bits=(8, 4), methods=("rtn",), out=out, quiet=True,
                             benchmark_rounds=1))


def test_sweep_writes_one_report_from_the_cells_results(swept: tuple[int, Path]) -> None:
    code, report = swept
    out = report.parent
    data = json.loads((out / SWEEP_JSON).read_text(encoding="utf-8"))
    cells = data["cells"]
    assert [(c["model"], c["bits"], c["method"]) for c in cells] == [("dream-mini", 8, "rtn"), ("dream-mini", 4, "rtn")]
    assert code == exitcodes.OK and [c["verdict"] for c in cells] == ["PASS", "PASS"]
    text = report.read_text(encoding="utf-8")
    for cell in cells:
        results = json.loads((Path(cell["out"]) / "results.json").read_text(encoding="utf-8"))
        entry = results["bit_widths"][0]
        assert entry["bits"] == cell["bits"] and entry["method"] == "rtn"
        assert entry["artifact"]["bytes"] == cell["artifact_bytes"] == Path(entry["artifact"]["path"]).stat().st_size
        assert cell["bits_per_weight"] == entry["metrics"]["bits_per_weight"]
        assert cell["quality_metric"] == "masked_top1_agreement"
        row = f"| dream-mini | {cell['bits']} | rtn | — | {entry['scheme']} | {cell['artifact_bytes'] / 1e6:.2f} MB | " \
              f"{cell['bits_per_weight']:.2f} | {cell['quality']:.4f} (masked_top1_agreement) | PASS |"
        assert row in text
        criteria = tomllib.loads((Path(cell["out"]) / "criteria.toml").read_text(encoding="utf-8"))
        assert criteria["bits"][str(cell["bits"])]["method"] == "rtn"
    int8, int4 = cells
    assert int4["bits_per_weight"] < int8["bits_per_weight"] and int4["quality"] < int8["quality"]
    svg = (out / SWEEP_CHART).read_text(encoding="utf-8")
    assert svg.count("<circle") == 2 and "dream-mini INT4 rtn" in svg


def test_a_failing_cell_fails_the_sweep_and_says_why(swept: tuple[int, Path], tmp_path: Path) -> None:
    data = json.loads((swept[1].parent / SWEEP_JSON).read_text(encoding="utf-8"))
    data["cells"][1].update(verdict="FAIL", failures=["kl_mean = 2.1 > 1.5"])
    report = write_report(data, tmp_path)
    assert exit_code(data["cells"]) == exitcodes.GATE_FAILED
    assert "1 of 2 cell(s) passed" in report.read_text(encoding="utf-8")
    assert "- dream-mini INT4 rtn: kl_mean = 2.1 > 1.5" in report.read_text(encoding="utf-8")
    data["cells"][0].update(verdict="ERROR", error="RuntimeError: boom")
    assert exit_code(data["cells"]) == exitcodes.HARNESS_ERROR


def test_parallel_quantization_is_byte_identical(ray_local: Any, tmp_path: Path) -> None:
    weights = make_weights(np.random.default_rng(SEED))
    rng = np.random.default_rng(SEED + 1)
    for i in range(4):
        weights[f"layer.{i + 1}.mlp.weight"] = (rng.standard_normal((24, 128)) * 0.05).astype(np.float32)
    acts = rng.standard_normal((64, 128)).astype(np.float32)
    hessians = {"layer.2.mlp.weight": (2.0 * acts.T @ acts / 64).astype(np.float32)}
    config = aq.QuantizationConfig("int4-g32-asym", method="gptq", overrides=(("layer.0.*", "int8-channel-sym"),))
    serial = aq.quantize_model(weights, config, hessians=hessians)
    parallel = quantize_model_ray(weights, config, chunks=3, hessians=hessians)
    assert parallel.tensors["layer.2.mlp.weight"].method == "gptq"  # the Hessian reached its chunk
    assert list(parallel.order) == list(weights)
    a, b = aq.save(serial, tmp_path / "serial.parquet"), aq.save(parallel, tmp_path / "parallel.parquet")
    assert a.read_bytes() == b.read_bytes()


def test_missing_ray_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(ConfigurationError, match=r"pip install 'arrowquant\[ray\]'"):
        with ray_session():
            pass


def test_cells_are_validated_before_any_task(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="residual2"):
        plan_cells(SweepConfig(models=("dream-mini",), bits=(8,), methods=("residual2",), out=tmp_path))
    with pytest.raises(ConfigurationError, match=r"bits\.3|no \[bits"):
        plan_cells(SweepConfig(models=("dream-mini",), bits=(3,), out=tmp_path))


@pytest.mark.parametrize("name", ["minilm", "dream-mini", "weights", "minilm-edge"])
def test_derived_criteria_round_trip_through_toml(name: str) -> None:
    path = default_criteria_path(name) if "-edge" not in name else default_criteria_path("minilm", "edge")
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    assert tomllib.loads(to_toml(data)) == data


def test_cli_parses_a_sweep() -> None:
    args = parser().parse_args(["sweep", "--model", "minilm,dream-mini", "--bits", "8,4", "--methods", "rtn,hqq",
                                "--address", "ray://head:10001"])
    assert (args.command, args.model, args.bits, args.methods, args.address) == (
        "sweep", "minilm,dream-mini", (8, 4), "rtn,hqq", "ray://head:10001")
