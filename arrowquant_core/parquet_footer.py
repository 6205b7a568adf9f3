"""The column-chunk sizes a Parquet footer declares, read by our own Thrift walker.

``limits.check_parquet_footprint`` refuses a file whose footer declares far more decoded
data than the file's size allows (a decompression bomb) before any column is read. It
used to take the sizes from pyarrow's ``RowGroupMetaData.column(j)``, but that call can
kill the process: pyarrow 26 validates a column chunk's size statistics while building
its metadata object and throws a C++ exception the Python binding does not catch, so a
footer with a level histogram of the wrong length ends in ``std::terminate`` (SIGABRT),
not in an exception (the ``make fuzz`` campaign found it with seed 13; Arrow's issue
45283 is the same validation). Reading the file itself through pyarrow is safe: there
the same check surfaces as an ``OSError``.

So the footprint check parses the footer here. The footer is Thrift's compact protocol
(``FileMetaData`` in apache/parquet-format's ``parquet.thrift``); this walker reads the
four fields it needs and skips every other field by its wire type:

    FileMetaData.row_groups (4) -> RowGroup.columns (1) -> ColumnChunk.meta_data (3)
        -> ColumnMetaData.num_values (5), total_uncompressed_size (6)

Every read is bounded by the footer's bytes: a container may not declare more elements
than bytes remain (each element takes at least one), nesting stops at ``MAX_DEPTH``, and
anything malformed raises ``FormatError`` naming the file and the rule.
"""

from __future__ import annotations

from collections.abc import Callable
import os
from typing import Final

from arrowquant_core.errors import FormatError

__all__ = ["MAX_DEPTH", "column_chunk_sizes", "footer_bytes"]

MAX_DEPTH: Final = 64
"""Deepest struct/container nesting accepted (Parquet's own footers nest about 6 deep)."""

MAGIC: Final = b"PAR1"

# Thrift compact protocol wire types
_STOP: Final = 0
_TRUE: Final = 1
_FALSE: Final = 2
_BYTE: Final = 3
_I16: Final = 4
_I32: Final = 5
_I64: Final = 6
_DOUBLE: Final = 7
_BINARY: Final = 8
_LIST: Final = 9
_SET: Final = 10
_MAP: Final = 11
_STRUCT: Final = 12
_UUID: Final = 13


class _Reader:
    """A cursor over the footer bytes; every read checks what remains."""

    def __init__(self, data: bytes, where: str) -> None:
        self.data = data
        self.pos = 0
        self.where = where

    def fail(self, rule: str) -> FormatError:
        return FormatError(f"{self.where}: Parquet footer is malformed at byte {self.pos} of {len(self.data)}: "
                           f"{rule}")

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise self.fail("it ends inside a value")
        value = self.data[self.pos]
        self.pos += 1
        return value

    def skip_bytes(self, n: int) -> None:
        if n < 0 or n > len(self.data) - self.pos:
            raise self.fail(f"a value declares {n} bytes where {len(self.data) - self.pos} remain")
        self.pos += n

    def varint(self) -> int:
        result = 0
        shift = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7
            if shift >= 70:
                raise self.fail("a varint longer than 10 bytes")

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def count(self, n: int) -> int:
        """A container's element count, refused when more than the bytes left could hold."""
        if n > len(self.data) - self.pos:
            raise self.fail(f"a container declares {n} elements where {len(self.data) - self.pos} bytes remain")
        return n

    def list_header(self) -> tuple[int, int]:
        head = self.byte()
        size = head >> 4
        if size == 15:
            size = self.varint()
        return self.count(size), head & 0x0F

    def field(self, last: int) -> tuple[int, int]:
        """``(field id, wire type)`` of the next field of a struct; type 0 ends the struct."""
        head = self.byte()
        kind = head & 0x0F
        if kind == _STOP:
            return 0, _STOP
        delta = head >> 4
        return (last + delta if delta else self.zigzag()), kind

    def skip(self, kind: int, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise self.fail(f"values nest deeper than {MAX_DEPTH} levels")
        if kind == _TRUE or kind == _FALSE:
            return  # a struct field's boolean lives in its type nibble
        if kind == _BYTE:
            self.skip_bytes(1)
        elif kind == _I16 or kind == _I32 or kind == _I64:
            self.varint()
        elif kind == _DOUBLE:
            self.skip_bytes(8)
        elif kind == _BINARY:
            self.skip_bytes(self.varint())
        elif kind == _UUID:
            self.skip_bytes(16)
        elif kind == _LIST or kind == _SET:
            size, elem = self.list_header()
            for _ in range(size):
                self._skip_element(elem, depth + 1)
        elif kind == _MAP:
            size = self.count(self.varint())
            if size:
                types = self.byte()
                for _ in range(size):
                    self._skip_element(types >> 4, depth + 1)
                    self._skip_element(types & 0x0F, depth + 1)
        elif kind == _STRUCT:
            self.walk(depth + 1)
        else:
            raise self.fail(f"unknown Thrift wire type {kind}")

    def _skip_element(self, kind: int, depth: int) -> None:
        if kind == _TRUE or kind == _FALSE:
            self.skip_bytes(1)  # a boolean inside a container takes one byte
        else:
            self.skip(kind, depth)

    def walk(self, depth: int, wanted: dict[int, int] | None = None,
             read: Callable[[int], None] | None = None) -> None:
        """Walk one struct: ``read(field id)`` for a field of ``wanted`` (id -> wire type)
        that has its wire type, every other field skipped."""
        if depth > MAX_DEPTH:
            raise self.fail(f"values nest deeper than {MAX_DEPTH} levels")
        last = 0
        while True:
            fid, kind = self.field(last)
            if kind == _STOP:
                return
            if read is not None and wanted is not None and wanted.get(fid) == kind:
                read(fid)
            else:
                self.skip(kind, depth)
            last = fid

    def struct_list(self) -> int:
        """The element count of a ``list<struct>`` field's header (anything else is refused)."""
        size, elem = self.list_header()
        if elem != _STRUCT:
            raise self.fail(f"a list of wire type {elem} where Parquet has a list of structs")
        return size


def _column_meta(r: _Reader, depth: int, out: list[tuple[int, int]]) -> None:
    """ColumnMetaData: num_values (5) and total_uncompressed_size (6)."""
    sizes = {5: 0, 6: 0}

    def read(fid: int) -> None:
        sizes[fid] = r.zigzag()

    r.walk(depth, {5: _I64, 6: _I64}, read)
    out.append((sizes[5], sizes[6]))


def _structs(r: _Reader, each: Callable[[], None]) -> None:
    """``each()`` once per element of a ``list<struct>`` whose header is next."""
    for _ in range(r.struct_list()):
        each()


def column_chunk_sizes(footer: bytes, where: str) -> list[tuple[int, int]]:
    """``(num_values, total_uncompressed_size)`` of every column chunk in a serialized
    ``FileMetaData``, in file order (0 for a chunk that records none)."""
    r = _Reader(footer, where)
    out: list[tuple[int, int]] = []

    def column_chunk() -> None:  # ColumnChunk.meta_data (3), at depth 3
        r.walk(3, {3: _STRUCT}, lambda _fid: _column_meta(r, 4, out))

    def row_group() -> None:  # RowGroup.columns (1), at depth 2
        r.walk(2, {1: _LIST}, lambda _fid: _structs(r, column_chunk))

    r.walk(1, {4: _LIST}, lambda _fid: _structs(r, row_group))  # FileMetaData.row_groups (4)
    return out


def footer_bytes(path: str | os.PathLike[str], size: int, where: str) -> bytes:
    """The serialized ``FileMetaData`` of the Parquet file at ``path`` (``size`` bytes):
    ``PAR1``, data, footer, its 4-byte little-endian length, ``PAR1``."""
    if size < 12:
        raise FormatError(f"{where}: {size} bytes is too short for a Parquet file (at least 12: magic, footer "
                          "length, magic)")
    try:
        return _footer_bytes(path, size, where)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise FormatError(f"{where}: cannot be read ({exc.strerror})") from None


def _footer_bytes(path: str | os.PathLike[str], size: int, where: str) -> bytes:
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(size - 8)
        tail = f.read(8)
        if head != MAGIC or tail[4:] != MAGIC:
            encrypted = tail[4:] == b"PARE"
            raise FormatError(f"{where}: " + ("an encrypted Parquet footer (PARE), which ArrowQuant does not read"
                                              if encrypted else "does not begin and end with Parquet's magic PAR1"))
        length = int.from_bytes(tail[:4], "little")
        if length > size - 12:
            raise FormatError(f"{where}: the footer declares {length} bytes, more than the {size - 12} the file "
                              "holds between its magics")
        f.seek(size - 8 - length)
        data = f.read(length)
    if len(data) != length:
        raise FormatError(f"{where}: the file shrank while its footer was read")
    return data
