"""An independent reader of the ArrowQuant Parquet format, written from docs/FORMAT.md alone.

It uses pyarrow and NumPy only and never imports ``arrowquant_core``: if the
specification leaves something out, this reader gets it wrong and
``tests/test_format_spec.py`` (which compares it with the core bit for bit) fails.
Section numbers in the comments are those of docs/FORMAT.md.
"""

from __future__ import annotations

from dataclasses import dataclass
import hashlib
import json
import math
from pathlib import Path
import re
from typing import Any

import numpy as np
import pyarrow.parquet as pq

VERSION_KEY = b"arrowquant.format_version"
METADATA_KEY = b"arrowquant.metadata"
SCHEME_NAME = re.compile(r"^int(\d+)-(tensor|channel|g(\d+))-(sym|asym)(?:-k(\d+))?$")  # section 5
SUPER_BLOCK = 256  # section 6.6: values per super-block of a K scheme
# section 4: dtype -> NumPy storage type (bfloat16 kept as its raw uint16 bit patterns)
STORAGE = {"float32": "<f4", "float16": "<f2", "float64": "<f8", "bfloat16": "<u2", "bool": "?",
           "int8": "<i1", "int16": "<i2", "int32": "<i4", "int64": "<i8",
           "uint8": "<u1", "uint16": "<u2", "uint32": "<u4", "uint64": "<u8"}
FLOATS = ("float32", "float16", "bfloat16", "float64")
ALLOWED = {"float": FLOATS, "buffer": tuple(d for d in STORAGE if d not in FLOATS), "aux": tuple(STORAGE),
           "v1": tuple(STORAGE)}


class SpecError(ValueError):
    """The file breaks a rule of the specification."""


@dataclass(frozen=True)
class Tensor:
    name: str
    kind: str                 # "quantized", "float", "buffer", "tied", "aux" ("float" for v1 rows)
    shape: tuple[int, ...]
    dtype: str
    values: np.ndarray        # decoded values in ``dtype`` (bfloat16: raw uint16 bit patterns)
    scheme: str = ""
    method: str = ""
    codes: np.ndarray | None = None   # unpacked, (rows, cols) uint8
    scales: np.ndarray | None = None  # float32, one per block
    zeros: np.ndarray | None = None   # uint8, one per block (implicit ones filled in)
    params: np.ndarray | None = None  # float32 (n_blocks, 3) for lattice methods
    tied_to: str = ""


def checksum(header: str, parts: list[bytes]) -> str:
    """Section 7: sha256(header, then per part: 8-byte little-endian length, bytes)."""
    digest = hashlib.sha256(header.encode("utf-8"))
    for part in parts:
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()


def shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def scheme_of(name: str) -> tuple[int, bool, str, int]:
    """Section 5: ``int{bits}-{tensor|channel|g{G}}-{sym|asym}[-k{S}]`` -> (bits, symmetric, granularity, G)."""
    match = SCHEME_NAME.match(name)
    if match is None:
        raise SpecError(f"scheme name {name!r} does not follow the grammar")
    bits, where, group, sym, _scale_bits = match.groups()
    granularity = "group" if group else where
    return int(bits), sym == "sym", granularity, int(group or 0)


def scale_bits_of(name: str) -> int:
    """Section 6.6: S of a ``-k{S}`` scheme (scales stored as S-bit codes), else 0."""
    match = SCHEME_NAME.match(name)
    return int(match.group(5)) if match is not None and match.group(5) else 0


def k_scales(blob: bytes, group: int, n_blocks: int, name: str) -> np.ndarray:
    """Section 6.6: int16 exponents, one per super-block, then one uint8 code per group;
    scale = 2**exponent * code, in float32."""
    per = SUPER_BLOCK // group
    n_super = -(-n_blocks // per)
    if len(blob) != 2 * n_super + n_blocks:
        raise SpecError(f"{name}: {len(blob)} scale bytes for {n_blocks} groups")
    exps = np.frombuffer(blob[:2 * n_super], dtype="<i2").astype(np.int64)
    codes = np.frombuffer(blob[2 * n_super:], dtype=np.uint8)
    step = np.ldexp(np.float32(1.0), exps[np.arange(n_blocks) // per]).astype(np.float32)
    return (step * codes.astype(np.float32)).astype(np.float32)


def layout(shape: tuple[int, ...], granularity: str, group: int) -> tuple[int, int, int, int]:
    """Section 6.1: (rows, cols, block length, groups per row)."""
    numel = math.prod(shape)
    if granularity == "tensor":
        return 1, numel, numel, 1
    rows = shape[0] if len(shape) >= 2 else 1
    cols = numel // rows if rows else 0
    if granularity == "channel":
        return rows, cols, cols, 1
    return rows, cols, group, -(-cols // group)


def unpack(packed: bytes, bits: int, count: int) -> np.ndarray:
    """Section 6.2: little-end first within each byte."""
    raw = np.frombuffer(packed, dtype=np.uint8)
    per = 8 // bits
    if raw.size != -(-count // per):
        raise SpecError(f"{raw.size} code bytes, {count} {bits}-bit codes need {-(-count // per)}")
    mask = (1 << bits) - 1
    lanes = np.stack([(raw >> (bits * k)) & mask for k in range(per)], axis=1)
    return lanes.reshape(-1)[:count].astype(np.uint8)


def to_dtype(values: np.ndarray, dtype: str) -> np.ndarray:
    """Section 8: float32 results in the tensor's original dtype (bfloat16 as uint16 bits)."""
    if dtype == "float32":
        return values
    if dtype in ("float16", "float64"):
        return values.astype(dtype)
    # bfloat16: round to nearest, ties to even, on the float32 bit pattern
    bits = values.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = np.isnan(values)
    out = rounded.astype(np.uint16)
    out[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)  # keep NaN a (quiet) NaN
    return out


def decode_raw(row: dict[str, Any], kind: str) -> Tensor:
    """Section 4: raw little-endian values in C order (float, buffer, aux and v1 rows)."""
    name, dtype, shape = row["name"], row["dtype"], tuple(row["shape"])
    data = row["data"]
    if dtype not in ALLOWED[kind]:
        raise SpecError(f"{name}: dtype {dtype} is not allowed in a {kind} row")
    header_kind = "float" if kind == "v1" else kind
    if checksum(f"{header_kind}|{name}|{shape_text(shape)}|{dtype}", [data]) != row["sha256"]:
        raise SpecError(f"{name}: checksum mismatch")
    storage = np.dtype(STORAGE[dtype])
    if len(data) != math.prod(shape) * storage.itemsize:
        raise SpecError(f"{name}: {len(data)} bytes for shape {shape} of {dtype}")
    values = np.frombuffer(data, dtype=storage).reshape(shape)
    return Tensor(name, header_kind, shape, dtype, values)


# Section 6.8: the methods whose codes are of W R, and their Hadamard block
ROTATIONS = {"iclip-h": 64, "gptq-ih": 64, "gptq-kh": 64, "gptq-khr": 64, "gptq-kh128": 128}
SIGN_SEED = 0x41515254


def unrotate(matrix: np.ndarray, block: int, name: str) -> np.ndarray:
    """Section 6.8, steps 1-3, in float32."""
    rows, cols = matrix.shape
    if cols % block:
        raise SpecError(f"{name}: {cols} columns are not a multiple of the Hadamard block {block}")
    out = matrix.astype(np.float32, copy=True)
    for start in range(0, cols, block):
        h = 1
        while h < block:
            for i in range(start, start + block):
                if (i - start) % (2 * h) < h:
                    a = out[:, i].copy()
                    b = out[:, i + h].copy()
                    out[:, i] = a + b
                    out[:, i + h] = a - b
            h *= 2
    out *= np.float32(1.0 / math.sqrt(block))
    raw = np.random.PCG64(SIGN_SEED + cols).random_raw(cols)
    out *= np.where(raw % 2 == 0, np.float32(1.0), np.float32(-1.0)).astype(np.float32)
    return out


def decode_quantized(row: dict[str, Any]) -> Tensor:
    """Sections 5-8."""
    name, dtype, shape = row["name"], row["dtype"], tuple(row["shape"])
    scheme, method = row["scheme"], row["method"]
    parts = [row["codes"], row["scales"], row["zeros"], row["params"]]
    header = f"quantized|{name}|{shape_text(shape)}|{dtype}|{scheme}|{method}"
    if checksum(header, parts) != row["sha256"]:
        raise SpecError(f"{name}: checksum mismatch")
    bits, symmetric, granularity, group = scheme_of(scheme)
    rows, cols, block, groups = layout(shape, granularity, group)
    n_blocks = rows * groups
    codes = unpack(parts[0], bits, rows * cols).reshape(rows, cols)
    # blocks: pad each row to groups * block columns (padding codes are never used)
    padded = np.zeros((rows, groups * block), dtype=np.uint8)
    padded[:, :cols] = codes
    blocks = padded.reshape(n_blocks, block)
    if method == "residual2":  # section 6.5: a lattice, not affine
        params = np.frombuffer(parts[3], dtype="<f4").astype(np.float32).reshape(n_blocks, 3)
        m, a1, a2 = params[:, 0:1], params[:, 1:2], params[:, 2:3]
        levels = np.concatenate([m - a1 - a2, m - a1 + a2, m + a1 - a2, m + a1 + a2], axis=1)
        values = np.take_along_axis(levels, blocks.astype(np.intp), axis=1).astype(np.float32)
        scales = zeros = None
    else:  # section 6.4
        params = None
        scales = (k_scales(bytes(parts[1]), group, n_blocks, name) if scale_bits_of(scheme)
                  else np.frombuffer(parts[1], dtype="<f4").astype(np.float32))
        if symmetric:
            if parts[2]:
                raise SpecError(f"{name}: a symmetric scheme stores no zero points")
            zeros = np.full(n_blocks, 1 << (bits - 1), dtype=np.uint8)
        else:
            zeros = np.frombuffer(parts[2], dtype=np.uint8)
        if scales.size != n_blocks or zeros.size != n_blocks:
            raise SpecError(f"{name}: {scales.size} scales / {zeros.size} zeros for {n_blocks} blocks")
        values = blocks.astype(np.float32)
        values -= zeros[:, None].astype(np.float32)
        values *= scales[:, None]
    matrix = values.reshape(rows, groups * block)[:, :cols]
    if method in ROTATIONS:
        matrix = unrotate(np.ascontiguousarray(matrix), ROTATIONS[method], name)
    out = to_dtype(np.ascontiguousarray(matrix).reshape(shape), dtype)
    return Tensor(name, "quantized", shape, dtype, out, scheme, method, codes, scales, zeros, params)


def read(path: Path) -> tuple[int, dict[str, str], list[Tensor]]:
    """(format version, model metadata, tensors in file order)."""
    table = pq.read_table(path)
    meta = pq.read_metadata(path).metadata or {}  # section 3: the footer's key/value metadata
    if VERSION_KEY not in meta:
        raise SpecError(f"{path}: no {VERSION_KEY!r}")
    version = int(meta[VERSION_KEY].decode("ascii"))
    metadata = json.loads(meta.get(METADATA_KEY, b"{}").decode("utf-8"))
    rows = table.to_pylist()
    tensors: list[Tensor] = []
    for row in rows:
        kind = row["kind"] if version >= 2 else "v1"
        if kind == "quantized":
            tensors.append(decode_quantized(row))
        elif kind == "tied":
            tensors.append(Tensor(row["name"], "tied", tuple(row["shape"]), row["dtype"], np.zeros(0),
                                  tied_to=row.get("tied_to") or ""))
        else:
            tensors.append(decode_raw(row, kind))
    by_name = {t.name: t for t in tensors}
    for i, t in enumerate(tensors):  # section 4: an alias decodes to its tensor's values
        if t.kind != "tied":
            continue
        target = by_name.get(t.tied_to)
        if target is None or target.kind in ("tied", "aux") or (target.shape, target.dtype) != (t.shape, t.dtype):
            raise SpecError(f"{t.name}: tied to {t.tied_to!r}, not a stored tensor of the same shape and dtype")
        header = f"tied|{t.name}|{t.tied_to}|{shape_text(t.shape)}|{t.dtype}"
        if checksum(header, []) != rows[i]["sha256"]:
            raise SpecError(f"{t.name}: checksum mismatch")
        tensors[i] = Tensor(t.name, "tied", t.shape, t.dtype, target.values, target.scheme, target.method,
                            target.codes, target.scales, target.zeros, target.params, t.tied_to)
    return version, metadata, tensors
