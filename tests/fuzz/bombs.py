"""Bomb-like inputs: small files that claim (or contain) something huge.

Each bomb writes a file and names the reader that must refuse or read it within bounds.
``measure`` runs the reader in a fresh subprocess and reports its outcome, wall time and
peak RSS (VmHWM; see ``harness.memory`` for why not ``ru_maxrss``) above the RSS after imports, so
the memory a reader spends on a hostile file is measured on its own, not mixed with the
test process. Bounds are generous multiples of the file's real size (issue 10: memory
must follow the real size, never what the file claims).

    python tests/fuzz/bombs.py            # every bomb at campaign size, as a table
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
import json
import os
from pathlib import Path
import struct
import subprocess
import sys
import time
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20


@dataclass(frozen=True)
class Bomb:
    name: str
    reader: str          # "module:function" called with the path
    make: Callable[[Path, int], Path]
    claims: str          # what the file claims, for the table
    path_name: str = "bomb.bin"


def _parquet_zstd(path: Path, scale: int) -> Path:
    """A format-v2 artifact whose one row holds ``scale`` MiB of zero codes (zstd: ~KB)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from arrowquant_core import storage

    n = scale * MiB
    zeros = np.zeros(n, dtype=np.uint8)  # calloc: pages never touched until compressed
    codes = pa.LargeBinaryArray.from_buffers(pa.large_binary(), 1, [None, pa.py_buffer(np.array([0, n], np.int64)),
                                                                    pa.py_buffer(zeros)])
    empty = pa.array([b""], pa.large_binary())
    schema = storage._schema(storage.FORMAT_V2, {}, [{"name": "w", "kind": "quantized", "sha256": "0" * 64}])
    table = pa.table({"name": ["w"], "shape": [[2 * n]], "dtype": ["float32"], "data": pa.array([None], pa.large_binary()),
                      "sha256": ["0" * 64], "kind": ["quantized"], "scheme": ["int4-tensor-asym"], "method": ["rtn"],
                      "codes": codes, "scales": empty, "zeros": empty, "params": empty,
                      "tied_to": pa.array([None], pa.string())}, schema=schema)
    pq.write_table(table, path, compression="zstd", use_dictionary=False)
    return path


def _safetensors_header(path: Path, scale: int) -> Path:
    """A header of ``scale`` MiB (capped by MAX_HEADER_BYTES) packed with the smallest
    valid entries: the most Python objects per header byte."""
    from arrowquant_core.safetensors_io import MAX_HEADER_BYTES

    budget = min(scale * MiB, MAX_HEADER_BYTES) - 64
    parts, size, i = [], 2, 0
    while True:
        part = f'"t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'
        if size + len(part) + 1 > budget:
            break
        parts.append(part)
        size += len(part) + 1
        i += 1
    header = ("{" + ",".join(parts) + "}").encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return path


def _safetensors_header_over_cap(path: Path, scale: int) -> Path:
    """Claims a 99 MB header (issue 10: that took 1.4-2 GB); the file is really that big."""
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", 99_000_000))
        handle.write(b"{" + b" " * 1000)
        handle.truncate(8 + 99_000_000)  # sparse: no disk, no memory
    return path


def _long_shape(path: Path, scale: int) -> Path:
    """One tensor whose shape list has ~``scale`` x 100k entries (the message must stay short)."""
    shape = [0] * (scale * 100_000)
    header = json.dumps({"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return path


def _npy_lying_shape(path: Path, scale: int) -> Path:
    """A .npy header declaring 10**12 float32 (4 TB) over 16 bytes of data."""
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000,), }"
    header += " " * (-(len(header) + 11) % 64) + "\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + bytes(16))
    return path


def _jsonl_long_line(path: Path, scale: int) -> Path:
    """One JSONL line of ``scale`` MiB (a list of ids far past any sequence length)."""
    body = b"1," * (scale * MiB // 2)
    path.write_bytes(b'{"input_ids": [' + body + b'1], "mask_ratio": 0.5}\n')
    return path


def _gguf_strings(path: Path, scale: int) -> Path:
    """A valid GGUF whose one metadata key is an array of ``scale`` x 131072 empty strings
    (8 bytes each): gguf-py alone made NumPy views for each, 1.4 GB for 8 MB."""
    n = scale * MiB // 8
    key = b"tokenizer.ggml.tokens"
    with open(path, "wb") as handle:
        handle.write(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
                     + struct.pack("<IIQ", 9, 8, n))
        handle.truncate(handle.tell() + 8 * n)  # every length 0: zeros, written sparse
    return path


def read_gguf_header(path: Path) -> Any:
    """What ``--artifact FILE`` reads first: the bit width from the header."""
    from harness.gguf_artifact import header_bit_width

    return header_bit_width(path, [8, 4, 2])


def _hf_config_layers(path: Path, scale: int) -> Path:
    from fuzz.hf_bomb import make_folder

    return make_folder(path, scale)


def _dev_zero(path: Path, scale: int) -> Path:
    return Path("/dev/zero")


BOMBS: dict[str, Bomb] = {b.name: b for b in [
    Bomb("parquet-zstd-codes", "arrowquant_core.storage:load", _parquet_zstd, "scale MiB of codes in ~KB",
         "bomb.parquet"),
    Bomb("safetensors-header-max", "arrowquant_core.safetensors_io:read_safetensors", _safetensors_header,
         "header of scale MiB, minimal entries", "bomb.safetensors"),
    Bomb("safetensors-header-99MB", "arrowquant_core.safetensors_io:read_header", _safetensors_header_over_cap,
         "99 MB header", "bomb.safetensors"),
    Bomb("safetensors-long-shape", "arrowquant_core.safetensors_io:read_safetensors", _long_shape,
         "shape list of scale x 100k dims", "bomb.safetensors"),
    Bomb("npy-lying-shape", "fuzz.bombs:read_npy_file", _npy_lying_shape, "4 TB in 144 bytes", "w.npy"),
    Bomb("jsonl-long-line", "fixtures.calibration:read_jsonl", _jsonl_long_line, "one line of scale MiB",
         "cal.jsonl"),
    Bomb("gguf-string-array", "fuzz.bombs:read_gguf_header", _gguf_strings, "scale x 131k metadata strings",
         "bomb.gguf"),
    Bomb("hf-config-layers", "fuzz.hf_bomb:build_from_config", _hf_config_layers,
         "config.json of scale x 50k layers over 2", "config.json"),
    Bomb("criteria-dev-zero", "harness.criteria:load_criteria", _dev_zero, "endless /dev/zero"),
    Bomb("calibration-dev-zero", "fixtures.calibration:read_jsonl", _dev_zero, "endless /dev/zero"),
]}


def read_npy_file(path: Path) -> Any:
    from arrowquant_core.safetensors_io import read_npy_folder

    return read_npy_folder(path.parent)


def _peak_kib() -> int:
    """Peak RSS of this process in KiB (harness.memory: VmHWM, not ru_maxrss, which
    carries the parent's mark across fork + exec)."""
    from harness.memory import peak_rss_bytes

    return peak_rss_bytes() // 1024


def _reset_peak() -> None:
    """Start the peak over at the current RSS, so several bombs can be measured one after
    another in one process."""
    from harness.memory import reset_peak_rss

    reset_peak_rss()


def _child_many(jobs: list[tuple[str, str]]) -> None:
    """Run in the subprocess: for each (reader, path), reset the peak, call, print JSON."""
    import gc
    import importlib

    for reader, _path in jobs:  # import everything first: imports are not the bomb's cost
        importlib.import_module(reader.split(":")[0])
    for reader, path in jobs:
        gc.collect()
        _reset_peak()
        _child(reader, path)


def _child(reader: str, path: str) -> None:
    """Import, note RSS, call the reader, print one JSON line."""
    import importlib

    from arrowquant_core.errors import ArrowQuantError

    module, function = reader.split(":")
    call = getattr(importlib.import_module(module), function)
    base = _peak_kib()
    start = time.perf_counter()
    try:
        call(Path(path))
        outcome, message = "ok", ""
    except ArrowQuantError as exc:
        outcome, message = f"typed:{type(exc).__name__}", str(exc)
    except BaseException as exc:  # noqa: BLE001 - the point is to report what escaped
        outcome, message = f"crash:{type(exc).__name__}", str(exc)[:500]
    seconds = time.perf_counter() - start
    peak = _peak_kib()
    print(json.dumps({"outcome": outcome, "message_chars": len(message), "message": message[:300],
                      "seconds": seconds, "base_kib": base, "peak_kib": peak}))


def measure_all(bombs: list[tuple[Bomb, int]], folder: Path, timeout: float = 300.0) -> list[dict[str, Any]]:
    """Make each bomb (at its scale) in ``folder`` and read them all in one subprocess,
    the peak RSS reset before each; returns one report per bomb: the child's outcome,
    message length, seconds and RSS added (KiB) above the RSS before the call."""
    paths = []
    for bomb, scale in bombs:
        (folder / bomb.name).mkdir(parents=True, exist_ok=True)
        paths.append(bomb.make(folder / bomb.name / bomb.path_name, scale))
    jobs = [(bomb.reader, str(path)) for (bomb, _s), path in zip(bombs, paths)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
           "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", f"from fuzz.bombs import _child_many; _child_many({jobs!r})"],
                          env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or len(lines) != len(bombs):
        raise RuntimeError(f"bomb child failed (exit {done.returncode}): {done.stderr[-2000:]}")
    reports = []
    for (bomb, scale), path, line in zip(bombs, paths, lines):
        report: dict[str, Any] = json.loads(line)
        real = path.stat().st_size if path.is_file() else 0
        report.update(bomb=bomb.name, claims=bomb.claims.replace("scale", str(scale)), file_bytes=real,
                      added_kib=report["peak_kib"] - report["base_kib"])
        reports.append(report)
    return reports


def main() -> int:
    import tempfile

    scale = int(os.environ.get("ARROWQUANT_BOMB_SCALE", "256"))
    with tempfile.TemporaryDirectory(prefix="aq-bombs-") as tmp:
        rows = measure_all([(bomb, scale) for bomb in BOMBS.values()], Path(tmp))
    print(f"{'bomb':26s} {'file bytes':>12s} {'added RSS MiB':>14s} {'s':>6s}  outcome")
    for r in rows:
        print(f"{r['bomb']:26s} {r['file_bytes']:12d} {r['added_kib'] / 1024:14.1f} {r['seconds']:6.2f}  {r['outcome']}")
    print(json.dumps(rows))
    return 0 if all(not r["outcome"].startswith("crash") for r in rows) else 1


if __name__ == "__main__":
    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    raise SystemExit(main())
