"""Judging a GGUF made elsewhere (harness/gguf_artifact.py): name mapping, dequantizing,
every rule a bad file breaks, and the done-when check on the real MiniLM: a GGUF written
by gguf-py's quantizer, read through the artifact path, gives the comparison row's figures."""

from __future__ import annotations

from pathlib import Path
import re

import gguf
import numpy as np
import pytest

from arrowquant_core.errors import ConfigurationError, FormatError
from harness import gguf_artifact, peers
from test_peers import bert_like  # tests/ is on sys.path (rootdir-relative, no package)

T = gguf.GGMLQuantizationType
POOLER = "0.model.pooler.dense.weight"


def write(path: Path, tensors: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]], arch: str = "bert") -> Path:
    """A GGUF with the given (name -> (float data, type)) tensors, quantized by gguf-py."""
    peers.write_gguf(path, [(n, gguf.quants.quantize(np.asarray(a, np.float32), t), t)
                            for n, (a, t) in tensors.items()], arch,
                     {"general.name": "made-elsewhere", "general.quantized_by": "llama-quantize test double",
                      "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q8_0)})
    return path


def llama_named(weights: dict[str, np.ndarray], qtype: gguf.GGMLQuantizationType = T.Q8_0,
                drop_pooler: bool = True) -> dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]]:
    """What llama.cpp's converter + quantizer produce: llama.cpp names and types, pooler dropped."""
    names = peers.gguf_names(weights).names
    return {names[n]: (a, peers.choose_type(names[n], a.shape, qtype, True)[0]) for n, a in weights.items()
            if not (drop_pooler and n.startswith("0.model.pooler."))}


def test_llama_cpp_names_map_back_and_the_pooler_is_filled(tmp_path: Path) -> None:
    weights = bert_like()
    weights.pop("0.model.pooler.dense.weight")
    weights["0.model.pooler.dense.weight"] = np.ones((64, 64), np.float32)
    weights["0.model.pooler.dense.bias"] = np.zeros(64, np.float32)
    path = write(tmp_path / "ext.gguf", llama_named(weights))
    art = gguf_artifact.load(path, weights)
    assert list(art.weights) == list(weights)
    assert art.filled_from_source == ("0.model.pooler.dense.weight", "0.model.pooler.dense.bias")
    np.testing.assert_array_equal(art.weights[POOLER], weights[POOLER])
    assert art.names["0.model.encoder.layer.1.attention.self.value.weight"] == "blk.1.attn_v.weight"
    assert art.types["0.model.encoder.layer.1.attention.self.value.weight"] == "Q8_0"
    assert POOLER not in art.quantized and art.bytes == path.stat().st_size
    ref = weights["0.model.encoder.layer.0.intermediate.dense.weight"]
    got = art.weights["0.model.encoder.layer.0.intermediate.dense.weight"]
    assert got.shape == ref.shape and 0 < np.abs(got - ref).max() < 0.01 * np.abs(ref).max()
    assert "made-elsewhere" in art.produced_by and "llama-quantize test double" in art.produced_by
    assert art.main_type == "Q8_0" and art.bit_width([8, 4, 2]) == 8
    assert gguf_artifact.plan_mismatches(art) == []  # what llama.cpp's Q8_0 rules give
    rows = gguf_artifact.layer_rows(art, weights)
    assert [r.name for r in rows] == art.quantized and all(r.scheme == "Q8_0" and r.cosine > 0.999 for r in rows)
    assert gguf_artifact.unquantized_matrices(art) == ["0.model.embeddings.position_embeddings.weight",
                                                       "0.model.embeddings.token_type_embeddings.weight"]


def test_source_names_are_accepted_too(tmp_path: Path) -> None:
    weights = bert_like()
    path = write(tmp_path / "src.gguf", {n: (a, T.Q4_0 if a.ndim >= 2 else T.F32) for n, a in weights.items()})
    art = gguf_artifact.load(path, weights)
    assert art.filled_from_source == () and art.names[POOLER] == POOLER
    assert set(art.types.values()) == {"Q4_0", "F32"}
    # the file says MOSTLY_Q8_0 but holds Q4_0: every quantized tensor breaks llama.cpp's rules
    mismatches = gguf_artifact.plan_mismatches(art)
    assert mismatches is not None and len(mismatches) == len(art.quantized)
    assert "0.model.encoder.layer.0.attention.self.query.weight: Q4_0, llama.cpp Q8_0 gives Q8_0" in mismatches


def _error(path: Path, weights: dict[str, np.ndarray]) -> str:
    with pytest.raises(FormatError) as info:
        gguf_artifact.load(path, weights)
    text = str(info.value)
    assert str(path) in text and "rule" in text, text
    return text


def test_every_broken_rule_is_a_format_error_naming_file_tensor_and_rule(tmp_path: Path) -> None:
    weights = bert_like()
    good = llama_named(weights)

    missing = dict(good)
    missing.pop("blk.1.ffn_down.weight")
    text = _error(write(tmp_path / "missing.gguf", missing), weights)
    assert "0.model.encoder.layer.1.output.dense.weight" in text and "blk.1.ffn_down.weight" in text

    unknown = dict(good)
    unknown["blk.9.attn_q.weight"] = (np.zeros((64, 64)), T.Q8_0)
    assert "'blk.9.attn_q.weight' is not a tensor of the model" in _error(write(tmp_path / "unk.gguf", unknown), weights)

    twice = dict(good)
    twice["0.model.embeddings.word_embeddings.weight"] = good["token_embd.weight"]
    assert "both map to '0.model.embeddings.word_embeddings.weight'" in _error(write(tmp_path / "dup.gguf", twice),
                                                                               weights)

    wrong = dict(good)
    wrong["blk.0.attn_q.weight"] = (np.zeros((32, 64)), T.Q8_0)
    assert re.search(r"'blk.0.attn_q.weight' has shape \[32, 64\].*reversed", _error(write(tmp_path / "shape.gguf", wrong),
                                                                                     weights))

    nan = dict(good)
    bad = np.array(weights["0.model.embeddings.LayerNorm.bias"])
    bad[3] = np.nan
    nan["token_embd_norm.bias"] = (bad, T.F32)
    assert "'token_embd_norm.bias' (F32) dequantizes to 1 NaN/Inf" in _error(write(tmp_path / "nan.gguf", nan), weights)

    # Q8_1 (ggml's activation type) has no dequantizer in gguf-py
    path = tmp_path / "q81.gguf"
    raw = [(n, gguf.quants.quantize(np.asarray(a, np.float32), t), t) for n, (a, t) in good.items()]
    q81 = np.zeros((64, 2 * gguf.GGML_QUANT_SIZES[T.Q8_1][1]), np.uint8)  # 64 rows of 2 blocks
    raw = [(n, q81, T.Q8_1) if n == "blk.0.attn_k.weight" else (n, d, t) for n, d, t in raw]
    peers.write_gguf(path, raw, "bert", {"general.name": "x"})
    assert "'blk.0.attn_k.weight' is stored as Q8_1" in _error(path, weights)

    whole = write(tmp_path / "whole.gguf", good).read_bytes()
    (tmp_path / "cut.gguf").write_bytes(whole[:-40])
    text = _error(tmp_path / "cut.gguf", weights)
    assert "'blk.1.layer_output_norm.weight' needs bytes up to" in text and "truncated" in text  # the last one
    (tmp_path / "head.gguf").write_bytes(whole[:100])
    assert "not a complete GGUF file" in _error(tmp_path / "head.gguf", weights)
    (tmp_path / "text.gguf").write_text("not a gguf at all\n")
    assert "not a complete GGUF file" in _error(tmp_path / "text.gguf", weights)

    with pytest.raises(ConfigurationError, match="no such file"):
        gguf_artifact.load(tmp_path / "absent.gguf", weights)


def test_a_truncated_gguf_is_a_format_error_naming_the_tensor(tmp_path: Path) -> None:
    from fixtures.minilm.model import original_weights

    weights = original_weights()
    result = peers.quantize(weights, peers.get_peer("Q8_0"), tmp_path / "m.gguf")
    (tmp_path / "cut.gguf").write_bytes(result.path.read_bytes()[:-1000])
    with pytest.raises(FormatError) as info:
        gguf_artifact.load(tmp_path / "cut.gguf", weights)
    assert "cut.gguf: tensor" in str(info.value) and "truncated" in str(info.value)


def test_gguf_py_file_read_as_artifact_matches_the_comparison_row(tmp_path: Path) -> None:
    """Issue 13 item 2 at library level, on the real MiniLM: Q4_0 and Q8_0 files written by
    the peer path, read back by the artifact path (GGUFReader, name mapping, dequantize),
    give the same bytes, weights and weight SQNR as the comparison's rows. The output
    metrics through the whole run: tests/test_external_artifact.py."""
    from fixtures.minilm.model import original_weights

    weights = original_weights()
    for name in ("Q4_0", "Q8_0"):
        result = peers.quantize(weights, peers.get_peer(name), tmp_path / f"minilm-{name}.gguf", model_name="minilm")
        peer_row = peers.peer_row(result, weights, None)
        art = gguf_artifact.load(result.path, weights)
        assert art.filled_from_source == () and list(art.weights) == list(weights)
        for tensor, values in result.weights.items():
            np.testing.assert_array_equal(art.weights[tensor], values, err_msg=tensor)
        judged = peers.row(peer_row["method"], weights, art.weights, art.bytes, peer_row["quantize_seconds"], None)
        assert judged == {k: peer_row[k] for k in judged}
        assert art.main_type == name and art.bit_width([8, 4, 2]) == (8 if name == "Q8_0" else 4)
        assert art.types["embeddings.word_embeddings.weight"] == "Q8_0"  # llama.cpp's tied-embedding rule


def test_a_broken_gguf_fails_the_weight_gates(tmp_path: Path) -> None:
    """Injected fault: one tensor's FP16 block scales doubled inside a Q4_0 file (as a
    buggy exporter would). The file still reads; the layer rows the suite gates on show
    it: MiniLM's INT4 gate weight_sqnr_db_min >= 14 fails (a doubled scale gives ~0 dB)."""
    from harness.criteria import parse_rule

    weights = bert_like()
    path = write(tmp_path / "ok.gguf", llama_named(weights, T.Q4_0))
    gate = parse_rule("weight_sqnr_db_min >= 14", 4)
    assert gate.check(min(r.sqnr_db for r in gguf_artifact.layer_rows(gguf_artifact.load(path, weights),
                                                                       weights))) is None
    reader = gguf.GGUFReader(path)
    target = next(t for t in reader.tensors if t.name == "blk.1.attn_v.weight")
    data = bytearray(path.read_bytes())
    blocks = np.frombuffer(data, np.uint8, count=target.n_bytes, offset=target.data_offset).reshape(-1, 18).copy()
    scales = blocks[:, :2].copy().view(np.float16) * np.float16(2)
    blocks[:, :2] = scales.view(np.uint8).reshape(-1, 2)
    data[target.data_offset:target.data_offset + target.n_bytes] = blocks.tobytes()
    broken = tmp_path / "doubled-scales.gguf"
    broken.write_bytes(bytes(data))
    rows = {r.name: r for r in gguf_artifact.layer_rows(gguf_artifact.load(broken, weights), weights)}
    worst = min(r.sqnr_db for r in rows.values())
    assert worst == rows["0.model.encoder.layer.1.attention.self.value.weight"].sqnr_db and worst < 3
    failure = gate.check(worst)
    assert failure is not None and "weight_sqnr_db_min" in failure


@pytest.mark.parametrize("peer", ["Q4_K-pure", "IQ4_XS-pure"])
def test_scales_doubled_doubles_a_super_block_type_of_the_files_main_type(peer: str, tmp_path: Path) -> None:
    """gguf-scales-doubled on a ggml K/IQ file: the victim is a tensor of the file's main
    type (not a fallback one), and doubling each block's leading FP16 d doubles every value
    of Q4_K's d * scale * q term and all of IQ4_XS's values."""
    from harness import external, peers

    weights = bert_like(hidden=256)
    result = peers.quantize(weights, peers.get_peer(peer), tmp_path / "m.gguf")
    broken = external.open_external(result.path, weights, 4, "test", "gguf-scales-doubled", tmp_path)
    clean = gguf_artifact.load(result.path, weights)
    changed = [n for n in clean.quantized if not np.array_equal(clean.weights[n], broken.artifact.weights[n])]
    assert changed == ["0.model.encoder.layer.0.intermediate.dense.weight"]  # the largest, first of its size
    assert broken.artifact.types[changed[0]] == peers.get_peer(peer).ggml_type.name
    if peer.startswith("IQ4"):
        np.testing.assert_array_equal(broken.artifact.weights[changed[0]], 2 * clean.weights[changed[0]])


def _header(kv: bytes, n_kv: int = 1, n_tensors: int = 0) -> bytes:
    import struct

    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kv


def _key(name: str, value_type: int, payload: bytes) -> bytes:
    import struct

    return struct.pack("<Q", len(name)) + name.encode() + struct.pack("<I", value_type) + payload


def test_metadata_arrays_are_read_by_extent_and_the_general_keys_stay(tmp_path: Path) -> None:
    """A tokenizer-sized string array, numeric and nested arrays: walked for their size
    (gguf-py alone makes views for every element), the general.* scalars still read."""
    rng = np.random.default_rng(0)
    w = {"a.weight": rng.standard_normal((8, 64)).astype(np.float32)}
    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(path, "bert")
    writer.add_string("general.name", "with arrays")
    writer.add_uint32("general.file_type", int(gguf.LlamaFileType.MOSTLY_Q8_0))
    writer.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(20_000)])
    writer.add_array("tokenizer.ggml.scores", [float(i) for i in range(20_000)])
    writer.add_array("general.tags", ["a", "b"])
    writer.add_array("x.nested", [[1, 2], [3]])
    writer.add_tensor("a.weight", gguf.quants.quantize(w["a.weight"], T.Q8_0), raw_dtype=T.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert gguf_artifact.header_bit_width(path, [8, 4, 2])[0] == 8
    art = gguf_artifact.load(path, w)
    assert art.metadata["general.name"] == "with arrays"
    assert np.allclose(art.weights["a.weight"], w["a.weight"], atol=0.05)
    reader = gguf_artifact._open(path)
    field = reader.fields["tokenizer.ggml.tokens"]
    assert field.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING] and int(field.parts[-1][0]) == 20_000


@pytest.mark.parametrize("blob, needle", [
    (_header(b"", n_kv=10**9), "declares 1000000000 metadata keys"),
    (_header(b"", n_kv=0, n_tensors=10**7), "declares 10000000 tensors"),
    (_header(_key("t", 9, (8).to_bytes(4, "little") + (10**9).to_bytes(8, "little"))),
     "declares 1000000000 STRING elements"),
    (_header(_key("t", 9, (8).to_bytes(4, "little") + (1).to_bytes(8, "little") + (10**6).to_bytes(8, "little"))),
     "ends past the end of the file"),
    (_header(_key("t", 9, (99).to_bytes(4, "little") + (1).to_bytes(8, "little"))), "element type 99"),
])
def test_lying_gguf_headers_are_format_errors_before_any_allocation(tmp_path: Path, blob: bytes,
                                                                     needle: str) -> None:
    path = tmp_path / "lie.gguf"
    path.write_bytes(blob + bytes(64))
    with pytest.raises(FormatError, match=needle) as info:
        gguf_artifact.header_bit_width(path, [8, 4, 2])
    assert str(path) in str(info.value)
