"""Tests of activation fake quantization (arrowquant_core.actquant).

Kinds (docs/STYLE.md rule 14): exact round trips on the code grid, an oracle against a slow
per-row reference, per-token versus per-tensor on a named outlier case, Hypothesis
properties (derandomized), and the typed errors.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arrowquant_core.actquant import ActScheme, act_params, act_range, fake_quant, parse_act_scheme
from arrowquant_core.errors import ConfigurationError, QuantizationError

F32 = npt.NDArray[np.float32]
SCHEMES = [ActScheme(b, g, s) for b in (8, 4) for g in ("tensor", "channel", "token") for s in (True, False)]
IDS = [s.name for s in SCHEMES]


def _params_for(x: F32, scheme: ActScheme) -> tuple[F32 | None, F32 | None]:
    if scheme.granularity == "token":
        return None, None
    lo, hi = act_range(x, scheme.granularity)
    return act_params(lo, hi, scheme)


@pytest.mark.parametrize("scheme", SCHEMES, ids=IDS)
def test_values_on_the_grid_round_trip_exactly(scheme: ActScheme) -> None:
    """Values that already are ``(code - zero) * scale`` come back bit for bit."""
    rng = np.random.default_rng(scheme.bits)
    x = rng.normal(size=(3, 5, 16)).astype(np.float32)
    scale, zero = _params_for(x, scheme)
    once = fake_quant(x, scheme, scale, zero)
    assert once.dtype == np.float32 and once.shape == x.shape
    if scheme.granularity == "token":
        # dynamic: the range is re-read from the (already quantized) row, so check the
        # codes the row's own parameters give instead: integers inside [0, qmax]
        scale, zero = act_params(*act_range(x, "token"), scheme)
        codes = once / scale + zero
        assert np.allclose(codes, np.rint(codes), atol=1e-3)
        assert codes.min() > -1e-3 and codes.max() < scheme.qmax + 1e-3
        if not scheme.symmetric:
            return
    twice = fake_quant(once, scheme, scale, zero)
    assert np.array_equal(once, twice)


@pytest.mark.parametrize("scheme", SCHEMES, ids=IDS)
def test_error_is_at_most_half_a_step_inside_the_range(scheme: ActScheme) -> None:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(40, 24)).astype(np.float32) * rng.uniform(0.1, 5.0, size=24).astype(np.float32)
    scale, zero = _params_for(x, scheme)
    out = fake_quant(x, scheme, scale, zero)
    if scheme.granularity == "token":
        lo, hi = act_range(x, "token")
        scale, _ = act_params(lo, hi, scheme)
    assert scale is not None
    assert np.all(np.abs(out - x) <= scale * 0.5 * (1 + 1e-5) + 1e-7)


def test_oracle_per_row_reference() -> None:
    """Per-token fake quant equals a slow per-row loop written from the formula."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(17, 9)).astype(np.float32)
    x[4] = 0.0  # an all-zero token: scale guarded to 1, values stay 0
    scheme = ActScheme(4, "token", symmetric=False)
    got = fake_quant(x, scheme)
    for r, row in enumerate(x.astype(np.float64)):
        lo, hi = min(row.min(), 0.0), max(row.max(), 0.0)
        s = (hi - lo) / 15 if hi > lo else 1.0
        s = float(np.float32(s))
        z = float(np.clip(np.rint(-lo / s), 0, 15))
        ref = (np.clip(np.rint(row.astype(np.float32) / np.float32(s) + z), 0, 15) - z) * s
        assert np.allclose(got[r], ref, atol=1e-6), f"row {r}: worst {np.max(np.abs(got[r] - ref))}"
    assert np.all(got[4] == 0.0)


def test_per_token_beats_per_tensor_when_one_token_holds_a_massive_outlier() -> None:
    """The case the dLLM paper measures: one token with a huge activation spoils a
    per-tensor scale for every other token; per-token scales keep them."""
    rng = np.random.default_rng(11)
    x = rng.normal(size=(32, 64)).astype(np.float32)
    x[5, 3] = 500.0
    per_tensor = ActScheme(8, "tensor")
    scale, zero = act_params(*act_range(x, "tensor"), per_tensor)
    err_tensor = np.abs(fake_quant(x, per_tensor, scale, zero) - x)
    err_token = np.abs(fake_quant(x, ActScheme(8, "token")) - x)
    others = np.arange(32) != 5
    assert err_token[others].mean() * 20 < err_tensor[others].mean()


def test_static_values_outside_the_calibrated_range_are_clipped() -> None:
    scheme = ActScheme(8, "channel")
    calib = np.array([[1.0, -2.0], [-1.0, 2.0]], np.float32)
    scale, zero = act_params(*act_range(calib, "channel"), scheme)
    out = fake_quant(np.array([[10.0, -10.0]], np.float32), scheme, scale, zero)
    assert out[0, 0] == pytest.approx(1.0, rel=1e-6) and out[0, 1] == pytest.approx(-2.0 * 128 / 127, rel=1e-6)


@given(st.lists(st.floats(-1e4, 1e4, width=32), min_size=1, max_size=64),
       st.sampled_from(SCHEMES))
@settings(derandomize=True, max_examples=150, deadline=None)
def test_zero_stays_zero_and_output_is_finite(values: list[float], scheme: ActScheme) -> None:
    x = np.array([values + [0.0]], dtype=np.float32)
    scale, zero = _params_for(x, scheme)
    out = fake_quant(x, scheme, scale, zero)
    assert np.all(np.isfinite(out))
    assert out[0, -1] == 0.0


def test_act_range_shapes() -> None:
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    assert [a.shape for a in act_range(x, "tensor")] == [(1,), (1,)]
    assert [a.shape for a in act_range(x, "channel")] == [(4,), (4,)]
    assert [a.shape for a in act_range(x, "token")] == [(2, 3, 1), (2, 3, 1)]
    lo, hi = act_range(x, "channel")
    assert lo.tolist() == [0, 1, 2, 3] and hi.tolist() == [20, 21, 22, 23]


def test_names_round_trip() -> None:
    for scheme in SCHEMES:
        assert parse_act_scheme(scheme.name) == scheme
    assert ActScheme(8, "token").name == "a8-token-sym"


@pytest.mark.parametrize(("bits", "granularity"), [(2, "token"), (16, "tensor"), (8, "group"), (4, "row")])
def test_invalid_schemes_raise(bits: int, granularity: str) -> None:
    with pytest.raises(ConfigurationError, match="activation scheme"):
        ActScheme(bits, granularity)


@pytest.mark.parametrize("name", ["a8-token", "w8-token-sym", "a8-token-signed", "ax-token-sym"])
def test_bad_names_raise(name: str) -> None:
    with pytest.raises(ConfigurationError, match=name):
        parse_act_scheme(name)


def test_static_scheme_without_parameters_raises() -> None:
    with pytest.raises(ConfigurationError, match="needs calibrated scale"):
        fake_quant(np.ones((2, 3), np.float32), ActScheme(8, "tensor"))


def test_parameters_of_the_wrong_shape_raise() -> None:
    """Channel scales from another layer (other width) are refused, not broadcast."""
    scheme = ActScheme(8, "channel")
    scale, zero = act_params(*act_range(np.ones((2, 5), np.float32), "channel"), scheme)
    with pytest.raises(ConfigurationError, match=r"shape \(3,\)"):
        fake_quant(np.ones((2, 3), np.float32), scheme, scale, zero)


def test_non_finite_input_raises() -> None:
    x = np.array([[1.0, np.nan]], np.float32)
    with pytest.raises(QuantizationError, match="NaN"):
        fake_quant(x, ActScheme(8, "token"))
    with pytest.raises(QuantizationError, match="NaN"):
        act_range(x, "tensor")
    with pytest.raises(ConfigurationError, match="min > max"):
        act_params(np.array([1.0], np.float32), np.array([0.0], np.float32), ActScheme(8, "tensor"))
