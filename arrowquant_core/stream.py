"""Streaming quantization: read, quantize, write and measure one piece at a time (issue 11).

The in-memory path (``quantize_model`` -> ``save`` -> ``load`` -> ``dequantize``) holds
the whole model several times over; a 7B checkpoint (15.2 GB in bf16) does not fit. Here
peak memory is a constant plus a small multiple of the largest *block*, never the model:

* **read** (:class:`SafetensorsSource`): tensors are read from the safetensors file with
  ``os.pread`` into a buffer of one row block, in file order. No memory map: every page of
  a map that is touched counts in the process's RSS until it is unmapped, while a
  ``pread`` buffer is freed as soon as the block is done (the page cache is the kernel's,
  not the process's).
* **quantize** (:func:`quantize_rows`): a 2-D tensor is quantized a row block at a time.
  Groups run along the last axis within a row (``tensor.layout``), so every block's
  codes, scales and zero points are exactly the rows' share of the whole tensor's; the
  block results are copied into preallocated whole-tensor arrays, which are therefore
  byte-identical to ``quantize_tensor``'s on the whole tensor (tests/test_stream.py proves
  it against the in-memory path). Per-tensor schemes and K-schemes (whose scale codes are
  chosen per tensor) are quantized whole.
* **write** (:class:`StreamWriter`): one Parquet row group per tensor, the rows exactly
  those of ``storage.save`` (same columns, checksums and order). The manifest digest is
  only known when the last row is written, so the keys go into the Parquet footer's
  key/value metadata at close (``ParquetWriter.add_key_value_metadata``, pyarrow 26),
  which is where the format keeps them (docs/FORMAT.md section 3); the Arrow schema copy
  in ``ARROW:schema``, fixed when the file was opened, then has none, and ``storage.load``
  reads the footer's.
* **read back and measure** (:func:`iter_artifact`, :func:`measure`): the artifact is read
  one row group at a time, each quantized tensor dequantized a row block at a time and
  compared with the same rows of the source; cosine, SQNR and relative error are
  accumulated in float64 block by block (never a whole-tensor float64 copy), with the
  worst row cosine and the group range ratios that the in-memory harness reports.

Ties (one array under two names, e.g. an LM head saved as a copy of the embedding
matrix) are found as ``fixtures.checkpoint.find_ties`` finds them for the in-memory path:
a float tensor of two or more dimensions whose digest equals an earlier one's (sorted
names) is stored as a ``tied`` row pointing at the earlier tensor. The digest is complete
only once the tensor has been read, so an alias is quantized and then discarded: a tied
checkpoint costs one extra quantization per alias, never a second pass over the file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
import hashlib
import json
import math
import os
from pathlib import Path
import time
from typing import IO, Any, Final

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

from arrowquant_core.atomic import write_atomic
from arrowquant_core.errors import ConfigurationError, FormatError, QuantizationError
from arrowquant_core.kernels import block_range
from arrowquant_core.limits import check_parquet_footprint, cut, short
from arrowquant_core.metrics import cosines_from_sums
from arrowquant_core.methods import quantize_tensor
from arrowquant_core.model import RAW_DTYPES, QuantizationConfig
from arrowquant_core.safetensors_io import INDEX_NAME, SafetensorsHeader, TensorInfo, read_header, read_index
from arrowquant_core.schemes import Scheme
from arrowquant_core.storage import (
    FORMAT_V2,
    MANIFEST_KEY,
    METADATA_KEY,
    VERSION_KEY,
    WRITER,
    WRITER_KEY,
    check_columns,
    decode_row,
    manifest_digest,
    raw_row,
    row_checksum,
    schema_fields,
    tied_row,
    tied_target,
)
from arrowquant_core.tensor import QuantizedTensor, dequantize, layout

Array = npt.NDArray[Any]
F32 = npt.NDArray[np.float32]
Progress = Callable[[int, int, str], None]

SOURCE_DIGEST_KEY: Final[str] = "source_digest"  # harness.context.SOURCE_KEY

BLOCK_VALUES: Final[int] = 1 << 22
"""Values per row block (4 Mi: 16 MB as float32, 32 MB as float64). Large enough that the
per-block overhead of the kernels is small, small enough that a few block-sized
temporaries are a rounding error next to a 7B model."""


# --------------------------------------------------------------------------- reading the source

class SafetensorsSource:
    """Tensors of a safetensors checkpoint, read a row block at a time with ``os.pread``.

    ``path`` is one ``.safetensors`` file, or a folder holding ``model.safetensors`` or a
    sharded checkpoint (``model.safetensors.index.json`` and its shards, as Hugging Face
    ships 7B models); every header is validated by ``safetensors_io.read_header``, and a
    sharded folder's index must match its shards (``read_safetensors_folder``'s rules).
    ``names`` is in file order (shard by shard), so a pass over them reads sequentially.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.files: list[Path] = shard_files(self.path)
        self.headers: list[SafetensorsHeader] = [read_header(f) for f in self.files]
        self._owner: dict[str, int] = {}
        names: list[str] = []
        for i, header in enumerate(self.headers):
            for info in sorted(header.tensors.values(), key=lambda t: t.begin):
                if info.name in self._owner:
                    raise FormatError(f"{self.path}: tensor {short(info.name)} is in both "
                                      f"{self.files[self._owner[info.name]].name} and {self.files[i].name}")
                self._owner[info.name] = i
                names.append(info.name)
        self.names: tuple[str, ...] = tuple(names)
        self._fds: list[int] = []
        for f in self.files:
            self._fds.append(os.open(f, os.O_RDONLY))

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __enter__(self) -> SafetensorsSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def has(self, name: str) -> bool:
        return name in self._owner

    def info(self, name: str) -> TensorInfo:
        return self.headers[self._owner[name]].tensors[name]

    @property
    def file_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def read_rows(self, name: str, start: int, stop: int) -> Array:
        """Rows ``[start, stop)`` of a tensor (first axis; a 0-d or 1-d tensor is one row)."""
        shard = self._owner[name]
        header = self.headers[shard]
        info = header.tensors[name]
        rows, cols = _rows_cols(info.shape)
        if not 0 <= start <= stop <= rows:
            raise ConfigurationError(f"{self.path}: tensor {short(name)}: rows [{start}, {stop}) outside [0, {rows})")
        dtype = info.numpy_dtype
        count = (stop - start) * cols
        out = np.empty(count, dtype=dtype)
        view = out.view(np.uint8).data
        offset = header.data_start + info.begin + start * cols * dtype.itemsize
        done = 0
        while done < len(view):
            got = os.preadv(self._fds[shard], [view[done:]], offset + done)
            if got <= 0:
                raise FormatError(f"{self.files[shard]}: tensor {short(name)}: file ended before its data (truncated?)")
            done += got
        shape = (stop - start, *info.shape[1:]) if len(info.shape) >= 2 else info.shape
        return out.reshape(shape)

    def read(self, name: str) -> Array:
        rows, _cols = _rows_cols(self.info(name).shape)
        return self.read_rows(name, 0, rows)


def shard_files(path: Path) -> list[Path]:
    """The safetensors file(s) of ``path``: itself, the folder's ``model.safetensors``, or the
    shards its ``model.safetensors.index.json`` maps (checked against their headers)."""
    if path.is_file():
        return [path]
    index_path = path / INDEX_NAME
    if index_path.is_file():
        shards = read_index(path, index_path)
        for shard, wanted in shards.items():
            present = set(read_header(path / shard).tensors)
            if present != set(wanted):
                odd = sorted(present ^ set(wanted))[0]
                raise FormatError(f"{index_path}: shard {short(shard)} and the weight_map disagree about tensor "
                                  f"{short(odd)}")
        return [path / shard for shard in sorted(shards)]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise FormatError(f"{path}: neither {INDEX_NAME} nor model.safetensors found")


class _HashingReader:
    """Reads one tensor's rows in order, each once, and digests the bytes on the way
    (blake2b-128 over ``dtype name + shape``, then the data: ``harness.context._digests``),
    so the digest costs no second pass over a 15 GB file."""

    def __init__(self, source: SafetensorsSource, name: str) -> None:
        info = source.info(name)
        self.source, self.name = source, name
        self.rows = _rows_cols(info.shape)[0]
        self.next = 0
        self.hasher = hashlib.blake2b(f"{info.numpy_dtype.name}{list(info.shape)}".encode(), digest_size=16)

    def __call__(self, start: int, stop: int) -> Array:
        if start != self.next:
            raise ConfigurationError(f"tensor {short(self.name)}: rows read out of order ({start} after {self.next})")
        out = self.source.read_rows(self.name, start, stop)
        self.hasher.update(out.view(np.uint8).data)
        self.next = stop
        return out

    def digest(self) -> str:
        if self.next != self.rows:
            raise ConfigurationError(f"tensor {short(self.name)}: only {self.next} of {self.rows} rows were read")
        return self.hasher.hexdigest()


def source_digest(digests: Mapping[str, str]) -> str:
    """One digest of every tensor's digest (``RunContext.source_digest``'s construction)."""
    digest = hashlib.sha256()
    for name in sorted(digests):
        digest.update(f"{name}={digests[name]};".encode())
    return digest.hexdigest()


def _rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) < 2:
        return 1, math.prod(shape)
    return shape[0], math.prod(shape[1:])


def block_rows(shape: tuple[int, ...], bits: int, block_values: int = BLOCK_VALUES) -> int:
    """Rows per block: about ``block_values`` values, and a whole number of bytes of
    ``bits``-bit packed codes, so block codes concatenate into the tensor's codes.

    >>> block_rows((152064, 3584), 4)
    1170
    """
    rows, cols = _rows_cols(shape)
    if block_values < 1:
        raise ConfigurationError(f"block_values = {block_values}: must be >= 1")
    per = 8 // bits
    step = per // math.gcd(per, cols) if cols else 1  # rows * cols must be a multiple of per
    k = max(1, block_values // max(cols, 1))
    k = max(step, k - k % step)
    return min(rows, k) if rows else 1


def _row_blockable(scheme: Scheme, shape: tuple[int, ...]) -> bool:
    # per-tensor blocks span every row; K-schemes encode scales per tensor (kquant.py)
    return len(shape) >= 2 and scheme.granularity != "tensor" and not scheme.scale_bits


# --------------------------------------------------------------------------- quantizing

def quantize_rows(read_rows: Callable[[int, int], Array], shape: tuple[int, ...], dtype: str, scheme: Scheme,
                  name: str, method: str = "rtn", block_values: int = BLOCK_VALUES) -> QuantizedTensor:
    """Quantize a tensor of ``shape`` read a row block at a time by ``read_rows(start, stop)``.

    Byte-identical to ``quantize_tensor`` on the whole tensor (see the module docstring).
    """
    if not _row_blockable(scheme, shape):
        return quantize_tensor(read_rows(0, _rows_cols(shape)[0]), scheme, name, method)
    rows, cols, _block, n_groups = layout(shape, scheme)
    k = block_rows(shape, scheme.bits, block_values)
    per = 8 // scheme.bits
    codes = np.empty(-(-rows * cols // per), dtype=np.uint8)
    scales: F32 | None = None
    zeros: npt.NDArray[np.uint8] | None = None
    params: F32 | None = None
    used = ""
    for r0 in range(0, rows, k):
        r1 = min(rows, r0 + k)
        part = quantize_tensor(read_rows(r0, r1), scheme, name, method)
        if part.dtype != dtype:
            raise QuantizationError(f"tensor {name!r}: block dtype {part.dtype} differs from {dtype}")
        if used and part.method != used:  # a fallback taken on some blocks only
            raise QuantizationError(f"tensor {name!r}: rows {r0}-{r1} used method {part.method!r}, earlier rows "
                                    f"{used!r}; this method cannot be streamed in row blocks")
        used = part.method
        c0 = r0 * cols // per
        codes[c0:c0 + part.codes.size] = part.codes
        scales = _place(scales, part.scales, r0, r1, rows)
        zeros = _place(zeros, part.zeros, r0, r1, rows)
        params = _place(params, part.params, r0, r1, rows)
        del part
    assert scales is not None and zeros is not None and params is not None
    qt = QuantizedTensor(name=name, scheme=scheme, shape=shape, dtype=dtype, codes=codes, scales=scales,
                         zeros=zeros, method=used, params=params)
    qt.check()
    del n_groups
    return qt


def _place(whole: Array | None, part: Array, r0: int, r1: int, rows: int) -> Array:
    """Copy a block's per-row array (``part.size`` divisible by its rows) into the tensor's."""
    per_row = part.size // (r1 - r0)
    if whole is None:
        whole = np.empty(rows * per_row, dtype=part.dtype)
    if part.size != (r1 - r0) * per_row or whole.size != rows * per_row:
        raise QuantizationError(f"block of rows {r0}-{r1}: {part.size} values do not split evenly by row")
    whole[r0 * per_row:r1 * per_row] = part
    return whole


# --------------------------------------------------------------------------- writing

def _blob(data: Array | bytes) -> Any:
    """A one-value large_binary array over ``data`` without copying it."""
    raw = np.ascontiguousarray(np.frombuffer(data, np.uint8) if isinstance(data, bytes) else data).view(np.uint8)
    offsets = np.array([0, raw.size], dtype=np.int64)
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), 1, [None, pa.py_buffer(offsets.data), pa.py_buffer(raw.data)])


class StreamWriter:
    """Write a format-v2 artifact one row (one Parquet row group) at a time.

    Rows and checksums are those of ``storage.save``. Every ArrowQuant key (version,
    model metadata, writer, manifest digest) goes into the footer's key/value metadata at
    :meth:`close`, so the model metadata may hold what is only known at the end (the
    source digest). Call ``close`` exactly once, after the last row.
    """

    def __init__(self, handle: IO[bytes], metadata: Mapping[str, str]) -> None:
        self._metadata = dict(metadata)
        self.schema = pa.schema(schema_fields(FORMAT_V2))
        self._writer = pq.ParquetWriter(handle, self.schema, compression="zstd", use_dictionary=False,
                                        write_statistics=False)
        self._manifest: list[tuple[str, str, str]] = []
        self._names: set[str] = set()

    def _row(self, name: str, kind: str, shape: tuple[int, ...], dtype: str, checksum: str,
             columns: Mapping[str, Any]) -> None:
        if name in self._names:
            raise FormatError(f"tensor {short(name)} written twice")
        self._names.add(name)
        arrays: list[Any] = []
        base: dict[str, Any] = {"name": name, "shape": [int(d) for d in shape], "dtype": dtype, "sha256": checksum,
                                "kind": kind, **columns}
        for f in self.schema:
            value = base.get(f.name)
            if pa.types.is_large_binary(f.type):
                arrays.append(_blob(value) if value is not None else pa.nulls(1, pa.large_binary()))
            else:
                arrays.append(pa.array([value], type=f.type))
        self._writer.write_table(pa.Table.from_arrays(arrays, schema=self.schema))
        self._manifest.append((name, kind, checksum))

    def write_quantized(self, qt: QuantizedTensor) -> str:
        """Write a quantized row; returns its checksum."""
        checksum, scales = row_checksum(qt)
        self._row(qt.name, "quantized", qt.shape, qt.dtype, checksum,
                  {"scheme": qt.scheme.name, "method": qt.method, "codes": qt.codes, "scales": scales,
                   "zeros": qt.zeros, "params": np.ascontiguousarray(qt.params, dtype="<f4")})
        return checksum

    def write_raw(self, name: str, array: Array, kind: str) -> str:
        """Write a float, buffer or aux row; returns its checksum."""
        row = raw_row(name, array, kind)
        self._row(name, kind, tuple(row["shape"]), row["dtype"], row["sha256"], {"data": row["data"]})
        return str(row["sha256"])

    def write_tied(self, alias: str, canonical: str, shape: tuple[int, ...], dtype: str) -> str:
        """Write ``alias`` as a tie to the earlier row ``canonical``; returns its checksum."""
        if canonical not in self._names:
            raise FormatError(f"tensor {short(alias)}: tied to {short(canonical)}, which has not been written")
        row = tied_row(alias, canonical, shape, dtype)
        self._row(alias, "tied", shape, dtype, row["sha256"], {"tied_to": canonical})
        return str(row["sha256"])

    def close(self, extra: Mapping[str, str] | None = None) -> str:
        """Write the keys (model metadata plus ``extra``) and the manifest digest into the
        footer and finish the file; returns the digest."""
        metadata_json = json.dumps({**self._metadata, **dict(extra or {})}, sort_keys=True).encode()
        digest = manifest_digest(FORMAT_V2, metadata_json, self._manifest)
        # the stubs type the keys as str; pyarrow stores str and bytes alike as bytes
        self._writer.add_key_value_metadata({VERSION_KEY.decode(): str(FORMAT_V2),
                                             METADATA_KEY.decode(): metadata_json.decode(),
                                             WRITER_KEY.decode(): WRITER, MANIFEST_KEY.decode(): digest})
        self._writer.close()
        return digest


@dataclass(frozen=True)
class StreamedTensor:
    """What the streaming pass did with one tensor."""

    name: str
    kind: str  # "quantized", "float", "buffer" or "tied"
    shape: tuple[int, ...]
    dtype: str
    scheme: str
    method: str
    source_bytes: int
    digest: str  # blake2b of the source tensor as read (see _HashingReader)
    checksum: str  # the row's sha256 as written (compared with the row read back)
    tied_to: str = ""  # "tied": the earlier tensor it is stored as

    def __post_init__(self) -> None:
        if self.kind not in ("quantized", "float", "buffer", "tied"):
            raise ConfigurationError(f"tensor {self.name!r}: kind {self.kind!r} is not quantized/float/buffer/tied")
        if (self.kind == "tied") != bool(self.tied_to):
            raise ConfigurationError(f"tensor {self.name!r}: a tied tensor, and only one, names its canonical tensor")


@dataclass(frozen=True)
class Tie:
    """A tied row read back: ``alias`` is stored as ``canonical`` (same shape and dtype)."""

    alias: str
    canonical: str
    shape: tuple[int, ...]
    dtype: str


def may_tie(info: TensorInfo) -> bool:
    """Whether a tensor can be stored as a tie: float, two or more dimensions
    (``fixtures.checkpoint.find_ties``' rule)."""
    return info.numpy_dtype.name not in RAW_DTYPES and len(info.shape) >= 2


def quantize_file(source: SafetensorsSource, config: QuantizationConfig, path: str | os.PathLike[str],
                  metadata: Mapping[str, str] | None = None, block_values: int = BLOCK_VALUES,
                  progress: Progress | None = None) -> list[StreamedTensor]:
    """Quantize every tensor of ``source`` into a format-v2 artifact at ``path``, one at a time.

    The artifact's metadata gets ``source_digest`` (:func:`source_digest` of the tensors
    as read), the key and construction the harness uses to tell a stale artifact.
    The same plan as ``quantize_model`` (``config.wants``, ``scheme_for``, ``method_for``;
    no Hessians: a calibrated method falls back as it does without one). Tensors are
    written in sorted-name order, the order ``read_safetensors`` gives the in-memory path,
    so the two artifacts hold the same rows with byte-identical codes (tests/test_stream.py);
    the files differ only in their Parquet layout (row groups, where the keys are).
    """
    names = sorted(source.names)
    done: list[StreamedTensor] = []
    first: dict[str, str] = {}  # digest -> the first tensor with it (the digest covers dtype and shape)

    def tie(name: str, info: TensorInfo, digest: str, writer: StreamWriter) -> bool:
        if not may_tie(info):
            return False
        canonical = first.setdefault(digest, name)
        if canonical == name:
            return False
        checksum = writer.write_tied(name, canonical, info.shape, info.numpy_dtype.name)
        done.append(StreamedTensor(name, "tied", info.shape, info.numpy_dtype.name, "", "", info.nbytes, digest,
                                   checksum, canonical))
        return True

    def body(handle: IO[bytes]) -> None:
        writer = StreamWriter(handle, metadata or {})
        for i, name in enumerate(names, start=1):
            info = source.info(name)
            dtype = info.numpy_dtype.name
            reader = _HashingReader(source, name)
            if dtype not in RAW_DTYPES and len(info.shape) >= config.min_ndim \
                    and config.wants(name, np.empty((0,) * len(info.shape))):
                scheme = config.scheme_for(name)
                qt = quantize_rows(reader, info.shape, dtype, scheme, name, config.method_for(name), block_values)
                if not tie(name, info, reader.digest(), writer):
                    checksum = writer.write_quantized(qt)
                    done.append(StreamedTensor(name, "quantized", info.shape, dtype, scheme.name, qt.method,
                                               info.nbytes, reader.digest(), checksum))
                del qt
            else:
                kind = "buffer" if dtype in RAW_DTYPES else "float"
                values = reader(0, reader.rows)
                if not tie(name, info, reader.digest(), writer):
                    checksum = writer.write_raw(name, values, kind)
                    done.append(StreamedTensor(name, kind, info.shape, dtype, "", "", info.nbytes, reader.digest(),
                                               checksum))
                del values
            if progress is not None:
                progress(i, len(names), name)
        writer.close({SOURCE_DIGEST_KEY: source_digest({t.name: t.digest for t in done})})

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, body)
    return done


# --------------------------------------------------------------------------- reading back

def iter_artifact(path: str | os.PathLike[str]) -> Iterator[tuple[str, str, str, QuantizedTensor | Array | Tie]]:
    """Yield ``(name, kind, checksum, QuantizedTensor, array or Tie)`` one Parquet row group at
    a time, checking each row's checksum (a tied row: that it points at an earlier stored
    model tensor of its shape and dtype), then the manifest digest after the last row (a
    reader that stops early has not verified the file)."""
    source = Path(path)
    pf, fields, kv = _open_artifact(source)
    if kv.get(VERSION_KEY) != str(FORMAT_V2).encode():
        raise FormatError(f"{source}: not a format-v2 ArrowQuant artifact")
    check_columns(fields, FORMAT_V2, source)
    rows: list[tuple[str, str, str]] = []
    stored: dict[str, tuple[list[int], str]] = {}  # model tensors a tie may point at: shape, dtype
    for g in range(pf.num_row_groups):
        table = _read_group(pf, g, fields, source)
        for i in range(table.num_rows):
            row = _row(table, fields, i, g, source)
            name, kind = str(row["name"]), str(row["kind"])
            rows.append((name, kind, str(row["sha256"])))
            if kind == "tied":
                canonical, shape, dtype = tied_target(row, source)
                if stored.get(canonical) != (shape, dtype):
                    raise FormatError(f"{source}: tensor {short(name)}: tied to {canonical[:80]!r}, which is not an "
                                      f"earlier stored model tensor of {dtype}{shape[:8]}")
                yield name, kind, str(row["sha256"]), Tie(name, canonical, tuple(shape), dtype)
                continue
            value = decode_row(row, source)
            if kind != "aux":
                stored[name] = ([int(d) for d in row["shape"]], str(row["dtype"]))
            yield name, kind, str(row["sha256"]), value
        del table
    recorded = kv.get(MANIFEST_KEY)
    expected = manifest_digest(FORMAT_V2, bytes(kv.get(METADATA_KEY, b"{}")), rows)
    if recorded is None or recorded != expected.encode():
        raise FormatError(f"{source}: manifest digest missing or mismatched: rows deleted, added, reordered or renamed")


# What pyarrow raises on a damaged file: ArrowInvalid (a ValueError) for bad encodings and
# lengths, OSError for corrupt compressed pages, UnicodeDecodeError for names that are not
# UTF-8. A footer that would make pyarrow abort is refused before by the footprint check.
_PARQUET_ERRORS: Final = (pa.ArrowException, OSError, ValueError, MemoryError)


def _open_artifact(path: Path) -> tuple[Any, list[str], dict[bytes, bytes]]:
    """The open Parquet file, its column names and its footer's key/value metadata."""
    check_parquet_footprint(path, "artifact")
    try:
        pf = pq.ParquetFile(path)
        return pf, list(pf.schema_arrow.names), dict(pf.metadata.metadata or {})
    except _PARQUET_ERRORS as exc:
        raise FormatError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {cut(str(exc))})") from None


def _read_group(pf: Any, g: int, columns: list[str], path: Path) -> pa.Table:
    try:
        table: pa.Table = pf.read_row_group(g, columns=columns)
        return table
    except _PARQUET_ERRORS as exc:
        raise FormatError(f"{path}: row group {g} cannot be read ({type(exc).__name__}: {cut(str(exc))})") from None


def _row(table: pa.Table, fields: list[str], i: int, g: int, path: Path) -> dict[str, Any]:
    """Row ``i`` of a row group's table as Python values; text that is not UTF-8 (pyarrow
    decodes it here) is a damaged file."""
    try:
        return {f: _value(table.column(f), i) for f in fields}
    except UnicodeDecodeError:
        raise FormatError(f"{path}: row group {g}: a text value is not UTF-8 (damaged file)") from None


def _value(column: Any, i: int) -> Any:
    chunk_start = 0
    for chunk in column.chunks:
        if i < chunk_start + len(chunk):
            scalar = chunk[i - chunk_start]
            if pa.types.is_large_binary(chunk.type) or pa.types.is_binary(chunk.type):
                return None if not scalar.is_valid else memoryview(scalar.as_buffer())
            return scalar.as_py()
        chunk_start += len(chunk)
    raise FormatError(f"row {i} missing from column")


class ArtifactIndex:
    """Random access to an artifact's tensors by name, one row group each (the
    layer-streaming forward pass loads one matrix at a time). Each row's checksum is
    verified as it is decoded; the manifest is :func:`iter_artifact`'s job."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._file, self._fields, _ = _open_artifact(self.path)
        check_columns(self._fields, FORMAT_V2, self.path)
        self.groups: dict[str, int] = {}
        for g in range(self._file.num_row_groups):
            try:
                names = _read_group(self._file, g, ["name"], self.path).column("name").to_pylist()
            except UnicodeDecodeError:
                raise FormatError(f"{self.path}: row group {g}: a tensor name is not UTF-8 (damaged file)") from None
            if len(names) != 1:
                raise FormatError(f"{self.path}: row group {g} holds {len(names)} rows; a streamed artifact has one")
            self.groups[str(names[0])] = g

    def get(self, name: str) -> QuantizedTensor | Array:
        if name not in self.groups:
            raise FormatError(f"{self.path}: no tensor {short(name)}")
        table = _read_group(self._file, self.groups[name], self._fields, self.path)
        row = _row(table, self._fields, 0, self.groups[name], self.path)
        value: QuantizedTensor | Array = decode_row(row, self.path)
        return value


@dataclass(frozen=True)
class TensorMeasure:
    """Weight-level quality of one tensor as read back, accumulated block by block."""

    name: str
    scheme: str
    method: str
    shape: tuple[int, ...]
    parameters: int
    cosine: float
    sqnr_db: float
    relative_error: float
    row_cosine_min: float
    group_range_ratio_min: float
    group_range_ratio_max: float
    nonfinite: int

    def __post_init__(self) -> None:
        if self.parameters < 0 or self.nonfinite < 0:
            raise ConfigurationError(f"tensor {self.name!r}: negative counts")


def tensor_rows(qt: QuantizedTensor, r0: int, r1: int) -> QuantizedTensor:
    """Rows ``[r0, r1)`` of a quantized tensor, sharing its arrays (dequantize a slice of
    an embedding table or LM head without the whole); the tensor must be row-blockable and
    ``r0 * cols`` a whole number of bytes of codes."""
    if not _row_blockable(qt.scheme, qt.shape) or (r0 * layout(qt.shape, qt.scheme)[1] * qt.scheme.bits) % 8:
        raise ConfigurationError(f"tensor {short(qt.name)}: rows {r0}-{r1} cannot be cut out of {qt.scheme.name} codes")
    rows, cols, _block, n_groups = layout(qt.shape, qt.scheme)
    per = 8 // qt.scheme.bits
    shape = (r1 - r0, *qt.shape[1:])

    def part(a: Array) -> Array:
        if a.size == 0:
            return a
        each = a.size // rows
        return a[r0 * each:r1 * each]
    return QuantizedTensor(name=qt.name, scheme=qt.scheme, shape=shape, dtype=qt.dtype,
                           codes=qt.codes[r0 * cols // per:-(-r1 * cols // per)], scales=part(qt.scales),
                           zeros=part(qt.zeros), method=qt.method, params=part(qt.params))


def measure_tensor(qt: QuantizedTensor, read_rows: Callable[[int, int], Array],
                   block_values: int = BLOCK_VALUES) -> TensorMeasure:
    """Compare a quantized tensor with its source rows, a row block at a time.

    Sums of squares and products are float64 over one block, added up in Python floats:
    the same cosine / SQNR / relative error as ``metrics.cosine`` etc. on the whole
    tensor up to float64 summation order (tests/test_stream.py: within 1e-9).
    """
    rows, cols, block, n_groups = layout(qt.shape, qt.scheme)
    blockable = _row_blockable(qt.scheme, qt.shape)
    k = block_rows(qt.shape, qt.scheme.bits, block_values) if blockable else rows
    ss = gg = sg = dd = 0.0
    row_min = 1.0
    lo_ratio, hi_ratio = math.inf, -math.inf
    nonfinite = 0
    # two float64 buffers for the whole tensor's blocks: fresh pages per block cost more
    # than the arithmetic (about 5x a copy on this machine, issue 11)
    ref_buf = np.empty(min(k, rows) * cols, dtype=np.float64)
    got_buf = np.empty(min(k, rows) * cols, dtype=np.float64)
    for r0 in range(0, rows, k):
        r1 = min(rows, r0 + k)
        # in the tensor's own dtype first (a bf16 model dequantizes to bf16), as ``load().dequantize()``
        got32 = np.asarray(dequantize(tensor_rows(qt, r0, r1) if blockable else qt),
                           dtype=np.float32).reshape(r1 - r0, cols)
        ref32 = np.ascontiguousarray(read_rows(r0, r1), dtype=np.float32).reshape(r1 - r0, cols)
        finite = np.isfinite(got32)
        nonfinite += int(got32.size - int(np.count_nonzero(finite)))
        ref = ref_buf[:(r1 - r0) * cols].reshape(r1 - r0, cols)
        got = got_buf[:(r1 - r0) * cols].reshape(r1 - r0, cols)
        np.copyto(ref, ref32)
        np.copyto(got, got32)
        rs = np.einsum("ij,ij->i", ref, ref)
        gs = np.einsum("ij,ij->i", got, got)
        rg = np.einsum("ij,ij->i", ref, got)
        got -= ref  # now the error
        ds = np.einsum("ij,ij->i", got, got)
        ss += float(rs.sum())
        gg += float(gs.sum())
        sg += float(rg.sum())
        dd += float(ds.sum())
        cos = cosines_from_sums(rg, rs, gs)  # the rule of metrics.row_cosines; a non-finite row is NaN
        if cos.size:
            low = float(cos.min())
            row_min = low if math.isnan(low) or low < row_min else row_min  # NaN stays NaN
        if qt.scheme.granularity != "tensor" or r1 - r0 == rows:
            rlo, rhi = block_range(np.ascontiguousarray(ref32), block, n_groups)
            glo, ghi = block_range(np.ascontiguousarray(got32), block, n_groups)
            # ranges in float32, ratios in float64: as harness.context.group_range_ratios
            ref_range = (rhi - rlo).astype(np.float64)
            keep = ref_range > 0
            if bool(np.any(keep)):
                ratio = (ghi - glo).astype(np.float64)[keep] / ref_range[keep]
                lo_ratio, hi_ratio = min(lo_ratio, float(ratio.min())), max(hi_ratio, float(ratio.max()))
        del ref, got, ref32, got32
    del ref_buf, got_buf
    if not math.isfinite(lo_ratio):
        lo_ratio = hi_ratio = 1.0
    na, nb = math.sqrt(ss), math.sqrt(gg)
    cosine = 1.0 if na == 0 and nb == 0 else 0.0 if na == 0 or nb == 0 else sg / (na * nb)
    sqnr = math.inf if dd == 0 else -math.inf if ss == 0 else 10.0 * math.log10(ss / dd)
    rel = (0.0 if dd == 0 else math.inf) if ss == 0 else math.sqrt(dd) / na
    return TensorMeasure(qt.name, qt.scheme.name, qt.method, qt.shape, qt.numel, cosine, sqnr, rel, row_min,
                         lo_ratio, hi_ratio, nonfinite)


@dataclass(frozen=True)
class Readback:
    """The artifact read back tensor by tensor against the source."""

    measures: list[TensorMeasure]
    kept_exact: list[str]  # float and buffer rows bit-exact to the source
    changed: list[str]  # float and buffer rows that differ from the source
    missing: list[str]  # in the source, not in the artifact
    unexpected: list[str]  # in the artifact, not in the source
    dtype_mismatches: list[str]  # dequantizes (or is kept) in another dtype than the source's
    ties: dict[str, str]  # alias -> canonical, as the artifact records them
    checksums: dict[str, str]  # each row's sha256 as read back
    digests: dict[str, str]  # each source tensor's digest, re-read during this pass
    metadata: dict[str, str]  # the artifact's model metadata
    seconds: float
    # float rows kept unquantized that hold a NaN or an infinity (quantized tensors count
    # theirs in TensorMeasure.nonfinite); the in-memory accounting checks both alike
    nonfinite_kept: list[str] = field(default_factory=list)


def measure(source: SafetensorsSource, artifact: str | os.PathLike[str], block_values: int = BLOCK_VALUES,
            progress: Progress | None = None) -> Readback:
    """Read ``artifact`` back one row group at a time and measure every tensor against
    ``source`` (peak memory: one tensor's codes plus a few row blocks)."""
    t0 = time.perf_counter()
    measures: list[TensorMeasure] = []
    exact: list[str] = []
    changed: list[str] = []
    dtypes: list[str] = []
    checksums: dict[str, str] = {}
    digests: dict[str, str] = {}
    ties: dict[str, str] = {}
    unexpected: list[str] = []
    nonfinite: list[str] = []
    total = len(source.names)
    for name, kind, checksum, value in iter_artifact(artifact):
        checksums[name] = checksum
        if not source.has(name):
            unexpected.append(name)
            continue
        reader = _HashingReader(source, name)
        want_dtype = source.info(name).numpy_dtype.name
        if isinstance(value, QuantizedTensor):
            measures.append(measure_tensor(value, reader, block_values))
            if value.dtype != want_dtype:
                dtypes.append(name)
        elif isinstance(value, Tie):
            ties[name] = value.canonical
            step = max(1, block_values // max(1, _rows_cols(value.shape)[1]))
            for start in range(0, reader.rows, step):  # digest only, a row block at a time
                reader(start, min(reader.rows, start + step))
            if value.dtype != want_dtype:
                dtypes.append(name)
        else:
            want = reader(0, reader.rows)
            same = (value.dtype == want.dtype and value.shape == want.shape
                    and np.ascontiguousarray(value).tobytes() == np.ascontiguousarray(want).tobytes())
            (exact if same else changed).append(name)
            if kind == "float" and not bool(np.all(np.isfinite(np.asarray(value, dtype=np.float32)))):
                nonfinite.append(name)
            if value.dtype.name != want_dtype:
                dtypes.append(name)
        digests[name] = reader.digest()
        del value
        if progress is not None:
            progress(len(checksums), total, name)
    missing = sorted(set(source.names) - set(checksums))
    return Readback(measures, exact, changed, missing, unexpected, dtypes, ties, checksums, digests,
                    artifact_metadata(artifact), time.perf_counter() - t0, nonfinite)


def artifact_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The model metadata of an artifact, from the Parquet footer alone."""
    kv: dict[bytes, bytes] = dict(pq.read_metadata(Path(path)).metadata or {})
    try:
        data = json.loads(kv.get(METADATA_KEY, b"{}").decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FormatError(f"{path}: model metadata is not valid JSON") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path}: model metadata must be a JSON object")
    return {str(k): str(v) for k, v in data.items()}


def digest_file(path: str | os.PathLike[str], chunk: int = 1 << 24) -> str:
    """sha256 of a file read in chunks (``cache.sha256_file`` reads the whole file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while True:
            part = handle.read(chunk)
            if not part:
                return digest.hexdigest()
            digest.update(part)
