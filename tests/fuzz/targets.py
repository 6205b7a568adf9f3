"""Fuzz targets: every reader of an outside file, fed hostile bytes.

A target takes bytes, writes them where its reader expects a file, calls the reader, and
classifies the outcome:

- ``ok``      the reader accepted the input (valid, or a harmless mutation);
- ``typed``   it raised an ``ArrowQuantError`` (FormatError, ConfigurationError, ...):
              the only acceptable way to refuse input;
- otherwise the exception propagates: a crash (raw TypeError, KeyError, MemoryError,
  RecursionError, a pyarrow error ...), which the tests and the campaign report.

Seeds are small valid files built here (deterministic), so mutations start from the
format's real structure; ``mutate`` applies a list of byte-level edits drawn by
Hypothesis. Structure-aware generators (safetensors headers, criteria TOML, JSONL lines)
live in ``strategies.py``.
"""

from __future__ import annotations

from collections.abc import Callable
import io
import json
from pathlib import Path
import tempfile
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from arrowquant_core import storage
from arrowquant_core.errors import ArrowQuantError
from arrowquant_core.model import QuantizationConfig, quantize_model
from arrowquant_core.safetensors_io import read_npy_folder, read_safetensors, read_safetensors_folder, write_safetensors

Target = Callable[[bytes], str]

CRITERIA_SEED = b'''model = "weights"

[all]
gates = [{ rule = "quantize_seconds <= 60", why = "seed" }, "load_seconds <= 5"]

[bits.4]
scheme = "int4-g64-asym"
method = "rtn"
compare = ["clip"]
gates = ["compression_vs_fp32 >= 5.5", { rule = "weight_cosine_min >= 0.98", why = "x" }]
report = ["weight_cosine_mean"]

[bits.2]
scheme = "int2-g64-asym"
gates = ["weight_cosine_mean >= 0.85"]
ladder = { rungs = [["int4-g64-asym", "rtn"], ["fp16", ""]], layer_threshold = 0.01, target = 0.9 }
'''

JSONL_SEED = (b'{"input_ids": [1, 2, 3], "mask_ratio": 0.5}\n'
              b'{"input_ids": [4], "mask_ratio": 1.0, "timestep": 999}\n')


def _weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {"a.weight": rng.standard_normal((4, 64)).astype(np.float32),
            "b.bias": rng.standard_normal(4).astype(np.float16)}


def seed_safetensors() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.safetensors"
        write_safetensors(path, _weights(), {"format": "np"})
        return path.read_bytes()


def seed_npy() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.arange(12, dtype=np.float32).reshape(3, 4))
    return buffer.getvalue()


def seed_parquet_v2() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.parquet"
        storage.save(quantize_model(_weights(), QuantizationConfig("int4-g64-asym")), path)
        return path.read_bytes()


def seed_parquet_stream() -> bytes:
    """A streamed artifact (one row group per tensor, the manifest in the footer), with a
    tie: the second tensor is a copy of the first."""
    from arrowquant_core import stream

    weights = _weights()
    weights["c.weight"] = weights["a.weight"].copy()
    with tempfile.TemporaryDirectory() as tmp:
        source, path = Path(tmp) / "m.safetensors", Path(tmp) / "m.parquet"
        write_safetensors(source, weights)
        with stream.SafetensorsSource(source) as src:
            stream.quantize_file(src, QuantizationConfig("int4-g64-asym"), path)
        return path.read_bytes()


def _gguf_source() -> dict[str, np.ndarray]:
    """The model a fuzzed GGUF is judged against (``--artifact`` reads a GGUF as a model's)."""
    rng = np.random.default_rng(11)
    return {"a.weight": rng.standard_normal((8, 64)).astype(np.float32),
            "b.weight": rng.standard_normal((4, 32)).astype(np.float32),
            "c.bias": rng.standard_normal(4).astype(np.float32)}


def seed_gguf() -> bytes:
    """A GGUF as llama.cpp's tools write one: Q8_0 and Q4_0 matrices, an F32 vector,
    general.* metadata, tensors under the source's own names."""
    import gguf

    from harness.peers import write_gguf

    w = _gguf_source()
    T = gguf.GGMLQuantizationType
    tensors = [("a.weight", gguf.quants.quantize(w["a.weight"], T.Q8_0), T.Q8_0),
               ("b.weight", gguf.quants.quantize(w["b.weight"], T.Q4_0), T.Q4_0),
               ("c.bias", w["c.bias"], T.F32)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.gguf"
        write_gguf(path, tensors, "bert", {"general.name": "fuzz seed", "general.file_type": 7})
        return path.read_bytes()


def seed_calibration_parquet() -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.table({"input_ids": [[1, 2], [3]], "mask_ratio": [0.5, 1.0]}), buffer)
    return buffer.getvalue()


def seed_index() -> bytes:
    return json.dumps({"metadata": {"total_size": 0},
                       "weight_map": {"a.weight": "model-00001-of-00001.safetensors",
                                      "b.bias": "model-00001-of-00001.safetensors"}}).encode()


def mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Apply edits ``(op, position, value)``: 0 flip a bit, 1 set a byte, 2 insert a byte,
    3 delete a byte, 4 truncate, 5 duplicate a 16-byte span, 6 write a little-endian u64."""
    out = bytearray(data)
    for op, position, value in edits:
        if not out and op != 2:
            continue
        at = position % max(len(out), 1)
        if op == 0:
            out[at] ^= 1 << (value % 8)
        elif op == 1:
            out[at] = value % 256
        elif op == 2:
            out.insert(at, value % 256)
        elif op == 3:
            del out[at]
        elif op == 4:
            del out[at:]
        elif op == 5:
            out[at:at] = out[at:at + 16]
        elif op == 6:
            out[at:at + 8] = (value * 0x9E3779B97F4A7C15 % (1 << 64)).to_bytes(8, "little")
    return bytes(out)


def _run(reader: Callable[[Path], Any], data: bytes, name: str) -> str:
    with tempfile.TemporaryDirectory(prefix="aq-fuzz-") as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        try:
            reader(path)
        except ArrowQuantError:
            return "typed"
        return "ok"


def _load_both(path: Path) -> None:
    try:
        storage.load(path)
    except ArrowQuantError:
        pass
    storage.load_weights(path)


def _stream_both(path: Path) -> None:
    """The streaming readers: the whole file row group by row group with its manifest, then
    random access by name (the layer-streaming forward pass)."""
    from arrowquant_core import stream

    try:
        list(stream.iter_artifact(path))
    except ArrowQuantError:
        pass
    index = stream.ArtifactIndex(path)
    for name in index.groups:
        index.get(name)


def _gguf(path: Path) -> None:
    """What ``--artifact FILE`` does with it: the magic, the bit width from the header,
    then the whole file read and dequantized against the model."""
    from harness import gguf_artifact

    gguf_artifact.check_gguf(path)
    try:
        gguf_artifact.header_bit_width(path, [8, 4, 2])
    except ArrowQuantError:
        pass
    gguf_artifact.load(path, _gguf_source())


def _criteria(path: Path) -> None:
    from harness.criteria import load_criteria

    load_criteria(path)


def _jsonl(path: Path) -> None:
    from fixtures.calibration import read_jsonl

    read_jsonl(path, vocab_size=1000)


def _calibration_parquet(path: Path) -> None:
    from fixtures.calibration import read_parquet

    read_parquet(path, vocab_size=1000)


def _npy(path: Path) -> None:
    read_npy_folder(path.parent)


def _index(path: Path) -> None:
    write_safetensors(path.parent / "model-00001-of-00001.safetensors", _weights())
    read_safetensors_folder(path.parent)


def _results(path: Path) -> None:
    from harness.integrity import consistency_problems
    from harness.results import read_results

    consistency_problems(read_results(path))


TARGETS: dict[str, tuple[Callable[[Path], Any], str]] = {
    "safetensors": (read_safetensors, "model.safetensors"),
    "safetensors_index": (_index, "model.safetensors.index.json"),
    "npy": (_npy, "w.npy"),
    "parquet_v2": (_load_both, "m.parquet"),
    "parquet_stream": (_stream_both, "m.parquet"),
    "gguf": (_gguf, "m.gguf"),
    "criteria": (_criteria, "c.toml"),
    "calibration_jsonl": (_jsonl, "cal.jsonl"),
    "calibration_parquet": (_calibration_parquet, "cal.parquet"),
    "results": (_results, "results.json"),
}


def run_target(name: str, data: bytes) -> str:
    """``"ok"`` or ``"typed"``; anything else raises (a crash)."""
    reader, filename = TARGETS[name]
    return _run(reader, data, filename)


def seed_results() -> bytes:
    gate = {"test": "test_compression", "bits": 4, "metric": "compression_vs_fp32",
            "rule": "compression_vs_fp32 >= 5.5", "threshold": 5.5, "value": 6.0, "passed": True, "why": ""}
    return json.dumps({"schema_version": 1, "criteria": [gate],
                       "bit_widths": [{"bits": 4, "metrics": {"compression_vs_fp32": 6.0}}],
                       "tests": {"failed": 0, "errors": 0, "skipped": 0, "failures": []},
                       "verdict": "PASS"}).encode()


SEEDS: dict[str, Callable[[], bytes]] = {
    "safetensors": seed_safetensors,
    "safetensors_index": seed_index,
    "npy": seed_npy,
    "parquet_v2": seed_parquet_v2,
    "parquet_stream": seed_parquet_stream,
    "gguf": seed_gguf,
    "criteria": lambda: CRITERIA_SEED,
    "calibration_jsonl": lambda: JSONL_SEED,
    "calibration_parquet": seed_calibration_parquet,
    "results": seed_results,
}
