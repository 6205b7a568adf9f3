"""One rule for every input file: read within a bound derived from its real size.

Every reader of a file that someone else made (criteria TOML, calibration JSONL/Parquet,
safetensors headers and indexes, results.json) goes through ``read_capped``: the file
must be a regular file (not a device such as ``/dev/zero``, not a FIFO that would block
for ever), no larger than a cap chosen for its kind, and it is read with at most
``cap + 1`` bytes requested, so a file that grows while being read cannot push memory
past the cap either. Messages quote user data through ``short``, so an error about a
99 MB header or a million-entry shape stays one readable line (issue 10: an error that
printed a whole shape was 147 MB).
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any, Final, Union

from arrowquant_core.errors import FormatError
from arrowquant_core.parquet_footer import column_chunk_sizes, footer_bytes

__all__ = ["MAX_JSON_BYTES", "MAX_NDIM", "MESSAGE_LIMIT", "check_parquet_footprint", "check_regular", "check_shape",
           "cut", "parse_json", "read_capped", "read_json", "read_json_object", "short"]

StrPath = Union[str, "os.PathLike[str]"]

MESSAGE_LIMIT: Final = 200
"""Most characters of user data quoted in one error message."""


def short(value: object, limit: int = MESSAGE_LIMIT) -> str:
    """``repr(value)`` cut to ``limit`` characters, saying how much was cut.

    Lists and strings are sliced *before* ``repr``, so a million-entry list costs no
    more than a short one.

    >>> short(list(range(1000)), 20)
    '[0, 1, 2, 3, 4, 5, 6... (1000 items)'
    >>> short("abc")
    "'abc'"
    """
    if isinstance(value, (list, tuple)) and len(value) > limit:
        text = repr(list(value[:limit]))
        count = f"... ({len(value)} items)"
    elif isinstance(value, (str, bytes)) and len(value) > limit:
        text = repr(value[:limit])
        count = f"... ({len(value)} characters)"
    else:
        text = repr(value)
        count = f"... ({len(text)} characters)"
    if len(text) <= limit:
        return text
    return text[:limit] + count


MAX_NDIM: Final = 64
"""numpy's own limit on dimensions; a longer shape list is refused before it is used."""

_MAX_BYTES: Final = 1 << 62
"""Bytes numpy can allocate or index (``np.empty`` refuses beyond ~2**63)."""


def check_shape(at: str, shape: object, itemsize: int) -> tuple[int, ...]:
    """A shape numpy can represent, else FormatError: at most MAX_NDIM non-negative ints,
    and the product of its non-zero dims times ``itemsize`` within numpy's reach (so a
    zero-size tensor cannot hide an absurd dim that fails later, far from the file).

    >>> check_shape("t", [0, 1 << 70], 4)
    Traceback (most recent call last):
    ...
    arrowquant_core.errors.FormatError: t: shape [0, 1180591620717411303424] is not representable (more than 2**62 bytes, even if another dimension is 0)
    """
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise FormatError(f"{at}: shape {short(shape)} must be a list of non-negative integers "
                          f"(at most {MAX_NDIM} of them)")
    dims = tuple(int(d) for d in shape)
    reach = 1
    for d in dims:
        reach *= max(d, 1)
        if reach * itemsize > _MAX_BYTES:
            raise FormatError(f"{at}: shape {short(list(dims))} is not representable (more than 2**62 bytes, "
                              "even if another dimension is 0)")
    return dims


def cut(text: str, limit: int = 2 * MESSAGE_LIMIT) -> str:
    """``text`` itself (no quotes) cut to ``limit`` characters, for whole messages.

    >>> cut("x" * 10, 4)
    'xxxx... (10 characters)'
    """
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def check_regular(path: StrPath, what: str) -> int:
    """Size in bytes of ``path``, which must be a regular file (not a device, FIFO or socket)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise FormatError(f"{os.fspath(path)}: {what} cannot be read ({exc.strerror})") from None
    if stat.S_ISDIR(info.st_mode):
        raise FormatError(f"{os.fspath(path)}: {what} is a folder, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise FormatError(f"{os.fspath(path)}: {what} is not a regular file (a device, FIFO or socket); "
                          "refusing to read it")
    return int(info.st_size)


def read_capped(path: StrPath, cap: int, what: str) -> bytes:
    """The bytes of a regular file of at most ``cap`` bytes, else ``FormatError``.

    The file is opened non-blocking (a FIFO swapped in after the check cannot hang us)
    and re-checked on the open descriptor; a missing file raises ``FileNotFoundError``.

    >>> import pathlib; pathlib.Path("/tmp/arrowquant-doc-cap.txt").write_text("hello")
    5
    >>> read_capped("/tmp/arrowquant-doc-cap.txt", 10, "doc file")
    b'hello'
    """
    check_regular(path, what)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FormatError(f"{os.fspath(path)}: {what} is not a regular file; refusing to read it")
        if info.st_size > cap:
            raise FormatError(f"{os.fspath(path)}: {what} of {info.st_size} bytes exceeds the limit of {cap} "
                              "bytes for this kind of file")
        chunks: list[bytes] = []
        total = 0
        while total <= cap:
            chunk = os.read(fd, min(1 << 20, cap + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > cap:
            raise FormatError(f"{os.fspath(path)}: {what} grew past the limit of {cap} bytes while being read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _no_duplicates(where: str) -> Any:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise FormatError(f"{where}: key {short(key)} appears twice in a JSON object")
            out[key] = value
        return out
    return hook


def parse_json(text: bytes | str, where: str) -> Any:
    """json.loads that rejects duplicate keys and only ever raises FormatError (bad
    UTF-8, bad JSON, absurd nesting, an integer past the digit limit)."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates(where))
    except FormatError:
        raise
    except UnicodeDecodeError as exc:
        raise FormatError(f"{where}: not valid UTF-8 at byte {exc.start}") from None
    # one name per clause: mypyc types one name for the whole try statement
    except json.JSONDecodeError as bad:
        raise FormatError(f"{where}: not valid JSON: {bad.msg} at line {bad.lineno} column {bad.colno}") from None
    except (ValueError, RecursionError) as err:  # int digit limit, absurd nesting
        raise FormatError(f"{where}: not valid JSON: {err}") from None


MAX_JSON_BYTES: Final = 64 * 1024 * 1024
"""Largest JSON file of a model folder read (config.json, metadata.json): real configs
are kilobytes; a tokenizer.json is tens of MB and is read by the tokenizer's library."""


def read_json(path: StrPath, what: str, cap: int = MAX_JSON_BYTES) -> Any:
    """A JSON file someone else made, read within ``cap`` bytes (``read_capped``: a
    regular file, not a device or FIFO) and parsed by ``parse_json``; a missing file
    raises ``FileNotFoundError`` for the caller to word."""
    return parse_json(read_capped(path, cap, what), os.fspath(path))


def read_json_object(path: StrPath, what: str, cap: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """``read_json`` of a file that must hold a JSON object (config.json, metadata.json)."""
    data = read_json(path, what, cap)
    if not isinstance(data, dict):
        raise FormatError(f"{os.fspath(path)}: expected a JSON object, got {type(data).__name__}")
    return data


PARQUET_EXPANSION: Final = 64
"""Most a Parquet file may declare per byte on disk (decoded size / file size), plus
``PARQUET_SLACK``. zstd on real weights and codes gains 1-4x; a 35 KB file declaring
1 GiB of codes (30,000x) is a decompression bomb (issue 10: it took 4-8 GB to load)."""

PARQUET_SLACK: Final = 16 * 1024 * 1024
"""Absolute allowance on top of the ratio, so tiny files with all-zero tensors still load."""


def check_parquet_footprint(path: StrPath, what: str, expansion: int = PARQUET_EXPANSION,
                            slack: int = PARQUET_SLACK) -> int:
    """Refuse a Parquet file whose footer declares more decoded data than its real size
    allows, before any column is read; returns the declared bytes.

    Counted per column chunk: its declared uncompressed size, and 8 bytes per value (a
    run-length-encoded column of nulls or repeats is tiny even uncompressed, but decodes
    to one Arrow slot per value). The footer itself is at most the file's real size. The
    sizes come from our own reader of the footer (``parquet_footer``), not pyarrow's
    column metadata, whose construction can abort the process on a hostile footer.
    """
    size = check_regular(path, what)
    where = f"{os.fspath(path)}: not a readable Parquet file ({what})"
    declared = 0
    for num_values, uncompressed in column_chunk_sizes(footer_bytes(path, size, where), where):
        declared += max(uncompressed, 0) + 8 * max(num_values, 0)
    allowed = expansion * size + slack
    if declared > allowed:
        raise FormatError(
            f"{os.fspath(path)}: {what}: footer declares {declared} bytes of decoded data for a {size}-byte file "
            f"(limit {expansion}x the file size + {slack} bytes): a decompression bomb or a corrupted footer")
    return declared
