"""The Parquet footer reader behind the decompression-bomb check (arrowquant_core/parquet_footer.py).

It replaced pyarrow's ``RowGroupMetaData.column(j)``, which aborts the process (SIGABRT)
on a footer whose size statistics do not fit the schema. These tests hold it to three
things: the sizes it reads are pyarrow's own on every kind of file pyarrow writes; any
footer bytes end in a list or a ``FormatError``, never another exception; and the file
``make fuzz`` found (tests/fuzz/corpus/parquet_v2/crash-6aece25348e2.bin) now loads to a
typed error instead of killing the process.
"""

from __future__ import annotations

from pathlib import Path
import subprocess
import sys

from hypothesis import given, settings, strategies as st
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import arrowquant_core as aq
from arrowquant_core.errors import FormatError
from arrowquant_core.limits import check_parquet_footprint
from arrowquant_core.parquet_footer import MAX_DEPTH, column_chunk_sizes, footer_bytes

REPO = Path(__file__).resolve().parent.parent
ABORTER = REPO / "tests" / "fuzz" / "corpus" / "parquet_v2" / "crash-6aece25348e2.bin"


def pyarrow_sizes(path: Path) -> list[tuple[int, int]]:
    meta = pq.read_metadata(path)
    return [(meta.row_group(i).column(j).num_values, meta.row_group(i).column(j).total_uncompressed_size)
            for i in range(meta.num_row_groups) for j in range(meta.row_group(i).num_columns)]


def our_sizes(path: Path) -> list[tuple[int, int]]:
    return column_chunk_sizes(footer_bytes(path, path.stat().st_size, str(path)), str(path))


def mixed_table(rows: int) -> pa.Table:
    """Nested, nullable, dictionary, boolean, binary and fixed-size columns: every footer
    structure our walker skips (statistics, encodings lists, logical types, maps of
    key/value metadata) shows up in some column."""
    return pa.table({
        "ids": pa.array([[1, 2], [3], None] * (rows // 3), pa.list_(pa.int64())),
        "name": pa.array(["x", "yy", None] * (rows // 3)),
        "row": pa.array([{"k": 1.5, "b": True}] * (rows - rows % 3)),
        "tag": pa.array(["a", "b", "a"] * (rows // 3)).dictionary_encode(),
        "flag": pa.array([True, False, None] * (rows // 3)),
        "blob": pa.array([b"\x00\x01", b"", None] * (rows // 3), pa.binary()),
        "fixed": pa.array([b"abcd"] * (rows - rows % 3), pa.binary(4)),
        "ratio": np.linspace(0, 1, rows - rows % 3),
    }).replace_schema_metadata({"arrowquant": "test", "ünïcode": "ĳ"})


WRITE_OPTIONS = {
    "defaults": {},
    "page-index": {"write_page_index": True},
    "no-statistics": {"write_statistics": False},
    "uncompressed-small-row-groups": {"compression": "none", "row_group_size": 100},
    "plain-no-schema": {"store_schema": False, "use_dictionary": False},
    "v2-pages-checksums": {"data_page_version": "2.0", "write_page_checksum": True},
    "zstd-bloom-filters": {"compression": "zstd", "bloom_filter_options": {"name": {"ndv": 10}}},
}


@pytest.mark.parametrize("options", WRITE_OPTIONS, ids=str)
def test_sizes_are_pyarrows_own(tmp_path: Path, options: str) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(mixed_table(3000), path, **WRITE_OPTIONS[options])  # type: ignore[arg-type]
    sizes = our_sizes(path)
    assert sizes == pyarrow_sizes(path)
    assert len(sizes) >= 9 and all(n > 0 and u > 0 for n, u in sizes)


def test_sizes_of_our_artifacts_are_pyarrows_own(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    weights = {"a.weight": rng.standard_normal((64, 128)).astype(np.float32),
               "b.weight": rng.standard_normal((32, 64)).astype(np.float32),
               "c.bias": rng.standard_normal(32).astype(np.float32)}
    v2 = aq.save(aq.quantize_model(weights, aq.QuantizationConfig("int4-g64-asym")), tmp_path / "m.parquet")
    v1 = aq.save_weights(weights, tmp_path / "w.parquet")
    for path in (Path(v2), Path(v1)):
        assert our_sizes(path) == pyarrow_sizes(path)
        declared = check_parquet_footprint(path, "artifact")
        assert declared == sum(u + 8 * n for n, u in pyarrow_sizes(path))


def test_the_file_that_aborted_the_process_is_a_typed_error() -> None:
    """Run in a child: before the fix this load ended in SIGABRT (std::terminate inside
    pyarrow), which would take a pytest worker down with it."""
    code = ("import arrowquant_core as aq\n"
            "from arrowquant_core.errors import FormatError\n"
            f"try:\n    aq.load({str(ABORTER)!r})\n"
            "except FormatError as exc:\n    print('FormatError:', exc)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, (f"the load ended with exit {done.returncode} (negative: killed by a signal); "
                                  f"stderr: {done.stderr[-500:]}")
    assert done.stdout.startswith("FormatError:") and ABORTER.name in done.stdout, done.stdout


@pytest.mark.parametrize("blob, needle", [
    (b"", "too short"),
    (b"PAR1" + b"\x00" * 4 + b"PAR1", "malformed at byte 0 of 0"),
    (b"PAR1" + b"\x00" * 8 + b"PARE", "encrypted"),
    (b"XXXX" + b"\x00" * 8 + b"PAR1", "magic"),
    (b"PAR1" + b"\x00" * 4 + (10**6).to_bytes(4, "little") + b"PAR1", "footer declares 1000000 bytes"),
])
def test_files_that_are_not_parquet_name_the_rule(tmp_path: Path, blob: bytes, needle: str) -> None:
    path = tmp_path / "x.parquet"
    path.write_bytes(blob)
    with pytest.raises(FormatError, match=needle) as info:
        check_parquet_footprint(path, "artifact")
    assert str(path) in str(info.value)


@pytest.mark.parametrize("footer, needle", [
    (b"\x19\xfc\xff\xff\x03" + b"\x00" * 4, "declares 65535 elements"),  # a list of 65535 structs in 4 bytes
    (b"\x18\xff\xff\xff\xff\x0f", "declares 4294967295 bytes"),  # binary field longer than the footer
    (b"\x16" + b"\xff" * 11, "varint longer than 10 bytes"),
    (b"\x1e", "unknown Thrift wire type 14"),
    (b"\x1c" * (MAX_DEPTH + 2), f"deeper than {MAX_DEPTH}"),
    (b"\x15", "ends inside a value"),
    (b"\x49\x08", "a list of wire type 8"),  # row_groups as an (empty) list of binaries
])
def test_malformed_footers_are_format_errors(footer: bytes, needle: str) -> None:
    with pytest.raises(FormatError, match=needle):
        column_chunk_sizes(footer, "f.parquet")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_any_footer_bytes_give_sizes_or_a_format_error(footer: bytes) -> None:
    try:
        sizes = column_chunk_sizes(footer, "f.parquet")
    except FormatError:
        return
    assert all(isinstance(n, int) and isinstance(u, int) for n, u in sizes)
    assert len(sizes) <= len(footer)  # every column chunk takes at least a byte of the footer
