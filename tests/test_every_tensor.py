"""Every tensor of a checkpoint is accounted for in the artifact (issue 7, item 2):
quantized, float kept as float, integer/boolean buffers bit-exact, tied weights stored
once, auxiliary arrays alongside; and damage to any of them is a FormatError."""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import arrowquant_core as aq
from arrowquant_core.errors import FormatError, QuantizationError
from arrowquant_core.model import QuantizationConfig, quantize_model


def _checkpoint(rng: np.random.Generator) -> dict[str, np.ndarray]:
    emb = rng.standard_normal((50, 64)).astype(np.float32)
    return {
        "embed.weight": emb,
        "embed.position_ids": np.arange(16, dtype=np.int64)[None, :],
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
        "mask.causal": np.tril(np.ones((4, 4), dtype=bool)),
        "layer.fc.weight": rng.standard_normal((32, 64)).astype(np.float16),
        "layer.norm.weight": (1 + 0.1 * rng.standard_normal(64)).astype(ml_dtypes.bfloat16),
        "lm_head.weight": emb.copy(),
    }


def test_buffers_ties_and_aux_round_trip(tmp_path, rng) -> None:  # type: ignore[no-untyped-def]
    weights = _checkpoint(rng)
    model = quantize_model(weights, QuantizationConfig("int4-g64-asym"), ties={"lm_head.weight": "embed.weight"})
    assert sorted(model.buffers) == ["bn.num_batches_tracked", "embed.position_ids", "mask.causal"]
    assert model.ties == {"lm_head.weight": "embed.weight"}
    assert "lm_head.weight" not in model.tensors and "embed.weight" in model.tensors
    model = dataclasses.replace(model, aux={"timegroup/scale": np.linspace(0, 1, 10, dtype=np.float32),
                                            "timegroup/edges": np.array([0, 3, 7], dtype=np.int32)})
    path = aq.save(model, tmp_path / "m.parquet")
    back = aq.load(path)
    assert back.order == tuple(weights)
    assert back.ties == model.ties
    for name in model.buffers:
        assert back.buffers[name].dtype == weights[name].dtype
        np.testing.assert_array_equal(back.buffers[name], weights[name])
    for name, array in model.aux.items():
        assert back.aux[name].dtype == array.dtype
        np.testing.assert_array_equal(back.aux[name], array)
    out = back.dequantize()
    assert list(out) == list(weights)
    assert out["lm_head.weight"] is out["embed.weight"]
    for name, array in weights.items():
        assert out[name].dtype == array.dtype and out[name].shape == array.shape, name
    # the v1 reading path sees every tensor too, aux arrays excluded
    assert list(aq.load_weights(path)) == list(weights)



def test_tied_weights_are_stored_once(tmp_path, rng) -> None:  # type: ignore[no-untyped-def]
    weights = _checkpoint(rng)
    config = QuantizationConfig("int4-g64-asym")
    tied = aq.save(quantize_model(weights, config, ties={"lm_head.weight": "embed.weight"}), tmp_path / "t.parquet")
    rows = {r["name"]: r for r in pq.read_table(tied).to_pylist()}
    alias = rows["lm_head.weight"]
    assert alias["kind"] == "tied" and alias["tied_to"] == "embed.weight"
    assert not alias["codes"] and not alias["data"], "the alias must hold no values of its own"
    assert rows["embed.weight"]["kind"] == "quantized"


def test_v1_keeps_integer_buffers(tmp_path, rng) -> None:  # type: ignore[no-untyped-def]
    weights = _checkpoint(rng)
    back = aq.load_weights(aq.save_weights(weights, tmp_path / "v1.parquet"))
    for name, array in weights.items():
        assert back[name].dtype == array.dtype, name
        np.testing.assert_array_equal(back[name], array)


def test_a_tie_between_different_tensors_is_refused(rng) -> None:  # type: ignore[no-untyped-def]
    weights = _checkpoint(rng)
    weights["lm_head.weight"] = weights["lm_head.weight"] + 1
    with pytest.raises(QuantizationError, match="differ"):
        quantize_model(weights, QuantizationConfig("int8-g128-asym"), ties={"lm_head.weight": "embed.weight"})
    with pytest.raises(QuantizationError, match="must be in the checkpoint"):
        quantize_model(weights, QuantizationConfig("int8-g128-asym"), ties={"nope": "embed.weight"})


def _rewrite(path, fn) -> None:  # type: ignore[no-untyped-def]
    table = pq.read_table(path)
    rows = table.to_pylist()
    pq.write_table(pa.Table.from_pylist(fn(rows), schema=table.schema), path)


@pytest.mark.parametrize("damage", ["retarget", "dangling", "buffer_bytes", "aux_before_tensor"])
def test_damaged_rows_are_format_errors(tmp_path, rng, damage) -> None:  # type: ignore[no-untyped-def]
    weights = _checkpoint(rng)
    model = quantize_model(weights, QuantizationConfig("int8-g128-asym"), ties={"lm_head.weight": "embed.weight"})
    model = dataclasses.replace(model, aux={"t/scale": np.ones(3, np.float32)})
    path = aq.save(model, tmp_path / "m.parquet")

    def edit(rows):  # type: ignore[no-untyped-def]
        by = {r["name"]: r for r in rows}
        if damage == "retarget":
            by["lm_head.weight"]["tied_to"] = "layer.fc.weight"
        elif damage == "dangling":
            by["lm_head.weight"]["tied_to"] = "missing.weight"
        elif damage == "buffer_bytes":
            data = bytearray(by["embed.position_ids"]["data"])
            data[0] ^= 1
            by["embed.position_ids"]["data"] = bytes(data)
        else:
            rows = [rows[-1]] + rows[:-1]
        return rows
    _rewrite(path, edit)
    with pytest.raises(FormatError, match="m.parquet"):
        aq.load(path)
