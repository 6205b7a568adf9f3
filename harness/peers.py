"""llama.cpp's formats as peers in the method comparison, quantized by gguf-py or by ggml.

``--compare`` puts ArrowQuant's methods beside llama.cpp's own formats on the same
tensors and the same sentences. Two quantizers, one per kind of format:

- the legacy types (Q8_0, Q5_1, Q5_0, Q4_1, Q4_0) come from ``gguf`` (gguf-py, the
  Python package maintained in the llama.cpp repository), whose ``gguf.quants.quantize``
  is a NumPy port of ggml's reference quantizers;
- the K-quants (Q6_K ... Q2_K) and IQ types (IQ4_NL, IQ4_XS, IQ3_XXS, IQ2_XS) come from
  ggml's own ``ggml_quantize_chunk`` (``harness.ggml_quant``, the library
  ``harness.ggml_build`` compiles from the llama-cpp-python sdist), with and without
  llama.cpp's importance matrix (``+imatrix``: per input column, the mean squared
  calibration activation, ``ggml_quant.importance``). Every tensor of such a file is
  quantized by ggml, fallback types included, as llama-quantize does.

Every type dequantizes with gguf-py (checked equal to ggml's own ``to_float`` in
tests/test_ggml_quant.py). The core never imports gguf: this is harness code, and
``arrowquant_core`` stays free of it.

The K-quant and IQ peers come two ways: ``<type>-pure`` (``llama-quantize --pure``: one
type for every quantizable tensor) and, for the K-quant and IQ4 file types of ``MIXES``,
llama-quantize's own mix (``Q4_K_M``, ``Q3_K_S``, ``Q2_K`` ...: ``mix_rule``, a port of
``llama_tensor_get_type_impl`` for dense models, e.g. Q4_K_M's Q6_K on the attn_v and
ffn_down of the layers ``use_more_bits`` picks). The IQ3_XXS and IQ2_XS mixes add rules
for attn_q/attn_k/token embeddings that are not ported: those two are --pure only. Both
apply ``tensor_type_fallback``: a 256-value super-block type on a row whose length is not a
multiple of 256 falls back to a 32-block type. MiniLM's hidden size is 384, so every tensor
but ``ffn_down`` (1536 columns) falls back (Q4_K -> Q5_0, Q3_K/Q2_K -> Q4_0, IQ* ->
IQ4_NL): llama.cpp cannot store MiniLM below ~4.4 bits per weight, whatever the type asked
for, and the rows say so (``ggml_types``, ``ggml_type_parameters``, ``notes``).

What makes a peer honest:

- **llama.cpp's own choice of type per tensor** (``choose_type``), checked against the
  llama.cpp sources vendored in llama-cpp-python 0.3.36: the converter
  (``conversion/base.py``, ``prepare_tensors``) keeps 1-D tensors, norms, position
  embeddings and token-type tables in F32; ``llama-quantize`` (``src/llama-quant.cpp``)
  quantizes only tensors of 2+ dimensions whose name ends in ``weight``
  (``tensor_allows_quantization``), gives the token embeddings of a model without a
  separate ``output.weight`` (tied, as every BERT: there is no LM head) the output
  tensor's type, Q6_K for every legacy type but Q8_0 (``llama_tensor_get_type_impl``),
  and demotes a type whose block does not divide the row length
  (``tensor_type_fallback``: Q6_K -> Q8_0, a 32-block type -> F16). For MiniLM the token
  embeddings have 384 columns, not a multiple of 256, so llama.cpp stores them as Q8_0
  under every format here; Q4_0 is therefore ~4.5 bits on the encoder only.
- **Sizes measured on disk**: each peer is written as a real GGUF file with
  ``gguf.GGUFWriter`` (tensors and the general.* metadata; no tokenizer, as our own
  Parquet artifact carries none) and its bytes are measured. The format's own
  arithmetic (``gguf.GGML_QUANT_SIZES``: bytes per block of weights) is reported too.
- **Same names as llama.cpp** where gguf-py's ``TensorNameMap`` knows the architecture
  (``gguf_names``), so the rules above see ``token_embd.weight`` and so on; a tensor no
  map knows (MiniLM's BERT pooler, which llama.cpp's converter drops) keeps its source
  name and is quantized by the generic rules, so both sides of the comparison carry the
  same tensors.

Example::

    from harness import peers
    result = peers.quantize(weights, peers.get_peer("Q4_0"), Path("minilm-Q4_0.gguf"))
    result.weights            # dequantized, source names and shapes
    result.bits_per_weight    # GGUF bytes on disk * 8 / parameters
    peers.quantize(weights, peers.get_peer("Q4_K-pure+imatrix"), Path("q4k.gguf"),
                   importance=ggml_quant.importances(hessians))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
import importlib.metadata
import math
import os
from pathlib import Path
import secrets
import time
from typing import Any, Final

import gguf
import numpy as np
import numpy.typing as npt

from arrowquant_core.errors import ConfigurationError, QuantizationError, unknown_name

FloatArray = npt.NDArray[np.floating]
T = gguf.GGMLQuantizationType

LABEL_PREFIX: Final = "llama.cpp "
SCHEME: Final = "gguf"  # the "scheme" of a peer row in the comparison table


# llama_ftype -> its default ggml type (llama_ftype_get_default_type), for the mixes modelled
_F = gguf.LlamaFileType
MIXES: Final[dict[gguf.LlamaFileType, gguf.GGMLQuantizationType]] = {
    _F.MOSTLY_Q2_K: T.Q2_K, _F.MOSTLY_Q3_K_S: T.Q3_K, _F.MOSTLY_Q3_K_M: T.Q3_K, _F.MOSTLY_Q3_K_L: T.Q3_K,
    _F.MOSTLY_Q4_K_S: T.Q4_K, _F.MOSTLY_Q4_K_M: T.Q4_K, _F.MOSTLY_Q5_K_S: T.Q5_K, _F.MOSTLY_Q5_K_M: T.Q5_K,
    _F.MOSTLY_Q6_K: T.Q6_K, _F.MOSTLY_IQ4_NL: T.IQ4_NL, _F.MOSTLY_IQ4_XS: T.IQ4_XS,
}


GGUF_PY: Final = "gguf-py"  # quantizers of a peer: gguf.quants.quantize (NumPy) ...
GGML: Final = "ggml"  # ... or ggml_quantize_chunk (harness.ggml_quant)
IMATRIX_SUFFIX: Final = "+imatrix"
IMATRIX_ENTRIES_KEY: Final = "quantize.imatrix.entries_count"


@dataclass(frozen=True)
class PeerFormat:
    """One llama.cpp format a comparison can list (``peers = ["Q4_0"]`` in criteria).

    ``name`` is llama.cpp's own spelling (``llama-quantize`` and the GGUF type name);
    ``file_type`` the ``general.file_type`` llama-quantize writes for that mix. ``pure``
    is ``llama-quantize --pure``: every quantizable tensor in the file type, the token
    embeddings included (named ``<type>-pure``). ``quantizer``: ``GGUF_PY`` or ``GGML``.
    ``imatrix``: llama-quantize ``--imatrix`` (named ``...+imatrix``): every tensor with
    calibration activations is quantized with its importance matrix.
    """

    name: str
    ggml_type: gguf.GGMLQuantizationType
    file_type: gguf.LlamaFileType
    description: str
    pure: bool = False
    quantizer: str = GGUF_PY
    imatrix: bool = False

    def __post_init__(self) -> None:
        stem = self.file_type.name.removeprefix("MOSTLY_") if self.is_mix else self.ggml_type.name
        expected = stem + ("-pure" if self.pure else "") + (IMATRIX_SUFFIX if self.imatrix else "")
        if self.is_mix and MIXES.get(self.file_type) != self.ggml_type:
            raise ConfigurationError(f"peer {self.name!r}: llama-quantize's {self.file_type.name} mix is not modelled "
                                     f"with default type {self.ggml_type.name} (modelled: "
                                     f"{sorted(f.name for f in MIXES)})")
        if self.name != expected:
            raise ConfigurationError(f"peer {self.name!r}: ggml type {self.ggml_type.name}, pure={self.pure}, "
                                     f"imatrix={self.imatrix}: the name must be {expected!r}")
        if self.quantizer == GGUF_PY:
            if self.ggml_type not in _QUANTIZABLE or self.imatrix:
                raise ConfigurationError(f"peer {self.name!r}: gguf {_GGUF_VERSION} cannot quantize "
                                         f"{self.ggml_type.name}{' with an importance matrix' if self.imatrix else ''}"
                                         " in NumPy (quantizer = ggml can)")
        elif self.quantizer == GGML:
            if self.ggml_type in NEEDS_IMATRIX and not self.imatrix:
                raise ConfigurationError(f"peer {self.name!r}: llama-quantize refuses {self.ggml_type.name} without "
                                         "an importance matrix (tensor_requires_imatrix); name it "
                                         f"{self.name + IMATRIX_SUFFIX!r}")
        else:
            raise ConfigurationError(f"peer {self.name!r}: quantizer {self.quantizer!r}, not {GGUF_PY!r} or {GGML!r}")

    @property
    def is_mix(self) -> bool:
        """llama-quantize's own per-tensor mix for the file type (``mix_rule``): a ggml peer
        that is not --pure (the gguf-py peers model the legacy types' rules in choose_type)."""
        return self.quantizer == GGML and not self.pure

    @property
    def label(self) -> str:
        """The method name of this peer's row in the comparison and the report."""
        return LABEL_PREFIX + self.name

    @property
    def block_size(self) -> int:
        return int(gguf.GGML_QUANT_SIZES[self.ggml_type][0])

    @property
    def type_size(self) -> int:
        return int(gguf.GGML_QUANT_SIZES[self.ggml_type][1])

    @property
    def nominal_bits_per_weight(self) -> float:
        """Bits per weight of a tensor stored in this type: block bytes * 8 / block."""
        return self.type_size * 8 / self.block_size


def _quantizable() -> frozenset[gguf.GGMLQuantizationType]:
    """Types gguf-py quantizes in NumPy (a class defining ``quantize_blocks``)."""
    import gguf.quants as q

    traits: dict[gguf.GGMLQuantizationType, Any] = getattr(q, "_type_traits", {})
    return frozenset({T.F32, T.F16} | {t for t, cls in traits.items() if "quantize_blocks" in vars(cls)})


_GGUF_VERSION: Final = importlib.metadata.version("gguf")
_QUANTIZABLE: Final = _quantizable()
# tensor_requires_imatrix (src/llama-quant.cpp): llama-quantize refuses these target types
# without an importance matrix (token embeddings and the output excepted)
NEEDS_IMATRIX: Final = frozenset({T.IQ3_XXS, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_M, T.IQ1_S})
_LLAMA_CPP_PYTHON: Final = "0.3.36"  # harness.ggml_build.VERSION (not imported: it would pull the build module in)


def _ggml_pure(qtype: gguf.GGMLQuantizationType, file_type: gguf.LlamaFileType, what: str,
               imatrix: bool) -> PeerFormat:
    name = f"{qtype.name}-pure" + (IMATRIX_SUFFIX if imatrix else "")
    how = ("; with the importance matrix of the calibration sentences" if imatrix else "; no importance matrix")
    return PeerFormat(name, qtype, file_type, f"{what} (ggml, --pure{how})", pure=True, quantizer=GGML,
                      imatrix=imatrix)


def _ggml_mix(file_type: gguf.LlamaFileType, imatrix: bool) -> PeerFormat:
    stem = file_type.name.removeprefix("MOSTLY_")
    how = "with the importance matrix of the calibration sentences" if imatrix else "no importance matrix"
    return PeerFormat(stem + (IMATRIX_SUFFIX if imatrix else ""), MIXES[file_type], file_type,
                      f"llama-quantize's {stem} mix: {MIXES[file_type].name} with its per-tensor rules (ggml; {how})",
                      quantizer=GGML, imatrix=imatrix)


def _ggml_rows() -> tuple[PeerFormat, ...]:
    """The K-quant and IQ peers: each --pure, with and without imatrix where allowed.
    Layouts from ggml-common.h (block_q*_K, block_iq*) and ggml-quants.c's grids."""
    F = gguf.LlamaFileType
    kinds = (
        (T.Q6_K, F.MOSTLY_Q6_K, "6-bit codes, 8-bit scale per 16, FP16 super-scale per 256"),
        (T.Q5_K, F.MOSTLY_Q5_K_S, "5-bit codes, 6-bit scale and min per 32, FP16 super-scales per 256"),
        (T.Q4_K, F.MOSTLY_Q4_K_S, "4-bit codes, 6-bit scale and min per 32, FP16 super-scales per 256"),
        (T.Q3_K, F.MOSTLY_Q3_K_S, "3-bit codes, 6-bit scale per 16, FP16 super-scale per 256"),
        (T.Q2_K, F.MOSTLY_Q2_K, "2-bit codes, 4-bit scale and min per 16, FP16 super-scales per 256"),
        (T.IQ4_NL, F.MOSTLY_IQ4_NL, "4-bit codes on a non-uniform 16-value grid, FP16 scale per 32"),
        (T.IQ4_XS, F.MOSTLY_IQ4_XS, "IQ4_NL's grid, 6-bit scale per 32, FP16 super-scale per 256"),
        (T.IQ3_XXS, F.MOSTLY_IQ3_XXS, "groups of 4 from a 256-entry grid plus signs, 4-bit scale per 32"),
        (T.IQ2_XS, F.MOSTLY_IQ2_XS, "groups of 8 from a 512-entry E8-lattice grid plus signs, 4-bit scale per 16"),
    )
    pure = tuple(_ggml_pure(q, f, what, imatrix) for q, f, what in kinds for imatrix in (False, True)
                 if imatrix or q not in NEEDS_IMATRIX)
    return pure + tuple(_ggml_mix(f, imatrix) for f in MIXES for imatrix in (False, True))

# The one table of peer formats. CLI choices, criteria validation and report labels
# derive from it. Layouts are ggml's (ggml-common.h block_q*); gguf-py's quantizers
# are ports of ggml's quantize_row_q*_ref.
_ROWS: Final[tuple[PeerFormat, ...]] = (
    PeerFormat("Q8_0", T.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0,
               "8-bit codes, one FP16 scale per block of 32 (symmetric, absmax / 127)"),
    PeerFormat("Q5_1", T.Q5_1, gguf.LlamaFileType.MOSTLY_Q5_1,
               "5-bit codes, FP16 scale and minimum per block of 32 (asymmetric, min/max range)"),
    PeerFormat("Q5_0", T.Q5_0, gguf.LlamaFileType.MOSTLY_Q5_0,
               "5-bit codes, one FP16 scale per block of 32 (symmetric, signed absmax / -16)"),
    PeerFormat("Q4_1", T.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1,
               "4-bit codes, FP16 scale and minimum per block of 32 (asymmetric, min/max range)"),
    PeerFormat("Q4_0", T.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0,
               "4-bit codes, one FP16 scale per block of 32 (symmetric, signed absmax / -8)"),
    # --pure: the same codes on the token embeddings too (llama.cpp's default keeps them
    # at Q6_K/Q8_0, half of MiniLM's parameters), so the size is near the nominal bits
    PeerFormat("Q4_1-pure", T.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1,
               "Q4_1 on every quantizable tensor, token embeddings included (llama-quantize --pure)", pure=True),
    PeerFormat("Q4_0-pure", T.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0,
               "Q4_0 on every quantizable tensor, token embeddings included (llama-quantize --pure)", pure=True),
    *_ggml_rows(),
)
PEERS: Final[dict[str, PeerFormat]] = {p.name: p for p in _ROWS}


def get_peer(name: str) -> PeerFormat:
    """A peer format by llama.cpp's name (``"Q4_0"``); unknown: "did you mean"."""
    if name not in PEERS:
        raise unknown_name("peer format", name, PEERS)
    return PEERS[name]


# --- llama.cpp's names --------------------------------------------------------------

# Architectures whose gguf-py name maps are tried, in order, on a checkpoint's names;
# the one that maps the most tensors wins (BERT: sentence-transformers encoders;
# QWEN2 and LLAMA: the causal/diffusion LMs the project's runners cover).
ARCHITECTURES: Final[tuple[gguf.MODEL_ARCH, ...]] = (gguf.MODEL_ARCH.BERT, gguf.MODEL_ARCH.QWEN2,
                                                      gguf.MODEL_ARCH.LLAMA)
_SUFFIXES: Final = (".weight", ".bias")


@dataclass(frozen=True)
class NameMap:
    """Source tensor name -> GGUF name, for the architecture that mapped the most."""

    architecture: str | None  # gguf-py's name ("bert"), None when no map knows the names
    names: dict[str, str]  # every source name; unmapped ones map to themselves

    @property
    def unmapped(self) -> list[str]:
        return [s for s, g in self.names.items() if s == g]


# Leading components a wrapper puts before the Hugging Face names: sentence-transformers
# prefixes its module index and the attribute holding the HF model ("0.model." in v5,
# "0.auto_model." before). Only these are stripped: stripping any prefix would map
# "pooler.dense.weight" through "dense.weight" to BERT's classifier head.
_WRAPPER_PARTS: Final = frozenset({"model", "auto_model"})


def _map_one(tmap: gguf.TensorNameMap, name: str) -> str | None:
    """Try the name, then without each leading wrapper component in turn."""
    parts = name.split(".")
    for i in range(len(parts)):
        got = tmap.get_name(".".join(parts[i:]), try_suffixes=_SUFFIXES)
        if got is not None:
            return str(got)
        if not (parts[i].isdecimal() or parts[i] in _WRAPPER_PARTS):
            return None
    return None


def gguf_names(names: Iterable[str], architectures: Iterable[gguf.MODEL_ARCH] = ARCHITECTURES) -> NameMap:
    """llama.cpp's GGUF names for a checkpoint's tensors (``gguf.get_tensor_name_map``).

    >>> gguf_names(["0.model.encoder.layer.3.attention.self.query.weight"]).names
    {'0.model.encoder.layer.3.attention.self.query.weight': 'blk.3.attn_q.weight'}
    """
    names = list(names)
    numbers = [int(p) for n in names for p in n.split(".") if p.isdecimal()]
    n_blocks = min(max(numbers, default=0) + 1, 4096)
    best: tuple[int, str | None, dict[str, str]] = (0, None, {})
    for arch in architectures:
        tmap = gguf.get_tensor_name_map(arch, n_blocks)
        mapped = {n: g for n in names if (g := _map_one(tmap, n)) is not None}
        if len(set(mapped.values())) != len(mapped):
            continue  # two source tensors would share one GGUF name: not this architecture
        if len(mapped) > best[0]:
            best = (len(mapped), gguf.MODEL_ARCH_NAMES[arch], mapped)
    _count, arch_name, mapped = best
    out = {n: mapped.get(n, n) for n in names}
    clash = sorted({g for g in out.values() if list(out.values()).count(g) > 1})
    if clash:
        raise ConfigurationError(f"tensor names {clash[:3]} are both source names and llama.cpp names of "
                                 "other tensors; cannot name the GGUF tensors unambiguously")
    return NameMap(arch_name, out)


# --- llama.cpp's choice of type per tensor -------------------------------------------

_F32_BY_CONVERTER: Final = tuple(gguf.TENSOR_NAMES[t] + ".weight" for t in (
    gguf.MODEL_TENSOR.POS_EMBD, gguf.MODEL_TENSOR.TOKEN_TYPES))
_KEPT_BY_QUANTIZE: Final = ("_norm.weight", "ffn_gate_inp.weight", "ssm_conv1d")
TOKEN_EMBD: Final = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"
OUTPUT: Final = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight"
# tensor_type_fallback in llama-quant.cpp: a 256-block type demoted to a 32-block one
_FALLBACK: Final[dict[gguf.GGMLQuantizationType, gguf.GGMLQuantizationType]] = {
    T.Q6_K: T.Q8_0, T.Q5_K: T.Q5_1, T.Q4_K: T.Q5_0, T.Q3_K: T.Q4_0, T.Q2_K: T.Q4_0,
    T.IQ4_XS: T.IQ4_NL, T.IQ3_S: T.IQ4_NL, T.IQ3_XXS: T.IQ4_NL, T.IQ2_S: T.IQ4_NL,
    T.IQ2_XS: T.IQ4_NL, T.IQ2_XXS: T.IQ4_NL, T.IQ1_M: T.IQ4_NL, T.IQ1_S: T.IQ4_NL,
}


@dataclass(frozen=True)
class TensorChoice:
    source: str
    gguf_name: str
    shape: tuple[int, ...]  # numpy order (source); GGUF stores it reversed (ne[0] = last)
    ggml_type: gguf.GGMLQuantizationType
    reason: str


def _block(qtype: gguf.GGMLQuantizationType) -> int:
    return int(gguf.GGML_QUANT_SIZES[qtype][0])


MixRule = Callable[[str], "tuple[gguf.GGMLQuantizationType, str] | None"]


def choose_type(gguf_name: str, shape: tuple[int, ...], base: gguf.GGMLQuantizationType,
                tied_embeddings: bool, pure: bool = False,
                mix: MixRule | None = None) -> tuple[gguf.GGMLQuantizationType, str]:
    """The type llama.cpp gives one tensor when a model is converted to F32/F16 and then
    ``llama-quantize``d to ``base`` (no imatrix; ``pure``: --pure), with the reason.
    ``mix``: a K-quant mix's per-tensor rule (``mix_rule``) for the other tensors.

    >>> choose_type("token_embd.weight", (30522, 384), T.Q4_0, True)[0].name
    'Q8_0'
    """
    # conversion (convert_hf_to_gguf.py, ModelBase.prepare_tensors)
    if len(shape) <= 1:
        return T.F32, "1-D: F32 (converter)"
    if gguf_name.endswith("_norm.weight"):
        return T.F32, "norm: F32 (converter)"
    if gguf_name in _F32_BY_CONVERTER:
        return T.F32, "position / token-type table: F32 (converter; llama-quantize keeps it)"
    if not gguf_name.endswith("weight"):
        return T.F32, "not a weight: F32 (converter)"
    if any(k in gguf_name for k in _KEPT_BY_QUANTIZE):
        return T.F32, "kept in float by llama-quantize (tensor_allows_quantization)"
    # llama-quantize (llama-quant.cpp, llama_tensor_get_type_impl)
    qtype, reason = base, f"{base.name} (the file type)"
    ncols = shape[-1]
    if not pure and (gguf_name == OUTPUT or (tied_embeddings and gguf_name == TOKEN_EMBD)):
        if ncols % _block(base) != 0:
            qtype, reason = T.Q8_0, "output / tied token embeddings with a row not a multiple of the block: Q8_0"
        elif base != T.Q8_0:
            qtype, reason = T.Q6_K, "output / tied token embeddings (no output.weight): Q6_K"
        else:
            reason = "output / tied token embeddings: Q8_0"
    elif not pure and mix is not None:
        ruled = mix(gguf_name)
        if ruled is not None:
            qtype, reason = ruled
    # tensor_type_fallback: the block must divide the row (applies under --pure too)
    if ncols % _block(qtype) != 0:
        demoted = _FALLBACK.get(qtype, qtype)
        if ncols % _block(demoted) != 0:
            demoted = T.F16
        reason += f"; {ncols} columns not a multiple of {_block(qtype)}: falls back to {demoted.name}"
        qtype = demoted
    return qtype, reason


# Integer and boolean buffers (token-type ids, masks) are stored exactly, never quantized:
# GGUF's integer types, the narrowest that holds the numpy dtype without loss.
_INTEGER_TYPES: Final[dict[str, gguf.GGMLQuantizationType]] = {
    "int8": T.I8, "int16": T.I16, "int32": T.I32, "int64": T.I64,
    "bool": T.I8, "uint8": T.I16, "uint16": T.I32, "uint32": T.I64,
}
_NUMPY_OF: Final[dict[gguf.GGMLQuantizationType, type[np.generic]]] = {
    T.I8: np.int8, T.I16: np.int16, T.I32: np.int32, T.I64: np.int64}


def parameter_count(weights: Mapping[str, npt.NDArray[Any]]) -> int:
    """Floating-point parameters (integer buffers are not weights)."""
    return sum(int(a.size) for a in weights.values() if np.asarray(a).dtype.kind == "f")


# --- llama-quantize's K-quant mixes ------------------------------------------------------

def _category(gguf_name: str) -> str:
    """tensor_get_category (llama-quant.cpp): substring tests, in its order."""
    if gguf_name == OUTPUT:
        return "output"
    if gguf_name == TOKEN_EMBD:
        return "token_embd"
    for key in ("attn_qkv.weight", "attn_kv_b.weight", "attn_v.weight", "attn_k.weight", "attn_q.weight",
                "attn_output.weight", "ffn_up", "ffn_gate", "ffn_down"):
        if key in gguf_name:
            return key.removesuffix(".weight")
    return "other"


def _use_more_bits(i: int, n: int) -> bool:
    """llama-quant.cpp's use_more_bits: the first and last eighth, and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def mix_rule(file_type: gguf.LlamaFileType, names: Iterable[str], has_imatrix: bool) -> MixRule:
    """llama_tensor_get_type_impl for the K-quant and IQ4 mixes of ``MIXES``, as it runs on
    a dense model (no experts, n_gqa < 4, not Falcon, not a 70B: each of those adds rules
    not modelled here; BERT, MiniLM's architecture, is none of them). Called once per
    tensor in file order (the rules count attn_v and ffn_down tensors as llama.cpp does).
    Returns None where the mix keeps the file type."""
    names = list(names)
    n_attn_v = sum(1 for n in names if _category(n) in ("attn_v", "attn_qkv", "attn_kv_b"))
    n_layer = 1 + max((int(n.split(".")[1]) for n in names if n.startswith("blk.") and n.split(".")[1].isdecimal()),
                      default=-1)
    counters = {"attn_v": 0, "ffn_down": 0}
    ft = file_type

    def rule(gguf_name: str) -> tuple[gguf.GGMLQuantizationType, str] | None:
        cat = _category(gguf_name)
        out: gguf.GGMLQuantizationType | None = None
        if cat in ("attn_v", "attn_qkv", "attn_kv_b"):
            i = counters["attn_v"]
            counters["attn_v"] += 1
            if ft == _F.MOSTLY_Q2_K:
                out = T.Q3_K
            elif ft == _F.MOSTLY_Q3_K_M:
                out = T.Q5_K if i < 2 else T.Q4_K
            elif ft == _F.MOSTLY_Q3_K_L:
                out = T.Q5_K
            elif ft in (_F.MOSTLY_Q4_K_M, _F.MOSTLY_Q5_K_M) and _use_more_bits(i, n_attn_v):
                out = T.Q6_K
            elif ft == _F.MOSTLY_Q4_K_S and i < 4:
                out = T.Q5_K
            where = f"attn_v #{i} of {n_attn_v}"
        elif cat == "ffn_down":
            i = counters["ffn_down"]
            counters["ffn_down"] += 1
            if ft == _F.MOSTLY_Q2_K:
                out = T.Q3_K
            elif ft == _F.MOSTLY_Q3_K_M:
                out = T.Q5_K if i < n_layer // 16 else T.Q4_K
            elif ft == _F.MOSTLY_Q3_K_L:
                out = T.Q5_K
            elif ft == _F.MOSTLY_Q4_K_M:
                out = T.Q6_K if _use_more_bits(i, n_layer) else None
            elif ft in (_F.MOSTLY_IQ4_NL, _F.MOSTLY_IQ4_XS) and i < n_layer // 8 and not has_imatrix:
                out = T.Q5_K
            elif ft == _F.MOSTLY_Q5_K_M and _use_more_bits(i, n_layer):
                out = T.Q6_K
            elif ft == _F.MOSTLY_Q4_K_S and i < n_layer // 8:
                out = T.Q5_K
            where = f"ffn_down of layer {i} of {n_layer}"
        elif cat == "attn_output":
            out = {_F.MOSTLY_Q2_K: T.Q3_K, _F.MOSTLY_Q3_K_M: T.Q4_K, _F.MOSTLY_Q3_K_L: T.Q5_K}.get(ft)
            where = "attn_output"
        if out is None:
            return None
        return out, f"{out.name} ({ft.name.removeprefix('MOSTLY_')} mix: {where})"
    return rule


def plan(weights: Mapping[str, FloatArray], peer: PeerFormat) -> tuple[NameMap, list[TensorChoice]]:
    """Every tensor's GGUF name and llama.cpp type for ``peer``."""
    names = gguf_names(weights)
    tied = OUTPUT not in names.names.values()
    mix = mix_rule(peer.file_type, names.names.values(), peer.imatrix) if peer.is_mix else None
    choices = []
    for source, array in weights.items():
        shape = tuple(int(d) for d in array.shape)
        if np.asarray(array).dtype.kind != "f":
            dtype = np.asarray(array).dtype.name
            if dtype not in _INTEGER_TYPES:
                raise QuantizationError(f"tensor {source!r}: dtype {dtype} has no GGUF type")
            choices.append(TensorChoice(source, names.names[source], shape, _INTEGER_TYPES[dtype],
                                        f"integer buffer ({dtype}): stored exactly"))
            continue
        qtype, reason = choose_type(names.names[source], shape, peer.ggml_type, tied, peer.pure, mix)
        choices.append(TensorChoice(source, names.names[source], shape, qtype, reason))
    return names, choices


# --- quantize, write, dequantize --------------------------------------------------------


@dataclass(frozen=True)
class PeerResult:
    """One peer applied to a weight dict: dequantized weights plus every size."""

    peer: PeerFormat
    weights: dict[str, FloatArray]  # dequantized, source names, shapes and order
    tensors: tuple[TensorChoice, ...]
    architecture: str | None
    path: Path
    file_bytes: int  # the GGUF file on disk
    tensor_bytes: int  # tensor data by the format's block sizes (GGML_QUANT_SIZES)
    parameters: int
    quantize_seconds: float  # gguf.quants.quantize over every tensor; not writing
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def bits_per_weight(self) -> float:
        """GGUF bytes on disk * 8 / parameters: the same measure as our artifacts'."""
        return self.file_bytes * 8 / self.parameters

    @property
    def format_bits_per_weight(self) -> float:
        """Tensor data alone, from the formats' block sizes (no header, no padding)."""
        return self.tensor_bytes * 8 / self.parameters

    def type_parameters(self) -> dict[str, int]:
        """Parameters stored in each ggml type (MiniLM: where the K-quant's share went)."""
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.ggml_type.name] = out.get(t.ggml_type.name, 0) + math.prod(t.shape)
        return dict(sorted(out.items()))

    def type_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.ggml_type.name] = out.get(t.ggml_type.name, 0) + 1
        return dict(sorted(out.items()))


def _nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // int(block) * int(size)


def write_gguf(path: Path, tensors: list[tuple[str, npt.NDArray[Any], gguf.GGMLQuantizationType]],
               architecture: str, metadata: Mapping[str, str | int]) -> int:
    """Write a GGUF file (atomically: temp file + rename) and return its bytes on disk.

    ``tensors`` holds (GGUF name, data as gguf.quants.quantize returned it, type).
    String metadata goes in as strings, ints as uint32 (general.file_type's type).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    writer = gguf.GGUFWriter(tmp, architecture)
    try:
        for key, value in metadata.items():
            if isinstance(value, int):
                writer.add_uint32(key, value)
            else:
                writer.add_string(key, value)
        for name, data, qtype in tensors:
            raw = qtype if data.dtype == np.uint8 else None
            writer.add_tensor(name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path.stat().st_size


def _fallback_note(stored: list[TensorChoice], peer: PeerFormat) -> list[str]:
    """One note per fallback type: how many tensors (and parameters) llama.cpp could not
    store in the peer's type because their rows are not whole super-blocks."""
    by_type: dict[str, list[TensorChoice]] = {}
    for c in stored:
        if "falls back" in c.reason:
            by_type.setdefault(c.ggml_type.name, []).append(c)
    return [f"{len(cs)} tensors ({sum(math.prod(c.shape) for c in cs):,} parameters) have rows not a multiple of "
            f"{_block(peer.ggml_type)}: llama.cpp stores them as {t} (tensor_type_fallback)"
            for t, cs in sorted(by_type.items())]


def _quantize_tensor(array: FloatArray, c: TensorChoice, peer: PeerFormat,
                     importance: Mapping[str, FloatArray] | None) -> npt.NDArray[Any]:
    """One tensor's stored data, by the peer's quantizer (floats are only converted)."""
    if peer.quantizer == GGUF_PY or c.ggml_type in (T.F32, T.F16):
        return gguf.quants.quantize(array, c.ggml_type)
    from harness import ggml_quant

    imp = importance.get(c.source) if importance is not None else None
    if imp is None and c.ggml_type in NEEDS_IMATRIX and c.gguf_name not in (TOKEN_EMBD, OUTPUT):
        raise QuantizationError(f"tensor {c.source!r} ({c.gguf_name}): llama-quantize needs an importance matrix for "
                                f"{c.ggml_type.name} and the calibration captured none for this tensor")
    return ggml_quant.quantize(array.reshape(-1, array.shape[-1]), c.ggml_type, imp, c.source)


def quantizer_name(peer: PeerFormat) -> str:
    """What quantized a peer's tensors, for the file's general.quantized_by and the report."""
    if peer.quantizer == GGUF_PY:
        return f"gguf-py {_GGUF_VERSION}"
    return f"ggml (ggml_quantize_chunk, llama-cpp-python {_LLAMA_CPP_PYTHON} sdist)"


def quantize(weights: Mapping[str, FloatArray], peer: PeerFormat, path: Path, *,
             model_name: str = "model", importance: Mapping[str, FloatArray] | None = None) -> PeerResult:
    """Quantize ``weights`` the way llama.cpp would for ``peer``, write the GGUF file to
    ``path``, and dequantize (in memory, gguf-py's reference dequantizers).

    ``importance``: llama-imatrix's per-column importance of each calibrated tensor
    (source names, ``ggml_quant.importances``); required by a ``+imatrix`` peer, ignored
    otherwise (a peer without it is quantized as llama-quantize without --imatrix)."""
    if peer.imatrix and not importance:
        raise ConfigurationError(f"peer {peer.name!r} needs an importance matrix (calibration activations of the "
                                 "model's Linear layers); the model's runner captured none")
    used = importance if peer.imatrix else None
    names, choices = plan(weights, peer)
    notes: list[str] = []
    stored: list[TensorChoice] = []
    for c in choices:
        if peer.quantizer == GGUF_PY and c.ggml_type not in _QUANTIZABLE and c.ggml_type not in _NUMPY_OF:
            # e.g. Q6_K for tied token embeddings whose rows are a multiple of 256
            notes.append(f"{c.source}: llama.cpp uses {c.ggml_type.name}, which gguf {_GGUF_VERSION} cannot "
                         "quantize; stored as Q8_0 (larger) instead")
            c = TensorChoice(c.source, c.gguf_name, c.shape, T.Q8_0, c.reason + "; Q8_0 in place of it (gguf-py)")
        stored.append(c)
    if peer.quantizer == GGML:
        notes += _fallback_note(stored, peer)
        if used is not None:
            with_imatrix = [c for c in stored if c.source in used and c.ggml_type not in _NUMPY_OF
                            and c.ggml_type not in (T.F32, T.F16)]
            notes.append(f"importance matrix on {len(with_imatrix)} of "
                         f"{sum(1 for c in stored if c.ggml_type not in (T.F32, T.F16) and c.ggml_type not in _NUMPY_OF)}"
                         " quantized tensors (the embedding tables are read by lookup, not a matmul: llama-imatrix "
                         "records none for them)")
    t0 = time.perf_counter()
    data = []
    for c in stored:
        if c.ggml_type in _NUMPY_OF:
            data.append(np.asarray(weights[c.source]).astype(_NUMPY_OF[c.ggml_type]))
            continue
        array = np.asarray(weights[c.source], dtype=np.float32)
        try:
            data.append(_quantize_tensor(array, c, peer, used))
        except QuantizationError:
            raise
        except Exception as exc:  # gguf.QuantError or a shape problem: name the tensor
            raise QuantizationError(f"tensor {c.source!r} ({c.gguf_name}, shape {list(c.shape)}): "
                                    f"{quantizer_name(peer)} could not quantize it as {c.ggml_type.name}: "
                                    f"{exc}") from None
    seconds = time.perf_counter() - t0
    arch = names.architecture or "unknown"
    how = ", --pure" if peer.pure else ""
    how += f", imatrix of {len(used)} tensors" if used is not None else ""
    metadata: dict[str, str | int] = {
        gguf.Keys.General.NAME: model_name,
        gguf.Keys.General.QUANTIZED_BY: f"{quantizer_name(peer)} (ArrowQuant harness.peers, llama.cpp rules{how})",
        gguf.Keys.General.FILE_TYPE: int(peer.file_type),
        gguf.Keys.General.QUANTIZATION_VERSION: int(gguf.GGML_QUANT_VERSION),
    }
    if used is not None:  # the key llama-quantize writes with --imatrix (LLM_KV_QUANTIZE_IMATRIX_N_ENTRIES)
        metadata[IMATRIX_ENTRIES_KEY] = len(used)
    file_bytes = write_gguf(path, [(c.gguf_name, d, c.ggml_type) for c, d in zip(stored, data)], arch, metadata)
    out: dict[str, FloatArray] = {}
    for c, d in zip(stored, data):
        if c.ggml_type in _NUMPY_OF:
            out[c.source] = np.asarray(weights[c.source]).copy()  # stored exactly
            continue
        out[c.source] = np.asarray(gguf.quants.dequantize(d, c.ggml_type), dtype=np.float32).reshape(c.shape)
    return PeerResult(peer=peer, weights=out, tensors=tuple(stored), architecture=names.architecture, path=path,
                      file_bytes=file_bytes, tensor_bytes=sum(_nbytes(c.shape, c.ggml_type) for c in stored),
                      parameters=parameter_count(weights),
                      quantize_seconds=seconds, notes=tuple(notes))


# --- rows of the method comparison --------------------------------------------------------


def weight_sqnr_db(source: Mapping[str, FloatArray], candidate: Mapping[str, FloatArray]) -> float:
    """SQNR over every tensor of 2+ dimensions (the ones our own methods quantize):
    total signal energy / total error energy, in dB."""
    signal = noise = 0.0
    for name, ref in source.items():
        if ref.ndim < 2 or ref.dtype.kind != "f":
            continue
        ref64 = np.asarray(ref, np.float64)
        signal += float(np.sum(np.square(ref64)))
        noise += float(np.sum(np.square(np.asarray(candidate[name], np.float64) - ref64)))
    return 10 * math.log10(signal / noise) if noise > 0 else math.inf


def row(label: str, source: Mapping[str, FloatArray], weights: Mapping[str, FloatArray], file_bytes: int,
        seconds: float, compare: Callable[[Mapping[str, FloatArray]], Mapping[str, Any]] | None) -> dict[str, Any]:
    """A comparison row with the keys of a method row (harness.context.compare_methods):
    size and bits per weight from the file's bytes, weight SQNR, the runner's metrics."""
    parameters = parameter_count(source)
    out: dict[str, Any] = {
        "method": label, "scheme": SCHEME, "quantize_seconds": seconds,
        "size_mb": file_bytes / 1e6, "bits_per_weight": file_bytes * 8 / parameters,
        "weight_sqnr_db": weight_sqnr_db(source, weights), "calibrated_tensors": 0,
    }
    if compare is not None:
        raw = compare(weights)
        out.update({k: float(v) for k, v in raw.items() if isinstance(v, (int, float))})
    return out


def peer_row(result: PeerResult, source: Mapping[str, FloatArray],
             compare: Callable[[Mapping[str, FloatArray]], Mapping[str, Any]] | None) -> dict[str, Any]:
    out = row(result.peer.label, source, result.weights, result.file_bytes, result.quantize_seconds, compare)
    out.update({"format_bits_per_weight": result.tensor_bytes * 8 / result.parameters,
                "nominal_bits_per_weight": result.peer.nominal_bits_per_weight,
                "ggml_types": result.type_counts(), "ggml_type_parameters": result.type_parameters(),
                "quantizer": quantizer_name(result.peer), "imatrix": result.peer.imatrix,
                "notes": list(result.notes), "artifact": str(result.path)})
    return out


def compare_rows(weights: Mapping[str, FloatArray], peers: Iterable[str], folder: Path, model_name: str,
                 compare: Callable[[Mapping[str, FloatArray]], Mapping[str, Any]] | None,
                 progress: Callable[[str], None] = lambda _m: None,
                 hessians: Callable[[], Mapping[str, FloatArray]] | None = None) -> list[dict[str, Any]]:
    """One comparison row per peer format: what ``RunContext.compare_methods`` appends.

    ``hessians``: the run's calibration Hessians (GPTQ's, ``2 XᵀX / n``), called only when
    a ``+imatrix`` peer is listed; their diagonals are llama-imatrix's importance."""
    rows = []
    importance: dict[str, FloatArray] | None = None
    for name in peers:
        peer = get_peer(name)
        if peer.imatrix and importance is None:
            if hessians is None:
                raise ConfigurationError(f"peer {peer.name!r} needs an importance matrix, and the model's runner "
                                         "captures no calibration activations")
            from harness.ggml_quant import importances

            importance = importances(hessians())
        progress(f"comparing peer {peer.label} ({quantizer_name(peer)})")
        result = quantize(weights, peer, folder / f"{model_name}-{peer.name}.gguf", model_name=model_name,
                          importance=importance if peer.imatrix else None)
        rows.append(peer_row(result, weights, compare))
    return rows


def main(argv: list[str] | None = None) -> int:
    """``python -m harness.peers --model minilm [--peers Q8_0,Q4_0] [--out DIR]``: every
    peer's row on the model's evaluation set, as a Markdown table (no acceptance suite)."""
    import argparse
    import sys
    import tempfile

    from harness.fixtures_import import fixtures_module

    load_model = fixtures_module("checkpoint").load_model

    parser = argparse.ArgumentParser(prog="python -m harness.peers", description=main.__doc__)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help="comma-separated (default: every peer; the K-quant/IQ ones need `python -m "
                             "harness.ggml_build`, the +imatrix ones the model's calibration activations)")
    parser.add_argument("--out", type=Path, help="keep the GGUF files here (default: a temporary folder)")
    args = parser.parse_args(argv)
    checkpoint = load_model(args.model)
    runner = checkpoint.runner
    hessians = getattr(runner, "calibration_hessians", None)
    with tempfile.TemporaryDirectory(prefix="arrowquant-peers-") as tmp:
        rows = compare_rows(checkpoint.weights, [p for p in args.peers.split(",") if p], args.out or Path(tmp),
                            checkpoint.name, runner.compare if runner is not None else None,
                            lambda m: print(m, file=sys.stderr, flush=True), hessians)
    print("| format | bits/weight (file) | bits/weight (blocks) | weight SQNR dB | output cosine mean "
          "| output cosine worst | quantize s | tensor types |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['bits_per_weight']:.3f} | {r['format_bits_per_weight']:.3f} "
              f"| {r['weight_sqnr_db']:.2f} | {r.get('output_cosine_mean', math.nan):.5f} "
              f"| {r.get('output_cosine_min', math.nan):.5f} | {r['quantize_seconds']:.2f} "
              f"| {', '.join(f'{k} x{v}' for k, v in r['ggml_types'].items())} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
