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
    legacy = ["Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "Q4_1-pure", "Q4_0-pure"]
    assert list(peers.PEERS)[:len(legacy)] == legacy
    assert all(peers.PEERS[n].quantizer == peers.GGUF_PY for n in legacy)
    ggml = {n for n, p in peers.PEERS.items() if p.quantizer == peers.GGML}
    for t in ("Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS"):
        assert {f"{t}-pure", f"{t}-pure+imatrix"} <= ggml
    # llama-quantize refuses these without an imatrix: only the +imatrix peer exists
    for t in ("IQ3_XXS", "IQ2_XS"):
        assert f"{t}-pure+imatrix" in ggml and f"{t}-pure" not in peers.PEERS
    assert peers.get_peer("Q4_K-pure+imatrix").label == "llama.cpp Q4_K-pure+imatrix"
    # bytes per block of 32 from ggml's block_q4_0 (FP16 scale + 16 bytes of nibbles)
    assert peers.get_peer("Q4_0").nominal_bits_per_weight == 18 * 8 / 32
    assert peers.get_peer("Q8_0").label == "llama.cpp Q8_0"
    with pytest.raises(ConfigurationError, match="did you mean 'Q8_0'"):
        peers.get_peer("q8_0")
    with pytest.raises(ConfigurationError, match="refuses IQ2_XS without an importance matrix"):
        peers.PeerFormat("IQ2_XS-pure", T.IQ2_XS, gguf.LlamaFileType.MOSTLY_IQ2_XS, "x", pure=True,
                         quantizer=peers.GGML)
    with pytest.raises(ConfigurationError, match="cannot quantize Q4_K in NumPy"):
        peers.PeerFormat("Q4_K", T.Q4_K, gguf.LlamaFileType.MOSTLY_Q4_K_S, "x")
    with pytest.raises(ConfigurationError, match="the name must be 'Q4_K-pure\\+imatrix'"):
        peers.PeerFormat("Q4_K-pure", T.Q4_K, gguf.LlamaFileType.MOSTLY_Q4_K_S, "x", pure=True,
                         quantizer=peers.GGML, imatrix=True)


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
    assert set(shipped.plan(4).peers) == {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K_M+imatrix", "IQ4_XS+imatrix"}
    assert shipped.plan(2).peers == ("Q2_K-pure+imatrix",)


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


def importance_of(weights: dict[str, np.ndarray], seed: int = 1) -> dict[str, np.ndarray]:
    """A per-column importance for every Linear weight, uneven on purpose (a few columns
    carry most of the activation energy, as real ones do)."""
    rng = np.random.default_rng(seed)
    return {n: (rng.lognormal(0, 1.5, a.shape[1])).astype(np.float32) for n, a in weights.items()
            if a.ndim == 2 and "embeddings" not in n}


def test_k_quant_peer_rows_with_and_without_imatrix(tmp_path: Path) -> None:
    """K-quant and IQ rows are quantized by ggml, written as GGUF, read back by gguf-py;
    with hidden 256 every tensor keeps its type; the importance matrix lowers the
    importance-weighted error, which is what llama.cpp's imatrix optimises."""
    weights = bert_like(hidden=256, vocab=64, layers=1)
    imp = importance_of(weights)
    calls: list[int] = []
    rows = peers.compare_rows(weights, ["Q4_K-pure", "Q4_K-pure+imatrix", "IQ4_XS-pure", "Q2_K-pure+imatrix"],
                              tmp_path, "mini", None, hessians=lambda: calls.append(1) or {
                                  n: np.diag(2 * v) for n, v in imp.items()})
    assert calls == [1]  # captured once, only because a +imatrix peer is listed
    assert [r["method"] for r in rows] == ["llama.cpp Q4_K-pure", "llama.cpp Q4_K-pure+imatrix",
                                           "llama.cpp IQ4_XS-pure", "llama.cpp Q2_K-pure+imatrix"]
    for r in rows:
        assert r["scheme"] == "gguf" and r["size_mb"] * 1e6 == pytest.approx(Path(r["artifact"]).stat().st_size)
        assert r["quantizer"].startswith("ggml (ggml_quantize_chunk")
        assert any(n.startswith("importance matrix on 7 of 8") for n in r["notes"]) == r["imatrix"]
    assert rows[0]["ggml_types"] == {"F32": 9, "Q4_K": 8}  # norms, biases, position/type tables in F32
    assert rows[2]["ggml_types"]["IQ4_XS"] == 8 and rows[3]["ggml_types"]["Q2_K"] == 8
    assert rows[1]["imatrix"] and not rows[0]["imatrix"]
    assert rows[0]["nominal_bits_per_weight"] == 4.5 and rows[3]["nominal_bits_per_weight"] == 2.625
    assert rows[3]["weight_sqnr_db"] < rows[0]["weight_sqnr_db"] - 8  # 2.6 bits vs 4.5
    plain = gguf.GGUFReader(rows[0]["artifact"])
    with_imatrix = gguf.GGUFReader(rows[1]["artifact"])
    assert with_imatrix.fields[peers.IMATRIX_ENTRIES_KEY].contents() == len(imp)
    assert peers.IMATRIX_ENTRIES_KEY not in plain.fields
    name = "0.model.encoder.layer.0.intermediate.dense.weight"
    src = weights[name]

    def weighted_error(reader: gguf.GGUFReader) -> float:
        t = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(src.shape)
        return float(np.sum(imp[name] * np.square(got - src)))
    assert weighted_error(with_imatrix) < 0.97 * weighted_error(plain)


def test_super_block_types_fall_back_on_rows_of_384(tmp_path: Path) -> None:
    """MiniLM's rows of 384 values are not whole 256-value super-blocks: llama.cpp (and so
    the peer) stores those tensors in the fallback type, and the row says so."""
    weights = bert_like(hidden=384, vocab=32, layers=1)
    result = peers.quantize(weights, peers.get_peer("Q3_K-pure"), tmp_path / "m.gguf")
    # ffn_down has 4 * 384 = 1536 columns (6 super-blocks); the others fall back to Q4_0
    assert result.type_counts() == {"F32": 9, "Q3_K": 1, "Q4_0": 7}
    assert any("rows not a multiple of 256: llama.cpp stores them as Q4_0" in n for n in result.notes)
    assert result.type_parameters()["Q3_K"] == 384 * 1536
    with pytest.raises(ConfigurationError, match="needs an importance matrix"):
        peers.quantize(weights, peers.get_peer("IQ2_XS-pure+imatrix"), tmp_path / "n.gguf")
    from arrowquant_core.errors import QuantizationError
    with pytest.raises(QuantizationError, match=r"output.dense.weight.*blk.0.ffn_down.weight.*IQ2_XS"):
        peers.quantize(weights, peers.get_peer("IQ2_XS-pure+imatrix"), tmp_path / "n.gguf",
                       importance={"0.model.pooler.dense.weight": np.ones(384, np.float32)})


def test_k_quant_mixes_follow_llama_quantize_per_tensor_rules(tmp_path: Path) -> None:
    """llama_tensor_get_type_impl on a 6-layer BERT (MiniLM's shape): use_more_bits picks
    attn_v and ffn_down of layers 2 and 5 for Q6_K in Q4_K_M; Q2_K lifts attn_v,
    attn_output and ffn_down to Q3_K; then the 384-column fallback applies to each."""
    weights = bert_like(hidden=384, vocab=32, layers=6)

    def types(name: str) -> dict[str, str]:
        return {c.gguf_name: c.ggml_type.name for c in peers.plan(weights, peers.get_peer(name))[1]
                if c.ggml_type != T.F32}
    q4km = types("Q4_K_M")
    assert [q4km[f"blk.{i}.ffn_down.weight"] for i in range(6)] == ["Q4_K", "Q4_K", "Q6_K", "Q4_K", "Q4_K", "Q6_K"]
    assert [q4km[f"blk.{i}.attn_v.weight"] for i in range(6)] == ["Q5_0", "Q5_0", "Q8_0", "Q5_0", "Q5_0", "Q8_0"]
    assert q4km["blk.0.attn_q.weight"] == "Q5_0" and q4km["token_embd.weight"] == "Q8_0"
    q2k = types("Q2_K")
    assert q2k["blk.3.ffn_down.weight"] == "Q3_K" and q2k["blk.3.attn_output.weight"] == "Q4_0"  # Q3_K -> Q4_0
    assert q2k["blk.3.attn_q.weight"] == "Q4_0"
    q3km = types("Q3_K_M")
    assert [q3km[f"blk.{i}.attn_v.weight"] for i in range(3)] == ["Q5_1", "Q5_1", "Q5_0"]  # Q5_K / Q4_K, fallen back
    assert types("Q4_K_S")["blk.3.attn_v.weight"] == "Q5_1" and types("Q4_K_S")["blk.4.attn_v.weight"] == "Q5_0"
    assert types("Q4_K-pure")["blk.2.ffn_down.weight"] == "Q4_K"  # --pure: no mix
    peer = peers.get_peer("Q4_K_M")
    assert peer.is_mix and peer.ggml_type == T.Q4_K and peer.file_type == gguf.LlamaFileType.MOSTLY_Q4_K_M
    result = peers.quantize(weights, peer, tmp_path / "m.gguf")
    from harness import gguf_artifact
    art = gguf_artifact.load(result.path, weights)
    assert art.file_type == "MOSTLY_Q4_K_M" and art.main_type == "Q4_K" and gguf_artifact.plan_mismatches(art) == []
    with pytest.raises(ConfigurationError, match="mix is not modelled"):
        peers.PeerFormat("Q2_K_S", T.Q2_K, gguf.LlamaFileType.MOSTLY_Q2_K_S, "x", quantizer=peers.GGML)
