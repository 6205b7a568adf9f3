"""The output gates of a model a user brings must be able to say no.

The any-model runners measure their own output metrics: the causal-LM runner (KL,
top-1, perplexity) on the tiny GPT-2 of ``fixtures/tiny_lm.py``, the encoder runner
(pooled and per-token hidden-state cosines) on MiniLM's folder run as a plain
transformers encoder. Each fault runs through the whole harness on the real model and
must fail every gate named here; the same run without the fault passes (the control),
so the failures are the fault's. Each gate of ``runner-hf-causal-lm.toml`` and
``runner-hf-encoder.toml`` is failed by at least one fault here (tests/test_gate_audit.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.config import RunConfig
from harness.runner import RunResult, run
from tests.gate_keys import keys

# (runner, bits, fault) -> the gates that must all fail. Measured (seed 0): rows-permuted
# takes the tiny GPT-2's top-1 agreement to 0.0 and its perplexity x150-210; the tied
# embedding with 64 rows swapped gives KL max 3.1 nats at INT4; the first layer's
# LayerNorm gain x1.5 gives KL mean 0.048 and perplexity x1.07 at INT8; rows-permuted
# takes MiniLM's worst token's hidden-state cosine to ~0.1 at INT8 and INT4.
FAILS = {
    ("hf-causal-lm", 8, "norm-gain-scaled"): {"kl_mean", "kl_max", "next_token_top1_agreement", "perplexity_ratio",
                                              "kept_tensors_changed"},
    ("hf-causal-lm", 4, "embedding-rows-swapped"): {"kl_mean", "kl_max", "kl_p99", "perplexity_ratio"},
    ("hf-causal-lm", 4, "rows-permuted"): {"kl_mean", "kl_max", "kl_p99", "next_token_top1_agreement",
                                           "perplexity_ratio"},
    ("hf-causal-lm", 2, "rows-permuted"): {"kl_mean", "kl_p99", "kl_mean_worst_sentence",
                                           "next_token_top1_agreement", "perplexity_ratio"},
    ("hf-encoder", 8, "rows-permuted"): {"pooled_cosine_mean", "pooled_cosine_min", "hidden_cosine_min"},
    ("hf-encoder", 4, "rows-permuted"): {"pooled_cosine_mean", "pooled_cosine_min", "hidden_cosine_mean",
                                         "hidden_cosine_min"},
}
SHOWN_FAILING = set().union(*(keys(runner, metrics) for (runner, _b, _f), metrics in FAILS.items()))


def _folder(runner: str) -> str:
    if runner == "hf-causal-lm":
        from fixtures import tiny_lm

        return str(tiny_lm.ensure_tiny_gpt2())
    from fixtures.minilm.model import model_dir

    return str(model_dir())


def _run(runner: str, bits: int, fault: str | None, out: Path) -> RunResult:
    # the encoder runner is asked for: MiniLM's folder is detected as sentence-transformers
    result = run(RunConfig(model=_folder(runner), bits=(bits,), out=out, fault=fault, quiet=True, benchmark_rounds=1,
                           runner=runner if runner == "hf-encoder" else None))
    assert result.results["run"]["runner"] == runner
    return result


def _failed(result: RunResult) -> set[str]:
    return {c["metric"] for c in result.results["criteria"] if not c["passed"]}


@pytest.mark.parametrize(("runner", "bits", "fault"), sorted(FAILS))
def test_fault_fails_the_runners_output_gates(runner: str, bits: int, fault: str, tmp_path: Path) -> None:
    result = _run(runner, bits, fault, tmp_path)
    assert result.verdict == "FAIL" and result.exit_code == 1
    assert FAILS[(runner, bits, fault)] <= _failed(result), (sorted(FAILS[(runner, bits, fault)] - _failed(result)),
                                                             sorted(_failed(result)))
    assert f"injected fault `{fault}`" in result.report_path.read_text()


@pytest.mark.parametrize(("runner", "bits"), sorted({(r, b) for r, b, _f in FAILS}))
def test_clean_run_passes(runner: str, bits: int, tmp_path: Path) -> None:
    """The control: without a fault every gate of the same run passes."""
    result = _run(runner, bits, None, tmp_path)
    assert result.verdict == "PASS", (_failed(result), result.results["tests"]["failures"])
