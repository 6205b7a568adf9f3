"""Which code measures a gate: the key under which a fault test shows that gate failing.

A gate's metric is computed by the suite (artifact, weight and timing metrics: one piece
of code for every in-memory run), by the streaming run (its own readback), or, for an
output metric, by the runner of the model the criteria file is for. A fault that fails
``kl_mean`` on dream-mini says nothing about the causal-LM runner's ``kl_mean``, so
output gates are keyed by runner (tests/test_gate_audit.py).
"""

from __future__ import annotations

from collections.abc import Iterable

from harness.measures import METRICS

# criteria file `model` -> the runner that measures its output metrics
RUNNER_OF = {"minilm": "sentence-transformers", "sentence-transformers": "sentence-transformers",
             "dream-mini": "dream-mini", "dit-mini": "dit-mini", "dit-mini-audio": "dit-mini",
             "hf-causal-lm": "hf-causal-lm", "hf-encoder": "hf-encoder"}


def gate_key(model: str, metric: str) -> tuple[str, str]:
    """(what measures it, metric) for a gate of the criteria file of ``model``."""
    if model == "streaming":
        return ("streaming", metric)
    if METRICS[metric].level == "output":
        return (RUNNER_OF[model], metric)
    return ("suite", metric)


def keys(model: str, metrics: Iterable[str]) -> set[tuple[str, str]]:
    return {gate_key(model, m) for m in metrics}
