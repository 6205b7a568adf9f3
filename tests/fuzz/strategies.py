"""Structure-aware generators: inputs that get past the first byte checks.

Byte mutations of a valid seed mostly break the outer framing (length prefix, magic,
footer). These build files whose framing is right and whose *content* is hostile:
safetensors headers with absurd shapes, dtypes and offsets; criteria TOML whose sections
and values have the wrong types; JSONL lines with wrong types and deep nesting; Parquet
artifacts whose schema metadata is hostile. Each generator takes a ``draw`` of
Hypothesis (``st.data().draw``) so the same code serves the tests and the campaign.
"""

from __future__ import annotations

import io
import json
import struct
from typing import Any

from hypothesis import strategies as st
import pyarrow as pa
import pyarrow.parquet as pq

HUGE_INTS = st.sampled_from([0, 1, 2, 7, 8, 255, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**62, 2**63 - 1, 2**63,
                             2**64, 10**30, -1, -(2**63)])
JSON_LEAF = st.one_of(st.none(), st.booleans(), HUGE_INTS, st.floats(allow_nan=False, allow_infinity=False),
                      st.text(max_size=12))
JSON_VALUE = st.recursive(JSON_LEAF, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                              st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                          max_leaves=12)
DTYPE_CODES = st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "U16",
                               "F8_E4M3", "f32", "", "F32 "])


def _shape(draw: Any) -> Any:
    return draw(st.one_of(st.lists(HUGE_INTS, max_size=5), st.lists(st.integers(0, 4), max_size=4),
                          st.lists(st.integers(0, 1), min_size=65, max_size=80), JSON_VALUE))


def safetensors_file(draw: Any) -> bytes:
    entries: dict[str, Any] = {}
    offset = 0
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.one_of(st.text(max_size=10), st.just("__metadata__"), st.just("x\n# evil")))
        shape = _shape(draw)
        size = draw(st.integers(0, 64))
        offsets = draw(st.one_of(st.just([offset, offset + size]), st.lists(HUGE_INTS, max_size=3), JSON_VALUE))
        entry = {"dtype": draw(DTYPE_CODES), "shape": shape, "data_offsets": offsets}
        if draw(st.booleans()):
            entry = draw(st.dictionaries(st.sampled_from(["dtype", "shape", "data_offsets", "x"]), JSON_VALUE,
                                         max_size=3)) | entry if draw(st.booleans()) else entry
        entries[name] = draw(st.one_of(st.just(entry), JSON_VALUE)) if draw(st.integers(0, 9)) == 0 else entry
        offset += size
    if draw(st.booleans()):
        entries["__metadata__"] = draw(st.one_of(st.dictionaries(st.text(max_size=5), st.text(max_size=5)),
                                                 JSON_VALUE))
    header = json.dumps(entries).encode()
    if draw(st.integers(0, 5)) == 0:
        header = b"[" * draw(st.integers(1, 5000)) + b"]" * draw(st.integers(0, 5))
    header += b" " * (-len(header) % 8)
    length = draw(st.one_of(st.just(len(header)), HUGE_INTS.map(lambda v: v % (1 << 64))))
    data = bytes(draw(st.integers(0, offset + 8)))
    return struct.pack("<Q", length) + header + data


_TOML_VALUES = st.sampled_from([
    '"int4-g64-asym"', '"int8-g128-asym"', '"nope"', "4", "-1", "1e400", "nan", "inf", "true", "[]", "[1, 2]",
    '["weight_cosine_mean"]', '[["a", "b"]]', "{}", '{ rule = 1 }', '{ rule = "weight_cosine_min >= 0.9" }',
    '{ rule = "weight_cosine_min >= e" }', '["weight_cosine_min >= --"]', '["x" ]', '"' + "a" * 300 + '"',
    "[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]", "1979-05-27T07:32:00Z", '{ rungs = 3 }',
    '{ rungs = [["fp16", ""]], budget_mb = -1 }', '{ rungs = [], layer_threshold = "x", target = 0.9 }',
    '{ rungs = [], layer_threshold = 0.1, target = 0.9, fail_fast = "yes" }', '["clip", 3]', "'\\u0000'",
])
_TOML_KEYS = st.sampled_from(["scheme", "gates", "report", "method", "compare", "ladder", "model", "x", "bits"])
_TOML_SECTIONS = st.sampled_from(["[bits.4]", "[bits.2]", "[bits.8]", "[bits.x]", "[bits.04]", "[bits.999999]",
                                  "[all]", "[bits]", "[[bits]]", "[model]", "[bits.4.ladder]", ""])


def criteria_text(draw: Any) -> bytes:
    lines: list[str] = []
    if draw(st.booleans()):
        lines.append(f"model = {draw(_TOML_VALUES)}")
    for _ in range(draw(st.integers(0, 4))):
        lines.append(draw(_TOML_SECTIONS))
        for _ in range(draw(st.integers(0, 4))):
            lines.append(f"{draw(_TOML_KEYS)} = {draw(_TOML_VALUES)}")
    raw = "\n".join(lines).encode()
    if draw(st.integers(0, 9)) == 0:
        raw += draw(st.sampled_from([b"\xff\xfe", b"\x00", b"\xc3"]))
    return raw


_IDS = st.one_of(st.lists(st.integers(-5, 2000), max_size=6), st.lists(JSON_LEAF, max_size=4), JSON_VALUE)


def jsonl_text(draw: Any) -> bytes:
    lines: list[bytes] = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.integers(0, 6))
        if kind == 0:
            lines.append(b"[" * draw(st.integers(1, 100_000)))
        elif kind == 1:
            lines.append(json.dumps(draw(JSON_VALUE)).encode())
        elif kind == 2:
            lines.append(b'{"input_ids": [' + b"1," * draw(st.integers(0, 300_000)) + b'1], "mask_ratio": 0.5}')
        else:
            record: dict[str, Any] = {"input_ids": draw(_IDS),
                                      "mask_ratio": draw(st.one_of(st.floats(), JSON_LEAF))}
            if draw(st.booleans()):
                record["timestep"] = draw(st.one_of(HUGE_INTS, JSON_LEAF))
            lines.append(json.dumps(record).encode())
    return b"\n".join(lines)


def parquet_artifact(draw: Any, seed: bytes) -> bytes:
    """The seed artifact with hostile schema metadata or columns."""
    table = pq.read_table(io.BytesIO(seed))
    meta = dict(table.schema.metadata or {})
    choice = draw(st.integers(0, 4))
    if choice == 0:
        meta[b"arrowquant.metadata"] = b"[" * draw(st.integers(1, 200_000)) + b"]"
    elif choice == 1:
        meta[b"arrowquant.metadata"] = json.dumps(draw(JSON_VALUE)).encode()
    elif choice == 2:
        meta[draw(st.sampled_from([b"arrowquant.format_version", b"arrowquant.manifest_sha256"]))] = \
            draw(st.binary(max_size=20))
    elif choice == 3:
        rows = table.num_rows
        keep = draw(st.lists(st.integers(0, max(rows - 1, 0)), max_size=rows + 1))
        table = table.take(pa.array(keep, pa.int64()))
    else:
        shapes = [draw(st.lists(HUGE_INTS.filter(lambda v: 0 <= v < 2**63), max_size=4)) for _ in range(table.num_rows)]
        index = table.schema.get_field_index("shape")
        table = table.set_column(index, table.schema.field("shape"), pa.array(shapes, pa.list_(pa.int64())))
    out = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(meta), out, compression="zstd")
    return out.getvalue()
