"""Tests of quantize_model: the plan (ndim, overrides, keep_float), progress, fail_fast,
the caller's weights, and QuantizedModel.dequantize."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from arrowquant_core.errors import ConfigurationError, QuantizationError
from arrowquant_core.model import QuantizationConfig, QuantizedModel, quantize_model
from arrowquant_core.schemes import SCHEMES
from arrowquant_core.tensor import dequantize, quantize

FloatArray = npt.NDArray[np.floating]
MATRICES = ["embeddings.word.weight", "layer.0.attn.q.weight", "layer.0.mlp.fc.weight"]
VECTORS = ["layer.0.attn.q.bias", "layer.0.norm.weight"]


def snapshot(weights: dict[str, FloatArray]) -> list[tuple[str, str, tuple[int, ...], bytes, bool]]:
    return [(k, str(v.dtype), v.shape, v.tobytes(), bool(v.flags.writeable)) for k, v in weights.items()]


def test_tensors_are_picked_by_ndim(weights: dict[str, FloatArray]) -> None:
    model = quantize_model(weights, QuantizationConfig("int4-g32-asym"))
    assert sorted(model.tensors) == sorted(MATRICES)
    assert sorted(model.floats) == sorted(VECTORS)
    assert model.skipped == {}
    for name in MATRICES:
        assert model.tensors[name].scheme is SCHEMES["int4-g32-asym"]
        assert model.tensors[name].name == name
    for name in VECTORS:
        assert model.floats[name].tobytes() == weights[name].tobytes()
        assert model.floats[name].dtype == weights[name].dtype

    only_3d = quantize_model(weights, QuantizationConfig("int8-channel-sym", min_ndim=3))
    assert sorted(only_3d.tensors) == ["layer.0.mlp.fc.weight"]
    everything = quantize_model(weights, QuantizationConfig("int8-tensor-sym", min_ndim=1))
    assert sorted(everything.tensors) == sorted(weights)


def test_quantized_tensors_equal_per_tensor_quantize(weights: dict[str, FloatArray]) -> None:
    model = quantize_model(weights, QuantizationConfig("int4-g64-asym"))
    for name in MATRICES:
        alone = quantize(weights[name], "int4-g64-asym", name)
        qt = model.tensors[name]
        assert (qt.shape, qt.dtype, qt.method) == (alone.shape, alone.dtype, alone.method)
        assert qt.codes.tobytes() == alone.codes.tobytes()
        assert qt.scales.tobytes() == alone.scales.tobytes()
        assert qt.zeros.tobytes() == alone.zeros.tobytes()


def test_overrides_first_matching_pattern_wins(weights: dict[str, FloatArray]) -> None:
    overrides = (("embeddings.*", "int8-channel-sym"), ("*.weight", "int2-g32-asym"),
                 ("*.q.weight", "int8-tensor-asym"))  # shadowed by "*.weight"
    model = quantize_model(weights, QuantizationConfig("int4-g64-sym", overrides=overrides))
    assert model.tensors["embeddings.word.weight"].scheme.name == "int8-channel-sym"
    assert model.tensors["layer.0.attn.q.weight"].scheme.name == "int2-g32-asym"
    assert model.tensors["layer.0.mlp.fc.weight"].scheme.name == "int2-g32-asym"

    reordered = (overrides[2], overrides[0], overrides[1])
    model = quantize_model(weights, QuantizationConfig("int4-g64-sym", overrides=reordered))
    assert model.tensors["layer.0.attn.q.weight"].scheme.name == "int8-tensor-asym"

    config = QuantizationConfig("int4-g64-sym", overrides=(("*.mlp.*", "int8-g32-sym"),))
    model = quantize_model(weights, config)
    assert model.tensors["embeddings.word.weight"].scheme.name == "int4-g64-sym"  # default
    assert model.tensors["layer.0.mlp.fc.weight"].scheme.name == "int8-g32-sym"
    # patterns are case-sensitive globs over the whole name
    assert config.scheme_for("LAYER.0.MLP.FC.WEIGHT").name == "int4-g64-sym"
    assert config.scheme_for("x.mlp.y").name == "int8-g32-sym"


def test_keep_float_patterns(weights: dict[str, FloatArray]) -> None:
    config = QuantizationConfig("int4-g32-asym", keep_float=("embeddings.*", "*.fc.*"),
                                overrides=(("embeddings.*", "int8-channel-sym"),))
    model = quantize_model(weights, config)
    assert sorted(model.tensors) == ["layer.0.attn.q.weight"]
    for name in ("embeddings.word.weight", "layer.0.mlp.fc.weight"):
        kept = model.floats[name]
        assert kept.dtype == weights[name].dtype and kept.tobytes() == weights[name].tobytes()
        assert not np.shares_memory(kept, weights[name])


def test_progress_is_called_once_per_tensor(weights: dict[str, FloatArray]) -> None:
    calls: list[tuple[int, int, str]] = []
    quantize_model(weights, QuantizationConfig("int8-channel-sym"),
                   progress=lambda done, total, name: calls.append((done, total, name)))
    assert calls == [(i, len(weights), name) for i, name in enumerate(weights, start=1)]


def with_nan(weights: dict[str, FloatArray]) -> dict[str, FloatArray]:
    bad = dict(weights)
    q = weights["layer.0.attn.q.weight"].copy()
    q[3, 7] = np.nan
    bad["layer.0.attn.q.weight"] = q
    return bad


def test_fail_fast_raises_naming_the_tensor(weights: dict[str, FloatArray]) -> None:
    calls: list[str] = []
    with pytest.raises(QuantizationError, match="'layer.0.attn.q.weight'.*non-finite"):
        quantize_model(with_nan(weights), QuantizationConfig("int4-g32-asym"),
                       progress=lambda done, total, name: calls.append(name))
    assert calls == ["embeddings.word.weight"]  # stopped at the bad tensor


def test_without_fail_fast_the_bad_tensor_is_skipped_and_kept_in_float(weights: dict[str, FloatArray]) -> None:
    bad = with_nan(weights)
    calls: list[str] = []
    model = quantize_model(bad, QuantizationConfig("int4-g32-asym", fail_fast=False),
                           progress=lambda done, total, name: calls.append(name))
    assert calls == list(bad)
    assert list(model.skipped) == ["layer.0.attn.q.weight"]
    reason = model.skipped["layer.0.attn.q.weight"]
    assert "non-finite" in reason and "[3, 7]" in reason
    kept = model.floats["layer.0.attn.q.weight"]
    assert kept.dtype == np.float16 and kept.tobytes() == bad["layer.0.attn.q.weight"].tobytes()
    assert sorted(model.tensors) == ["embeddings.word.weight", "layer.0.mlp.fc.weight"]
    assert list(model.dequantize()) == list(bad)


def test_callers_dict_and_arrays_are_untouched(weights: dict[str, FloatArray]) -> None:
    weights["layer.0.attn.q.bias"].flags.writeable = False
    before = snapshot(weights)
    ids = {k: id(v) for k, v in weights.items()}
    model = quantize_model(weights, QuantizationConfig(
        "int2-g32-asym", overrides=(("embeddings.*", "int8-channel-asym"),)))
    model.dequantize()
    assert snapshot(weights) == before
    assert {k: id(v) for k, v in weights.items()} == ids
    for name, kept in model.floats.items():
        assert not np.shares_memory(kept, weights[name])


def test_dequantize_keeps_source_order_shapes_and_dtypes(weights: dict[str, FloatArray]) -> None:
    reordered = {k: weights[k] for k in reversed(list(weights))}
    for source in (weights, reordered):
        model = quantize_model(source, QuantizationConfig("int8-g32-sym"))
        assert model.order == tuple(source)
        out = model.dequantize()
        assert list(out) == list(source)
        for name, array in out.items():
            assert array.dtype == source[name].dtype, name
            assert array.shape == source[name].shape, name
            if name in model.tensors:
                assert array.tobytes() == dequantize(model.tensors[name]).tobytes()
            else:
                assert array.tobytes() == source[name].tobytes()


def test_parameter_counts(weights: dict[str, FloatArray]) -> None:
    model = quantize_model(weights, QuantizationConfig("int4-g32-asym"))
    assert model.parameter_count == sum(int(a.size) for a in weights.values())
    assert model.quantized_parameter_count == sum(int(weights[n].size) for n in MATRICES)


def test_empty_model_is_an_error() -> None:
    with pytest.raises(QuantizationError, match="no tensors"):
        quantize_model({}, QuantizationConfig("int8-channel-sym"))


def test_already_quantized_and_non_array_values_are_rejected(weights: dict[str, FloatArray]) -> None:
    qt = quantize(weights["embeddings.word.weight"], "int4-g32-asym", "embeddings.word.weight")
    with pytest.raises(QuantizationError, match="'embeddings.word.weight' is already quantized"):
        quantize_model({**weights, "embeddings.word.weight": qt},  # type: ignore[dict-item]
                       QuantizationConfig("int8-channel-sym"))
    with pytest.raises(QuantizationError, match="'odd': expected a numpy array, got list"):
        quantize_model({"odd": [1.0, 2.0]}, QuantizationConfig("int8-channel-sym"))  # type: ignore[dict-item]


def test_integer_buffers_pass_through_and_other_dtypes_are_validated() -> None:
    """BERT's int64 position_ids is a buffer, never quantized; a complex tensor is refused."""
    model = quantize_model({"pos_ids": np.arange(8)}, QuantizationConfig("int8-channel-sym"))  # type: ignore[dict-item]
    assert not model.tensors and model.buffers["pos_ids"].dtype == np.int64
    with pytest.raises(QuantizationError, match="'z'.*complex64"):
        quantize_model({"z": np.ones(8, np.complex64)}, QuantizationConfig("int8-channel-sym"))  # type: ignore[dict-item]


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"scheme": "int4-g65-asym"}, "did you mean"),
    ({"scheme": "int8-channel-sym", "overrides": (("*.fc.*", "int3-g32-sym"),)}, "override '*.fc.*'"),
    ({"scheme": "int8-channel-sym", "min_ndim": 0}, "min_ndim = 0"),
])
def test_config_is_validated_on_construction(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        QuantizationConfig(**kwargs)  # type: ignore[arg-type]
    assert needle in str(info.value)


def test_quantized_model_is_a_frozen_record(weights: dict[str, FloatArray]) -> None:
    model = quantize_model(weights, QuantizationConfig("int8-channel-sym"))
    assert isinstance(model, QuantizedModel)
    with pytest.raises(AttributeError):
        model.order = ()  # type: ignore[misc]
