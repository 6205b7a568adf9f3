"""Tests of fixtures.calibration: samples, synthetic generation, JSONL/Parquet files and
their error messages, and the content-addressed cache."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arrowquant_core.errors import ConfigurationError, FormatError
from fixtures.calibration import (
    MAX_TIMESTEP,
    CalibrationCache,
    CalibrationSample,
    content_hash,
    load_calibration,
    read_jsonl,
    read_parquet,
    synthetic_samples,
    timestep_for,
    write_jsonl,
)

PARQUET_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int64())), ("mask_ratio", pa.float64()),
                            ("timestep", pa.int32())])


def samples3() -> list[CalibrationSample]:
    return [CalibrationSample([1, 2, 3], 0.5), CalibrationSample([7], 1.0, timestep=10),
            CalibrationSample(np.array([0, 9], dtype=np.uint8), 0.001)]


# --------------------------------------------------------------------------- samples


def test_sample_defaults_and_normalisation() -> None:
    source = np.array([4, 5, 6], dtype=np.int32)
    sample = CalibrationSample(source, 0.25)
    source[0] = 99  # the sample holds its own copy
    assert sample.input_ids.tolist() == [4, 5, 6] and sample.input_ids.dtype == np.int64
    assert not sample.input_ids.flags.writeable
    assert (sample.mask_ratio, sample.timestep) == (0.25, 250)
    assert CalibrationSample([4, 5, 6], 0.25) == sample and len({sample, CalibrationSample([4, 5, 6], 0.25)}) == 1
    assert CalibrationSample([4, 5, 6], 0.25, timestep=3) != sample


def test_timestep_is_round_of_ratio_times_999() -> None:
    assert [timestep_for(r) for r in (1e-9, 0.0005, 0.25, 0.5, 0.75, 1.0)] == [0, 0, 250, 500, 749, 999]
    assert MAX_TIMESTEP == 999


@pytest.mark.parametrize(
    ("ids", "ratio", "timestep", "message"),
    [
        ([[1, 2]], 0.5, None, r"input_ids must be a non-empty 1-D sequence, got shape \[1, 2\]"),
        ([[1], [1, 2]], 0.5, None, r"input_ids must be a 1-D sequence of integers: .*inhomogeneous"),
        ([], 0.5, None, r"non-empty 1-D sequence, got shape \[0\]"),
        ([1.5], 0.5, None, r"input_ids must be integers, got dtype float64"),
        ([-1, 3], 0.5, None, r"input_ids must be in \[0, 2\*\*63\)"),
        ([1], 0.0, None, r"mask_ratio 0.0 must be in \(0, 1\]"),
        ([1], 1.5, None, r"mask_ratio 1.5 must be in \(0, 1\]"),
        ([1], float("nan"), None, r"mask_ratio nan must be in \(0, 1\]"),
        ([1], True, None, r"mask_ratio True must be a number"),
        ([1], 0.5, 1000, r"timestep 1000 must be an integer in \[0, 999\]"),
        ([1], 0.5, -1, r"timestep -1 must be an integer"),
        ([1], 0.5, 2.0, r"timestep 2.0 must be an integer"),
    ],
    ids=["2d", "ragged", "empty", "float-ids", "negative-id", "ratio-0", "ratio-1.5", "ratio-nan", "ratio-bool",
         "timestep-1000", "timestep-neg", "timestep-float"],
)
def test_sample_validation(ids: Any, ratio: Any, timestep: Any, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        CalibrationSample(ids, ratio, timestep)


# --------------------------------------------------------------------------- synthetic


def test_synthetic_is_seeded_and_deterministic_to_the_byte(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", synthetic_samples(1000, 8, 16, seed=3, mask_token_id=5))
    write_jsonl(tmp_path / "b.jsonl", synthetic_samples(1000, 8, 16, seed=3, mask_token_id=5))
    write_jsonl(tmp_path / "c.jsonl", synthetic_samples(1000, 8, 16, seed=4, mask_token_id=5))
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert (tmp_path / "a.jsonl").read_bytes() != (tmp_path / "c.jsonl").read_bytes()


def test_synthetic_never_emits_the_mask_token_and_reaches_both_ends() -> None:
    ids = np.concatenate([s.input_ids for s in synthetic_samples(3, 20, 50, seed=0, mask_token_id=1)])
    assert set(ids.tolist()) == {0, 2}
    ids = np.concatenate([s.input_ids for s in synthetic_samples(3, 20, 50, seed=0, mask_token_id=2)])
    assert set(ids.tolist()) == {0, 1}


def test_synthetic_ratios_follow_a_uniform_sampler_schedule() -> None:
    samples = synthetic_samples(10, 4, 2, seed=0, mask_token_id=0)
    assert [(s.mask_ratio, s.timestep) for s in samples] == [(0.25, 250), (0.5, 500), (0.75, 749), (1.0, 999)]
    assert [s.mask_ratio for s in synthetic_samples(10, 1, 2, seed=0, mask_token_id=0)] == [1.0]


@settings(derandomize=True, database=None, max_examples=40, deadline=None)
@given(vocab=st.integers(2, 5000), n=st.integers(1, 998), seq_len=st.integers(1, 4), seed=st.integers(0, 2**32),
       mask_fraction=st.floats(0, 1, exclude_max=True))
def test_property_synthetic_invariants(vocab: int, n: int, seq_len: int, seed: int, mask_fraction: float) -> None:
    mask = int(mask_fraction * vocab)
    samples = synthetic_samples(vocab, n, seq_len, seed=seed, mask_token_id=mask)
    ids = np.stack([s.input_ids for s in samples])
    assert ids.shape == (n, seq_len) and ids.min() >= 0 and ids.max() < vocab and not (ids == mask).any()
    ratios = np.array([s.mask_ratio for s in samples])
    # every ratio bucket (i/n, (i+1)/n] holds exactly one sample
    assert np.array_equal(np.ceil(ratios * n - 1e-9).astype(int) - 1, np.arange(n))
    # and, as n < 999, every sample has its own timestep
    steps = [s.timestep for s in samples]
    assert steps == sorted(set(steps)) and steps[-1] == MAX_TIMESTEP


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"vocab_size": 1}, r"vocab_size = 1 must be an integer >= 2"),
        ({"n": 0}, r"n = 0 must be an integer >= 1"),
        ({"n": True}, r"n = True must be an integer"),
        ({"seq_len": 0}, r"seq_len = 0 must be an integer >= 1"),
        ({"seed": -1}, r"seed = -1 must be an integer >= 0"),
        ({"mask_token_id": 100}, r"mask_token_id = 100 must be in \[0, vocab_size=100\)"),
    ],
    ids=["vocab", "n", "n-bool", "seq_len", "seed", "mask-token"],
)
def test_synthetic_rejects_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"vocab_size": 100, "n": 2, "seq_len": 3, "seed": 0, "mask_token_id": 0, **kwargs}
    with pytest.raises(ConfigurationError, match=message):
        synthetic_samples(**args)


# --------------------------------------------------------------------------- JSONL


def test_jsonl_round_trip_and_exact_line_format(tmp_path: Path) -> None:
    path = tmp_path / "cal.jsonl"
    write_jsonl(path, samples3())
    lines = path.read_text().splitlines()
    assert lines[0] == '{"input_ids": [1, 2, 3], "mask_ratio": 0.5, "timestep": 500}'
    assert [json.loads(line) for line in lines][1] == {"input_ids": [7], "mask_ratio": 1.0, "timestep": 10}
    assert read_jsonl(path) == samples3()
    assert load_calibration(path, vocab_size=10) == samples3()


def test_jsonl_skips_blank_lines_and_derives_missing_timestep(tmp_path: Path) -> None:
    path = tmp_path / "cal.jsonl"
    path.write_text('\n{"input_ids": [1], "mask_ratio": 0.75}\n\n  \n{"input_ids": [2], "mask_ratio": 1}\n')
    assert [(s.input_ids.tolist(), s.timestep) for s in read_jsonl(path)] == [([1], 749), ([2], 999)]


def test_write_jsonl_rejects_bad_input_and_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "cal.jsonl"
    write_jsonl(path, samples3())
    before = path.read_bytes()
    with pytest.raises(ConfigurationError, match=r"cal.jsonl: refusing to write an empty calibration set"):
        write_jsonl(path, [])
    with pytest.raises(ConfigurationError, match=r"cal.jsonl: sample 1 is a dict, not a CalibrationSample"):
        write_jsonl(path, [samples3()[0], {"input_ids": [1]}])  # type: ignore[list-item]
    with pytest.raises(FileNotFoundError):
        write_jsonl(tmp_path / "missing" / "cal.jsonl", samples3())
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.jsonl"]


GOOD = '{"input_ids": [1, 2], "mask_ratio": 0.5}\n'

BAD_LINES: dict[str, tuple[str, str]] = {
    "malformed-json": ('{"input_ids": [1, 2], "mask_ratio": 0.5', r"line 2: malformed JSON: Expecting ',' delimiter"),
    "not-object": ("[1, 2]", r"line 2: expected a JSON object, got list"),
    "missing-ids": ('{"mask_ratio": 0.5}', r"line 2: missing field 'input_ids'"),
    "missing-ratio": ('{"input_ids": [1]}', r"line 2: missing field 'mask_ratio'"),
    "unknown-field": ('{"input_ids": [1], "mask_rate": 0.5}', r"line 2: unknown field 'mask_rate'; did you mean "
                                                              r"'mask_ratio'\?"),
    "ids-not-list": ('{"input_ids": "1 2", "mask_ratio": 0.5}', r"line 2: 'input_ids' must be a non-empty list"),
    "ids-empty": ('{"input_ids": [], "mask_ratio": 0.5}', r"line 2: 'input_ids' must be a non-empty list"),
    "id-float": ('{"input_ids": [1, 2.0], "mask_ratio": 0.5}', r"line 2: input_ids\[1\] = 2.0 is not an integer"),
    "id-bool": ('{"input_ids": [true], "mask_ratio": 0.5}', r"line 2: input_ids\[0\] = True is not an integer"),
    "id-negative": ('{"input_ids": [3, -4], "mask_ratio": 0.5}', r"line 2: input_ids\[1\] = -4 is negative"),
    "id-huge": ('{"input_ids": [99999999999999999999], "mask_ratio": 0.5}', r"line 2: input_ids\[0\] = "
                                                                            r"99999999999999999999 is negative or "
                                                                            r"beyond int64"),
    "id-out-of-vocab": ('{"input_ids": [1, 100], "mask_ratio": 0.5}', r"line 2: input_ids\[1\] = 100 is outside the "
                                                                      r"vocabulary \[0, 100\)"),
    "ratio-string": ('{"input_ids": [1], "mask_ratio": "0.5"}', r"line 2: 'mask_ratio' must be a number, got '0.5'"),
    "ratio-zero": ('{"input_ids": [1], "mask_ratio": 0}', r"line 2: mask_ratio 0 must be in \(0, 1\]"),
    "ratio-above-one": ('{"input_ids": [1], "mask_ratio": 1.01}', r"line 2: mask_ratio 1.01 must be in \(0, 1\]"),
    "ratio-nan": ('{"input_ids": [1], "mask_ratio": NaN}', r"line 2: mask_ratio nan must be in \(0, 1\]"),
    "ratio-null": ('{"input_ids": [1], "mask_ratio": null}', r"line 2: 'mask_ratio' must be a number, got None"),
    "timestep-range": ('{"input_ids": [1], "mask_ratio": 0.5, "timestep": 1000}',
                       r"line 2: timestep 1000 must be an integer in \[0, 999\]"),
    "timestep-float": ('{"input_ids": [1], "mask_ratio": 0.5, "timestep": 5.0}', r"line 2: timestep 5.0 must be"),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_jsonl_errors_name_file_line_and_rule(tmp_path: Path, case: str) -> None:
    line, message = BAD_LINES[case]
    path = tmp_path / "cal.jsonl"
    path.write_text(GOOD + line + "\n" + GOOD)
    with pytest.raises(FormatError, match=message) as info:
        read_jsonl(path, vocab_size=100)
    assert str(info.value).startswith(f"{path}: line 2: ")


@pytest.mark.parametrize(("content", "message"),
                         [(b"", r"empty calibration file"), (b"\n \n", r"empty calibration file"),
                          (GOOD.encode() * 2 + b'{"input_ids": [1], "mask_ratio": 0.5, "x": "\xff"}',
                           r"line 3: not valid UTF-8")],
                         ids=["empty", "blank-only", "not-utf8"])
def test_jsonl_file_level_errors(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "cal.jsonl"
    path.write_bytes(content)
    with pytest.raises(FormatError, match=message) as info:
        read_jsonl(path)
    assert str(info.value).startswith(f"{path}: ")


def test_bad_vocab_argument(tmp_path: Path) -> None:
    path = tmp_path / "cal.jsonl"
    path.write_text(GOOD)
    with pytest.raises(ConfigurationError, match=r"vocab_size = 0 must be a positive integer or None"):
        read_jsonl(path, vocab_size=0)


# --------------------------------------------------------------------------- Parquet


def write_parquet(path: Path, columns: dict[str, list[Any]], schema: pa.Schema | None = None) -> Path:
    if schema is None:
        schema = pa.schema([f for f in PARQUET_SCHEMA if f.name in columns])
    pq.write_table(pa.table(columns, schema=schema), path)
    return path


def test_parquet_round_trip(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "cal.parquet", {"input_ids": [[1, 2, 3], [7], [0, 9]],
                                                     "mask_ratio": [0.5, 1.0, 0.001], "timestep": [500, 10, None]})
    assert read_parquet(path) == samples3()
    assert load_calibration(path, vocab_size=10) == samples3()


def test_parquet_without_timestep_column_and_with_int32_ids(tmp_path: Path) -> None:
    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("mask_ratio", pa.float32())])
    path = write_parquet(tmp_path / "cal.parquet", {"input_ids": [[5, 6]], "mask_ratio": [0.25]}, schema)
    [sample] = read_parquet(path)
    assert sample.input_ids.dtype == np.int64 and (sample.mask_ratio, sample.timestep) == (0.25, 250)


def test_parquet_matches_jsonl_for_synthetic_samples(tmp_path: Path) -> None:
    samples = synthetic_samples(500, 6, 32, seed=9, mask_token_id=499)
    path = write_parquet(tmp_path / "cal.parquet", {"input_ids": [s.input_ids.tolist() for s in samples],
                                                     "mask_ratio": [s.mask_ratio for s in samples],
                                                     "timestep": [s.timestep for s in samples]})
    write_jsonl(tmp_path / "cal.jsonl", samples)
    assert read_parquet(path, vocab_size=500) == read_jsonl(tmp_path / "cal.jsonl", vocab_size=500) == samples


BAD_ROWS: dict[str, tuple[dict[str, list[Any]], str]] = {
    "null-ratio": ({"input_ids": [[1], [2]], "mask_ratio": [0.5, None]}, r"row 1: mask_ratio is null"),
    "null-ids": ({"input_ids": [[1], None], "mask_ratio": [0.5, 0.5]}, r"row 1: input_ids is null"),
    "null-id": ({"input_ids": [[1], [2, None]], "mask_ratio": [0.5, 0.5]}, r"row 1: input_ids\[1\] = None is not"),
    "empty-ids": ({"input_ids": [[1], []], "mask_ratio": [0.5, 0.5]}, r"row 1: 'input_ids' must be a non-empty"),
    "negative-id": ({"input_ids": [[1], [2], [3, -1]], "mask_ratio": [0.5] * 3}, r"row 2: input_ids\[1\] = -1 is "
                                                                                  r"negative"),
    "out-of-vocab": ({"input_ids": [[1, 10]], "mask_ratio": [0.5]}, r"row 0: input_ids\[1\] = 10 is outside"),
    "ratio-range": ({"input_ids": [[1], [1]], "mask_ratio": [0.5, 0.0]}, r"row 1: mask_ratio 0.0 must be in"),
    "timestep-range": ({"input_ids": [[1]], "mask_ratio": [0.5], "timestep": [1000]}, r"row 0: timestep 1000 must"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_parquet_errors_name_file_row_and_rule(tmp_path: Path, case: str) -> None:
    columns, message = BAD_ROWS[case]
    path = write_parquet(tmp_path / "cal.parquet", columns)
    with pytest.raises(FormatError, match=message) as info:
        read_parquet(path, vocab_size=10)
    assert str(info.value).startswith(f"{path}: row ")


BAD_TABLES: dict[str, tuple[pa.Table | bytes, str]] = {
    "missing-column": (pa.table({"input_ids": pa.array([[1]], pa.list_(pa.int64()))}), r"missing column 'mask_ratio'"),
    "unknown-column": (pa.table({"input_ids": [[1]], "mask_ratio": [0.5], "text": ["hi"]}),
                       r"unknown column 'text'"),
    "ids-as-doubles": (pa.table({"input_ids": [[1.0]], "mask_ratio": [0.5]}),
                       r"column 'input_ids' has type list<\w+: double>, expected list<int64>"),
    "ratio-as-string": (pa.table({"input_ids": [[1]], "mask_ratio": ["0.5"]}),
                        r"column 'mask_ratio' has type string, expected double"),
    "timestep-as-float": (pa.table({"input_ids": [[1]], "mask_ratio": [0.5], "timestep": [1.0]}),
                          r"column 'timestep' has type double, expected int32"),
    "no-rows": (pa.table({"input_ids": pa.array([], pa.list_(pa.int64())), "mask_ratio": pa.array([], pa.float64())}),
                r"empty calibration file \(no rows\)"),
    "not-parquet": (b'{"input_ids": [1], "mask_ratio": 0.5}\n', r"not a readable Parquet file"),
    "empty-file": (b"", r"not a readable Parquet file"),
}


@pytest.mark.parametrize("case", list(BAD_TABLES))
def test_parquet_file_level_errors(tmp_path: Path, case: str) -> None:
    content, message = BAD_TABLES[case]
    path = tmp_path / "cal.parquet"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        pq.write_table(content, path)
    with pytest.raises(FormatError, match=message) as info:
        read_parquet(path)
    assert str(info.value).startswith(f"{path}: ")


def test_load_calibration_dispatches_on_suffix(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "cal.JSONL", samples3())
    assert load_calibration(tmp_path / "cal.JSONL") == samples3()
    with pytest.raises(ConfigurationError, match=r"cal.csv: unknown calibration file suffix '.csv'; available: "
                                                 r".jsonl, .parquet"):
        load_calibration(tmp_path / "cal.csv")


# --------------------------------------------------------------------------- cache


class CountingBuilder:
    """A builder that reads its source file and counts how often it ran."""

    def __init__(self, source: Path) -> None:
        self.source, self.calls = source, 0

    def __call__(self) -> list[CalibrationSample]:
        self.calls += 1
        ids = [int(x) for x in self.source.read_text().split()]
        return [CalibrationSample(ids, 1.0)]


def test_cache_serves_the_second_call_and_keys_on_inputs(tmp_path: Path) -> None:
    cache = CalibrationCache(tmp_path / "cache")
    calls: list[int] = []

    def build() -> list[CalibrationSample]:
        calls.append(1)
        return synthetic_samples(100, 3, 4, seed=1, mask_token_id=0)

    first = cache.get_or_build({"seed": 1, "n": 3}, build)
    assert cache.get_or_build({"n": 3, "seed": 1}, build) == first  # key order does not matter
    assert len(calls) == 1
    cache.get_or_build({"seed": 2, "n": 3}, build)
    assert len(calls) == 2
    assert cache.path_for({"seed": 1, "n": 3}).is_file()
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".jsonl", ".jsonl"]


def test_cache_never_serves_a_changed_source(tmp_path: Path) -> None:
    source = tmp_path / "corpus.txt"
    source.write_text("1 2 3")
    cache, builder = CalibrationCache(tmp_path / "cache"), CountingBuilder(source)
    key = {"reader": "whitespace"}
    assert cache.get_or_build(key, builder, source=source)[0].input_ids.tolist() == [1, 2, 3]
    assert cache.get_or_build(key, builder, source=source)[0].input_ids.tolist() == [1, 2, 3]
    assert builder.calls == 1
    source.write_text("4 5 6")  # same name, same size, new content
    assert cache.get_or_build(key, builder, source=source)[0].input_ids.tolist() == [4, 5, 6]
    assert builder.calls == 2
    source.write_text("1 2 3")  # back to the first content: content-addressed, so a hit
    assert cache.get_or_build(key, builder, source=source)[0].input_ids.tolist() == [1, 2, 3]
    assert builder.calls == 2


def test_cache_does_not_store_when_the_source_changes_during_the_build(tmp_path: Path) -> None:
    source = tmp_path / "corpus.txt"
    source.write_text("1 2 3")
    cache = CalibrationCache(tmp_path / "cache")
    stale_path = cache.path_for({}, source)

    def build_then_edit() -> list[CalibrationSample]:
        samples = CountingBuilder(source)()
        source.write_text("9 9 9")
        return samples

    cache.get_or_build({}, build_then_edit, source=source)
    assert not stale_path.exists() and not cache.path_for({}, source).exists()


def test_cache_rebuilds_a_damaged_entry_and_rejects_non_json_keys(tmp_path: Path) -> None:
    cache = CalibrationCache(tmp_path)
    path = cache.path_for({"k": 1})
    path.write_text("{damaged")
    samples = cache.get_or_build({"k": 1}, lambda: samples3())
    assert samples == samples3() and read_jsonl(path) == samples3()
    with pytest.raises(ConfigurationError, match=r"key_inputs must hold plain JSON values"):
        cache.key({"path": Path("x")})
    with pytest.raises(ConfigurationError, match=r"key_inputs must hold plain JSON values"):
        cache.key({"x": float("nan")})


def test_content_hash_is_sha256_of_the_bytes(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * 5000  # > 1 MiB: several chunks
    path.write_bytes(data)
    assert content_hash(path) == hashlib.sha256(data).hexdigest()
