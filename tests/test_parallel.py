"""Measurement on several threads (fixtures.parallel) gives the figures one thread gives.

A harness run measures side by side on every core (``--threads`` / ``ARROWQUANT_THREADS``):
dream-mini's weight-only and weight-activation evaluations, the original model's side
and the GPTQ Hessian rows; the calibration ``XᵀX`` sums beside MiniLM's forward pass. Each computation still runs on one thread in the same order,
so the results must be bit-identical; these tests compare real runners at 1 and 2
threads, and check the plumbing (order, errors, the environment setting, the CLI flag).
torch itself stays at one thread: two may change a forward pass's float sums.
"""

from __future__ import annotations

import os
from pathlib import Path
import threading
import time

import numpy as np
import pytest
import torch

import arrowquant_core as aq
from arrowquant_core.errors import ConfigurationError, QuantizationError
from fixtures import parallel
from fixtures.dream_mini import runner as dream_runner
from fixtures.runners.torch_util import capture_linear_hessians
from harness.cli import main


def test_map_ordered_keeps_the_order_of_its_items() -> None:
    seen: set[str] = set()

    def slow_first(x: int) -> int:
        time.sleep(0.05 * (3 - x))  # the first item finishes last
        seen.add(threading.current_thread().name)
        return x * 10

    assert parallel.map_ordered(slow_first, [0, 1, 2], workers=2) == [0, 10, 20]
    assert len(seen) == 2  # really on two threads
    assert parallel.map_ordered(slow_first, [2, 1], workers=1) == [20, 10]


def test_map_ordered_raises_the_error_of_a_call() -> None:
    def boom(x: int) -> int:
        if x == 1:
            raise QuantizationError("tensor 'w': broken on purpose")
        return x

    with pytest.raises(QuantizationError, match="broken on purpose"):
        parallel.map_ordered(boom, [0, 1, 2], workers=2)


def test_threads_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(parallel.ENV, raising=False)
    assert parallel.threads() == max(1, os.cpu_count() or 1)
    monkeypatch.setenv(parallel.ENV, "3")
    assert parallel.threads() == 3
    for bad in ("0", "-1", "two"):
        monkeypatch.setenv(parallel.ENV, bad)
        with pytest.raises(ConfigurationError, match="ARROWQUANT_THREADS"):
            parallel.threads()


def test_cli_threads_flag_is_checked_and_leaves_the_environment_as_it_was(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--model", "dream-mini", "--threads", "0"])
    assert exit_info.value.code == 2
    assert "--threads" in capsys.readouterr().err
    monkeypatch.setenv(parallel.ENV, "lots")
    assert main(["run", "--model", "dream-mini", "--quiet"]) == 2  # refused before any work
    assert "ARROWQUANT_THREADS='lots'" in capsys.readouterr().err
    monkeypatch.setenv(parallel.ENV, "1")
    # an unknown model fails after the flag took effect; the variable is restored
    code = main(["run", "--model", "no-such-model-here", "--threads", "2", "--quiet"])
    assert code != 0
    assert os.environ[parallel.ENV] == "1"


# --- the Hessian capture: XᵀX beside the forward pass -------------------------------

def _tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(24, 48), torch.nn.GELU(), torch.nn.Linear(48, 24),
                               torch.nn.GELU(), torch.nn.Linear(24, 8))


def _capture(net: torch.nn.Module, batches: list[torch.Tensor]) -> dict[str, np.ndarray]:
    def run() -> None:
        for b in batches:
            net(b)
    return capture_linear_hessians(net, run)


def test_hessians_accumulated_on_threads_equal_the_one_thread_sums(monkeypatch: pytest.MonkeyPatch) -> None:
    net = _tiny_net()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(int(n), 24, generator=gen) * 3 for n in (5, 64, 1, 300, 17)]
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the runners keep it: see the next test
    try:
        monkeypatch.setenv(parallel.ENV, "1")
        one = _capture(net, batches)
        monkeypatch.setenv(parallel.ENV, "2")
        two = _capture(net, batches)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(torch_threads)
    assert sorted(one) == sorted(two) == ["0.weight", "2.weight", "4.weight"]
    for name in one:
        assert np.array_equal(one[name], two[name]), name
    # and they are the Hessians: 2 XᵀX / n of the first layer's inputs, to float32
    # precision (each batch's product is float32: arrowquant_core.gptq.HessianAccumulator)
    x = torch.cat(batches).numpy().astype(np.float64)
    exact = 2 * x.T @ x / x.shape[0]
    assert np.allclose(one["0.weight"], exact, rtol=1e-5, atol=1e-6 * float(np.abs(exact).max()))


@pytest.mark.parametrize("threads", ["1", "2"])
def test_nonfinite_activations_name_the_layer_with_any_thread_count(
        threads: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(parallel.ENV, threads)
    net = _tiny_net()
    bad = torch.randn(4, 24)
    bad[2, 5] = float("nan")
    with pytest.raises(QuantizationError, match=r"tensor '0\.weight'.*NaN or Inf"):
        _capture(net, [torch.randn(3, 24), bad, torch.randn(2, 24)])


def test_minilm_hessians_do_not_depend_on_the_thread_count(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from fixtures.checkpoint import load_model

    runner = load_model("minilm").runner
    assert runner is not None
    sentences = runner.calibration[:96]
    got = {}
    for n in ("1", "2"):
        monkeypatch.setenv(parallel.ENV, n)
        got[n] = runner.capture_hessians(sentences)
        assert torch.get_num_threads() == 1
    assert sorted(got["1"]) == sorted(got["2"]) and len(got["1"]) == 37
    for name, h in got["1"].items():
        assert np.array_equal(h, got["2"][name]), name


# --- dream-mini: evaluations side by side -------------------------------------------

def test_dream_mini_comparison_is_identical_on_one_and_two_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The weight-only evaluation, two weight-activation configurations and the original
    model's side (recomputed at each count) measured on 1 and 2 threads."""
    folder = dream_runner.ensure_fixture()
    configs = tuple(c for c in dream_runner.ACT_CONFIGS if c.key in ("a8_tensor_timeaware", "a4_token"))
    assert len(configs) == 2
    results = {}
    for n in ("1", "2"):
        monkeypatch.setenv(parallel.ENV, n)
        monkeypatch.setattr(dream_runner, "_SHARED_REFERENCE", {})  # the original's side, measured again
        runner = dream_runner.DreamRunner(folder, act_configs=configs)
        model = aq.quantize_model(runner.original, aq.QuantizationConfig("int4-g128-asym"))
        results[n] = runner.compare(model.dequantize())
    one, two = results["1"], results["2"]
    assert one.keys() == two.keys()
    assert "a8_tensor_timeaware_kl_mean" in one and "a4_token_kl_mean" in one and "frontier_flip_rate8" in one
    assert one == two  # every figure and table, bit for bit


# --- MiniLM: the ladder's sensitivity pass side by side ------------------------------

def test_ladder_plan_is_the_same_with_a_parallel_sensitivity_pass() -> None:
    from arrowquant_core.plan import Rung, plan_quality
    from fixtures.checkpoint import load_model

    runner = load_model("minilm").runner
    assert runner is not None
    names = ["encoder.layer.0.attention.self.value.weight", "encoder.layer.5.output.dense.weight",
             "embeddings.position_embeddings.weight"]
    rungs = (Rung("int2-g32-asym"), Rung("int4-g64-asym"), Rung("int8-g128-asym"))
    score = runner.calibration_score()
    lines: list[str] = []
    plans = [plan_quality(runner.source, names, rungs, score, layer_threshold=0.002, target=0.995,
                          mapper=mapper, progress=lines.append)
             for mapper in (None, parallel.map_ordered)]
    serial, side_by_side = plans
    # repr: the damage of rungs never measured is NaN, which never equals itself
    assert repr(serial.decisions) == repr(side_by_side.decisions) and serial.score == side_by_side.score
    assert serial.log == side_by_side.log
    assert sum(line.startswith("sensitivity ") for line in lines) == 2 * len(names)
    assert any(d.rung > 0 for d in serial.decisions)  # the ladder had something to decide


# --- a whole run: --threads 1 and --threads 2 write the same figures -----------------

def _figures(results: dict) -> dict:  # type: ignore[type-arg]
    """Every measured figure of a results.json except timings (they move with the load)."""
    out = {}
    for entry in results["bit_widths"]:
        metrics = {k: v for k, v in entry["metrics"].items() if "seconds" not in k}
        out[entry["bits"]] = {"metrics": metrics, "layers": entry["layers"], "verdict": entry["verdict"]}
    out["criteria"] = [{k: v for k, v in c.items() if k != "value"} | (
        {} if "seconds" in c["metric"] else {"value": c["value"]}) for c in results["criteria"]]
    out["verdict"] = results["verdict"]
    return out


def test_minilm_run_gives_the_same_figures_on_one_and_two_threads(tmp_path: Path) -> None:
    """The harness's own fan-out: the bit widths' encodes on leased model copies, with the
    reference beside them (prepare), weight metrics per tensor. In-process, so the second
    run reuses the first's calibration capture; the Hessians' own thread test is above."""
    import json

    results = {}
    for n in ("2", "1"):  # the second run reuses the first's calibration capture (in-process)
        out = tmp_path / f"threads{n}"
        code = main(["run", "--model", "minilm", "--bits", "8,2", "--threads", n, "--out", str(out), "--quiet"])
        assert code == 0
        results[n] = json.loads((out / "results.json").read_text(encoding="utf-8"))
        assert results[n]["provenance"]["threads"]["measurement"] == int(n)
    assert _figures(results["1"]) == _figures(results["2"])
    assert len(results["1"]["bit_widths"][0]["layers"]) == 40


# --- quantize_model: tensors side by side --------------------------------------------

def test_quantize_model_on_two_threads_writes_the_same_file(tmp_path: Path) -> None:
    """dream-mini with its calibration Hessians (GPTQ), one tensor at a time and two side
    by side: the saved artifacts are equal byte for byte, and the progress callback saw
    every tensor once each time."""
    runner = dream_runner.DreamRunner(dream_runner.ensure_fixture())
    hessians = runner.calibration_hessians()
    config = aq.QuantizationConfig("int4-g128-asym", method="gptq")
    seen: list[str] = []
    files = []
    for mapper in (None, lambda fn, names: parallel.map_ordered(fn, names, workers=2)):
        model = aq.quantize_model(runner.original, config, hessians=hessians, mapper=mapper,
                                  progress=lambda _d, _t, name: seen.append(name))
        assert sum(t.method == "gptq" for t in model.tensors.values()) >= 10
        files.append(aq.save(model, tmp_path / f"{'serial' if mapper is None else 'two'}.parquet").read_bytes())
    assert files[0] == files[1]
    assert len(seen) == 2 * len(set(seen)) == 2 * len(runner.original)


def test_realize_on_two_threads_writes_the_same_file(tmp_path: Path) -> None:
    """A ladder plan over dream-mini's matrices, every rung used (INT2 GPTQ, INT4 GPTQ,
    INT8, FP16): realized one tensor at a time and two side by side, the saved artifacts
    are equal byte for byte."""
    from arrowquant_core.plan import FP16, LayerDecision, MixedPlan, Rung, realize

    runner = dream_runner.DreamRunner(dream_runner.ensure_fixture())
    hessians = runner.calibration_hessians()
    rungs = (Rung("int2-g64-asym", "gptq"), Rung("int4-g128-asym", "gptq"), Rung("int8-g128-asym"), Rung(FP16))
    names = [n for n, a in runner.original.items() if a.ndim == 2]
    decisions = tuple(LayerDecision(n, i % len(rungs), "test", (), int(runner.original[n].size))
                      for i, n in enumerate(names))
    plan = MixedPlan(rungs, decisions, 0, 1.0, ())
    files = []
    for mapper in (None, lambda fn, items: parallel.map_ordered(fn, items, workers=2)):
        model = realize(runner.original, plan, hessians, mapper=mapper)
        assert {t.method for t in model.tensors.values()} >= {"gptq", "rtn"} and len(model.floats) >= 2
        files.append(aq.save(model, tmp_path / f"{'serial' if mapper is None else 'two'}.parquet").read_bytes())
    assert files[0] == files[1]


def test_quantize_model_on_two_threads_skips_and_fails_as_serially(weights: dict) -> None:  # type: ignore[type-arg]
    """A tensor that cannot be quantized is kept as float and named in ``skipped`` either
    way; with fail_fast the first such tensor, in model order, raises."""
    bad = dict(weights)
    bad["layer.0.attn.q.weight"] = np.full((16, 100), np.nan, dtype=np.float32)
    bad["layer.1.attn.q.weight"] = np.full((16, 100), np.inf, dtype=np.float32)
    two = lambda fn, names: parallel.map_ordered(fn, names, workers=2)  # noqa: E731
    models = [aq.quantize_model(bad, aq.QuantizationConfig("int4-g32-asym", fail_fast=False), mapper=m)
              for m in (None, two)]
    assert models[0].skipped == models[1].skipped and sorted(models[0].skipped) == [
        "layer.0.attn.q.weight", "layer.1.attn.q.weight"]
    assert sorted(models[0].tensors) == sorted(models[1].tensors)
    for mapper in (None, two):
        with pytest.raises(QuantizationError, match=r"layer\.0\.attn\.q\.weight"):
            aq.quantize_model(bad, aq.QuantizationConfig("int4-g32-asym", fail_fast=True), mapper=mapper)


def test_dequantize_on_two_threads_gives_the_same_arrays(tmp_path: Path) -> None:
    """The real MiniLM at INT4 (the loaded artifact, every float, buffer and tie kept):
    ``dequantize`` and ``load_weights`` with two threads give the arrays one thread
    gives, in the same order, dtype for dtype and bit for bit, a tie still the very array
    of its canonical tensor."""
    from fixtures.minilm.model import original_weights

    weights = dict(original_weights())
    canonical = next(n for n, a in weights.items() if a.ndim == 2)
    weights["tied.copy.weight"] = weights[canonical]
    ties = {"tied.copy.weight": canonical}
    model = aq.quantize_model(weights, aq.QuantizationConfig("int4-g64-asym"), ties=ties)
    path = aq.save(model, tmp_path / "minilm-int4.parquet")
    loaded = aq.load(path)
    assert len(loaded.tensors) >= 30 and loaded.floats and loaded.ties
    two = lambda fn, items: parallel.map_ordered(fn, items, workers=2)  # noqa: E731
    serial, side_by_side, via_v1 = loaded.dequantize(), loaded.dequantize(two), aq.load_weights(path, mapper=two)
    assert list(serial) == list(side_by_side) == list(via_v1) == list(loaded.order)
    for name, array in serial.items():
        for other in (side_by_side[name], via_v1[name]):
            assert other.dtype == array.dtype and other.shape == array.shape, name
            assert other.view(np.uint8).tobytes() == array.view(np.uint8).tobytes(), name
    for alias, canonical in loaded.ties.items():
        assert side_by_side[alias] is side_by_side[canonical]
