"""SpatialQuantizer on dit-mini: smoothing preserves the function exactly when folded,
Hessians follow the smoothed inputs, the fallback is counted, GPTQ takes conv weights,
activation fake-quantization, and the measured gain of smoothing at W8A8."""

from __future__ import annotations


import numpy as np
import pytest

from arrowquant_core.actquant import ActScheme, act_params, act_range, fake_quant
from arrowquant_core.errors import ConfigurationError
from arrowquant_core.gptq import hessian_from_activations, quantize_gptq
from arrowquant_core.spatial import (
    SmoothSite,
    SpatialConfig,
    apply_smoothing,
    quantize_spatial,
    smoothed_hessian,
    smoothing_factors,
)
from arrowquant_core.tensor import dequantize
from fixtures.dit_mini.config import DiTConfig
from fixtures.dit_mini.model import forward
from fixtures.dit_mini.runner import DiTRunner, ensure_fixture


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> DiTRunner:
    return DiTRunner(ensure_fixture(0, DiTConfig.image(), tmp_path_factory.mktemp("dit")))


def test_folded_smoothing_preserves_the_function(runner: DiTRunner) -> None:
    """Every site smoothed with large factors (a fold, a V-row fold, and the auxiliary
    vector of fc2): the float model predicts the same noise."""
    rng = np.random.default_rng(0)
    w = dict(runner.original)
    for site in runner.sites:
        width = w[site.consumers[0]].shape[1]
        w.update(apply_smoothing(w, site, np.exp(rng.normal(0, 1.5, width)).astype(np.float32)))
    assert "blocks.0.mlp.fc2.input_scale" in w
    s = runner.samples
    a = forward(runner.original, s.x_t, s.t, s.y, runner.config)
    b = forward(w, s.x_t, s.t, s.y, runner.config)
    assert np.abs(a - b).max() < 2e-3 * np.abs(a).max()
    assert not np.allclose(w["blocks.0.attn.qkv.weight"], runner.original["blocks.0.attn.qkv.weight"])


def test_factors_and_hessian_transform() -> None:
    s = smoothing_factors(np.array([16.0, 1.0, 0.0], np.float32), np.array([1.0, 4.0, 1.0], np.float32), 0.5)
    assert s.tolist() == [4.0, 0.5, 1.0]  # sqrt(16)/1, 1/sqrt(4), a dead channel left alone
    x = np.random.default_rng(1).standard_normal((64, 3)).astype(np.float32)
    h = hessian_from_activations(x)
    assert np.allclose(smoothed_hessian(h, s), hessian_from_activations(x / s), rtol=1e-5)


def test_fallback_is_logged_and_counted() -> None:
    """A site whose activations are all zero: no factor can lower its error, so it is not
    smoothed and its consumer is quantized per channel."""
    rng = np.random.default_rng(0)
    weights = {"fc.weight": rng.standard_normal((8, 128)).astype(np.float32),
               "prev.weight": rng.standard_normal((128, 4)).astype(np.float32),
               "prev.bias": np.zeros(128, np.float32)}
    from arrowquant_core.spatial import Fold

    site = SmoothSite("fc", ("fc.weight",), (Fold("prev.weight", 0),))
    lines: list[str] = []
    result = quantize_spatial(weights, (site,), {"fc.weight": np.zeros((32, 128), np.float32)},
                              SpatialConfig("int4-g64-sym"), log=lines.append)
    assert list(result.fallbacks) == ["fc"] and "per channel" in result.fallbacks["fc"]
    assert result.model.tensors["fc.weight"].scheme.name == "int4-channel-sym"
    assert any("fallback" in line for line in lines) and not result.factors


def test_site_without_inverse_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="inverse factor would be lost"):
        SmoothSite("fc", ("fc.weight",))


def test_gptq_takes_a_conv_weight_as_its_im2col_matrix() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 4, 2, 2)).astype(np.float32)
    h = hessian_from_activations(rng.standard_normal((256, 16)).astype(np.float32))
    conv = quantize_gptq(w, "int4-channel-sym", "conv", h)
    flat = quantize_gptq(w.reshape(16, 16), "int4-channel-sym", "conv", h)
    assert conv.shape == (16, 4, 2, 2)
    assert np.array_equal(dequantize(conv).reshape(16, 16), dequantize(flat))


def test_activation_fake_quant() -> None:
    x = np.array([[0.1, -0.2, 10.0], [0.3, 0.05, -0.4]], np.float32)
    tensor = ActScheme(8, "tensor")
    lo, hi = act_range(x, "tensor")
    scale, zero = act_params(lo, hi, tensor)
    assert float(scale[0]) == pytest.approx(10.0 / 127)
    q = fake_quant(x, tensor, scale, zero)
    assert np.allclose(q, np.round(x / scale) * scale)
    token = fake_quant(x, ActScheme(8, "token"))  # row 2 gets its own, finer scale
    assert abs(token[1, 1] - x[1, 1]) < abs(q[1, 1] - x[1, 1]) or q[1, 1] == x[1, 1]
    assert ActScheme(4, "channel", symmetric=False).name == "a4-channel-asym"
    with pytest.raises(ConfigurationError, match="static granularity"):
        fake_quant(x, tensor)


def test_time_aware_activation_parameters_per_group() -> None:
    """Activation ranges that grow with the timestep get one static scale per group, each
    no wider than the time-agnostic one."""
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(5), 40)
    x = (rng.standard_normal((200, 64)) * (1.0 + groups[:, None])).astype(np.float32)
    weights = {"fc.weight": rng.standard_normal((16, 64)).astype(np.float32)}
    config = SpatialConfig("int8-channel-sym", act=ActScheme(8, "tensor"), smooth=False, time_aware=True)
    result = quantize_spatial(weights, (), {"fc.weight": x}, config, groups={"fc.weight": groups})
    scales = [float(result.act_params_by_group[g]["fc.weight"][0][0]) for g in range(5)]
    assert scales == sorted(scales) and scales[-1] == float(result.act_params["fc.weight"][0][0])
    assert scales[0] < 0.4 * scales[-1]
