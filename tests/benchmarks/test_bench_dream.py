"""Speed of the NumPy denoiser, as a benchmark (not a timed unit test that flakes)."""

import numpy as np

from fixtures.dream_mini.config import DreamConfig
from fixtures.dream_mini.denoiser import forward
from fixtures.dream_mini.generator import generate_weights


def test_bench_forward_mini(benchmark) -> None:  # type: ignore[no-untyped-def]
    """32 sequences x 64 tokens on the mini model: budget 1 s (median), so a dream-mini
    harness run (dozens of forwards) stays inside the seed's 30 s."""
    cfg = DreamConfig.mini()
    w = generate_weights(cfg, seed=0)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(32, 64))
    logits = benchmark.pedantic(forward, args=(w, cfg, ids), rounds=5, iterations=1, warmup_rounds=1)
    assert logits.shape == (32, 64, cfg.vocab_size)
    assert benchmark.stats.stats.median < 1.0
