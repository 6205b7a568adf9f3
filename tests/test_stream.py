"""Streaming quantization (arrowquant_core/stream.py, harness/streaming.py; issue 11).

Real safetensors files in tmp_path, real Parquet artifacts, a real subprocess for the
memory bound. The streaming path must give the in-memory path's codes byte for byte
(row blocks of a few hundred values force many blocks per tensor, ragged groups and odd
column counts included), the same metrics, a file ``storage.load`` reads, a manifest
that catches reordered rows, and a peak RSS that does not grow with the model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
import subprocess
import sys

import ml_dtypes
import numpy as np
import pyarrow.parquet as pq
import pytest

import arrowquant_core as aq
from arrowquant_core import stream
from arrowquant_core.errors import FormatError
from arrowquant_core.safetensors_io import read_safetensors, write_safetensors
from harness.context import group_range_ratios, row_cosine_min

ROOT = Path(__file__).resolve().parents[1]


def _weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    w = {
        "embed.weight": rng.standard_normal((97, 75), dtype=np.float32),  # odd cols: 2 rows per INT4 byte step
        "layer.0.fc.weight": (rng.standard_normal((64, 200)) * 0.05).astype(ml_dtypes.bfloat16),  # ragged g64
        "layer.0.fc.bias": rng.standard_normal(64).astype(np.float32),
        "layer.0.out.weight": rng.standard_t(4, (130, 64)).astype(np.float16),
        "position_ids": np.arange(16, dtype=np.int64),
    }
    w["embed.weight"][3] = 0.0  # a zero row
    w["embed.weight"][5] = 0.01  # a constant row
    return w


@pytest.fixture(scope="module")
def source_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stream") / "model.safetensors"
    write_safetensors(path, _weights())
    return path


@pytest.mark.parametrize("scheme,method", [
    ("int4-g64-asym", "rtn"), ("int8-channel-sym", "rtn"), ("int2-g32-asym", "rtn"), ("int4-g32-sym", "clip"),
    ("int2-g32-asym", "residual2"), ("int4-tensor-asym", "rtn"),
    ("int4-g32-asym-k6", "iclip"),
])
def test_row_blocks_give_the_in_memory_codes(source_file: Path, tmp_path: Path, scheme: str, method: str) -> None:
    config = aq.QuantizationConfig(scheme, method=method)
    artifact = tmp_path / "streamed.parquet"
    with stream.SafetensorsSource(source_file) as source:
        done = stream.quantize_file(source, config, artifact, block_values=300)
    assert {t.name: t.kind for t in done} == {"embed.weight": "quantized", "layer.0.fc.weight": "quantized",
                                              "layer.0.out.weight": "quantized", "layer.0.fc.bias": "float",
                                              "position_ids": "buffer"}
    reference = aq.quantize_model(read_safetensors(source_file), config)
    streamed = aq.load(artifact)  # the ordinary loader reads the streamed file (footer keys, manifest)
    assert set(streamed.tensors) == set(reference.tensors)
    for name, want in reference.tensors.items():
        got = streamed.tensors[name]
        assert (got.scheme, got.shape, got.dtype, got.method) == (want.scheme, want.shape, want.dtype, want.method)
        for field in ("codes", "scales", "zeros", "params"):
            assert getattr(got, field).tobytes() == getattr(want, field).tobytes(), (name, field)
    for name, array in reference.floats.items():
        assert streamed.floats[name].tobytes() == array.tobytes()
    assert streamed.buffers["position_ids"].tolist() == list(range(16))
    # and the same rows (name, kind, checksum) in the same order as the in-memory save
    aq.save(dataclasses_replace_metadata(reference, streamed.metadata), tmp_path / "memory.parquet")
    assert _rows(artifact) == _rows(tmp_path / "memory.parquet")


def dataclasses_replace_metadata(model: aq.QuantizedModel, metadata: dict[str, str]) -> aq.QuantizedModel:
    import dataclasses

    return dataclasses.replace(model, metadata=dict(metadata))


def _rows(path: Path) -> list[tuple[str, str, str]]:
    table = pq.read_table(path, columns=["name", "kind", "sha256"])
    return list(zip(*(table.column(c).to_pylist() for c in ("name", "kind", "sha256"))))


def test_streamed_artifact_has_one_row_group_per_tensor_and_the_source_digest(source_file: Path,
                                                                             tmp_path: Path) -> None:
    artifact = tmp_path / "a.parquet"
    with stream.SafetensorsSource(source_file) as source:
        done = stream.quantize_file(source, aq.QuantizationConfig("int4-g64-asym"), artifact, block_values=300)
    assert pq.ParquetFile(artifact).num_row_groups == len(done) == 5
    assert stream.artifact_metadata(artifact)["source_digest"] == stream.source_digest({t.name: t.digest for t in done})


def test_metrics_match_the_in_memory_measures(source_file: Path, tmp_path: Path) -> None:
    artifact = tmp_path / "m.parquet"
    config = aq.QuantizationConfig("int4-g64-asym")
    with stream.SafetensorsSource(source_file) as source:
        stream.quantize_file(source, config, artifact, block_values=300)
        back = stream.measure(source, artifact, block_values=300)
    assert back.missing == back.unexpected == back.changed == back.dtype_mismatches == []
    assert sorted(back.kept_exact) == ["layer.0.fc.bias", "position_ids"]
    source_weights = read_safetensors(source_file)
    deq = aq.load(artifact).dequantize()
    assert [m.name for m in back.measures] == ["embed.weight", "layer.0.fc.weight", "layer.0.out.weight"]
    for m in back.measures:
        ref = np.asarray(source_weights[m.name], np.float32)
        got = np.asarray(deq[m.name], np.float32)
        lo, hi = group_range_ratios(ref, got, config.scheme_for(m.name))
        assert m.cosine == pytest.approx(aq.cosine(ref, got), abs=1e-12)
        assert m.sqnr_db == pytest.approx(aq.sqnr_db(ref, got), abs=1e-9)
        assert m.relative_error == pytest.approx(aq.relative_error(ref, got), abs=1e-12)
        assert m.row_cosine_min == pytest.approx(row_cosine_min(ref, got), abs=1e-12)
        assert (m.group_range_ratio_min, m.group_range_ratio_max) == pytest.approx((lo, hi), abs=1e-12)
        assert m.nonfinite == 0


def test_ties_are_stored_like_the_in_memory_path_and_a_wrong_tie_is_caught(source_file: Path, tmp_path: Path) -> None:
    """A tensor identical to an earlier one (an LM head saved as a copy of the embedding)
    is stored as a tied row, the same rows as ``save`` of ``quantize_model`` with
    ``find_ties``; the read-back finds the source's ties itself, so an artifact whose tie
    the source no longer has (injected fault: the alias edited after quantization) counts
    a tie mismatch, while its source digest no longer matches either."""
    from fixtures.checkpoint import find_ties
    from harness.streaming import source_ties, tie_mismatches

    weights = _weights()
    weights["lm_head.weight"] = weights["embed.weight"].copy()  # sorts after embed.weight: the alias
    weights["layer.0.bias_copy"] = weights["layer.0.fc.bias"].copy()  # 1-D: never a tie
    path = tmp_path / "tied.safetensors"
    write_safetensors(path, weights)
    config = aq.QuantizationConfig("int4-g64-asym")
    streamed, in_memory = tmp_path / "s.parquet", tmp_path / "m.parquet"
    with stream.SafetensorsSource(path) as source:
        done = stream.quantize_file(source, config, streamed, block_values=300)
        back = stream.measure(source, streamed, block_values=300)
        found = source_ties(source, back.digests)
    loaded = read_safetensors(path)
    assert find_ties(loaded) == found == back.ties == {"lm_head.weight": "embed.weight"}
    assert [t.kind for t in done if t.name == "lm_head.weight"] == ["tied"]
    aq.save(aq.quantize_model(loaded, config, ties=find_ties(loaded)), in_memory)
    assert _rows(streamed) == _rows(in_memory)
    assert aq.load(streamed).ties == {"lm_head.weight": "embed.weight"}
    assert tie_mismatches(found, back.ties) == [] and back.missing == back.unexpected == []
    weights["lm_head.weight"][0, 0] += 1.0  # the fault: the source's alias no longer equals its canonical
    write_safetensors(path, weights)
    with stream.SafetensorsSource(path) as source:
        back = stream.measure(source, streamed, block_values=300)
        assert tie_mismatches(source_ties(source, back.digests), back.ties) == ["lm_head.weight"]
        assert back.metadata["source_digest"] != stream.source_digest(back.digests)


def test_manifest_catches_reordered_rows(source_file: Path, tmp_path: Path) -> None:
    """Injected fault: the rows of a streamed artifact reordered, each row intact."""
    artifact = tmp_path / "ok.parquet"
    with stream.SafetensorsSource(source_file) as source:
        stream.quantize_file(source, aq.QuantizationConfig("int4-g64-asym"), artifact)
    table = pq.read_table(artifact)
    footer = dict(pq.read_metadata(artifact).metadata)
    shuffled = table.take([1, 0, 2, 3, 4]).replace_schema_metadata(
        {k: v for k, v in footer.items() if k != b"ARROW:schema"})
    bad = tmp_path / "reordered.parquet"
    pq.write_table(shuffled, bad)
    with pytest.raises(FormatError, match="manifest"):
        list(stream.iter_artifact(bad))
    with pytest.raises(FormatError, match="manifest"):
        aq.load(bad)


def test_edited_source_is_caught_by_the_readback(source_file: Path, tmp_path: Path) -> None:
    """Injected fault: the source changes between quantization and the check."""
    copy = tmp_path / "model.safetensors"
    copy.write_bytes(source_file.read_bytes())
    artifact = tmp_path / "a.parquet"
    with stream.SafetensorsSource(copy) as source:
        stream.quantize_file(source, aq.QuantizationConfig("int4-g64-asym"), artifact)
    weights = {k: np.array(v) for k, v in read_safetensors(copy).items()}
    weights["layer.0.fc.bias"][7] += 1.0
    write_safetensors(copy, weights)
    with stream.SafetensorsSource(copy) as source:
        back = stream.measure(source, artifact)
    assert back.changed == ["layer.0.fc.bias"]
    assert stream.source_digest(back.digests) != back.metadata["source_digest"]


def test_block_rows_keep_packed_codes_on_byte_boundaries() -> None:
    for shape, bits in [((97, 75), 4), ((97, 75), 2), ((10, 3), 2), ((152064, 3584), 4), ((5, 7), 8)]:
        k = stream.block_rows(shape, bits, 100)
        assert k >= 1 and (k * shape[1] * bits) % 8 == 0 or k == shape[0]


def _dream(folder: Path, layers: int) -> Path:
    from fixtures.dream_mini.config import DreamConfig
    from fixtures.dream_mini.generator import generate

    config = DreamConfig(vocab_size=2048, hidden_size=512, intermediate_size=1024, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=2, mask_token_id=2047)
    return generate(folder, config=config)


def _probe(folder: Path, out: Path) -> dict[str, float]:
    run = subprocess.run([sys.executable, "-m", "harness.streaming", "--model", str(folder), "--out", str(out),
                          "--block-values", str(1 << 16)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    result: dict[str, float] = json.loads(run.stdout)
    return result


def test_peak_rss_tracks_the_largest_tensor_not_the_model(tmp_path: Path) -> None:
    """Two Dream-shaped models, 2 and 16 layers (26 MB and 151 MB in FP32, the same
    largest tensor, 4 MB): quantized, written, read back and measured in a fresh process
    each. Measured: peak RSS grows by ~43 MB over the imports for both (the constant:
    pyarrow's first use, the row-block buffers). Holding the model would add >= 125 MB."""
    small = _probe(_dream(tmp_path / "l2", 2), tmp_path / "l2.parquet")
    large = _probe(_dream(tmp_path / "l16", 16), tmp_path / "l16.parquet")
    assert large["largest_tensor_bytes"] == small["largest_tensor_bytes"]
    assert large["file_bytes"] > 5 * small["file_bytes"]
    assert small["changed"] == large["changed"] == small["missing"] == large["missing"] == 0
    grow_small = small["peak_rss_bytes"] - small["rss_start_bytes"]
    grow_large = large["peak_rss_bytes"] - large["rss_start_bytes"]
    model_gap = large["file_bytes"] - small["file_bytes"]
    assert grow_large - grow_small < 0.1 * model_gap, (grow_small, grow_large, model_gap)
    assert grow_large < 64e6 + 4 * large["largest_tensor_bytes"], grow_large
    assert math.isfinite(large["weight_cosine_min"]) and large["weight_cosine_min"] > 0.98


def test_the_independent_reader_reads_a_streamed_artifact(source_file: Path, tmp_path: Path) -> None:
    """docs/FORMAT.md section 3: the keys are in the footer; tests/format_reader.py
    (written from the spec alone) must decode a streamed file to the core's values."""
    from tests import format_reader as spec

    artifact = tmp_path / "s.parquet"
    with stream.SafetensorsSource(source_file) as source:
        stream.quantize_file(source, aq.QuantizationConfig("int4-g64-asym"), artifact, block_values=300)
    version, metadata, tensors = spec.read(artifact)
    assert version == 2 and "source_digest" in metadata
    core = aq.load(artifact).dequantize()
    assert [t.name for t in tensors] == list(core)
    for t in tensors:
        want = np.asarray(core[t.name])
        assert np.asarray(t.values).view(np.uint8).tobytes() == want.view(np.uint8).tobytes(), t.name


def test_layer_streaming_denoiser_gives_the_in_memory_logits(tmp_path: Path) -> None:
    """The layer-streaming forward pass (one tensor loaded at a time, the LM head in row
    blocks, embedding rows read one by one) equals denoiser.forward bit for bit, on the
    source and on the dequantized artifact."""
    from fixtures.dream_mini.config import DreamConfig
    from fixtures.dream_mini.denoiser import forward
    from fixtures.dream_mini.generator import generate
    from fixtures.dream_mini import streaming as ds

    folder = generate(tmp_path / "mini", dtype="bfloat16")
    config = DreamConfig.load(folder)
    artifact = tmp_path / "mini.parquet"
    ids = np.array([[1, 2, 3, config.mask_token_id, 5, 6, 7, 8], [9, config.mask_token_id, 9, 10, 11, 12, 3, 1]])
    with stream.SafetensorsSource(folder / "model.safetensors") as source:
        stream.quantize_file(source, aq.QuantizationConfig("int4-g64-asym"), artifact)
        got = ds.streamed_logits(ds.SourceWeights(source, config), config, ids)
        assert np.array_equal(got, forward(read_safetensors(folder / "model.safetensors"), config, ids))
    got = ds.streamed_logits(ds.ArtifactWeights(stream.ArtifactIndex(artifact), config), config, ids)
    assert np.array_equal(got, forward(aq.load(artifact).dequantize(), config, ids))


def test_harness_stream_run_measures_every_gate_and_kl(tmp_path: Path) -> None:
    """``python -m harness run --model FOLDER --stream``: every gate of streaming.toml is
    measured (none NOT MEASURED), the verdict is PASS with exit 0, the Dream folder gets
    output-level KL; the same run with a source where one tensor became a copy of another
    stores it as a tie (one row fewer bytes, tie gate passes)."""
    from fixtures.dream_mini.generator import generate
    from harness.cli import main

    folder = generate(tmp_path / "mini", dtype="bfloat16")
    assert main(["run", "--model", str(folder), "--bits", "4", "--stream", "--out", str(tmp_path / "out"),
                 "--quiet"]) == 0
    results = json.loads((tmp_path / "out" / "streaming_results.json").read_text())
    entry = results["bit_widths"][0]
    assert all(g["value"] is not None and g["passed"] for g in entry["gates"]), entry["gates"]
    assert len(entry["gates"]) == 16 and entry["metrics"]["kl_positions"] > 0
    assert 0 < entry["metrics"]["kl_mean"] < 2
    assert entry["artifact_sha256"] == stream.digest_file(Path(entry["artifact"]))
    # harness verify / report take the streaming results; tampering is refused (exit 2)
    results_file = tmp_path / "out" / "streaming_results.json"
    assert main(["verify", str(results_file)]) == 0
    assert main(["report", str(results_file), "--out", str(tmp_path / "again.md")]) == 0
    assert (tmp_path / "again.md").read_text() == (tmp_path / "out" / "STREAMING_VALIDATION_REPORT.md").read_text()
    forged = json.loads(results_file.read_text())
    gate = next(g for g in forged["bit_widths"][0]["gates"] if g["metric"] == "weight_cosine_min")
    gate["value"] = 0.5  # a failing value still marked passed, and no longer the measured metric
    (tmp_path / "forged.json").write_text(json.dumps(forged))
    assert main(["verify", str(tmp_path / "forged.json")]) == 2
    assert main(["report", str(tmp_path / "forged.json")]) == 2
    artifact = Path(entry["artifact"])
    artifact.write_bytes(artifact.read_bytes()[:-1] + b"\0")
    assert main(["verify", str(results_file)]) == 2
    # q_proj of layer 1 made identical to layer 0's: stored once, as a tie, and the baselines count it once
    weights = {k: np.array(v) for k, v in read_safetensors(folder / "model.safetensors").items()}
    weights["model.layers.1.self_attn.q_proj.weight"] = weights["model.layers.0.self_attn.q_proj.weight"]
    write_safetensors(folder / "model.safetensors", weights)
    assert main(["run", "--model", str(folder), "--bits", "4", "--stream", "--out", str(tmp_path / "tied"),
                 "--quiet", "--runner", "none"]) == 0
    tied = json.loads((tmp_path / "tied" / "streaming_results.json").read_text())
    again = tied["bit_widths"][0]
    assert again["ties"] == {"model.layers.1.self_attn.q_proj.weight": "model.layers.0.self_attn.q_proj.weight"}
    assert again["metrics"]["tie_mismatches"] == 0 and again["artifact_bytes"] < entry["artifact_bytes"]
    assert tied["baselines"]["fp32_bytes"] < results["baselines"]["fp32_bytes"]


def test_a_sharded_checkpoint_streams_like_one_file(source_file: Path, tmp_path: Path) -> None:
    """Hugging Face ships 7B models in shards with model.safetensors.index.json: the
    streaming reader takes the folder and gives the single file's codes."""
    weights = read_safetensors(source_file)
    names = sorted(weights)
    folder = tmp_path / "sharded"
    folder.mkdir()
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    for shard, part in shards.items():
        write_safetensors(folder / shard, {n: weights[n] for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: shard for shard, part in shards.items() for n in part}}))
    config = aq.QuantizationConfig("int4-g64-asym")
    with stream.SafetensorsSource(folder) as sharded, stream.SafetensorsSource(source_file) as single:
        assert len(sharded.files) == 2 and sorted(sharded.names) == names
        stream.quantize_file(sharded, config, tmp_path / "a.parquet", block_values=300)
        stream.quantize_file(single, config, tmp_path / "b.parquet", block_values=300)
    assert _rows(tmp_path / "a.parquet") == _rows(tmp_path / "b.parquet")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: "model-00001-of-00002.safetensors" for n in names}}))
    with pytest.raises(FormatError, match="disagree"):
        stream.SafetensorsSource(folder)
