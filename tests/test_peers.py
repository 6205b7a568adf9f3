"""llama.cpp peers quantized by gguf-py (harness/peers.py): the table, llama.cpp's rules
for which tensor gets which type, the GGUF file on disk, and the comparison row."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from arrowquant_core.errors import ConfigurationError
from harness import peers
from harness.criteria import load_criteria

T = gguf.GGMLQuantizationType


def bert_like(hidden: int = 64, vocab: int = 96, layers: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """A miniature with sentence-transformers BERT names (MiniLM's layout), seeded."""
    rng = np.random.default_rng(seed)
    p = "0.model."
    w = {f"{p}embeddings.word_embeddings.weight": rng.normal(0, 0.05, (vocab, hidden)),
         f"{p}embeddings.position_embeddings.weight": rng.normal(0, 0.02, (32, hidden)),
         f"{p}embeddings.token_type_embeddings.weight": rng.normal(0, 0.02, (2, hidden)),
         f"{p}embeddings.LayerNorm.weight": 1 + rng.normal(0, 0.01, hidden),
         f"{p}embeddings.LayerNorm.bias": rng.normal(0, 0.01, hidden)}
    for i in range(layers):
        b = f"{p}encoder.layer.{i}."
        for part in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            w[f"{b}{part}.weight"] = rng.normal(0, 0.05, (hidden, hidden))
            w[f"{b}{part}.bias"] = rng.normal(0, 0.01, hidden)
        w[f"{b}intermediate.dense.weight"] = rng.normal(0, 0.05, (4 * hidden, hidden))
        w[f"{b}output.dense.weight"] = rng.normal(0, 0.05, (hidden, 4 * hidden))
        w[f"{b}output.LayerNorm.weight"] = 1 + rng.normal(0, 0.01, hidden)
    w[f"{p}pooler.dense.weight"] = rng.normal(0, 0.05, (hidden, hidden))
    return {k: np.asarray(v, np.float32) for k, v in w.items()}


def test_table_and_lookup() -> None:
    assert list(peers.PEERS) == ["Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "Q4_1-pure", "Q4_0-pure"]
    # bytes per block of 32 from ggml's block_q4_0 (FP16 scale + 16 bytes of nibbles)
    assert peers.get_peer("Q4_0").nominal_bits_per_weight == 18 * 8 / 32
    assert peers.get_peer("Q8_0").label == "llama.cpp Q8_0"
    with pytest.raises(ConfigurationError, match="did you mean 'Q8_0'"):
        peers.get_peer("q8_0")


def test_llama_cpp_type_rules() -> None:
    """choose_type follows llama-quant.cpp / convert_hf_to_gguf.py (see the module doc)."""
    pick = peers.choose_type
    # tied token embeddings: Q6_K; 384 columns are not a multiple of 256 -> Q8_0 (MiniLM)
    assert pick("token_embd.weight", (30522, 384), T.Q4_0, True)[0] == T.Q8_0
    assert pick("token_embd.weight", (1000, 512), T.Q4_0, True)[0] == T.Q6_K
    assert pick("token_embd.weight", (1000, 512), T.Q8_0, True)[0] == T.Q8_0
    # with a separate output.weight, token embeddings get the file type; output gets Q6_K
    assert pick("token_embd.weight", (1000, 512), T.Q4_0, False)[0] == T.Q4_0
    assert pick("output.weight", (1000, 512), T.Q4_1, False)[0] == T.Q6_K
    assert pick("position_embd.weight", (512, 384), T.Q4_0, True)[0] == T.F32
    assert pick("token_types.weight", (2, 384), T.Q4_0, True)[0] == T.F32
    assert pick("blk.0.attn_output_norm.weight", (384,), T.Q4_0, True)[0] == T.F32
    assert pick("blk.0.attn_q.bias", (384,), T.Q4_0, True)[0] == T.F32
    assert pick("blk.0.attn_q.weight", (384, 384), T.Q5_1, True)[0] == T.Q5_1
    # --pure: the token embeddings take the file type too; norms and tables stay F32
    assert pick("token_embd.weight", (30522, 384), T.Q4_0, True, pure=True)[0] == T.Q4_0
    assert pick("position_embd.weight", (512, 384), T.Q4_0, True, pure=True)[0] == T.F32
    # a row not a multiple of the 32-value block: F16 (tensor_type_fallback)
    assert pick("blk.0.ffn_up.weight", (64, 48), T.Q4_0, True)[0] == T.F16


def test_names_follow_gguf_py_maps() -> None:
    names = peers.gguf_names(bert_like())
    assert names.architecture == "bert"
    assert names.names["0.model.encoder.layer.1.attention.self.query.weight"] == "blk.1.attn_q.weight"
    assert names.names["0.model.encoder.layer.0.output.dense.weight"] == "blk.0.ffn_down.weight"
    assert names.names["0.model.embeddings.word_embeddings.weight"] == "token_embd.weight"
    # llama.cpp has no name for BERT's pooler: it keeps its own (not the classifier's "cls")
    assert names.unmapped == ["0.model.pooler.dense.weight"]


def test_quantize_writes_a_gguf_that_reads_back_as_planned(tmp_path: Path) -> None:
    weights = bert_like()
    result = peers.quantize(weights, peers.get_peer("Q4_1"), tmp_path / "m.gguf", model_name="mini")
    assert result.file_bytes == (tmp_path / "m.gguf").stat().st_size
    # the file holds the tensor data (block arithmetic) plus a header and alignment padding
    assert result.tensor_bytes < result.file_bytes < result.tensor_bytes + 16_000
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    stored = {t.name: t.tensor_type for t in reader.tensors}
    assert stored == {c.gguf_name: c.ggml_type for c in result.tensors}
    assert stored["token_embd.weight"] == T.Q8_0 and stored["blk.0.attn_q.weight"] == T.Q4_1
    assert stored["0.model.pooler.dense.weight"] == T.Q4_1 and stored["position_embd.weight"] == T.F32
    assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_1)
    # dequantized in source names, shapes and order; float tensors exact
    assert list(result.weights) == list(weights)
    for name, ref in weights.items():
        assert result.weights[name].shape == ref.shape
        if ref.ndim == 1:
            np.testing.assert_array_equal(result.weights[name], ref)
    # Q4_1: asymmetric 4-bit per 32 values, error at most half a step (range / 15 / 2),
    # plus the FP16 rounding of scale and minimum (a few percent of a step)
    ref = weights["0.model.encoder.layer.0.attention.self.key.weight"].reshape(-1, 32)
    got = result.weights["0.model.encoder.layer.0.attention.self.key.weight"].reshape(-1, 32)
    step = (ref.max(axis=1) - ref.min(axis=1)) / 15
    assert np.all(np.abs(got - ref).max(axis=1) <= step * 0.55)
    assert np.abs(got - ref).max() > step.min() * 0.3  # and it did quantize
    assert result.bits_per_weight == pytest.approx(result.file_bytes * 8 / result.parameters)


def test_q6_k_tensor_is_stored_as_q8_0_and_said(tmp_path: Path) -> None:
    """Tied embeddings with 256-multiple rows are Q6_K in llama.cpp, which gguf-py cannot
    quantize: stored as Q8_0 and noted, never silently."""
    result = peers.quantize(bert_like(hidden=256, layers=1), peers.get_peer("Q4_0"), tmp_path / "m.gguf")
    assert any("Q6_K" in note for note in result.notes)
    assert result.type_counts()["Q8_0"] == 1


def test_row_has_the_keys_of_a_method_row(tmp_path: Path) -> None:
    weights = bert_like()
    calls = []

    def compare(w):  # type: ignore[no-untyped-def]
        calls.append(w)
        return {"output_cosine_mean": 0.5, "table": [1, 2]}

    rows = peers.compare_rows(weights, ["Q8_0", "Q4_0"], tmp_path, "mini", compare)
    assert [r["method"] for r in rows] == ["llama.cpp Q8_0", "llama.cpp Q4_0"]
    for r in rows:
        assert {"method", "scheme", "quantize_seconds", "size_mb", "bits_per_weight", "weight_sqnr_db",
                "calibrated_tensors", "output_cosine_mean"} <= set(r)
        assert "table" not in r and r["scheme"] == "gguf"
        assert r["size_mb"] * 1e6 == Path(r["artifact"]).stat().st_size
    assert rows[0]["weight_sqnr_db"] > rows[1]["weight_sqnr_db"] + 15  # 8 bits vs 4 bits
    assert len(calls) == 2


def test_criteria_peers_list(tmp_path: Path) -> None:
    good = tmp_path / "c.toml"
    good.write_text('[bits.4]\nscheme = "int4-g64-asym"\npeers = ["Q4_0", "Q5_1"]\n')
    assert load_criteria(good).plan(4).peers == ("Q4_0", "Q5_1")
    bad = tmp_path / "bad.toml"
    bad.write_text('[bits.4]\nscheme = "int4-g64-asym"\npeers = ["Q4_K"]\n')
    with pytest.raises(ConfigurationError, match=r"bad.toml \[bits.4\]: unknown peer format 'Q4_K'; did you mean"):
        load_criteria(bad)
    shipped = load_criteria(Path(__file__).resolve().parents[1] / "harness/criteria/minilm.toml")
    assert shipped.plan(8).peers == ("Q8_0",)
    assert set(shipped.plan(4).peers) == {"Q4_0", "Q4_1", "Q5_0", "Q5_1"}


def test_integer_buffers_are_stored_exactly_and_are_not_parameters(tmp_path: Path) -> None:
    from harness import gguf_artifact

    weights: dict[str, np.ndarray] = dict(bert_like())
    weights["0.model.embeddings.position_ids"] = np.arange(32, dtype=np.int64).reshape(1, 32)
    result = peers.quantize(weights, peers.get_peer("Q8_0"), tmp_path / "m.gguf")
    assert result.type_counts()["I64"] == 1
    assert result.parameters == sum(a.size for n, a in weights.items() if a.dtype.kind == "f")
    art = gguf_artifact.load(result.path, weights)
    np.testing.assert_array_equal(art.weights["0.model.embeddings.position_ids"], weights["0.model.embeddings.position_ids"])
    assert art.weights["0.model.embeddings.position_ids"].dtype == np.int64
    assert "0.model.embeddings.position_ids" not in art.quantized
    changed = dict(weights)
    changed["0.model.embeddings.position_ids"] = weights["0.model.embeddings.position_ids"] + 1
    with pytest.raises(Exception, match="integer buffers are stored exactly"):
        gguf_artifact.load(result.path, changed)
