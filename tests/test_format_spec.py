"""docs/FORMAT.md holds: an independent reader written from it decodes what the core writes, bit for bit.

``tests/format_reader.py`` uses pyarrow and NumPy only. Here the core writes files
covering every scheme of the table (8/4/2 bits; per tensor, per channel, every group
size; symmetric and asymmetric), the residual 2-bit lattice, every float dtype, ragged
last groups (a 32x16x3x3 conv: 144 columns) and float rows; the reader's codes, scales,
zero points, params and decoded values must equal the core's exactly (compared as bit
patterns). A naive reader that pads ragged groups in the file is shown to go wrong on
the same files, so the comparison can fail. The DuckDB queries printed in the spec run
against a real file.
"""

from __future__ import annotations

from pathlib import Path
import re

import duckdb
import numpy as np
import pytest

import arrowquant_core as aq
from arrowquant_core.model import QuantizedModel
from arrowquant_core.methods import quantize_tensor
from arrowquant_core.rotation import ROTATED_METHODS
from arrowquant_core.schemes import SCHEMES
from arrowquant_core.storage import METADATA_KEY, VERSION_KEY, _schema, MANIFEST_KEY, WRITER_KEY
from arrowquant_core.tensor import block_codes, dequantize, layout
from tests import format_reader as spec

REPO = Path(__file__).resolve().parent.parent
FORMAT_MD = REPO / "docs/FORMAT.md"
OUTSIDE = re.compile(r"(\.\./|/work/)" + "shared" + "/")  # split so this file does not match itself
DTYPES = ("float32", "float16", "bfloat16", "float64")
# shape -> why it is here
SHAPES = {
    (32, 16, 3, 3): "a conv: 144 columns, ragged last group for g32/g64/g128/g256",
    (7, 100): "a matrix with 100 columns: ragged for every group size",
    (50,): "a vector: one row",
}


def weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    for i, shape in enumerate(SHAPES):
        dtype = DTYPES[i % len(DTYPES)]
        values = rng.standard_t(4, size=shape).astype(np.float32) * 0.05
        values.reshape(-1)[:3] = [0.0, 0.0, 1.5]  # exact zeros and one outlier
        out[f"t{i}.weight"] = values.astype(aq_dtype(dtype))
    return out


def aq_dtype(name: str) -> np.dtype:
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def bits_of(array: np.ndarray) -> np.ndarray:
    """Bit patterns, so NaN payloads and -0.0 compare exactly too."""
    return np.ascontiguousarray(array).view(f"u{array.dtype.itemsize}")


def _rtn(scheme: str) -> str:
    """Round-to-nearest: on a K scheme's scale grid, its own variant."""
    return "krtn" if SCHEMES[scheme].scale_bits else "rtn"


def build_model(scheme: str, rng: np.random.Generator) -> QuantizedModel:
    tensors = {}
    floats = {}
    order = []
    for dtype in DTYPES:  # every dtype through every scheme on the ragged conv
        name = f"conv.{dtype}"
        w = (rng.standard_normal((32, 16, 3, 3)).astype(np.float32) * 0.1).astype(aq_dtype(dtype))
        tensors[name] = quantize_tensor(w, SCHEMES[scheme], name, _rtn(scheme))
        order.append(name)
    for name, w in weights(rng).items():
        tensors[name] = quantize_tensor(w, SCHEMES[scheme], name, _rtn(scheme))
        order.append(name)
    if SCHEMES[scheme].bits == 2 and SCHEMES[scheme].granularity == "group" and not SCHEMES[scheme].scale_bits:
        w = rng.standard_normal((32, 16, 3, 3)).astype(np.float32)
        tensors["conv.residual2"] = quantize_tensor(w, SCHEMES[scheme], "conv.residual2", "residual2")
        order.append("conv.residual2")
    for dtype in DTYPES:  # float rows of every dtype, a scalar among them
        name = f"bias.{dtype}"
        floats[name] = rng.standard_normal(5).astype(aq_dtype(dtype))
        order.append(name)
    floats["scalar"] = np.array(3.25, dtype=np.float32)
    order.append("scalar")
    buffers = {}  # integer and boolean buffers of every width, stored bit-exact
    for dtype in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"):
        info = np.iinfo(dtype)
        buffers[f"buffer.{dtype}"] = np.array([info.min, -1 if info.min else 1, 0, info.max], dtype=dtype)
    buffers["buffer.mask"] = np.array([[True, False], [False, True]])
    order += list(buffers)
    ties = {"lm_head.weight": "conv.float16", "bias.alias": "bias.float64"}  # a quantized and a float target
    order += list(ties)
    aux = {"timestep_groups.scales": rng.standard_normal((5, 3)).astype(np.float32),
           "timestep_groups.bounds": np.array([0, 200, 400, 600, 800, 1000], dtype=np.int64)}
    return QuantizedModel(tensors=tensors, floats=floats, order=tuple(order), metadata={"model": "spec-test"},
                          buffers=buffers, ties=ties, aux=aux)


def compare(model: QuantizedModel, path: Path) -> None:
    version, metadata, decoded = spec.read(path)
    assert version == 2 and metadata == {"model": "spec-test"}
    assert [t.name for t in decoded] == list(model.order) + list(model.aux)  # aux rows last
    core = aq.load(path)
    everything = core.dequantize()
    for t in decoded:
        if t.kind in ("float", "buffer", "aux", "tied"):
            expected = {"float": core.floats, "buffer": core.buffers, "aux": core.aux,
                        "tied": everything}[t.kind][t.name]
            assert t.dtype == expected.dtype.name and t.shape == expected.shape, t.name
            np.testing.assert_array_equal(bits_of(t.values).reshape(-1), bits_of(expected).reshape(-1),
                                          err_msg=t.name)
            continue
        qt = core.tensors[t.name]
        rows, cols, _block, _groups = layout(qt.shape, qt.scheme)
        codes = block_codes(qt)
        n_groups = _groups
        core_codes = codes.reshape(rows, n_groups * _block)[:, :cols]
        np.testing.assert_array_equal(t.codes, core_codes, err_msg=f"{t.name} {t.scheme}: codes")
        if qt.is_lattice:
            np.testing.assert_array_equal(bits_of(t.params.reshape(-1)), bits_of(qt.params))
        else:
            np.testing.assert_array_equal(bits_of(t.scales), bits_of(qt.scales), err_msg=f"{t.name}: scales")
            if qt.zeros.size:
                np.testing.assert_array_equal(t.zeros, qt.zeros)
        expected = dequantize(qt)
        assert t.shape == tuple(expected.shape)
        mismatch = np.flatnonzero(bits_of(t.values).reshape(-1) != bits_of(expected).reshape(-1))
        assert mismatch.size == 0, (f"{t.name} ({t.scheme}, {t.dtype}): {mismatch.size} values differ, "
                                    f"first at flat index {int(mismatch[0])}")


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_the_independent_reader_matches_the_core_bit_for_bit(scheme: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(sorted(SCHEMES).index(scheme))
    model = build_model(scheme, rng)
    path = aq.save(model, tmp_path / f"{scheme}.parquet")
    compare(model, path)


@pytest.mark.parametrize("method", sorted(ROTATED_METHODS))
def test_the_independent_reader_undoes_rotations_bit_for_bit(method: str, tmp_path: Path) -> None:
    """Section 6.8 read from the spec alone: the reader's own butterflies and signs give
    the core's values bit for bit, on every rotated method, at 4 and 2 bits."""
    rng = np.random.default_rng(len(method))
    tensors, order = {}, []
    for scheme in ("int4-g32-asym-k8", "int2-g32-asym-k8", "int4-g64-asym"):
        cols = 256
        w = rng.standard_normal((8, cols)).astype(np.float32)
        x = rng.standard_normal((64, cols)).astype(np.float32)
        hessian = (x.T @ x / 64).astype(np.float32)
        name = f"w.{scheme}"
        tensors[name] = quantize_tensor(w, SCHEMES[scheme], name, method, hessian)
        assert tensors[name].method == method
        order.append(name)
    model = QuantizedModel(tensors=tensors, floats={}, order=tuple(order), metadata={"model": "spec-test"})
    path = aq.save(model, tmp_path / f"{method}.parquet")
    compare(model, path)


def test_v1_files_decode_too(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    floats = {f"w.{d}": rng.standard_normal((3, 5)).astype(aq_dtype(d)) for d in DTYPES}
    floats["steps"] = np.arange(-3, 12, dtype=np.int64).reshape(3, 5)  # v1 rows may hold integers too
    floats["mask"] = np.eye(3, dtype=bool)
    path = aq.save_weights(floats, tmp_path / "v1.parquet", {"source": "test"})
    version, metadata, decoded = spec.read(path)
    assert version == 1 and metadata == {"source": "test"}
    for t in decoded:
        np.testing.assert_array_equal(bits_of(t.values), bits_of(floats[t.name]))


def naive_decode(t: spec.Tensor, row: dict[str, object]) -> np.ndarray:
    """The reader the storage docstring used to invite: every group padded to G codes in the file."""
    bits, _sym, _gran, group = spec.scheme_of(t.scheme)
    rows = t.shape[0]
    cols = int(np.prod(t.shape)) // rows
    groups = -(-cols // group)
    raw = np.frombuffer(row["codes"], dtype=np.uint8)  # type: ignore[arg-type]
    per = 8 // bits
    flat = np.stack([(raw >> (bits * k)) & ((1 << bits) - 1) for k in range(per)], axis=1).reshape(-1)
    flat = np.pad(flat, (0, max(0, rows * groups * group - flat.size)))[: rows * groups * group]
    blocks = flat.reshape(rows * groups, group).astype(np.float32)
    blocks -= t.zeros[:, None].astype(np.float32)  # type: ignore[index]
    blocks *= t.scales[:, None]  # type: ignore[index]
    return blocks.reshape(rows, groups * group)[:, :cols].reshape(t.shape)


def test_a_reader_that_pads_ragged_groups_in_the_file_is_caught(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    rng = np.random.default_rng(2)
    w = rng.standard_normal((32, 16, 3, 3)).astype(np.float32)
    qt = quantize_tensor(w, SCHEMES["int4-g64-asym"], "conv", "rtn")
    path = aq.save(QuantizedModel({"conv": qt}, {}, ("conv",)), tmp_path / "conv.parquet")
    (t,) = spec.read(path)[2]
    row = pq.read_table(path).to_pylist()[0]
    naive = naive_decode(t, row)
    right = dequantize(qt)
    np.testing.assert_array_equal(t.values, right)
    cosine = float(np.dot(naive.ravel(), right.ravel()) / np.linalg.norm(naive) / np.linalg.norm(right))
    assert not np.array_equal(naive, right) and cosine < 0.999  # silently wrong, as the issue reported


def test_checksums_are_verified_by_the_spec_reader(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(3)
    model = build_model("int8-channel-sym", rng)
    path = aq.save(model, tmp_path / "m.parquet")
    table = pq.read_table(path)
    codes = table.column("codes").to_pylist()
    codes[0] = bytes([codes[0][0] ^ 1]) + codes[0][1:]
    tampered = table.set_column(table.schema.get_field_index("codes"), "codes",
                                pa.array(codes, type=pa.large_binary()))
    pq.write_table(tampered, tmp_path / "bad.parquet")
    with pytest.raises(spec.SpecError, match="checksum mismatch"):
        spec.read(tmp_path / "bad.parquet")


def test_the_spec_names_every_column_and_metadata_key() -> None:
    text = FORMAT_MD.read_text()
    schema = _schema(2, {}, [])
    for field in schema:
        assert f"| `{field.name}` | `{str(field.type).replace('item: ', '')}` |" in text, field
    for key in (VERSION_KEY, METADATA_KEY, MANIFEST_KEY, WRITER_KEY):
        assert f"`{key.decode()}`" in text
    for scheme in ("tensor", "channel", "g{G}"):
        assert scheme in text


def duckdb_queries() -> list[str]:
    block = re.search(r"```sql\n(.*?)```", FORMAT_MD.read_text(), re.S)
    assert block is not None
    return [q.strip() for q in block.group(1).split(";") if q.strip() and not q.strip().startswith("--")
            or "SELECT" in q]


def test_the_duckdb_queries_in_the_spec_run(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    model = build_model("int4-g64-asym", rng)
    artifacts = tmp_path / "reports" / "artifacts"
    aq.save(model, artifacts / "minilm-int4.parquet")
    con = duckdb.connect()
    results = []
    for query in duckdb_queries():
        results.append(con.execute(query.replace("reports/artifacts", str(artifacts))).fetchall())
    listing, per_scheme, kv = results
    assert len(listing) == len(model.order) + len(model.aux)
    top = listing[0]
    assert top[1] == "quantized" and top[2] == "int4-g64-asym" and top[6] == max(r[6] for r in listing)
    assert {"int4-g64-asym", "float float32", "float bfloat16", "buffer int64", "buffer bool", "tied float16",
            "aux int64"} <= {r[0] for r in per_scheme}
    assert next(r for r in listing if r[0] == "lm_head.weight")[6] == 0  # a tied alias stores no values
    assert dict(kv)["arrowquant.format_version"] == "2"


def test_the_repository_stands_alone() -> None:
    """Every design note the code cites is a file in docs/; nothing cites a file outside the repository."""
    cited: set[str] = set()
    for path in [*REPO.glob("*.py"), *REPO.glob("*.toml"), *REPO.glob("arrowquant_core/*.py"),
                 *REPO.glob("harness/**/*.py"), *REPO.glob("fixtures/**/*.py"), *REPO.glob("tests/**/*.py")]:
        text = path.read_text(encoding="utf-8")
        assert not OUTSIDE.search(text), f"{path} cites a file outside the repository"
        for match in re.finditer(r"(?<![\w/])(MYPYC|STYLE|DESIGN|FORMAT)\.md", text):
            line = text[max(0, match.start() - 5):match.end()]
            assert "docs/" in line, f"{path}: cites {match.group(0)} without its docs/ path"
        cited.update(re.findall(r"docs/[A-Z]+\.md", text))
    assert cited >= {"docs/MYPYC.md", "docs/STYLE.md", "docs/FORMAT.md"}
    for doc in cited:
        assert (REPO / doc).is_file(), doc
