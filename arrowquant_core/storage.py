"""Parquet storage, one row per tensor.

Format v1 holds unquantized tensors; format v2 holds every tensor of a quantized model:
quantized tensors (packed codes, scales, zero points, scheme, method, original shape and
dtype), float tensors kept unquantized, integer/boolean buffers (bit-exact), tied
aliases (stored once) and auxiliary arrays. The version lives in the schema metadata
under ``arrowquant.format_version``.

    column   type           v1   v2   meaning
    name     string         yes  yes  tensor name
    shape    list<int64>    yes  yes  original shape
    dtype    string         yes  yes  original dtype (float32/16, bfloat16, float64; bool and
                                      int/uint 8-64 for buffers and aux rows)
    data     large_binary   yes  yes  raw little-endian values (v2: float, buffer, aux rows)
    sha256   string         yes  yes  checksum of the row's logical content
    kind     string              yes  "quantized", "float", "buffer", "tied" or "aux"
    scheme   string              yes  scheme name (quantized rows)
    method   string              yes  algorithm that chose the codes
    codes    large_binary        yes  packed codes
    scales   large_binary        yes  float32 scales, one per block (K-schemes: int16 exponents
                                          + uint8 codes, kquant.py)
    zeros    large_binary        yes  uint8 zero points (empty for symmetric schemes)
    params   large_binary        yes  float32 (m, a1, a2) per block for lattice methods, else empty
    tied_to  string              opt  "tied" rows: the canonical tensor this alias is stored as
                                      (files written before the column existed have no ties)

Model tensors (every kind but "aux") keep the source order; "aux" rows follow them.

Every write goes to a temporary file in the destination folder and is renamed over the
target only when complete (safetensors' "write to tempfile + rename"), so a crash never
leaves a half-written artifact and never destroys the previous one. Every load checks
each row's checksum, then the **manifest digest** (schema metadata
``arrowquant.manifest_sha256``): one sha256 over the format version, the exact model
metadata bytes, the row count and every row's (name, kind, checksum) in file order, so a
deleted, reordered, renamed or added row, or edited metadata, is a ``FormatError`` even
when each remaining row is intact (per-row checksums cannot see that). Every row kind
(quantized, float, buffer, tied, aux, v1) is covered. Before any column is read, the
footer's declared decoded size is checked against the file's real size
(``limits.check_parquet_footprint``: a small zstd file declaring GiBs is refused). ``load_weights`` is the v1 reading path: it reads v1 files and v2
files alike, dequantizing the latter. Any damage raises ``FormatError`` naming the file
and the tensor, never a raw pyarrow or NumPy error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

from arrowquant_core.atomic import write_atomic
from arrowquant_core.bf16 import bfloat16
from arrowquant_core.errors import ArrowQuantError, ConfigurationError, FormatError
from arrowquant_core.limits import check_parquet_footprint, check_shape, cut, short
from arrowquant_core.model import RAW_DTYPES, Mapper, QuantizedModel
from arrowquant_core.schemes import SCHEMES
from arrowquant_core.kquant import decode_scales, encode_scales
from arrowquant_core.tensor import FLOAT_DTYPES, QuantizedTensor, layout

FloatArray = npt.NDArray[np.floating]

VERSION_KEY: Final = b"arrowquant.format_version"
METADATA_KEY: Final = b"arrowquant.metadata"
MANIFEST_KEY: Final = b"arrowquant.manifest_sha256"
WRITER_KEY: Final = b"arrowquant.writer"
WRITER: Final = "arrowquant_core 0.1.0"  # information for people and tools, never a decoding rule
FORMAT_V1: Final = 1
FORMAT_V2: Final = 2

_V1_FIELDS: Final[tuple[str, ...]] = ("name", "shape", "dtype", "data", "sha256")
_V2_FIELDS: Final[tuple[str, ...]] = _V1_FIELDS + ("kind", "scheme", "method", "codes", "scales", "zeros",
                                                  "params")
_V2_OPTIONAL: Final[tuple[str, ...]] = ("tied_to",)
_STORED_DTYPES: Final[tuple[str, ...]] = FLOAT_DTYPES + RAW_DTYPES
# row kinds holding raw values in ``data``, and the checksum prefix of each
_RAW_KINDS: Final[tuple[str, ...]] = ("float", "buffer", "aux")
_MESSAGE_CAP: Final = 2000


def _np_dtype(name: str) -> np.dtype[Any]:
    dtype: np.dtype[Any] = bfloat16() if name == "bfloat16" else np.dtype(name)
    return dtype


def _checksum(parts: Sequence[bytes | memoryview], header: str) -> str:
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


def _allowed(kind: str) -> tuple[str, ...]:
    """dtypes a row of ``kind`` may hold ("v1": a format-v1 row, which has no kind)."""
    return FLOAT_DTYPES if kind == "float" else RAW_DTYPES if kind == "buffer" else _STORED_DTYPES


def _raw_row(name: str, array: npt.NDArray[Any], kind: str = "float") -> dict[str, Any]:
    dtype = array.dtype.name
    if dtype not in _allowed(kind):
        raise FormatError(f"tensor {short(name)}: dtype {dtype} cannot be stored as a {kind} row; "
                          f"accepted: {list(_allowed(kind))}")
    header_kind = "float" if kind == "v1" else kind
    data = _float_bytes(array)
    shape = [int(d) for d in array.shape]
    return {"name": name, "shape": shape, "dtype": dtype, "data": data, "kind": header_kind,
            "sha256": _checksum([data], f"{header_kind}|{name}|{shape}|{dtype}")}


def _tied_row(alias: str, canonical: str, reference: dict[str, Any]) -> dict[str, Any]:
    """An alias stored as a reference to ``canonical`` (whose row is ``reference``)."""
    header = f"tied|{alias}|{canonical}|{reference['shape']}|{reference['dtype']}"
    return {"name": alias, "shape": reference["shape"], "dtype": reference["dtype"], "kind": "tied",
            "tied_to": canonical, "sha256": _checksum([], header)}


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


def _bytes_view(array: npt.NDArray[Any], dtype: str) -> memoryview:
    return np.ascontiguousarray(array, dtype=dtype).reshape(-1).view(np.uint8).data


def row_checksum(qt: QuantizedTensor) -> tuple[str, npt.NDArray[np.uint8]]:
    """The checksum of a quantized row and its stored scale bytes, as ``save`` computes
    them but without copying the codes (the streaming writer, stream.py)."""
    qt.check()
    scales: npt.NDArray[np.uint8] = (
        np.frombuffer(encode_scales(qt.scales, qt.scheme, qt.name), dtype=np.uint8) if qt.scheme.scale_bits
        else np.ascontiguousarray(qt.scales, dtype="<f4").reshape(-1).view(np.uint8))
    header = f"quantized|{qt.name}|{list(qt.shape)}|{qt.dtype}|{qt.scheme.name}|{qt.method}"
    parts = [_bytes_view(qt.codes, "u1"), scales.data, _bytes_view(qt.zeros, "u1"),
             _bytes_view(qt.params, "<f4")]
    return _checksum(parts, header), scales


def raw_row(name: str, array: npt.NDArray[Any], kind: str) -> dict[str, Any]:
    """A float, buffer or aux row as ``save`` writes it (public for the streaming writer)."""
    return _raw_row(name, array, kind)


def tied_row(alias: str, canonical: str, shape: tuple[int, ...], dtype: str) -> dict[str, Any]:
    """A tied row as ``save`` writes it (public for the streaming writer)."""
    return _tied_row(alias, canonical, {"shape": [int(d) for d in shape], "dtype": dtype})


def tied_target(row: dict[str, Any], path: Path) -> tuple[str, list[int], str]:
    """A tied row's (canonical name, shape, dtype), its checksum verified; the caller checks
    that the canonical tensor is a stored model tensor of the same shape and dtype."""
    canonical = row.get("tied_to")
    if not isinstance(canonical, str) or canonical == row["name"]:
        raise FormatError(f"{path}: tensor {short(row['name'])}: tied to {str(canonical)[:80]!r}, which is not a stored "
                          "model tensor")
    shape, dtype = list(_shape(row, path)), str(row["dtype"])
    _verify(row, [], f"tied|{row['name']}|{canonical}|{shape}|{dtype}", path)
    return canonical, shape, dtype


def manifest_digest(version: int, metadata_json: bytes, rows: list[tuple[str, str, str]]) -> str:
    """The manifest digest (docs/FORMAT.md section 7.1) of rows given as (name, kind, checksum)."""
    return _manifest(version, metadata_json, rows)


def check_columns(names: list[str], version: int, path: Path) -> None:
    """Every column a format-``version`` file must have is there (FormatError naming the lacking ones)."""
    missing = [f for f in (_V2_FIELDS if version == FORMAT_V2 else _V1_FIELDS) if f not in names]
    if missing:
        raise FormatError(f"{path}: format v{version} file lacks column(s) {missing}")


def decode_row(row: dict[str, Any], path: Path) -> Any:
    """One format-v2 row (a dict of column values, blobs as bytes or memoryviews) decoded:
    a QuantizedTensor for a quantized row, an array for float/buffer/aux rows. Tied rows
    are refused: the streaming reader has no canonical tensor to point them at."""
    kind = row.get("kind")
    if kind == "quantized":
        return _guard(path, lambda: _decode_quantized(row, path))
    if kind in _RAW_KINDS:
        return _guard(path, lambda: _decode_raw(row, path, str(kind)))
    raise FormatError(f"{path}: tensor {short(row.get('name'))}: kind {short(kind)} cannot be read row by row")


def _manifest(version: int, metadata_json: bytes, rows: list[tuple[str, str, str]]) -> str:
    """sha256 over the version, the metadata bytes and each row's (name, kind, checksum),
    every field length-prefixed (no two manifests share an encoding)."""
    digest = hashlib.sha256(b"arrowquant-manifest-1")
    digest.update(version.to_bytes(8, "little"))
    digest.update(len(metadata_json).to_bytes(8, "little"))
    digest.update(metadata_json)
    digest.update(len(rows).to_bytes(8, "little"))
    for name, kind, checksum in rows:
        for text in (name, kind, checksum):
            part = text.encode("utf-8", "surrogatepass")
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
    return digest.hexdigest()


def _manifest_rows(rows: list[dict[str, Any]], version: int) -> list[tuple[str, str, str]]:
    return [(str(row["name"]), str(row.get("kind") if version == FORMAT_V2 else "v1"), str(row["sha256"]))
            for row in rows]


def _check_manifest(table: pa.Table, version: int, rows: list[tuple[str, str, str]], path: Path) -> None:
    raw: Any = getattr(table.schema, "metadata", None) or {}
    recorded = raw.get(MANIFEST_KEY)
    if recorded is None:
        raise FormatError(f"{path}: schema metadata has no {MANIFEST_KEY.decode()!r} (written before manifest "
                          "digests, or stripped); re-quantize the model to get a verifiable artifact")
    expected = _manifest(version, bytes(raw.get(METADATA_KEY, b"{}")), rows)
    if recorded != expected.encode():
        raise FormatError(f"{path}: manifest digest mismatch: rows deleted, added, reordered or renamed, or the "
                          "model metadata edited (each remaining row's own checksum may still hold)")


def _schema(version: int, metadata: Mapping[str, str], rows: list[dict[str, Any]]) -> pa.Schema:
    metadata_json = json.dumps(dict(metadata), sort_keys=True).encode()
    meta: dict[bytes | str, bytes | str] = {VERSION_KEY: str(version).encode(), METADATA_KEY: metadata_json,
                                            WRITER_KEY: WRITER.encode(),
                                            MANIFEST_KEY: _manifest(version, metadata_json,
                                                                    _manifest_rows(rows, version)).encode()}
    return pa.schema(schema_fields(version), metadata=meta)


def schema_fields(version: int) -> list[pa.Field[Any]]:
    """The columns of a format-``version`` file, in order."""
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
            pa.field("tied_to", pa.string()),
        ]
    return fields


COMPRESSIONS: Final[tuple[str, ...]] = ("zstd", "none")


def _write_atomic(rows: list[dict[str, Any]], schema: pa.Schema, path: Path, compression: str = "zstd") -> None:
    if compression not in COMPRESSIONS:
        raise ConfigurationError(f"{path}: compression {short(compression)} is not one of {list(COMPRESSIONS)}")
    codec: Literal["zstd", "none"] = "none" if compression == "none" else "zstd"
    columns = {f.name: [row.get(f.name) for row in rows] for f in schema}
    table = pa.Table.from_pydict(columns, schema=schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    # zstd: codes of real weights are not uniformly distributed, and the artifact's size
    # is measured on disk, so what compression saves is real.
    write_atomic(path, lambda handle: pq.write_table(table, handle, compression=codec, use_dictionary=False,
                                                     write_statistics=False))


def save(model: QuantizedModel, path: str | os.PathLike[str]) -> Path:
    """Write a quantized model as a format-v2 Parquet file, atomically.

    Tensors keep the model's source order; returns the path written.
    """
    target = Path(path)
    rows: list[dict[str, Any]] = []
    by_name: dict[str, dict[str, Any]] = {}
    for name in model.order:
        if name in model.ties:
            continue
        qt = model.tensors.get(name)
        if qt is not None:
            by_name[name] = _quantized_row(qt)
        elif name in model.floats:
            by_name[name] = _raw_row(name, model.floats[name], "float")
        elif name in model.buffers:
            by_name[name] = _raw_row(name, model.buffers[name], "buffer")
        else:
            raise FormatError(f"{target}: tensor {short(name)} is in the model's order but has no data")
    for name in model.order:
        canonical = model.ties.get(name)
        if canonical is None:
            rows.append(by_name[name])
        elif canonical in by_name:
            rows.append(_tied_row(name, canonical, by_name[canonical]))
        else:
            raise FormatError(f"{target}: tensor {short(name)} is tied to {canonical!r}, which the model does not hold")
    clash = sorted(set(model.aux) & set(model.order))
    if clash:
        raise FormatError(f"{target}: auxiliary array(s) {clash[:3]} share a name with a model tensor")
    rows.extend(_raw_row(name, array, "aux") for name, array in model.aux.items())
    _write_atomic(rows, _schema(FORMAT_V2, model.metadata, rows), target)
    return target


def save_weights(weights: Mapping[str, FloatArray], path: str | os.PathLike[str],
                 metadata: Mapping[str, str] | None = None, compression: str = "zstd") -> Path:
    """Write float tensors as a format-v1 Parquet file, atomically (``compression="none"``
    where only the round trip matters: zstd of float32 weights saves little and costs the
    most of the write)."""
    target = Path(path)
    rows = [_raw_row(name, array, "v1") for name, array in weights.items()]
    _write_atomic(rows, _schema(FORMAT_V1, metadata or {}, rows), target, compression)
    return target


# --- reading ---------------------------------------------------------------------------

def _read_table(path: Path) -> tuple[pa.Table, int, dict[str, str]]:
    if not path.is_file():
        raise FormatError(f"{path}: no such file")
    try:
        check_parquet_footprint(path, "artifact")  # declared sizes vs real size, before reading
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    try:
        pf = pq.ParquetFile(path)
        table = pf.read()
        # The keys live in the Parquet footer's key/value metadata (docs/FORMAT.md section 3).
        # A streamed artifact (stream.py) adds the manifest there at close, after the Arrow
        # schema copy in ``ARROW:schema`` was fixed, so the footer's keys win.
        footer: Any = pf.metadata.metadata or {}
        extra = {k: v for k, v in footer.items() if k != b"ARROW:schema"}
        if extra:
            table = table.replace_schema_metadata({**(table.schema.metadata or {}), **extra})
    except (pa.ArrowException, OSError, ValueError, MemoryError) as exc:
        raise FormatError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {cut(str(exc))})") from None
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
        raise FormatError(f"{path}: format version {short(version_text)} is not an integer") from None
    if version not in (FORMAT_V1, FORMAT_V2):
        raise FormatError(f"{path}: format version {version} is not supported (known: 1, 2)")
    check_columns(table.schema.names, version, path)
    try:
        metadata = json.loads(raw.get(METADATA_KEY, b"{}").decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FormatError(f"{path}: model metadata is not valid JSON") from None
    except (RecursionError, ValueError, MemoryError) as exc:  # absurd nesting, huge ints
        raise FormatError(f"{path}: model metadata is not usable JSON ({type(exc).__name__})") from None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError(f"{path}: model metadata must be a JSON object of str to str")
    return table, version, {str(k): str(v) for k, v in metadata.items()}


def _rows(table: pa.Table, fields: tuple[str, ...]) -> list[dict[str, Any]]:
    columns = {f: _binary_views(table.column(f)) if f in _BLOB_FIELDS else table.column(f).to_pylist()
               for f in fields}
    return [{f: columns[f][i] for f in fields} for i in range(table.num_rows)]


# Binary columns are read as zero-copy memoryviews of Arrow's buffers, not to_pylist()
# bytes (one copy of every tensor fewer on load, issue 11); hashlib and np.frombuffer
# take them as they are.
_BLOB_FIELDS: Final[frozenset[str]] = frozenset({"data", "codes", "scales", "zeros", "params"})


def _binary_views(column: Any) -> list[Any]:
    out: list[Any] = []
    for chunk in column.chunks:
        if not (pa.types.is_large_binary(chunk.type) or pa.types.is_binary(chunk.type)):
            # not a binary column (a damaged or foreign file): hand the values on as they
            # are, so the row checks name the tensor and the column in a FormatError
            out += [v for v in chunk.to_pylist()]
            continue
        _validity, offsets_buffer, data_buffer = chunk.buffers()
        width = 8 if pa.types.is_large_binary(chunk.type) else 4
        offsets = np.frombuffer(offsets_buffer, dtype=f"<i{width}", count=len(chunk) + 1,
                                offset=chunk.offset * width)
        data = memoryview(data_buffer) if data_buffer is not None else memoryview(b"")
        valid = chunk.is_valid().to_pylist()
        for i in range(len(chunk)):
            out.append(data[int(offsets[i]):int(offsets[i + 1])] if valid[i] else None)
    return out


def _shape(row: dict[str, Any], path: Path) -> tuple[int, ...]:
    # also refuses zero-size tensors with absurd dims, which would fail deep in NumPy
    return check_shape(f"{path}: tensor {short(row['name'])}", row["shape"], 8)


def _verify(row: dict[str, Any], parts: Sequence[bytes | memoryview], header: str, path: Path) -> None:
    if _checksum(parts, header) != row["sha256"]:
        raise FormatError(f"{path}: tensor {short(row['name'])}: checksum mismatch (file corrupted or edited)")


def _decode_raw(row: dict[str, Any], path: Path, kind: str = "float") -> npt.NDArray[Any]:
    name, dtype, data = row["name"], row["dtype"], row["data"]
    allowed = _allowed(kind)
    if dtype not in allowed or not isinstance(data, (bytes, memoryview)):
        raise FormatError(f"{path}: tensor {short(name)}: {kind} row needs a dtype in {list(allowed)} and data bytes")
    shape = _shape(row, path)
    _verify(row, [data], f"{'float' if kind == 'v1' else kind}|{name}|{list(shape)}|{dtype}", path)
    np_dtype = _np_dtype(dtype)
    if len(data) != math.prod(shape) * np_dtype.itemsize:
        raise FormatError(f"{path}: tensor {short(name)}: {len(data)} data bytes, shape {list(shape)} "
                          f"of {dtype} needs {math.prod(shape) * np_dtype.itemsize}")
    return np.frombuffer(data, dtype=np_dtype.newbyteorder("<")).astype(np_dtype).reshape(shape)


def _decode_quantized(row: dict[str, Any], path: Path) -> QuantizedTensor:
    name = row["name"]
    scheme = SCHEMES.get(row["scheme"] or "")
    if scheme is None:
        raise FormatError(f"{path}: tensor {short(name)}: unknown scheme {short(row['scheme'])}")
    blobs = [row["codes"], row["scales"], row["zeros"], row["params"]]
    if not all(isinstance(b, (bytes, memoryview)) for b in blobs):
        raise FormatError(f"{path}: tensor {short(name)}: codes, scales, zeros and params must all be present")
    shape = _shape(row, path)
    method = str(row["method"] or "rtn")
    _verify(row, blobs, f"quantized|{name}|{list(shape)}|{row['dtype']}|{scheme.name}|{method}", path)
    if (len(blobs[1]) % 4 and not scheme.scale_bits) or len(blobs[3]) % 4:
        raise FormatError(f"{path}: tensor {short(name)}: scale and param bytes must be multiples of 4 (float32)")
    if scheme.scale_bits:
        rows, _cols, _block, n_groups = layout(shape, scheme)
        scales = decode_scales(bytes(blobs[1]), scheme, rows * n_groups, f"{path}: {name}")
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
    except ArrowQuantError as exc:
        text = str(exc)
        if len(text) <= _MESSAGE_CAP:
            raise
        # names and values quoted deeper down (tensor.py) come from the file: bound them
        raise type(exc)(cut(text, _MESSAGE_CAP)) from None
    # a distinct name per clause: mypyc types one ``exc`` for the whole try statement, and a
    # TypeError bound to a name typed ArrowQuantError is itself a TypeError when compiled
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError, MemoryError) as err:
        raise FormatError(f"{path}: malformed content ({type(err).__name__}: {cut(str(err))})") from None


def _build_model(table: pa.Table, source: Path, metadata: dict[str, str]) -> QuantizedModel:
    tensors: dict[str, QuantizedTensor] = {}
    floats: dict[str, FloatArray] = {}
    buffers: dict[str, npt.NDArray[Any]] = {}
    aux: dict[str, npt.NDArray[Any]] = {}
    ties: dict[str, str] = {}
    tied_rows: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    fields = _V2_FIELDS + tuple(f for f in _V2_OPTIONAL if f in table.schema.names)
    seen: set[str] = set()
    rows = _rows(table, fields)
    for row in rows:
        name, kind = row["name"], row["kind"]
        if name in seen:
            raise FormatError(f"{source}: tensor {short(name)} appears twice")
        seen.add(name)
        if kind == "aux":
            aux[name] = _decode_raw(row, source, "aux")
            continue
        if aux:
            raise FormatError(f"{source}: tensor {short(name)} comes after the auxiliary rows; model tensors come first")
        order.append(name)
        if kind == "quantized":
            tensors[name] = _decode_quantized(row, source)
        elif kind == "float":
            floats[name] = _decode_raw(row, source, "float")
        elif kind == "buffer":
            buffers[name] = _decode_raw(row, source, "buffer")
        elif kind == "tied":
            tied_rows[name] = row
        else:
            raise FormatError(f"{source}: tensor {short(name)}: unknown kind {str(kind)[:40]!r}")
    for alias, row in tied_rows.items():
        canonical, shape, dtype = tied_target(row, source)
        if canonical in tied_rows or canonical not in seen or canonical in aux:
            raise FormatError(f"{source}: tensor {short(alias)}: tied to {canonical[:80]!r}, which is not a stored "
                              "model tensor")
        target = tensors.get(canonical)
        if target is not None:
            target_shape, target_dtype = list(target.shape), target.dtype
        else:
            kept = floats[canonical] if canonical in floats else buffers[canonical]
            target_shape, target_dtype = list(kept.shape), kept.dtype.name
        if shape != target_shape or dtype != target_dtype:
            raise FormatError(f"{source}: tensor {short(alias)}: declared {dtype}{shape[:8]} but tied to {short(canonical)} "
                              f"of {target_dtype}{target_shape[:8]}")
        ties[alias] = canonical
    _check_manifest(table, FORMAT_V2, _manifest_rows(rows, FORMAT_V2), source)
    return QuantizedModel(tensors=tensors, floats=floats, order=tuple(order), metadata=metadata,
                          buffers=buffers, ties=ties, aux=aux)


def _build_weights(table: pa.Table, source: Path) -> dict[str, FloatArray]:
    out: dict[str, FloatArray] = {}
    rows = _rows(table, _V1_FIELDS)
    for row in rows:
        if row["name"] in out:
            raise FormatError(f"{source}: tensor {short(row['name'])} appears twice")
        out[row["name"]] = _decode_raw(row, source, "v1")
    _check_manifest(table, FORMAT_V1, _manifest_rows(rows, FORMAT_V1), source)
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


def load_weights(path: str | os.PathLike[str], mapper: Mapper | None = None) -> dict[str, FloatArray]:
    """The v1 reading path: float tensors from a v1 file, or a v2 file dequantized
    (``mapper``: see ``QuantizedModel.dequantize``)."""
    source = Path(path)
    table, version, metadata = _read_table(source)
    if version == FORMAT_V2:
        model: QuantizedModel = _guard(source, lambda: _build_model(table, source, metadata))
        return model.dequantize(mapper)
    weights: dict[str, FloatArray] = _guard(source, lambda: _build_weights(table, source))
    return weights


def format_version(path: str | os.PathLike[str]) -> int:
    """The format version recorded in a file's schema metadata."""
    return _read_table(Path(path))[1]
