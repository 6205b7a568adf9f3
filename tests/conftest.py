"""Shared fixtures for the core tests: seeded, pure generators of small checkpoints.

Kept small on purpose (docs/STYLE.md rule 15): one generator function that takes a
``numpy.random.Generator`` and plants the named edge cases the kernels must survive.
"""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import numpy.typing as npt
import pytest

FloatArray = npt.NDArray[np.floating]

SEED = 20261122


def make_weights(rng: np.random.Generator) -> dict[str, FloatArray]:
    """A tiny transformer-shaped checkpoint, in a fixed source order.

    Shapes and why they are there:

    - ``embeddings.word.weight``  (30, 64)   float32   row 0 all zeros, row 1 constant
    - ``layer.0.attn.q.weight``   (16, 100)  float16   100 is not a multiple of any group size
    - ``layer.0.attn.q.bias``     (16,)      float32   1-D: kept in float by ``min_ndim=2``
    - ``layer.0.norm.weight``     (100,)     bfloat16  1-D, bfloat16 storage
    - ``layer.0.mlp.fc.weight``   (3, 8, 20) float64   3-D, one huge outlier (an LLM.int8()
      style outlier feature: Dettmers et al. 2022)
    """
    emb = (rng.standard_normal((30, 64)) * 0.05).astype(np.float32)
    emb[0] = 0.0
    emb[1] = 0.125
    q = (rng.standard_normal((16, 100)) * 0.1).astype(np.float16)
    fc = rng.standard_normal((3, 8, 20)) * 0.02
    fc[1, 4, 7] = 40.0
    return {
        "embeddings.word.weight": emb,
        "layer.0.attn.q.weight": q,
        "layer.0.attn.q.bias": (rng.standard_normal(16) * 0.01).astype(np.float32),
        "layer.0.norm.weight": (1.0 + rng.standard_normal(100) * 0.1).astype(ml_dtypes.bfloat16),
        "layer.0.mlp.fc.weight": fc.astype(np.float64),
    }


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(SEED)


@pytest.fixture
def weights(rng: np.random.Generator) -> dict[str, FloatArray]:
    return make_weights(rng)


# The suite runs on one pytest-xdist worker per core: each harness run it starts
# in-process measures on one thread (fixtures.parallel). tests/test_parallel.py checks
# that more threads give the same figures; the whole-run benchmarks set their own count.
os.environ.setdefault("ARROWQUANT_THREADS", "1")
