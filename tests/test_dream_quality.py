"""Tests of fixtures.dream_mini.quality: the metrics say "same" for identical weights,
"close" for small noise and "no" for heavy noise; they are deterministic and
JSON-serialisable; masking and the unmasking sampler follow Dream's rules."""

from __future__ import annotations

import json

import numpy as np
import pytest

from arrowquant_core.errors import ConfigurationError
from fixtures.calibration import CalibrationSample, synthetic_samples
from fixtures.dream_mini.config import DreamConfig
from fixtures.dream_mini.generator import generate_weights
from fixtures.dream_mini.quality import (
    COMPARE_KEYS,
    bucket_edges,
    bucket_metrics,
    compare,
    mask_batch,
    prediction_stats,
    sampler_agreement,
    unmask,
)

MINI = DreamConfig.mini()
Weights = dict[str, np.ndarray]


@pytest.fixture(scope="module")
def weights() -> Weights:
    return generate_weights(MINI, seed=0)


@pytest.fixture(scope="module")
def samples() -> list[CalibrationSample]:
    # small and fast; ratios sweep (0, 1] like the fixture's calibration file
    return synthetic_samples(MINI.vocab_size, 6, 32, seed=0, mask_token_id=MINI.mask_token_id)


def _noisy(weights: Weights, relative: float, seed: int = 1) -> Weights:
    """Add Gaussian noise of ``relative`` x each matrix's median |w| (norms and biases kept)."""
    rng = np.random.default_rng(seed)
    out: Weights = {}
    for name, w in weights.items():
        if w.ndim == 2:
            noise = rng.standard_normal(w.shape).astype(np.float32)
            out[name] = w + np.float32(relative * float(np.median(np.abs(w)))) * noise
        else:
            out[name] = w
    return out


def _compare(orig: Weights, quant: Weights, samples: list[CalibrationSample]) -> dict[str, float | list[float]]:
    return compare(orig, quant, MINI, samples, seed=0, sampler_seq_len=16, sampler_batch=3)


def test_identical_weights_give_zero_kl_full_agreement_and_no_divergence(
        weights: Weights, samples: list[CalibrationSample]) -> None:
    r = _compare(weights, weights, samples)
    assert r["kl_mean"] == 0.0 and r["kl_p99"] == 0.0 and r["top1_agreement"] == 1.0
    assert r["bucket_kl_mean"] == [0.0] * 5 and r["bucket_top1_agreement"] == [1.0] * 5
    for steps in (4, 8):
        assert r[f"sampler_{steps}_token_agreement"] == 1.0
        assert r[f"sampler_{steps}_first_divergence_step"] == -1
        assert r[f"sampler_{steps}_rows_diverged"] == 0.0


def test_small_noise_gives_small_kl_and_heavy_noise_says_no(
        weights: Weights, samples: list[CalibrationSample]) -> None:
    def kl(quant: Weights) -> dict[str, list[float]]:
        return bucket_metrics(weights, quant, MINI, samples, buckets=5, seed=0)

    small, medium, heavy = kl(_noisy(weights, 0.002)), kl(_noisy(weights, 0.05)), kl(_noisy(weights, 2.0))
    assert 0.0 < small["all_kl_mean"][0] < 0.01 and small["all_top1_agreement"][0] > 0.95, small
    assert small["all_kl_mean"][0] < medium["all_kl_mean"][0] < heavy["all_kl_mean"][0]
    assert heavy["all_kl_mean"][0] > 2.0 and heavy["all_top1_agreement"][0] < 0.2, heavy
    assert min(heavy["kl_mean"]) > 1.0, heavy  # every mask-ratio bucket says no
    assert heavy["all_kl_p99"][0] > heavy["all_kl_mean"][0]  # the tail sees the worst positions
    sampled = sampler_agreement(weights, _noisy(weights, 2.0), MINI, steps=8, seq_len=24, seed=0, batch=4)
    assert sampled["token_agreement"] < 0.3, sampled
    assert sampled["first_divergence_step"] == 1.0 and sampled["rows_diverged"] == 1.0


def test_metrics_are_deterministic_and_json_serialisable(
        weights: Weights, samples: list[CalibrationSample]) -> None:
    noisy = _noisy(weights, 0.05)
    first, second = _compare(weights, noisy, samples), _compare(weights, noisy, samples)
    assert first == second
    assert set(first) == set(COMPARE_KEYS)
    assert json.loads(json.dumps(first)) == first
    assert first["bucket_edges"] == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert all(isinstance(first[k], list) and len(first[k]) == 5  # type: ignore[arg-type]
               for k in ("bucket_kl_mean", "bucket_kl_p99", "bucket_top1_agreement", "bucket_positions"))


def test_bucket_masking_covers_each_bucket_and_changes_with_seed(
        weights: Weights, samples: list[CalibrationSample]) -> None:
    noisy = _noisy(weights, 0.05)
    a = bucket_metrics(weights, noisy, MINI, samples, buckets=[0.0, 0.5, 1.0], seed=0)
    b = bucket_metrics(weights, noisy, MINI, samples, buckets=[0.0, 0.5, 1.0], seed=1)
    seq = 32
    # masked positions per bucket: every sample masked at a ratio inside the bucket
    low, high = a["positions"]
    assert 1 * len(samples) <= low <= 0.5 * seq * len(samples)
    assert 0.5 * seq * len(samples) <= high <= seq * len(samples)
    assert a["kl_mean"] != b["kl_mean"]  # a different seed masks different positions


def test_mask_batch_masks_round_ratio_times_length() -> None:
    ids = np.arange(40, dtype=np.int64).reshape(2, 20)
    masked, mask = mask_batch(ids, np.array([0.25, 1.0]), 99, np.random.default_rng(0))
    assert mask.sum(axis=1).tolist() == [5, 20]
    assert bool(np.all(masked[mask] == 99)) and bool(np.all(masked[~mask] == ids[~mask]))
    again, _ = mask_batch(ids, np.array([0.25, 1.0]), 99, np.random.default_rng(0))
    np.testing.assert_array_equal(masked, again)
    # a tiny ratio still masks one position
    _, one = mask_batch(ids[:1], np.array([0.001]), 99, np.random.default_rng(0))
    assert int(one.sum()) == 1
    with pytest.raises(ConfigurationError, match=r"\(0, 1\]"):
        mask_batch(ids, np.array([0.0, 0.5]), 99, np.random.default_rng(0))


def test_unmask_follows_dreams_schedule_and_keeps_the_prompt(weights: Weights) -> None:
    canvas = np.full((2, 20), MINI.mask_token_id, dtype=np.int64)
    canvas[:, :3] = [[5, 6, 7], [8, 9, 10]]
    history = unmask(weights, MINI, canvas, steps=4)
    assert len(history) == 4
    remaining = [int(np.sum(h[0] == MINI.mask_token_id)) for h in history]
    # Dream: linspace(1, 1e-3, 5) -> commit int(m * (1 - s / t)) then the rest at the last step
    t = np.linspace(1.0, 1e-3, 5)
    m, expected = 17, []
    for i in range(4):
        m = m - (int(m * (1 - t[i + 1] / t[i])) if i < 3 else m)
        expected.append(m)
    assert remaining == expected
    for h in history:
        np.testing.assert_array_equal(h[:, :3], canvas[:, :3])
    assert not bool(np.any(history[-1] == MINI.mask_token_id))
    # committed tokens never change afterwards
    for before, after in zip(history, history[1:]):
        done = before != MINI.mask_token_id
        np.testing.assert_array_equal(after[done], before[done])


def test_unmask_never_commits_the_mask_token(weights: Weights) -> None:
    """Even a head that ranks [MASK] first everywhere cannot leave masks behind."""
    hostile = dict(weights)
    head = weights["lm_head.weight"].copy()
    head[MINI.mask_token_id] = 50.0 * head[:10].sum(axis=0)
    hostile["lm_head.weight"] = head
    final = unmask(hostile, MINI, np.full((2, 12), MINI.mask_token_id, dtype=np.int64), steps=3)[-1]
    assert not bool(np.any(final == MINI.mask_token_id))


def test_sampler_reports_divergence_when_one_prediction_changes(weights: Weights) -> None:
    """Boost one token's head row: greedy trajectories must split, and early."""
    quant = dict(weights)
    head = weights["lm_head.weight"].copy()
    head[123] *= 20.0
    quant["lm_head.weight"] = head
    r = sampler_agreement(weights, quant, MINI, steps=4, seq_len=16, seed=0, batch=4)
    assert r["first_divergence_step"] == 1.0 and r["rows_diverged"] == 1.0
    assert r["token_agreement"] < 1.0


def test_prediction_stats_sees_uniform_and_one_hot_models(samples: list[CalibrationSample]) -> None:
    zero_head = dict(generate_weights(MINI, seed=0))
    zero_head["lm_head.weight"] = np.zeros_like(zero_head["lm_head.weight"])
    uniform = prediction_stats(zero_head, MINI, samples)
    assert uniform["mean_entropy"] == pytest.approx(np.log(MINI.vocab_size), rel=1e-6)
    assert uniform["frac_top1_lt_0_1"] == 1.0
    sharp = dict(zero_head)
    sharp["lm_head.weight"] = generate_weights(MINI, seed=0)["lm_head.weight"] * np.float32(50.0)
    one_hot = prediction_stats(sharp, MINI, samples)
    assert one_hot["mean_entropy"] < 0.5 and one_hot["frac_top1_gt_0_5"] > 0.9


def test_bad_arguments_are_readable_errors(weights: Weights, samples: list[CalibrationSample]) -> None:
    with pytest.raises(ConfigurationError, match="increase strictly"):
        bucket_edges([0.0, 0.6, 0.5, 1.0])
    with pytest.raises(ConfigurationError, match="at least one"):
        bucket_edges(0)
    mixed = [samples[0], CalibrationSample(np.arange(10), 0.5)]
    with pytest.raises(ConfigurationError, match="lengths"):
        prediction_stats(weights, MINI, mixed)
    with pytest.raises(ConfigurationError, match="empty"):
        prediction_stats(weights, MINI, [])
    with pytest.raises(ConfigurationError, match="steps = 0"):
        unmask(weights, MINI, np.zeros((1, 4), np.int64), steps=0)
    with pytest.raises(ConfigurationError, match="outside the vocabulary"):
        prediction_stats(weights, MINI, [CalibrationSample(np.array([1, 5000]), 0.5)])
