"""Judge a GGUF file made elsewhere: ``python -m harness run --model minilm --artifact model.gguf``.

A GGUF file quantized by llama.cpp (``convert_hf_to_gguf.py`` + ``llama-quantize``), or
by gguf-py (``harness.peers``), is read with gguf-py's ``GGUFReader``, its tensors are
mapped to the model's own names, dequantized with ``gguf.quants.dequantize`` (every
ggml type gguf-py knows, K-quants and IQ types included), checked, and handed to the
acceptance suite in place of our own quantizer's output. Sizes are the file's bytes.

Names: a tensor may carry the source checkpoint's name (as ``harness.peers`` writes
tensors no llama.cpp map knows) or llama.cpp's name for the file's
``general.architecture`` (``gguf.get_tensor_name_map``; ``blk.3.attn_q.weight`` is
``0.model.encoder.layer.3.attention.self.query.weight`` in a sentence-transformers
MiniLM). Shapes: GGUF stores dimensions reversed (``ne[0]`` is the row length), so a
tensor's reversed dims must equal the source shape.

Rules, each a ``FormatError`` naming the file, the tensor and the rule (exit 2):
every source tensor present (except the few llama.cpp's converter drops on purpose
because the architecture's graph never reads them, ``DROPPED_BY_CONVERTER``: those are
taken from the source and listed in the report), no unknown tensor, a type gguf-py can
dequantize, the data inside the file (not truncated), shapes equal, values finite.

Example::

    art = load(Path("minilm-Q4_0.gguf"), checkpoint.weights)
    art.weights, art.bytes, art.produced_by
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
import math
from pathlib import Path
import sys
import time
from typing import Any, Final, Literal

import gguf
import numpy as np
import numpy.typing as npt

from arrowquant_core.errors import ConfigurationError, FormatError
from arrowquant_core.limits import short
from arrowquant_core.model import RAW_DTYPES
from harness.peers import gguf_names

FloatArray = npt.NDArray[np.floating]
T = gguf.GGMLQuantizationType

# Source tensors llama.cpp's converter drops because the architecture's graph never
# reads them (conversion/bert.py, BertModel.filter_tensors: the BERT pooler; a
# sentence-transformers model pools token embeddings itself). Matched as name suffixes.
DROPPED_BY_CONVERTER: Final[dict[str, tuple[str, ...]]] = {
    "bert": ("pooler.dense.weight", "pooler.dense.bias"),
}
_FLOAT_TYPES: Final = frozenset({T.F32, T.F16})
# types that hold no quantized weights: floats, integer buffers, tensors taken from the source
_INTEGER_TYPES: Final = frozenset({"I8", "I16", "I32", "I64"})
_NOT_QUANTIZED: Final = frozenset({"F32", "F16", "source"}) | _INTEGER_TYPES


def dequantizable(qtype: gguf.GGMLQuantizationType) -> bool:
    """gguf-py dequantizes F32, F16 and every type with a class in gguf.quants."""
    import gguf.quants as q

    return qtype in _FLOAT_TYPES or qtype in getattr(q, "_type_traits", {})


# Most metadata keys and tensors a GGUF may declare. llama.cpp's files hold tens of keys
# and at most a few thousand tensors (a 405B model: 1,138); gguf-py builds Python objects
# for each (about 1 KB a tensor), so the caps bound what a lying header can cost.
MAX_GGUF_KEYS: Final = 65_536
MAX_GGUF_TENSORS: Final = 100_000


class _Reader(gguf.GGUFReader):
    """GGUFReader that checks every tensor's type and extent before touching its data,
    so a truncated or corrupt file names the tensor (gguf 0.19's reader would fail in a
    reshape with no name), and reads metadata arrays by their extent only.

    gguf-py turns every element of a metadata array into NumPy views of its own: an 8 MB
    file of a million empty strings took 14 s and 1.4 GB here (a real tokenizer array of
    150k tokens about 200 MB and 2 s). The harness reads only ``general.*`` scalars, so
    an array is walked for its size -- a loop over string lengths, no object per element
    -- and kept as its type and length. Overrides the private ``_build_fields``,
    ``_build_tensor_info``, ``_get_field_parts`` and ``_build_tensors`` (gguf 0.17-0.19);
    tests/test_gguf_artifact.py and the fuzz target ``gguf`` cover them."""

    path: Path

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(path)

    def _build_fields(self, offs: int, count: int) -> int:
        count = int(count)
        if count > MAX_GGUF_KEYS or count * 13 > len(self.data) - offs:  # a key: length, 1 byte, type, value
            raise FormatError(f"{self.path}: the header declares {count} metadata keys; rule: at most "
                              f"{MAX_GGUF_KEYS}, each in the file's {len(self.data)} bytes")
        out: int = super()._build_fields(offs, count)
        return out

    def _build_tensor_info(self, offs: int, count: int) -> tuple[int, list[Any]]:
        count = int(count)
        if count > MAX_GGUF_TENSORS or count * 24 > len(self.data) - offs:  # name length, dims, type, offset
            raise FormatError(f"{self.path}: the header declares {count} tensors; rule: at most "
                              f"{MAX_GGUF_TENSORS}, each described in the file's {len(self.data)} bytes")
        out: tuple[int, list[Any]] = super()._build_tensor_info(offs, count)
        return out

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list[Any], list[int], list[Any]]:
        if int(raw_type) != gguf.GGUFValueType.ARRAY:
            out: tuple[int, list[Any], list[int], list[Any]] = super()._get_field_parts(orig_offs, raw_type)
            return out
        end = self._array_end(orig_offs, 0)
        itype, length = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
        return end - orig_offs, [itype, length], [], [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType(int(itype[0]))]

    def _array_end(self, offs: int, depth: int) -> int:
        """The offset just past the metadata array at ``offs`` (type, count, elements)."""
        size = len(self.data)
        if offs + 12 > size or depth > 8:
            raise FormatError(f"{self.path}: metadata array at byte {offs} "
                              + ("nests deeper than 8 levels" if depth > 8 else "runs past the end of the file")
                              + "; rule: metadata lies inside the file")
        start = offs
        raw = int(self._get(offs, np.uint32)[0])
        count = int(self._get(offs + 4, np.uint64)[0])
        offs += 12
        try:
            kind = gguf.GGUFValueType(raw)
        except ValueError:
            raise FormatError(f"{self.path}: metadata array at byte {start} has element type {raw}, unknown to "
                              f"gguf {gguf_version()}; rule: a GGUF value type") from None
        scalar = self.gguf_scalar_to_np.get(kind)
        least = np.dtype(scalar).itemsize if scalar is not None else (8 if kind == gguf.GGUFValueType.STRING else 12)
        if count * least > size - offs:
            raise FormatError(f"{self.path}: metadata array at byte {start} declares {count} {kind.name} "
                              f"elements, more than the {size - offs} bytes left can hold; rule: metadata lies "
                              "inside the file")
        if scalar is not None:
            return offs + count * least
        if kind == gguf.GGUFValueType.ARRAY:
            for _ in range(count):
                offs = self._array_end(offs, depth + 1)
            return offs
        # strings: a uint64 length, then the bytes, walked without an object per element
        order: Literal["little", "big"] = "little" if (sys.byteorder == "little") == (self.byte_order == "I") else "big"
        view = memoryview(self.data)  # type: ignore[arg-type]
        for i in range(count):
            if offs + 8 > size:
                raise FormatError(f"{self.path}: string {i} of the metadata array at byte {start} starts past the "
                                  "end of the file; rule: metadata lies inside the file")
            offs += 8 + int.from_bytes(view[offs:offs + 8], order)
        if offs > size:
            raise FormatError(f"{self.path}: a string of the metadata array at byte {start} ends past the end of "
                              "the file; rule: metadata lies inside the file")
        return offs

    def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
        size = len(self.data)
        for f in fields:
            _len, name_data, _n_dims, dims, raw_dtype, offset = f.parts
            name = bytes(name_data).decode("utf-8", "replace")
            try:
                qtype = T(int(raw_dtype[0]))
            except ValueError:
                raise FormatError(f"{self.path}: tensor {name!r} has ggml type id {int(raw_dtype[0])}, unknown to "
                                  f"gguf {gguf_version()}; rule: a type gguf-py can dequantize") from None
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            ne = [int(d) for d in dims]
            if ne and ne[0] % block != 0:
                raise FormatError(f"{self.path}: tensor {name!r} ({qtype.name}) has rows of {ne[0]} values; rule: "
                                  f"a row must be a whole number of {block}-value blocks")
            end = start_offs + int(offset[0]) + math.prod(ne) // block * type_size
            if end > size:
                raise FormatError(f"{self.path}: tensor {name!r} needs bytes up to {end} but the file has {size}; "
                                  "rule: every tensor's data lies inside the file (truncated?)")
        super()._build_tensors(start_offs, fields)


def gguf_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("gguf")


@dataclass(frozen=True)
class GGUFArtifact:
    """A GGUF file read back as the model's weights."""

    path: Path
    bytes: int  # the file on disk
    weights: dict[str, FloatArray]  # source names, shapes and order; dequantized float32
    types: dict[str, str]  # source name -> ggml type in the file ("source" if filled)
    names: dict[str, str]  # source name -> tensor name in the file
    filled_from_source: tuple[str, ...]  # not in the file: DROPPED_BY_CONVERTER
    metadata: dict[str, Any]  # general.* fields of the file
    load_seconds: float  # read + dequantize

    @property
    def file_type(self) -> str:
        """``general.file_type`` as llama.cpp names it (MOSTLY_Q4_0), or "unknown"."""
        return file_type_name(self.metadata.get("general.file_type"))

    @property
    def main_type(self) -> str:
        """The format, in effect (``main_type``)."""
        return main_type(self.file_type, self.types.values())

    @property
    def quantized(self) -> list[str]:
        """Source names stored in a quantized ggml type (not float, not filled)."""
        return [n for n, t in self.types.items() if t not in _NOT_QUANTIZED]

    @property
    def produced_by(self) -> str:
        """What made the file, from its own metadata, for the report."""
        meta = self.metadata
        parts = [f"general.name = {meta.get('general.name', '(none)')!r}",
                 f"general.architecture = {meta.get('general.architecture', '(none)')!r}",
                 f"file type {self.file_type}", f"main tensor type {self.main_type}"]
        for key in ("general.quantized_by", "general.organization", "general.source.url",
                    "general.quantization_version"):
            if key in meta:
                parts.append(f"{key} = {meta[key]!r}")
        return "; ".join(parts)

    def bit_width(self, available: Iterable[int]) -> int:
        """The criteria section to judge the file by (``bit_width``)."""
        return bit_width(self.main_type, available, self.path)


def file_type_name(value: Any) -> str:
    """``general.file_type`` as llama.cpp names it (MOSTLY_Q4_0), or "unknown"."""
    try:
        return gguf.LlamaFileType(int(value)).name if value is not None else "unknown"
    except ValueError:
        return f"unknown ({value})"


def main_type(file_type: str, types: Iterable[str]) -> str:
    """The format, in effect: the ggml type ``general.file_type`` names (MOSTLY_Q4_K_M
    -> Q4_K) when the file holds it, else the quantized type of the most tensors. Not the
    type of the most parameters: llama.cpp stores BERT's token embeddings (half of
    MiniLM) as Q8_0 under every legacy format."""
    present = list(types)
    stem = file_type.removeprefix("MOSTLY_")
    for candidate in (stem, stem.rsplit("_", 1)[0]):
        if candidate in T.__members__ and candidate in present:
            return candidate
    counts: dict[str, int] = {}
    for t in present:
        if t not in _NOT_QUANTIZED:
            counts[t] = counts.get(t, 0) + 1
    return max(counts, key=lambda k: counts[k]) if counts else "F16/F32"


def bit_width(main: str, available: Iterable[int], path: Path) -> int:
    """The criteria section ([bits.N]) to judge a file of main type ``main`` by: the
    largest available width not above the type's nominal bits per weight (Q8_0 8.5 -> 8,
    Q4_0 4.5 -> 4, Q5_1 6.0 -> 4); the smallest available when none is below."""
    widths = sorted(set(available))
    if not widths:
        raise ConfigurationError(f"{path}: the criteria file has no [bits.N] section")
    qtype = T.__members__.get(main)
    block, size = gguf.GGML_QUANT_SIZES[qtype] if qtype is not None else (1, 2)  # no quantized tensor: F16
    nominal = size * 8 / block
    below = [b for b in widths if b <= nominal]
    return below[-1] if below else widths[0]


GGUF_MAGIC: Final = b"GGUF"


def check_gguf(path: Path) -> None:
    """``--artifact`` judges GGUF files only: ConfigurationError for a missing file or one
    that does not start with GGUF's magic (a Parquet artifact of our own, a safetensors
    checkpoint, anything else), before any model is loaded."""
    path = Path(path)
    if not path.is_file():
        raise ConfigurationError(f"--artifact {path}: no such file")
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head != GGUF_MAGIC:
        hint = ""
        if head == b"PAR1":
            hint = ("; it is a Parquet file: ArrowQuant's own artifacts are judged by running without --artifact, "
                    "which quantizes and writes them in the run")
        raise ConfigurationError(f"--artifact {path}: not a GGUF file (starts with {head!r}, not {GGUF_MAGIC!r}); "
                                 f"--artifact judges GGUF files only{hint}")


def _open(path: Path) -> _Reader:
    try:
        return _Reader(path)
    except FormatError:
        raise
    except Exception as exc:  # gguf's parser: struct/index/value errors on a bad header
        raise FormatError(f"{path}: not a complete GGUF file ({type(exc).__name__}: {exc}); rule: magic 'GGUF', "
                          "a version-3 header, metadata and tensor infos whole") from None


def header_bit_width(path: Path, available: Iterable[int]) -> tuple[int, str]:
    """The bit width to judge ``path`` by, from its header alone (no model needed), and
    how it was chosen, in words for the report."""
    reader = _open(Path(path))
    meta = _metadata(reader)
    ftype = file_type_name(meta.get("general.file_type"))
    main = main_type(ftype, [t.tensor_type.name for t in reader.tensors])
    bits = bit_width(main, available, Path(path))
    qtype = T.__members__.get(main)
    nominal = (f"{gguf.GGML_QUANT_SIZES[qtype][1] * 8 / gguf.GGML_QUANT_SIZES[qtype][0]:g} bits per weight nominal"
               if qtype is not None else "no quantized tensor")
    return bits, (f"inferred from the file: main tensor type {main} ({nominal}; file type {ftype}) -> the largest "
                  f"bit width of the criteria not above it, INT{bits}")


def _metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if key.startswith("general.") and f.types and f.types[0] != gguf.GGUFValueType.ARRAY:
            try:
                value = f.contents()
            except UnicodeDecodeError:
                raise FormatError(f"{getattr(reader, 'path', 'GGUF file')}: metadata {short(key)} is not UTF-8 "
                                  "text; rule: GGUF strings are UTF-8") from None
            out[key] = value.item() if isinstance(value, np.generic) else value
    return out


def is_buffer(array: Any) -> bool:
    """An integer or boolean buffer (position ids and the like), not a weight: every other
    dtype of a model, bfloat16 included (its NumPy kind is "V"), is a float."""
    return np.asarray(array).dtype.name in RAW_DTYPES


def load(path: Path, source: Mapping[str, FloatArray]) -> GGUFArtifact:
    """Read ``path`` as the model whose float weights are ``source`` (names, shapes, order).

    Raises FormatError (file, tensor, rule) for a file that is not a complete GGUF, a
    missing or unknown tensor, a type gguf-py cannot dequantize, a shape that differs,
    or NaN/Inf after dequantization; ConfigurationError when the file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigurationError(f"--artifact {path}: no such file")
    t0 = time.perf_counter()
    reader = _open(path)
    meta = _metadata(reader)
    arch_name = str(meta.get("general.architecture", ""))
    archs = [a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name]
    forward = gguf_names(source, archs).names if archs else {n: n for n in source}
    by_file_name: dict[str, str] = {}
    for src, mapped in forward.items():
        by_file_name.setdefault(mapped, src)
    for src in source:
        by_file_name[src] = src  # a source name always means itself
    found: dict[str, Any] = {}
    for tensor in reader.tensors:
        known = by_file_name.get(tensor.name)
        if known is None:
            raise FormatError(f"{path}: tensor {tensor.name!r} is not a tensor of the model (neither a source name "
                              f"nor llama.cpp's {arch_name or '?'} name of one); rule: no unknown tensors")
        if known in found:
            raise FormatError(f"{path}: tensors {found[known].name!r} and {tensor.name!r} both map to {known!r}; "
                              "rule: one tensor per source tensor")
        found[known] = tensor
    dropped = DROPPED_BY_CONVERTER.get(arch_name, ())
    missing = [s for s in source if s not in found]
    filled = tuple(s for s in missing if any(s == d or s.endswith("." + d) for d in dropped))
    lacking = [s for s in missing if s not in filled]
    if lacking:
        s = lacking[0]
        raise FormatError(f"{path}: lacks tensor {s!r} (llama.cpp name {forward.get(s, s)!r})"
                          + (f" and {len(lacking) - 1} more" if len(lacking) > 1 else "")
                          + "; rule: every tensor of the model is in the artifact")
    weights: dict[str, FloatArray] = {}
    types: dict[str, str] = {}
    names: dict[str, str] = {}
    for src, ref in source.items():
        if src in filled:
            weights[src] = np.asarray(ref, dtype=np.float32)
            types[src], names[src] = "source", ""
            continue
        tensor = found[src]
        qtype = tensor.tensor_type
        if is_buffer(ref):  # an integer buffer: stored exactly, or wrong (bfloat16 is a float)
            got = np.asarray(tensor.data).reshape(tuple(reversed(tensor.shape.tolist())))
            if got.shape != ref.shape or not np.array_equal(got, ref):
                raise FormatError(f"{path}: tensor {tensor.name!r} ({qtype.name}) differs from the model's integer "
                                  f"buffer {src!r}; rule: integer buffers are stored exactly")
            weights[src], types[src], names[src] = np.asarray(ref).copy(), qtype.name, tensor.name
            continue
        if not dequantizable(qtype):
            raise FormatError(f"{path}: tensor {tensor.name!r} is stored as {qtype.name}, which gguf "
                              f"{gguf_version()} cannot dequantize; rule: a float or quantized weight type")
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        if shape != tuple(ref.shape):
            raise FormatError(f"{path}: tensor {tensor.name!r} has shape {list(shape)} (GGUF dims "
                              f"{tensor.shape.tolist()} reversed) but the model's {src!r} is {list(ref.shape)}; "
                              "rule: shapes equal after llama.cpp's reversed-dims convention")
        with np.errstate(invalid="ignore", over="ignore"):  # a corrupt scale: counted just below, named
            values = np.asarray(gguf.quants.dequantize(np.asarray(tensor.data), qtype), dtype=np.float32)
        values = values.reshape(shape)
        bad = int(values.size - np.count_nonzero(np.isfinite(values)))
        if bad:
            raise FormatError(f"{path}: tensor {tensor.name!r} ({qtype.name}) dequantizes to {bad} NaN/Inf "
                              "value(s); rule: every weight finite")
        weights[src], types[src], names[src] = values, qtype.name, tensor.name
    seconds = time.perf_counter() - t0
    return GGUFArtifact(path=path, bytes=path.stat().st_size, weights=weights, types=types, names=names,
                        filled_from_source=filled, metadata=meta, load_seconds=seconds)


@dataclass(frozen=True)
class ArtifactLayer:
    """Per-tensor quality, with the fields of ``harness.context.LayerRow`` (``scheme`` is
    the ggml type), so the suite's weight gates read a GGUF like our own artifacts."""

    name: str
    scheme: str
    shape: tuple[int, ...]
    parameters: int
    cosine: float
    sqnr_db: float
    relative_error: float


def layer_rows(art: GGUFArtifact, source: Mapping[str, FloatArray]) -> list[ArtifactLayer]:
    """Every quantized tensor's quality (float tensors and filled ones excluded)."""
    from arrowquant_core.metrics import cosine, relative_error, sqnr_db

    rows = []
    for n in art.quantized:
        ref, got = np.asarray(source[n], np.float32), art.weights[n]
        rows.append(ArtifactLayer(n, art.types[n], tuple(ref.shape), int(ref.size), cosine(ref, got),
                                  sqnr_db(ref, got), relative_error(ref, got)))
    return rows


def unquantized_matrices(art: GGUFArtifact) -> list[str]:
    """Tensors of 2+ dimensions the file keeps in float (llama.cpp keeps BERT's position
    and token-type tables in F32 on purpose: the criteria decide whether that is allowed)."""
    return [n for n, t in art.types.items() if t in ("F32", "F16") and art.weights[n].ndim >= 2]


def plan_mismatches(art: GGUFArtifact) -> list[str] | None:
    """Tensors stored in another type than llama.cpp's rules give them for the file's
    ``general.file_type``: a hand-made mix or a different tool. A tensor matches when one
    of the peers of ``harness.peers.PEERS`` with that file type plans its type (the default
    mix, --pure; the legacy types' rules, the K-quant and IQ4 mixes of
    ``harness.peers.MIXES``). None when no peer has the file type (not modelled)."""
    from harness.peers import PEERS, plan

    candidates = [p for p in PEERS.values() if p.file_type.name == art.file_type]
    if not candidates:
        return None
    allowed: dict[str, set[str]] = {}
    for peer in candidates:
        for c in plan(art.weights, peer)[1]:
            allowed.setdefault(c.source, set()).add(c.ggml_type.name)
    stem = art.file_type.removeprefix("MOSTLY_")
    out = []
    for src, stored in art.types.items():
        if stored == "source" or stored in _INTEGER_TYPES:
            continue  # taken from the source, or an integer buffer (stored exactly, checked by load)
        if stored not in allowed.get(src, set()):
            out.append(f"{art.names[src]}: {stored}, llama.cpp {stem} gives "
                       f"{' or '.join(sorted(allowed.get(src, set()))) or 'nothing'}")
    return out
