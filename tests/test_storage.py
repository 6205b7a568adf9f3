"""Tests of Parquet storage: v2 (quantized) and v1 (float) round trips, metadata,
atomic writes, and damaged or hostile files. Real files in tmp_path, written and
edited with pyarrow; no mocks. Comparisons are on logical content (docs/STYLE.md rule 8)."""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import json
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from arrowquant_core.errors import ArrowQuantError, FormatError
from arrowquant_core.model import QuantizationConfig, QuantizedModel, quantize_model
from arrowquant_core.schemes import SCHEMES
from arrowquant_core.storage import format_version, load, load_weights, save, save_weights
from arrowquant_core.tensor import quantize

FloatArray = npt.NDArray[np.floating]
VERSION_KEY = b"arrowquant.format_version"
METADATA_KEY = b"arrowquant.metadata"
Q_NAME = "layer.0.attn.q.weight"   # quantized, asymmetric (has zero points)
F_NAME = "layer.0.norm.weight"     # kept in float (bfloat16)


def build_model(weights: dict[str, FloatArray]) -> QuantizedModel:
    """Symmetric and asymmetric schemes, 8/4/2 bits, a non-default method, model metadata."""
    config = QuantizationConfig("int4-g32-asym", overrides=(
        ("embeddings.*", "int8-channel-sym"), ("*.mlp.*", "int2-g64-asym")))
    model = quantize_model(weights, config)
    tensors = dict(model.tensors)
    tensors["layer.0.mlp.fc.weight"] = dataclasses.replace(tensors["layer.0.mlp.fc.weight"], method="gptq")
    return dataclasses.replace(model, tensors=tensors,
                               metadata={"source": "unit test", "profile": "edge"})


@pytest.fixture
def model(weights: dict[str, FloatArray]) -> QuantizedModel:
    return build_model(weights)


@pytest.fixture
def v2_file(model: QuantizedModel, tmp_path: Path) -> Path:
    return save(model, tmp_path / "model.parquet")


@pytest.fixture
def v1_file(weights: dict[str, FloatArray], tmp_path: Path) -> Path:
    return save_weights(weights, tmp_path / "weights.parquet", metadata={"source": "unit test"})


def assert_same_model(got: QuantizedModel, want: QuantizedModel) -> None:
    assert got.order == want.order
    assert got.metadata == want.metadata
    assert sorted(got.tensors) == sorted(want.tensors)
    assert sorted(got.floats) == sorted(want.floats)
    for name, wq in want.tensors.items():
        gq = got.tensors[name]
        assert (gq.name, gq.scheme, gq.method, gq.shape, gq.dtype) == (wq.name, wq.scheme, wq.method, wq.shape, wq.dtype)
        assert gq.codes.dtype == np.uint8 and gq.codes.tobytes() == wq.codes.tobytes(), name
        assert gq.scales.dtype == np.float32 and gq.scales.tobytes() == wq.scales.tobytes(), name
        assert gq.zeros.dtype == np.uint8 and gq.zeros.tobytes() == wq.zeros.tobytes(), name
    for name, wf in want.floats.items():
        assert_same_array(got.floats[name], wf, name)


def assert_same_array(got: FloatArray, want: FloatArray, name: str) -> None:
    assert got.dtype == want.dtype, f"{name}: {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{name}: {got.shape} != {want.shape}"
    assert got.tobytes() == want.tobytes(), f"{name}: values differ"


def expect_format_error(path: Path, *readers: Callable[[Path], object], needle: str = "") -> None:
    """Every reader raises FormatError (not a raw pyarrow/NumPy error) naming the file."""
    for reader in readers or (load, load_weights):
        try:
            reader(path)
        except FormatError as exc:
            assert str(path) in str(exc), f"{reader.__name__}: message lacks the path: {exc}"
            assert needle in str(exc), f"{reader.__name__}: message lacks {needle!r}: {exc}"
        except Exception as exc:  # noqa: BLE001 - the point is to name what escaped
            pytest.fail(f"{reader.__name__}({path.name}) raised {type(exc).__name__}, not FormatError: {exc}")
        else:
            pytest.fail(f"{reader.__name__}({path.name}) did not raise FormatError")


def rewrite_column(path: Path, column: str, edit: Callable[[list[Any], list[Any]], list[Any]]) -> None:
    """Read the file with pyarrow, edit one column's values, write it back (schema and
    schema metadata unchanged)."""
    table = pq.read_table(path)
    names = table.column("name").to_pylist()
    values = edit(table.column(column).to_pylist(), names)
    index = table.schema.get_field_index(column)
    field = table.schema.field(column)
    table = table.set_column(index, field, pa.array(values, type=field.type))
    pq.write_table(table, path)


def flip_byte(blob_index: int, row_name: str) -> Callable[[list[Any], list[Any]], list[Any]]:
    def edit(values: list[Any], names: list[Any]) -> list[Any]:
        i = names.index(row_name)
        blob = bytearray(values[i])
        blob[blob_index] ^= 0x01
        values[i] = bytes(blob)
        return values
    return edit


def stray_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp") or p.name.startswith("."))


# ------------------------------------------------------------------------------ round trips

def test_v2_round_trip_is_bit_exact(model: QuantizedModel, v2_file: Path) -> None:
    assert sorted(model.tensors) == ["embeddings.word.weight", Q_NAME, "layer.0.mlp.fc.weight"]
    assert {qt.scheme.symmetric for qt in model.tensors.values()} == {True, False}
    back = load(v2_file)
    assert_same_model(back, model)
    for qt in back.tensors.values():
        qt.check()


def test_v2_load_weights_equals_model_dequantize(model: QuantizedModel, v2_file: Path) -> None:
    got = load_weights(v2_file)
    want = model.dequantize()
    assert list(got) == list(want)
    for name in want:
        assert_same_array(got[name], want[name], name)


def test_file_keeps_the_model_order(model: QuantizedModel, tmp_path: Path) -> None:
    reversed_model = dataclasses.replace(model, order=tuple(reversed(model.order)))
    path = save(reversed_model, tmp_path / "r.parquet")
    assert pq.read_table(path).column("name").to_pylist() == list(reversed(model.order))
    assert load(path).order == tuple(reversed(model.order))


SPECIALS = [0.0, -0.0, 1.0, -2.5, np.inf, -np.inf, np.nan]


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), np.dtype(np.float16),
                                   np.dtype(ml_dtypes.bfloat16), np.dtype(np.float64)],
                         ids=lambda d: str(d))
def test_v1_round_trip_is_bit_exact(dtype: np.dtype[Any], tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    weights = {
        "a.weight": rng.standard_normal((7, 13)).astype(dtype),
        "a.bias": np.array(SPECIALS, dtype=dtype),
        "scalar": np.array(0.5, dtype=dtype),
        "cube": rng.standard_normal((2, 3, 4)).astype(dtype),
        "tiny": np.array([ml_dtypes.finfo(dtype).smallest_subnormal,  # type: ignore[no-untyped-call]
                           ml_dtypes.finfo(dtype).max], dtype=dtype),  # type: ignore[no-untyped-call]
    }
    path = save_weights(weights, tmp_path / "w.parquet", metadata={"k": "v"})
    assert format_version(path) == 1
    back = load_weights(path)
    assert list(back) == list(weights)
    for name, array in weights.items():
        assert_same_array(back[name], array, name)


def test_v1_uncompressed_round_trip_and_an_unknown_compression_is_refused(tmp_path: Path) -> None:
    """The suite's v1 round trip writes without zstd (only the round trip is checked);
    the file reads back bit-exact, and a compression the writer does not offer is a
    ConfigurationError naming the file, with nothing written."""
    from arrowquant_core.errors import ConfigurationError

    weights = {"a.weight": np.random.default_rng(2).standard_normal((64, 48)).astype(np.float32)}
    plain = save_weights(weights, tmp_path / "plain.parquet", compression="none")
    packed = save_weights(weights, tmp_path / "packed.parquet")
    assert pq.ParquetFile(plain).metadata.row_group(0).column(0).compression == "UNCOMPRESSED"
    assert pq.ParquetFile(packed).metadata.row_group(0).column(0).compression == "ZSTD"
    for path in (plain, packed):
        assert_same_array(load_weights(path)["a.weight"], weights["a.weight"], "a.weight")
    with pytest.raises(ConfigurationError, match=r"lz4\.parquet.*compression 'lz4'"):
        save_weights(weights, tmp_path / "lz4.parquet", compression="lz4")
    assert not (tmp_path / "lz4.parquet").exists()


def test_v1_big_endian_floats_are_stored_as_their_values(tmp_path: Path) -> None:
    # storage.py byte-swaps '>' arrays on write: a big-endian float32 must be storable
    # and come back as the same values (native byte order).
    values = np.linspace(-3, 3, 12, dtype=np.float32).reshape(3, 4)
    path = save_weights({"w": values.astype(">f4")}, tmp_path / "be.parquet")
    assert_same_array(load_weights(path)["w"], values, "w")


def test_empty_v1_file_round_trips(tmp_path: Path) -> None:
    path = save_weights({}, tmp_path / "empty.parquet")
    assert load_weights(path) == {}


def test_format_version_and_schema_metadata(model: QuantizedModel, v1_file: Path, v2_file: Path) -> None:
    assert format_version(v1_file) == 1
    assert format_version(v2_file) == 2
    assert format_version(str(v2_file)) == 2
    assert pq.read_schema(v1_file).metadata[VERSION_KEY] == b"1"
    assert pq.read_schema(v2_file).metadata[VERSION_KEY] == b"2"
    stored = json.loads(pq.read_schema(v2_file).metadata[METADATA_KEY])
    assert stored == model.metadata
    names = pq.read_schema(v2_file).names
    for column in ("name", "shape", "dtype", "data", "sha256", "kind", "scheme", "method",
                   "codes", "scales", "zeros"):
        assert column in names


def test_load_of_a_v1_file_points_to_load_weights(v1_file: Path) -> None:
    expect_format_error(v1_file, load, needle="load_weights")


def test_save_accepts_str_paths_and_creates_folders(model: QuantizedModel, tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "m.parquet"
    written = save(model, str(target))
    assert written == target and target.is_file()
    assert stray_files(target.parent) == []
    assert_same_model(load(str(target)), model)


def test_saving_twice_replaces_the_file(model: QuantizedModel, weights: dict[str, FloatArray],
                                        tmp_path: Path) -> None:
    path = save_weights(weights, tmp_path / "m.parquet")
    save(model, path)
    assert format_version(path) == 2
    assert_same_model(load(path), model)
    assert stray_files(tmp_path) == []


# ------------------------------------------------------------------------------ atomicity

def test_failing_save_leaves_the_previous_file_intact(model: QuantizedModel, weights: dict[str, FloatArray],
                                                      tmp_path: Path) -> None:
    path = save(model, tmp_path / "m.parquet")
    before = path.read_bytes()
    bad_floats = dict(model.floats)
    bad_floats[F_NAME] = np.arange(100, dtype=np.int32)
    with pytest.raises(FormatError, match=f"'{F_NAME}'.*int32"):
        save(dataclasses.replace(model, floats=bad_floats), path)
    assert path.read_bytes() == before
    assert stray_files(tmp_path) == []

    bad_tensors = dict(model.tensors)
    bad_tensors[Q_NAME] = dataclasses.replace(model.tensors[Q_NAME], codes=model.tensors[Q_NAME].codes[:-1])
    with pytest.raises(FormatError, match=f"'{Q_NAME}'"):
        save(dataclasses.replace(model, tensors=bad_tensors), path)
    assert path.read_bytes() == before

    # integer buffers are stored (bit-exact); a dtype the format has no name for is refused
    with pytest.raises(FormatError, match="'ids'.*complex64"):
        save_weights({**weights, "ids": np.arange(4, dtype=np.complex64)}, path)
    assert path.read_bytes() == before
    assert stray_files(tmp_path) == []
    assert_same_model(load(path), model)


def test_save_onto_a_directory_fails_and_leaves_no_temp_file(model: QuantizedModel, tmp_path: Path) -> None:
    target = tmp_path / "m.parquet"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    with pytest.raises((ArrowQuantError, OSError)) as info:
        save(model, target)
    assert str(target) in str(info.value)
    assert (target / "keep.txt").read_text() == "keep"
    assert stray_files(tmp_path) == []


def test_save_below_a_file_fails_and_leaves_the_file_intact(model: QuantizedModel, tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_dir"
    blocker.write_bytes(b"precious")
    with pytest.raises((ArrowQuantError, OSError)):
        save(model, blocker / "m.parquet")
    assert blocker.read_bytes() == b"precious"
    assert stray_files(tmp_path) == []


@pytest.mark.parametrize("name", ["int4-g16-asym", "int2-g16-sym", "int8-tensor-asym"])
def test_any_table_scheme_round_trips_through_a_file(name: str, tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((3, 50)).astype(np.float32)
    model = QuantizedModel(tensors={"w": quantize(x, name, "w")}, floats={}, order=("w",))
    save(model, tmp_path / "m.parquet")
    back = load(tmp_path / "m.parquet").tensors["w"]
    assert back.scheme is SCHEMES[name]
    np.testing.assert_array_equal(back.codes, model.tensors["w"].codes)


def test_save_of_an_inconsistent_model_is_a_typed_error(model: QuantizedModel, tmp_path: Path) -> None:
    broken = dataclasses.replace(model, order=(*model.order, "ghost.weight"))
    with pytest.raises(ArrowQuantError, match="ghost.weight"):
        save(broken, tmp_path / "m.parquet")
    assert stray_files(tmp_path) == [] and not (tmp_path / "m.parquet").exists()


# ------------------------------------------------------------------ damaged and hostile files

@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.25, 0.5, 0.9, 0.999])
def test_truncated_file(v2_file: Path, fraction: float) -> None:
    data = v2_file.read_bytes()
    v2_file.write_bytes(data[: int(len(data) * fraction)])
    expect_format_error(v2_file, load, load_weights, format_version)


def test_file_cut_by_a_few_bytes(v2_file: Path) -> None:
    data = v2_file.read_bytes()
    for cut in (1, 4, 8, 9):
        v2_file.write_bytes(data[:-cut])
        expect_format_error(v2_file, load, load_weights, format_version)


@pytest.mark.parametrize("content", [
    b"",
    b"PAR1",
    b"PAR1PAR1",
    b"PAR1" + bytes(range(256)) * 4 + (1000).to_bytes(4, "little") + b"PAR1",
    b"PAR1" + b"\x00" * 64 + (2**31 - 1).to_bytes(4, "little") + b"PAR1",
    np.random.default_rng(0).bytes(4096),
    b'{"not": "parquet"}\n',
], ids=["empty", "magic-only", "two-magics", "garbage-footer", "huge-footer-length", "random", "json"])
def test_not_a_parquet_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.parquet"
    path.write_bytes(content)
    expect_format_error(path, load, load_weights, format_version)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    expect_format_error(tmp_path / "nope.parquet", load, load_weights, format_version)
    expect_format_error(tmp_path, load, load_weights, format_version)


@pytest.mark.parametrize("metadata", [None, {b"pandas": b"{}"}], ids=["no-metadata", "foreign-metadata"])
def test_parquet_without_our_metadata(tmp_path: Path, metadata: dict[bytes, bytes] | None) -> None:
    # A plain pyarrow table has no schema metadata at all (Schema.metadata is None).
    path = tmp_path / "plain.parquet"
    table = pa.table({"name": ["a"], "data": [b"\x00\x00\x80\x3f"]})
    pq.write_table(table.replace_schema_metadata(metadata), path)
    assert pq.read_schema(path).metadata == metadata
    expect_format_error(path, load, load_weights, format_version, needle="arrowquant.format_version")


def with_metadata(path: Path, key: bytes, value: bytes) -> None:
    """Rewrite the file with one schema-metadata entry replaced."""
    table = pq.read_table(path)
    meta = dict(table.schema.metadata or {})
    meta[key] = value
    pq.write_table(table.replace_schema_metadata(meta), path)


@pytest.mark.parametrize("version", [b"99", b"0", b"3", b"two", b"", b"\xff\xfe"])
def test_unknown_format_version(v2_file: Path, version: bytes) -> None:
    with_metadata(v2_file, VERSION_KEY, version)
    expect_format_error(v2_file, load, load_weights, format_version, needle="version")


def test_wrong_version_names_it(v2_file: Path) -> None:
    with_metadata(v2_file, VERSION_KEY, b"99")
    expect_format_error(v2_file, load, load_weights, format_version, needle="99")


@pytest.mark.parametrize("blob", [b"{not json", b"[1, 2]", b"\xff"])
def test_bad_model_metadata(v2_file: Path, blob: bytes) -> None:
    with_metadata(v2_file, METADATA_KEY, blob)
    expect_format_error(v2_file, load, load_weights, format_version, needle="metadata")


@pytest.mark.parametrize("column", ["codes", "scales", "zeros", "kind", "sha256", "shape"])
def test_missing_column_v2(v2_file: Path, column: str) -> None:
    table = pq.read_table(v2_file)
    pq.write_table(table.drop_columns([column]), v2_file)
    expect_format_error(v2_file, load, load_weights, format_version, needle=column)


@pytest.mark.parametrize("column", ["data", "sha256", "dtype"])
def test_missing_column_v1(v1_file: Path, column: str) -> None:
    pq.write_table(pq.read_table(v1_file).drop_columns([column]), v1_file)
    expect_format_error(v1_file, load_weights, format_version, needle=column)


def test_duplicate_tensor_name(v1_file: Path, v2_file: Path) -> None:
    for path in (v1_file, v2_file):
        table = pq.read_table(path)
        pq.write_table(pa.concat_tables([table, table.slice(1, 1)]), path)
        readers = (load, load_weights) if path == v2_file else (load_weights,)
        expect_format_error(path, *readers, needle="appears twice")


@pytest.mark.parametrize(("column", "row", "offset"), [
    ("codes", Q_NAME, 0),
    ("codes", Q_NAME, 417),
    ("codes", "embeddings.word.weight", 100),
    ("scales", Q_NAME, 3),
    ("zeros", Q_NAME, 1),
    ("data", F_NAME, 10),
])
def test_flipped_byte_is_a_checksum_mismatch(v2_file: Path, column: str, row: str, offset: int) -> None:
    rewrite_column(v2_file, column, flip_byte(offset, row))
    assert format_version(v2_file) == 2  # the file is still well-formed Parquet
    expect_format_error(v2_file, load, load_weights, needle=f"tensor {row!r}: checksum mismatch")


def test_flipped_byte_in_a_v1_file(v1_file: Path) -> None:
    rewrite_column(v1_file, "data", flip_byte(5, "layer.0.attn.q.weight"))
    expect_format_error(v1_file, load_weights, needle="'layer.0.attn.q.weight': checksum mismatch")


@pytest.mark.parametrize(("column", "value"), [
    ("scheme", "int4-g48-asym"),
    ("scheme", None),
    ("method", "hqq"),
    ("dtype", "float32"),
    ("dtype", "int8"),
    ("kind", "float"),
    ("kind", "mystery"),
    ("sha256", "0" * 64),
    ("name", "renamed.weight"),
])
def test_edited_fields_are_rejected(v2_file: Path, column: str, value: object) -> None:
    def edit(values: list[Any], names: list[Any]) -> list[Any]:
        values[names.index(Q_NAME)] = value
        return values
    rewrite_column(v2_file, column, edit)
    expect_format_error(v2_file, load, load_weights)


@pytest.mark.parametrize(("column", "values"), [
    ("shape", pa.array([["x"]] * 5, pa.list_(pa.string()))),
    ("shape", pa.array([[-1]] * 5, pa.list_(pa.int64()))),
    ("shape", pa.array([None] * 5, pa.list_(pa.int64()))),
    ("codes", pa.array(["text"] * 5, pa.string())),
    ("scheme", pa.array([[1]] * 5, pa.list_(pa.int64()))),
    ("data", pa.array([1] * 5, pa.int64())),
    ("name", pa.array([1, 2, 3, 4, 5], pa.int64())),
    ("sha256", pa.array([None] * 5, pa.string())),
], ids=["shape-strings", "shape-negative", "shape-null", "codes-as-text", "scheme-as-list",
        "data-as-int", "name-as-int", "sha256-null"])
def test_columns_of_the_wrong_type(v2_file: Path, column: str, values: pa.Array[Any]) -> None:
    table = pq.read_table(v2_file)
    assert table.num_rows == 5
    index = table.schema.get_field_index(column)
    table = table.set_column(index, pa.field(column, values.type), values)
    pq.write_table(table, v2_file)
    expect_format_error(v2_file, load, load_weights)


def test_column_name_that_is_not_utf8(v2_file: Path) -> None:
    # One byte of a column name in the Parquet footer (its first occurrence, the schema
    # element) replaced by 0xFF: pyarrow reads the file but Schema.names raises
    # UnicodeDecodeError.
    data = bytearray(v2_file.read_bytes())
    at = bytes(data).find(b"scales")
    assert at > 0
    data[at] = 0xFF
    v2_file.write_bytes(bytes(data))
    expect_format_error(v2_file, load, load_weights, format_version)


def test_malformed_key_value_metadata(v2_file: Path) -> None:
    # Flip the Thrift field header just before the key/value metadata list in the footer:
    # pyarrow then yields a schema whose .metadata raises TypeError.
    data = bytearray(v2_file.read_bytes())
    at = bytes(data).rfind(VERSION_KEY)
    assert at > 4
    data[at - 4] ^= 0xFF
    v2_file.write_bytes(bytes(data))
    expect_format_error(v2_file, load, load_weights, format_version)


def test_any_single_flipped_byte_is_an_error_or_harmless(tmp_path: Path) -> None:
    """Flip one byte at a time -- every 3rd byte of the Parquet footer (the structure;
    names and headers span several bytes), every 16th byte of the data pages: each load either raises FormatError naming the file or
    returns exactly the saved model (a flip in padding or unused fields). Anything else,
    a raw exception or different content, is listed."""
    rng = np.random.default_rng(3)
    small: dict[str, FloatArray] = {"q.weight": (rng.standard_normal((4, 40)) * 0.1).astype(np.float32),
             "k.weight": (rng.standard_normal((4, 32)) * 0.1).astype(np.float16),
             "norm.weight": np.ones(8, ml_dtypes.bfloat16)}
    model = quantize_model(small, QuantizationConfig(
        "int4-g32-asym", overrides=(("k.*", "int8-channel-sym"),)))
    path = save(model, tmp_path / "small.parquet")
    data = path.read_bytes()
    footer_start = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    offsets = [*range(0, footer_start, 16), *range(footer_start, len(data), 3)]
    problems: list[str] = []
    for at in offsets:
        damaged = bytearray(data)
        damaged[at] ^= 0xFF
        path.write_bytes(bytes(damaged))
        try:
            back = load(path)
        except FormatError as exc:
            if str(path) not in str(exc):
                problems.append(f"offset {at}: message lacks the path: {exc}")
            continue
        except Exception as exc:  # noqa: BLE001
            problems.append(f"offset {at}: {type(exc).__name__}: {exc}")
            continue
        try:
            assert_same_model(back, model)
        except AssertionError as exc:
            problems.append(f"offset {at}: loaded different content: {exc}")
    assert not problems, f"{len(problems)} of {len(offsets)} flips:\n" + "\n".join(problems[:20])
