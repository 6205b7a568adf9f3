"""Parquet storage, one row per tensor.

Format v1 holds float tensors; format v2 holds quantized tensors (packed codes, scales,
zero points, scheme, method, original shape and dtype) and the float tensors kept
unquantized. The version lives in the schema metadata under ``arrowquant.format_version``.

    column   type           v1   v2   meaning
    name     string         yes  yes  tensor name
    shape    list<int64>    yes  yes  original shape
    dtype    string         yes  yes  original dtype (float32, float16, bfloat16, float64)
    data     large_binary   yes  yes  raw little-endian values (v2: float rows only)
    sha256   string         yes  yes  checksum of the row's logical content
    kind     string              yes  "quantized" or "float"
    scheme   string              yes  scheme name (quantized rows)
    method   string              yes  algorithm that chose the codes
    codes    large_binary        yes  packed codes
    scales   large_binary        yes  float32 scales, one per block (K-schemes: int16 exponents
                                          + uint8 codes, kquant.py)
    zeros    large_binary        yes  uint8 zero points (empty for symmetric schemes)
    params   large_binary        yes  float32 (m, a1, a2) per block for lattice methods, else empty

Every write goes to a temporary file in the destination folder and is renamed over the
target only when complete (safetensors' "write to tempfile + rename"), so a crash never
leaves a half-written artifact and never destroys the previous one. Every load checks
each row's checksum. ``load_weights`` is the v1 reading path: it reads v1 files and v2
files alike, dequantizing the latter. Any damage raises ``FormatError`` naming the file
and the tensor, never a raw pyarrow or NumPy error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Final

import ml_dtypes
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

from arrowquant_core.atomic import write_atomic
from arrowquant_core.errors import ArrowQuantError, FormatError
from arrowquant_core.model import QuantizedModel
from arrowquant_core.schemes import SCHEMES
from arrowquant_core.kquant import decode_scales, encode_scales
from arrowquant_core.tensor import FLOAT_DTYPES, QuantizedTensor, layout

FloatArray = npt.NDArray[np.floating]

VERSION_KEY: Final = b"arrowquant.format_version"
METADATA_KEY: Final = b"arrowquant.metadata"
FORMAT_V1: Final = 1
FORMAT_V2: Final = 2

_V1_FIELDS: Final[tuple[str, ...]] = ("name", "shape", "dtype", "data", "sha256")
_V2_FIELDS: Final[tuple[str, ...]] = _V1_FIELDS + ("kind", "scheme", "method", "codes", "scales", "zeros",
                                                  "params")


def _np_dtype(name: str) -> np.dtype[Any]:
    dtype: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16 if name == "bfloat16" else name)
    return dtype


def _checksum(parts: list[bytes], header: str) -> str:
    digest = hashlib.sha256(header.encode("utf-8"))
    for part in parts:
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()


def _float_bytes(array: FloatArray) -> bytes:
    data = np.ascontiguousarray(array)
    if data.dtype.byteorder == ">":
        data = data.byteswap().view(data.dtype.newbyteorder("<"))
    return data.tobytes()


def _float_row(name: str, array: FloatArray) -> dict[str, Any]:
    dtype = array.dtype.name
    if dtype not in FLOAT_DTYPES:
        raise FormatError(f"tensor {name!r}: dtype {dtype} cannot be stored; accepted: {list(FLOAT_DTYPES)}")
    data = _float_bytes(array)
    shape = [int(d) for d in array.shape]
    return {"name": name, "shape": shape, "dtype": dtype, "data": data, "kind": "float",
            "sha256": _checksum([data], f"float|{name}|{shape}|{dtype}")}


def _quantized_row(qt: QuantizedTensor) -> dict[str, Any]:
    qt.check()
    codes, zeros = qt.codes.tobytes(), qt.zeros.tobytes()
    # K-schemes store scales as codes (kquant.py docstring gives the layout)
    scales = (encode_scales(qt.scales, qt.scheme, qt.name) if qt.scheme.scale_bits
              else qt.scales.astype("<f4").tobytes())
    params = qt.params.astype("<f4").tobytes()
    shape = list(qt.shape)
    header = f"quantized|{qt.name}|{shape}|{qt.dtype}|{qt.scheme.name}|{qt.method}"
    return {"name": qt.name, "shape": shape, "dtype": qt.dtype, "kind": "quantized",
            "scheme": qt.scheme.name, "method": qt.method, "codes": codes, "scales": scales,
            "zeros": zeros, "params": params, "sha256": _checksum([codes, scales, zeros, params], header)}


def _schema(version: int, metadata: Mapping[str, str]) -> pa.Schema:
    fields: list[pa.Field[Any]] = [
        pa.field("name", pa.string(), nullable=False),
        pa.field("shape", pa.list_(pa.int64()), nullable=False),
        pa.field("dtype", pa.string(), nullable=False),
        pa.field("data", pa.large_binary()),
        pa.field("sha256", pa.string(), nullable=False),
    ]
    if version == FORMAT_V2:
        fields += [
            pa.field("kind", pa.string(), nullable=False),
            pa.field("scheme", pa.string()),
            pa.field("method", pa.string()),
            pa.field("codes", pa.large_binary()),
            pa.field("scales", pa.large_binary()),
            pa.field("zeros", pa.large_binary()),
            pa.field("params", pa.large_binary()),
        ]
    meta: dict[bytes | str, bytes | str] = {VERSION_KEY: str(version).encode(),
            METADATA_KEY: json.dumps(dict(metadata), sort_keys=True).encode()}
    return pa.schema(fields, metadata=meta)


def _write_atomic(rows: list[dict[str, Any]], schema: pa.Schema, path: Path) -> None:
    columns = {f.name: [row.get(f.name) for row in rows] for f in schema}
    table = pa.Table.from_pydict(columns, schema=schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    # zstd: codes of real weights are not uniformly distributed, and the artifact's size
    # is measured on disk, so what compression saves is real.
    write_atomic(path, lambda handle: pq.write_table(table, handle, compression="zstd", use_dictionary=False,
                                                     write_statistics=False))


def save(model: QuantizedModel, path: str | os.PathLike[str]) -> Path:
    """Write a quantized model as a format-v2 Parquet file, atomically.

    Tensors keep the model's source order; returns the path written.
    """
    target = Path(path)
    rows: list[dict[str, Any]] = []
    for name in model.order:
        qt = model.tensors.get(name)
        if qt is not None:
            rows.append(_quantized_row(qt))
        elif name in model.floats:
            rows.append(_float_row(name, model.floats[name]))
        else:
            raise FormatError(f"{target}: tensor {name!r} is in the model's order but has no data")
    _write_atomic(rows, _schema(FORMAT_V2, model.metadata), target)
    return target


def save_weights(weights: Mapping[str, FloatArray], path: str | os.PathLike[str],
                 metadata: Mapping[str, str] | None = None) -> Path:
    """Write float tensors as a format-v1 Parquet file, atomically."""
    target = Path(path)
    rows = [_float_row(name, array) for name, array in weights.items()]
    _write_atomic(rows, _schema(FORMAT_V1, metadata or {}), target)
    return target


# --- reading ---------------------------------------------------------------------------

def _read_table(path: Path) -> tuple[pa.Table, int, dict[str, str]]:
    if not path.is_file():
        raise FormatError(f"{path}: no such file")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise FormatError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc})") from None
    try:
        return _inspect(table, path)
    except UnicodeDecodeError:
        raise FormatError(f"{path}: schema holds text that is not UTF-8 (corrupted footer)") from None


def _inspect(table: pa.Table, path: Path) -> tuple[pa.Table, int, dict[str, str]]:
    # Any: the stubs say dict[bytes, bytes], but a file without metadata gives None, and a
    # compiled annotation would turn that into a bare TypeError.
    raw: Any = getattr(table.schema, "metadata", None)
    if raw is None:
        raw = {}
    version_text = raw.get(VERSION_KEY)
    if version_text is None:
        raise FormatError(f"{path}: schema metadata has no {VERSION_KEY.decode()!r}; not an ArrowQuant file")
    try:
        version = int(version_text.decode())
    except (UnicodeDecodeError, ValueError):
        raise FormatError(f"{path}: format version {version_text!r} is not an integer") from None
    if version not in (FORMAT_V1, FORMAT_V2):
        raise FormatError(f"{path}: format version {version} is not supported (known: 1, 2)")
    needed = _V2_FIELDS if version == FORMAT_V2 else _V1_FIELDS
    missing = [f for f in needed if f not in table.schema.names]
    if missing:
        raise FormatError(f"{path}: format v{version} file lacks column(s) {missing}")
    try:
        metadata = json.loads(raw.get(METADATA_KEY, b"{}").decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FormatError(f"{path}: model metadata is not valid JSON") from None
    if not isinstance(metadata, dict):
        raise FormatError(f"{path}: model metadata must be a JSON object")
    return table, version, {str(k): str(v) for k, v in metadata.items()}


def _rows(table: pa.Table, fields: tuple[str, ...]) -> list[dict[str, Any]]:
    columns = {f: table.column(f).to_pylist() for f in fields}
    return [{f: columns[f][i] for f in fields} for i in range(table.num_rows)]


def _shape(row: dict[str, Any], path: Path) -> tuple[int, ...]:
    shape = row["shape"]
    if not isinstance(shape, list) or any(not isinstance(d, int) or d < 0 for d in shape):
        raise FormatError(f"{path}: tensor {row['name']!r}: shape {shape!r} must be non-negative integers")
    return tuple(int(d) for d in shape)


def _verify(row: dict[str, Any], parts: list[bytes], header: str, path: Path) -> None:
    if _checksum(parts, header) != row["sha256"]:
        raise FormatError(f"{path}: tensor {row['name']!r}: checksum mismatch (file corrupted or edited)")


def _decode_float(row: dict[str, Any], path: Path) -> FloatArray:
    name, dtype, data = row["name"], row["dtype"], row["data"]
    if dtype not in FLOAT_DTYPES or not isinstance(data, bytes):
        raise FormatError(f"{path}: tensor {name!r}: float row needs a dtype in {list(FLOAT_DTYPES)} and data bytes")
    shape = _shape(row, path)
    _verify(row, [data], f"float|{name}|{list(shape)}|{dtype}", path)
    np_dtype = _np_dtype(dtype)
    if len(data) != math.prod(shape) * np_dtype.itemsize:
        raise FormatError(f"{path}: tensor {name!r}: {len(data)} data bytes, shape {list(shape)} "
                          f"of {dtype} needs {math.prod(shape) * np_dtype.itemsize}")
    return np.frombuffer(data, dtype=np_dtype.newbyteorder("<")).astype(np_dtype).reshape(shape)


def _decode_quantized(row: dict[str, Any], path: Path) -> QuantizedTensor:
    name = row["name"]
    scheme = SCHEMES.get(row["scheme"] or "")
    if scheme is None:
        raise FormatError(f"{path}: tensor {name!r}: unknown scheme {row['scheme']!r}")
    blobs = [row["codes"], row["scales"], row["zeros"], row["params"]]
    if not all(isinstance(b, bytes) for b in blobs):
        raise FormatError(f"{path}: tensor {name!r}: codes, scales, zeros and params must all be present")
    shape = _shape(row, path)
    method = str(row["method"] or "rtn")
    _verify(row, blobs, f"quantized|{name}|{list(shape)}|{row['dtype']}|{scheme.name}|{method}", path)
    if (len(blobs[1]) % 4 and not scheme.scale_bits) or len(blobs[3]) % 4:
        raise FormatError(f"{path}: tensor {name!r}: scale and param bytes must be multiples of 4 (float32)")
    if scheme.scale_bits:
        rows, _cols, _block, n_groups = layout(shape, scheme)
        scales = decode_scales(blobs[1], scheme, rows * n_groups, f"{path}: {name}")
    else:
        scales = np.frombuffer(blobs[1], dtype="<f4").astype(np.float32)
    qt = QuantizedTensor(
        name=name, scheme=scheme, shape=shape, dtype=str(row["dtype"]),
        codes=np.frombuffer(blobs[0], dtype=np.uint8),
        scales=scales,
        zeros=np.frombuffer(blobs[2], dtype=np.uint8), method=method,
        params=np.frombuffer(blobs[3], dtype="<f4").astype(np.float32))
    qt.check(str(path))
    return qt


def _guard(path: Path, action: Callable[[], Any]) -> Any:
    try:
        return action()
    except ArrowQuantError:
        raise
    except (ValueError, TypeError, KeyError) as exc:
        raise FormatError(f"{path}: malformed content ({type(exc).__name__}: {exc})") from None


def _build_model(table: pa.Table, source: Path, metadata: dict[str, str]) -> QuantizedModel:
    tensors: dict[str, QuantizedTensor] = {}
    floats: dict[str, FloatArray] = {}
    order: list[str] = []
    for row in _rows(table, _V2_FIELDS):
        name = row["name"]
        if name in tensors or name in floats:
            raise FormatError(f"{source}: tensor {name!r} appears twice")
        order.append(name)
        if row["kind"] == "quantized":
            tensors[name] = _decode_quantized(row, source)
        elif row["kind"] == "float":
            floats[name] = _decode_float(row, source)
        else:
            raise FormatError(f"{source}: tensor {name!r}: unknown kind {row['kind']!r}")
    return QuantizedModel(tensors=tensors, floats=floats, order=tuple(order), metadata=metadata)


def _build_weights(table: pa.Table, source: Path) -> dict[str, FloatArray]:
    out: dict[str, FloatArray] = {}
    for row in _rows(table, _V1_FIELDS):
        if row["name"] in out:
            raise FormatError(f"{source}: tensor {row['name']!r} appears twice")
        out[row["name"]] = _decode_float(row, source)
    return out


def load(path: str | os.PathLike[str]) -> QuantizedModel:
    """Read a format-v2 file back into a QuantizedModel (codes and scales bit-exact)."""
    source = Path(path)
    table, version, metadata = _read_table(source)
    if version != FORMAT_V2:
        raise FormatError(f"{source}: format v{version} holds float tensors only; "
                          "read it with load_weights()")
    model: QuantizedModel = _guard(source, lambda: _build_model(table, source, metadata))
    return model


def load_weights(path: str | os.PathLike[str]) -> dict[str, FloatArray]:
    """The v1 reading path: float tensors from a v1 file, or a v2 file dequantized."""
    source = Path(path)
    table, version, metadata = _read_table(source)
    if version == FORMAT_V2:
        model: QuantizedModel = _guard(source, lambda: _build_model(table, source, metadata))
        return model.dequantize()
    weights: dict[str, FloatArray] = _guard(source, lambda: _build_weights(table, source))
    return weights


def format_version(path: str | os.PathLike[str]) -> int:
    """The format version recorded in a file's schema metadata."""
    return _read_table(Path(path))[1]
