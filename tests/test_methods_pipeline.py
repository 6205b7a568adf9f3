"""Methods through the model pipeline and storage: selectable per run and per tensor,
stored and reloaded exactly (residual 2-bit included)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import arrowquant_core as aq
from arrowquant_core.errors import ConfigurationError


def weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    # 128 input columns: the widest Hadamard block a rotated method uses (gptq-kh128)
    return {"emb.weight": rng.standard_normal((40, 128)).astype(np.float32),
            "fc.weight": rng.standard_t(4, (32, 128)).astype(np.float32) * 0.1,
            "fc.bias": rng.standard_normal(32).astype(np.float32)}


def hessians() -> dict[str, np.ndarray]:
    x = np.random.default_rng(4).standard_normal((256, 128)).astype(np.float32)
    return {"fc.weight": aq.hessian_from_activations(x)}


@pytest.mark.parametrize("method", sorted(aq.METHODS))
def test_every_method_round_trips_through_a_file(method: str, tmp_path: Path) -> None:
    scheme = "int2-g32-asym"
    model = aq.quantize_model(weights(), aq.QuantizationConfig(scheme, method=method), hessians=hessians())
    expected = aq.get_method(method).fallback if aq.get_method(method).needs_hessian else method
    assert model.tensors["emb.weight"].method == expected, "no Hessian: GPTQ falls back, and says so"
    assert model.tensors["fc.weight"].method == method
    path = aq.save(model, tmp_path / "m.parquet")
    back = aq.load(path)
    for name, qt in model.tensors.items():
        got = back.tensors[name]
        assert got.method == qt.method and got.scheme is qt.scheme
        for field in ("codes", "scales", "zeros", "params"):
            assert getattr(got, field).tobytes() == getattr(qt, field).tobytes(), (name, field)
    for name, array in model.dequantize().items():
        np.testing.assert_array_equal(aq.load_weights(path)[name], array, err_msg=name)


def test_calibrated_methods_beat_round_to_nearest_on_weights() -> None:
    w = weights()
    errors = {}
    for method in ("rtn", "clip", "residual2"):
        deq = aq.quantize_model(w, aq.QuantizationConfig("int2-g32-asym", method=method)).dequantize()
        errors[method] = float(np.sum((deq["fc.weight"] - w["fc.weight"]) ** 2))
    assert errors["clip"] <= errors["rtn"] and errors["residual2"] < errors["rtn"], errors


def test_method_overrides_pick_per_tensor() -> None:
    config = aq.QuantizationConfig("int2-g32-asym", method="rtn", method_overrides=(("fc.*", "residual2"),))
    model = aq.quantize_model(weights(), config)
    assert model.tensors["fc.weight"].method == "residual2" and model.tensors["emb.weight"].method == "rtn"


@pytest.mark.parametrize("kwargs, needle", [
    ({"scheme": "int8-g64-asym", "method": "residual2"}, "supports [2]-bit"),
    ({"scheme": "int4-g64-asym", "method": "gtpq"}, "did you mean 'gptq'"),
    ({"scheme": "int4-g64-asym", "method_overrides": (("x*", "hqqq"),)}, "did you mean 'hqq'"),
])
def test_bad_method_configuration(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigurationError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        aq.QuantizationConfig(**kwargs)  # type: ignore[arg-type]


def test_lattice_tensor_rejects_inconsistent_params() -> None:
    qt = aq.quantize_tensor(weights()["fc.weight"], aq.get_scheme("int2-g32-asym"), "fc", "residual2")
    assert qt.scales.size == 0 and qt.params.size == 3 * 32 * (128 // 32)
    import dataclasses

    broken = dataclasses.replace(qt, params=qt.params[:-3])
    with pytest.raises(aq.FormatError, match="params"):
        broken.check()
