"""Tests of arrowquant_core.safetensors_io: round trips, interop with the safetensors library,
streaming, hostile files, atomicity, sharded and legacy .npy folders."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from arrowquant_core.errors import ConfigurationError, FormatError
from arrowquant_core.safetensors_io import (
    DTYPES,
    MAX_HEADER_BYTES,
    DType,
    SafetensorsStreamWriter,
    read_header,
    read_metadata,
    read_npy_folder,
    read_safetensors,
    read_safetensors_folder,
    write_safetensors,
)

Array = npt.NDArray[Any]
SHAPES = [(), (5,), (2, 3, 4)]


def sample_array(row: DType, shape: tuple[int, ...], seed: int = 0) -> Array:
    """Deterministic values that use the dtype's range (negatives, fractions, extremes)."""
    rng = np.random.default_rng(seed)
    if row.code == "BOOL":
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if row.numpy.kind in "iu":
        info = np.iinfo(row.numpy)
        return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=row.numpy)
    return (rng.standard_normal(size=shape) * 100).astype(row.numpy)


def same_bits(a: Array, b: Array) -> bool:
    """Exact equality, bit for bit (NaN payloads and -0.0 included)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def only_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
@pytest.mark.parametrize("row", DTYPES, ids=lambda r: r.code)
def test_round_trip_every_dtype_and_rank(tmp_path: Path, row: DType, shape: tuple[int, ...]) -> None:
    path = tmp_path / "m.safetensors"
    array = sample_array(row, shape)
    write_safetensors(path, {"t": array})
    info = read_header(path).tensors["t"]
    assert (info.dtype, info.shape) == (row.code, shape)
    got = read_safetensors(path)["t"]
    assert same_bits(got, array)


def test_zero_size_and_many_tensors_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    tensors = {f"t{i}": sample_array(row, (3, i % 3), seed=i) for i, row in enumerate(DTYPES)}
    write_safetensors(path, tensors, {"format": "np", "ünïcode": "✓"})
    got = read_safetensors(path)
    assert list(got) == sorted(tensors)
    assert all(same_bits(got[name], tensors[name]) for name in tensors)
    assert read_metadata(path) == {"format": "np", "ünïcode": "✓"}


def test_returned_arrays_are_private_copy_on_write_maps(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    write_safetensors(path, {"w": np.zeros((2, 2), np.float32)})
    got = read_safetensors(path)["w"]
    got[0, 0] = 7.0  # writable; the write stays private to this process
    assert got.flags.writeable and got.flags.c_contiguous and type(got) is np.ndarray
    assert read_safetensors(path)["w"][0, 0] == 0.0  # the file is untouched
    write_safetensors(path, {"w": np.ones((2, 2), np.float32)})  # replaced by rename
    assert got[0, 0] == 7.0 and got[1, 1] == 0.0
    path.unlink()  # deleting the file leaves the arrays valid
    assert got[0, 0] == 7.0


def test_reads_only_the_names_asked_for(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    write_safetensors(path, {"a": np.ones(2, np.int8), "b": np.zeros(3, np.float64), "c": np.ones(1, np.uint8)})
    assert list(read_safetensors(path, ["c", "a", "c"])) == ["a", "c"]
    with pytest.raises(FormatError, match=r"m\.safetensors: unknown tensor 'bb'; did you mean 'b'\?"):
        read_safetensors(path, ["bb"])


def test_output_is_independent_of_insertion_order(tmp_path: Path) -> None:
    tensors: dict[str, Array] = {"z": np.arange(4, dtype=np.float32), "a": np.ones((2, 2), np.float16),
                                 "m": np.asarray(np.int64(3))}
    write_safetensors(tmp_path / "1.safetensors", tensors, {"b": "2", "a": "1"})
    write_safetensors(tmp_path / "2.safetensors", dict(reversed(tensors.items())), {"a": "1", "b": "2"})
    assert (tmp_path / "1.safetensors").read_bytes() == (tmp_path / "2.safetensors").read_bytes()
    assert list(read_header(tmp_path / "1.safetensors").tensors) == ["a", "m", "z"]


def test_header_is_padded_to_eight_bytes_and_data_tiles_in_name_order(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    write_safetensors(path, {"b": np.ones(3, np.int8), "a": np.ones(1, np.float64)})
    header = read_header(path)
    assert header.data_start % 8 == 0
    assert [(i.name, i.begin, i.end) for i in header.tensors.values()] == [("a", 0, 8), ("b", 8, 11)]


def test_big_endian_and_strided_input_is_stored_little_endian(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    source = np.arange(12, dtype=">f4").reshape(3, 4)[:, ::2]
    write_safetensors(path, {"w": source})
    got = read_safetensors(path)["w"]
    assert got.dtype == np.dtype("<f4") and np.array_equal(got, source)


@pytest.mark.parametrize(
    ("tensors", "metadata", "message"),
    [
        ({"c": np.zeros(2, np.complex64)}, None, r"tensor 'c': dtype complex64 is not supported"),
        ({"o": np.array(["x"], dtype=object)}, None, r"tensor 'o': dtype object is not supported"),
        ({"__metadata__": np.zeros(1, np.float32)}, None, r"'__metadata__' is reserved"),
        ({"": np.zeros(1, np.float32)}, None, r"tensor name '' must be a non-empty str"),
        ({"w": np.zeros(1, np.float32)}, {"k": 1}, r"metadata entry 'k': 1: keys and values must be str"),
    ],
    ids=["complex", "object", "reserved-name", "empty-name", "metadata-not-str"],
)
def test_write_rejects_bad_input(tmp_path: Path, tensors: dict[str, Array], metadata: Any, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        write_safetensors(tmp_path / "m.safetensors", tensors, metadata)
    assert only_files(tmp_path) == []


# --------------------------------------------------------------------------- Hypothesis

NAMES = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12).filter(  # utf-8: no lone surrogates
    lambda s: s != "__metadata__")


@st.composite
def tensor_dicts(draw: st.DrawFn, rows: tuple[DType, ...] = DTYPES) -> dict[str, Array]:
    names = draw(st.lists(NAMES, min_size=1, max_size=5, unique=True))
    out: dict[str, Array] = {}
    for name in names:
        row = draw(st.sampled_from(rows))
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        raw = draw(st.binary(min_size=math.prod(shape) * row.numpy.itemsize,
                             max_size=math.prod(shape) * row.numpy.itemsize))
        values = np.frombuffer(raw, dtype=np.uint8) % 2 if row.code == "BOOL" else np.frombuffer(raw, row.numpy)
        out[name] = values.astype(row.numpy, copy=False).reshape(shape)
    return out


PROPERTY = settings(derandomize=True, database=None, max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPERTY
@given(tensors=tensor_dicts(), metadata=st.dictionaries(NAMES, NAMES, max_size=3))
def test_property_round_trip_bit_exact(tmp_path: Path, tensors: dict[str, Array], metadata: dict[str, str]) -> None:
    path = tmp_path / "p.safetensors"
    write_safetensors(path, tensors, metadata)
    got = read_safetensors(path)
    assert list(got) == sorted(tensors)
    assert all(same_bits(got[name], tensors[name]) for name in tensors)
    assert read_metadata(path) == metadata


F32_F16 = tuple(r for r in DTYPES if r.code in ("F32", "F16"))


@PROPERTY
@given(tensors=tensor_dicts(F32_F16))
def test_property_library_reads_what_we_write(tmp_path: Path, tensors: dict[str, Array]) -> None:
    path = tmp_path / "p.safetensors"
    write_safetensors(path, tensors)
    theirs = load_file(path)
    assert sorted(theirs) == sorted(tensors)
    assert all(same_bits(theirs[name], tensors[name]) for name in tensors)


# --------------------------------------------------------------------------- interop


def test_library_reads_our_file_with_metadata(tmp_path: Path) -> None:
    path = tmp_path / "ours.safetensors"
    tensors = {"lm_head.weight": sample_array(DTYPES[1], (4, 3)), "norm": sample_array(DTYPES[2], (3,)),
               "scalar": np.asarray(np.float32(2.5))}
    write_safetensors(path, tensors, {"format": "pt", "scheme": "int4"})
    theirs = load_file(path)
    assert all(same_bits(theirs[n], tensors[n]) for n in tensors) and len(theirs) == 3
    with safe_open(path, framework="np") as handle:
        assert handle.metadata() == {"format": "pt", "scheme": "int4"}


def test_we_read_the_library_file_with_mixed_dtypes(tmp_path: Path) -> None:
    path = tmp_path / "theirs.safetensors"
    tensors = {"b.f16": sample_array(DTYPES[2], (2, 3)), "a.f32": sample_array(DTYPES[1], (5,)),
               "c.f32": sample_array(DTYPES[1], (1, 1, 2))}
    save_file(tensors, path, metadata={"format": "np"})
    got = read_safetensors(path)
    assert list(got) == sorted(tensors)
    assert all(same_bits(got[n], tensors[n]) for n in tensors)
    assert read_metadata(path) == {"format": "np"}


def test_single_dtype_bytes_match_the_library(tmp_path: Path) -> None:
    # The library orders data by dtype then name; with one dtype that is our order, so
    # the files must be identical: same compact JSON, same padding, same layout.
    tensors = {"z": sample_array(DTYPES[1], (2, 2)), "a": sample_array(DTYPES[1], (3,))}
    write_safetensors(tmp_path / "ours.safetensors", tensors, {"format": "np"})
    save_file(tensors, tmp_path / "theirs.safetensors", metadata={"format": "np"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()


# --------------------------------------------------------------------------- streaming


SPECS: dict[str, tuple[tuple[int, ...], Any]] = {
    "model.layers.1.w": ((3, 4), np.float32),
    "model.layers.0.w": ((2,), ml_dtypes.bfloat16),
    "model.norm": ((), np.dtype("int16")),
}


def spec_arrays() -> dict[str, Array]:
    return {name: np.arange(math.prod(shape)).astype(dtype).reshape(shape) for name, (shape, dtype) in SPECS.items()}


def test_stream_writer_equals_write_safetensors(tmp_path: Path) -> None:
    arrays = spec_arrays()
    with SafetensorsStreamWriter(tmp_path / "s.safetensors", SPECS, {"k": "v"}) as writer:
        assert writer.names == ("model.layers.0.w", "model.layers.1.w", "model.norm")
        for name in writer.names:
            writer.write(name, arrays[name])
    write_safetensors(tmp_path / "w.safetensors", arrays, {"k": "v"})
    assert (tmp_path / "s.safetensors").read_bytes() == (tmp_path / "w.safetensors").read_bytes()


@pytest.mark.parametrize(
    ("calls", "message"),
    [
        ([("model.layers.1.w", None)], r"expected 'model.layers.0.w' next .* comes later in sorted-name order"),
        ([("nope", np.zeros(2, np.float32))], r"tensor 'nope': expected 'model.layers.0.w' next .* is not in the specs"),
        ([("model.layers.0.w", None), ("model.layers.0.w", None)], r"'model.layers.0.w' was already written"),
        ([("model.layers.0.w", np.zeros(3, ml_dtypes.bfloat16))], r"shape \[3\] differs from the declared \[2\]"),
        ([("model.layers.0.w", np.zeros(2, np.float32))], r"dtype float32 differs from the declared bfloat16"),
    ],
    ids=["out-of-order", "unknown", "twice", "shape", "dtype"],
)
def test_stream_writer_misuse_is_readable_and_leaves_nothing(
        tmp_path: Path, calls: list[tuple[str, Array | None]], message: str) -> None:
    path = tmp_path / "s.safetensors"
    arrays = spec_arrays()
    with pytest.raises(ConfigurationError, match=message):
        with SafetensorsStreamWriter(path, SPECS) as writer:
            for name, array in calls:
                writer.write(name, arrays[name] if array is None else array)
    assert only_files(tmp_path) == []


def test_stream_writer_missing_tensor_and_use_outside_with(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    arrays = spec_arrays()
    with pytest.raises(ConfigurationError, match=r"2 declared tensor\(s\) never written, first 'model.layers.1.w'"):
        with SafetensorsStreamWriter(path, SPECS) as writer:
            writer.write("model.layers.0.w", arrays["model.layers.0.w"])
    assert only_files(tmp_path) == []
    with pytest.raises(ConfigurationError, match=r"outside the writer's 'with' block"):
        SafetensorsStreamWriter(path, SPECS).write("model.layers.0.w", arrays["model.layers.0.w"])
    with pytest.raises(ConfigurationError, match=r"tensor 'x': shape \[-1\] must be non-negative"):
        SafetensorsStreamWriter(path, {"x": ((-1,), np.float32)})
    with pytest.raises(ConfigurationError, match=r"tensor 'x': spec .* must be a \(shape tuple, numpy dtype\) pair"):
        SafetensorsStreamWriter(path, {"x": (3,)})  # type: ignore[dict-item]


# --------------------------------------------------------------------------- atomicity


def test_failed_writes_leave_previous_file_untouched_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    write_safetensors(path, {"old": np.ones(2, np.float32)})
    before = path.read_bytes()
    arrays = spec_arrays()

    with pytest.raises(RuntimeError, match="disk full"):  # failure in the middle of a stream
        with SafetensorsStreamWriter(path, SPECS) as writer:
            writer.write("model.layers.0.w", arrays["model.layers.0.w"])
            raise RuntimeError("disk full")
    with pytest.raises(ConfigurationError):  # failure while validating the input
        write_safetensors(path, {"new": np.ones(2, np.float32), "bad": np.ones(2, np.complex128)})
    with pytest.raises(ConfigurationError):  # failure at exit: a tensor never written
        with SafetensorsStreamWriter(path, SPECS):
            pass

    assert path.read_bytes() == before
    assert only_files(tmp_path) == ["m.safetensors"]
    assert list(read_safetensors(path)) == ["old"]


def test_write_into_missing_directory_fails_cleanly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_safetensors(tmp_path / "missing" / "m.safetensors", {"w": np.ones(1, np.float32)})
    assert only_files(tmp_path) == []


# --------------------------------------------------------------------------- hostile files


def raw_file(path: Path, header: dict[str, Any] | bytes, data: bytes = b"", length: int | None = None) -> Path:
    """A file with an arbitrary header (dict -> JSON) and data, bypassing our writer."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + data)
    return path


def raw_bytes(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def truncated(path: Path) -> Path:
    write_safetensors(path, {"a": np.ones(4, np.float32), "lm_head.weight": np.ones((2, 2), np.float32)})
    path.write_bytes(path.read_bytes()[:-4])
    return path


HOSTILE: dict[str, tuple[Callable[[Path], Path], str]] = {
    "truncated-data": (truncated,
                       r"tensor 'lm_head.weight': data_offsets \[16, 32\] extend past the end of the data "
                       r"\(28 bytes\): file truncated"),
    "header-longer-than-file": (lambda p: raw_file(p, b"{}", length=1000),
                                r"header length 1000 is larger than the 2 bytes after it"),
    "header-over-cap": (lambda p: raw_file(p, b"{}", length=MAX_HEADER_BYTES + 1),
                        rf"header length {MAX_HEADER_BYTES + 1} exceeds the limit"),
    "shorter-than-length-prefix": (lambda p: raw_bytes(p, b"\x01\x02"), r"2 bytes is too short"),
    "header-not-json": (lambda p: raw_file(p, b"{not json"), r"header: not valid JSON: Expecting property name"),
    "header-not-utf8": (lambda p: raw_file(p, b'{"\xff": 1}'), r"header: not valid UTF-8"),
    "header-not-object": (lambda p: raw_file(p, b"[1, 2]"), r"header must be a JSON object, got list"),
    "header-too-deep": (lambda p: raw_file(p, b"[" * 100_000), r"header: not valid JSON"),
    "duplicate-key": (lambda p: raw_file(p, b'{"w": {}, "w": {}}'), r"key 'w' appears twice"),
    "metadata-not-str": (lambda p: raw_file(p, {"__metadata__": {"k": 1}}),
                         r"__metadata__ must be an object of str to str"),
    "entry-not-object": (lambda p: raw_file(p, {"w": [1]}), r"tensor 'w': entry must be a JSON object"),
    "entry-missing-field": (lambda p: raw_file(p, {"w": {"dtype": "F32"}}),
                            r"tensor 'w': entry lacks 'shape', 'data_offsets'"),
    "unknown-dtype": (lambda p: raw_file(p, {"w": entry("F8_E4M3", [2], 0, 2)}, b"\0\0"),
                      r"tensor 'w': unknown dtype 'F8_E4M3'; supported: F64, F32"),
    "negative-shape": (lambda p: raw_file(p, {"w": entry("F32", [-1, 4], 0, 0)}),
                       r"tensor 'w': shape \[-1, 4\] must be a list of non-negative integers"),
    "bool-in-shape": (lambda p: raw_file(p, {"w": entry("F32", [True], 0, 4)}, b"\0" * 4),
                      r"tensor 'w': shape \[True\] must be a list"),
    "float-offsets": (lambda p: raw_file(p, {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.0]}},
                                         b"\0" * 4), r"tensor 'w': data_offsets \[0.0, 4.0\] must be \[begin, end\]"),
    "reversed-offsets": (lambda p: raw_file(p, {"w": entry("F32", [0], 4, 0)}, b"\0" * 4),
                         r"tensor 'w': data_offsets \[4, 0\] end before they begin"),
    "wrong-byte-count": (lambda p: raw_file(p, {"lm_head.weight": entry("F32", [10, 10], 0, 100)}, b"\0" * 100),
                         r"tensor 'lm_head.weight': data_offsets \[0, 100\] hold 100 bytes but F32 shape "
                         r"\[10, 10\] needs 400 bytes"),
    "overlapping-offsets": (lambda p: raw_file(p, {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)},
                                               b"\0" * 12),
                            r"tensor 'b': data_offsets \[4, 12\] overlap tensor 'a' \[0, 8\]"),
    "hole": (lambda p: raw_file(p, {"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 8, 12)}, b"\0" * 12),
             r"tensor 'b': data_offsets \[8, 12\] leave data bytes \[4, 8\] unused"),
    "trailing-bytes": (lambda p: raw_file(p, {"a": entry("U8", [2], 0, 2)}, b"\0" * 5),
                       r"3 trailing data bytes after the last tensor"),
    "bool-not-0-1": (lambda p: raw_file(p, {"flags": entry("BOOL", [2], 0, 2)}, b"\x01\x07"),
                     r"tensor 'flags': BOOL data holds bytes other than 0 and 1"),
    "absurd-zero-size-shape": (lambda p: raw_file(p, {"w": entry("F32", [0, 2**62, 2**62], 0, 0)}),
                               r"tensor 'w': shape \[0, 4611686018427387904, 4611686018427387904\] is not "
                               r"representable"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_file_is_a_format_error_naming_file_tensor_and_rule(tmp_path: Path, case: str) -> None:
    make, message = HOSTILE[case]
    path = make(tmp_path / "model.safetensors")
    with pytest.raises(FormatError, match=message) as info:
        read_safetensors(path)
    assert str(info.value).startswith(f"{path}: ")


# --------------------------------------------------------------------------- sharded folders


def sharded(folder: Path, weight_map: dict[str, str] | None = None) -> dict[str, Array]:
    tensors: dict[str, Array] = {"embed": np.ones((2, 2), np.float32), "layer.0": np.zeros(3, np.float16),
               "layer.1": np.arange(4, dtype=np.int32)}
    write_safetensors(folder / "model-00001-of-00002.safetensors", {"embed": tensors["embed"]})
    write_safetensors(folder / "model-00002-of-00002.safetensors",
                      {"layer.0": tensors["layer.0"], "layer.1": tensors["layer.1"]})
    default = {"embed": "model-00001-of-00002.safetensors", "layer.0": "model-00002-of-00002.safetensors",
               "layer.1": "model-00002-of-00002.safetensors"}
    index = {"metadata": {"total_size": 30}, "weight_map": default if weight_map is None else weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return tensors


def test_sharded_folder_happy_path(tmp_path: Path) -> None:
    tensors = sharded(tmp_path)
    got = read_safetensors_folder(tmp_path)
    assert list(got) == sorted(tensors)
    assert all(same_bits(got[n], tensors[n]) for n in tensors)


def test_single_file_folder_and_empty_folder(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "model.safetensors", {"w": np.ones(2, np.float32)})
    assert read_safetensors_folder(tmp_path)["w"].tolist() == [1.0, 1.0]
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FormatError, match=r"neither model.safetensors.index.json nor model.safetensors found"):
        read_safetensors_folder(tmp_path)


SHARD_A, SHARD_B = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"

BAD_MAPS: dict[str, tuple[dict[str, str], str]] = {
    "missing-shard": ({"embed": SHARD_A, "layer.0": "model-00003-of-00003.safetensors", "layer.1": SHARD_B},
                      r"tensor 'layer.0': shard 'model-00003-of-00003.safetensors' does not exist"),
    "tensor-not-in-shard": ({"embed": SHARD_A, "layer.0": SHARD_B, "layer.1": SHARD_B, "ghost": SHARD_A},
                            r"tensor 'ghost' is mapped to shard 'model-00001-of-00002.safetensors', which lacks it"),
    "unlisted-tensor": ({"embed": SHARD_A, "layer.0": SHARD_B},
                        r"shard 'model-00002-of-00002.safetensors' holds tensor 'layer.1', which the weight_map"),
    "path-traversal": ({"embed": "../model-00001-of-00002.safetensors"},
                       r"tensor 'embed': shard '../model-00001-of-00002.safetensors' must be a plain file name"),
}


@pytest.mark.parametrize("case", list(BAD_MAPS))
def test_sharded_folder_rejects_a_bad_index(tmp_path: Path, case: str) -> None:
    weight_map, message = BAD_MAPS[case]
    sharded(tmp_path, weight_map)
    with pytest.raises(FormatError, match=message) as info:
        read_safetensors_folder(tmp_path)
    assert "model.safetensors.index.json" in str(info.value)


def test_sharded_folder_rejects_a_tensor_stored_twice(tmp_path: Path) -> None:
    sharded(tmp_path)
    write_safetensors(tmp_path / SHARD_A, {"embed": np.ones((2, 2), np.float32), "layer.1": np.ones(4, np.int32)})
    with pytest.raises(FormatError, match=r"tensor 'layer.1' appears in both "
                                          r"'model-00001-of-00002.safetensors' and 'model-00002-of-00002"):
        read_safetensors_folder(tmp_path)


@pytest.mark.parametrize(
    ("text", "message"),
    [("{", r"not valid JSON"), ('{"metadata": {}}', r"must be a JSON object with a 'weight_map' object"),
     ('{"weight_map": {}}', r"'weight_map' lists no tensors"),
     ('{"weight_map": {"a": "x", "a": "y"}}', r"key 'a' appears twice")],
    ids=["not-json", "no-weight-map", "empty-map", "duplicate-tensor-in-map"],
)
def test_malformed_index_json(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(FormatError, match=message) as info:
        read_safetensors_folder(tmp_path)
    assert str(info.value).startswith(str(tmp_path / "model.safetensors.index.json"))


# --------------------------------------------------------------------------- legacy .npy folders


def test_npy_folder_round_trip(tmp_path: Path) -> None:
    up = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.save(tmp_path / "model.layers.0.mlp.up_proj.weight.npy", up)
    np.save(tmp_path / "model.norm.weight.npy", np.ones(3, dtype=">f2"))  # big-endian on disk
    (tmp_path / "README.txt").write_text("ignored")
    got = read_npy_folder(tmp_path)
    assert list(got) == ["model.layers.0.mlp.up_proj.weight", "model.norm.weight"]
    assert same_bits(got["model.layers.0.mlp.up_proj.weight"], up)
    assert got["model.norm.weight"].dtype == np.dtype("<f2")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True),
         r"not a plain .npy array \(pickles are never loaded\)"),
        (lambda p: p.write_bytes(b"\x80\x04K\x01."), r"not a plain .npy array"),  # a raw pickle
        (lambda p: p.write_bytes(b"\x93NUMPY\x01\x00"), r"not a plain .npy array"),  # truncated header
        (lambda p: p.write_bytes(b""), r"not a plain .npy array"),
        (lambda p: np.save(p, np.zeros(2, np.complex64)), r"dtype complex64 is not supported"),
    ],
    ids=["object-array", "pickle", "truncated", "empty", "complex"],
)
def test_npy_folder_rejects_bad_files_naming_them(tmp_path: Path, make: Callable[[Path], Any], message: str) -> None:
    path = tmp_path / "model.embed_tokens.weight.npy"
    make(path)
    with pytest.raises(FormatError, match=message) as info:
        read_npy_folder(tmp_path)
    assert str(info.value).startswith(f"{path}: ")


def test_npy_folder_empty(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match=r"no .npy files found"):
        read_npy_folder(tmp_path)
