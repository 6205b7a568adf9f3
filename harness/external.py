"""Judge an artifact produced elsewhere with the acceptance suite (``--artifact FILE.gguf``).

``harness.gguf_artifact`` reads the file (names mapped to the model's, dequantized,
checked: a FormatError per broken rule). This module puts what was read where the suite
looks for an artifact (``RunContext.written`` / ``reloaded``), so the same tests judge it:

- size: the file's bytes on disk against the FP32/FP16 baselines written in the run;
- load time: pytest-benchmark over reading + dequantizing the GGUF (``gguf_artifact.load``);
- per-layer weight metrics against the source tensors: cosine, SQNR, worst row (embedding
  tables), and the range of every ggml block (``BLOCK`` values: 32 for the legacy types,
  the 256-value super-block for K-quants) against the source block's range;
- accounting: every source tensor present (a FormatError otherwise), kept float tensors
  bit-exact, dtypes, finiteness, ties;
- output metrics: the model's runner on the dequantized weights.

What cannot apply to a file made elsewhere is not faked. Suite tests marked
``@pytest.mark.made_here(metrics=..., why=...)`` (the v2 round trip, the v1 paths, the
quantize time, the source digest, the plan match) are deselected by ``SuitePlugin``; each
criterion on their metrics is recorded in results.json and the report with ``passed:
null`` and ``why`` starting with ``NOT_MEASURED`` — neither a pass nor a skip. The
verdict is taken on the gates that were measured and lists these apart (``_bit_verdict``
``not_measured``): they describe how ArrowQuant produced an artifact, which a file made
by another tool cannot have, so counting them as failures would fail every such file
whatever its quality, and counting them as passes would claim what was not checked.
Only the metrics of ``ELSEWHERE_METRICS`` may be recorded so (``harness.integrity``
refuses any other), and only in a run with ``run.artifact`` set.

Faults (``GGUF_FAULTS``, ``--inject-fault`` with ``--artifact``) break a copy of the
file the way a buggy converter or exporter would; ``tests/test_external_artifact.py``
checks that each one fails a named gate or raises a FormatError naming file and tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import gguf
import numpy as np
import numpy.typing as npt

from arrowquant_core.errors import ConfigurationError, unknown_name
from harness import gguf_artifact
from harness.gguf_artifact import GGUFArtifact

if TYPE_CHECKING:
    from harness.context import Accounting, LayerRow, Reloaded, RunContext, Written

FloatArray = npt.NDArray[np.floating]
T = gguf.GGMLQuantizationType

MARKER: Final = "made_here"
NOT_MEASURED: Final = "NOT MEASURED: the artifact was produced elsewhere"
# The metrics only an artifact ArrowQuant made can have (see the module docstring).
ELSEWHERE_METRICS: Final = frozenset({"quantize_seconds", "roundtrip_exact", "source_match", "plan_mismatches",
                                      "promotions", "calibration_score",
                                      # ArrowQuant's own GPTQ variants on the model (hessian_comparison)
                                      "hessian_plain_kl_mean", "hessian_mask_aware_kl_mean",
                                      "hessian_mask_aware_kl_ratio", "hessian_plain_vs_shipped_kl_ratio"})
METHOD: Final = "gguf"  # the "method" of a layer row read from a GGUF file: the file's own type decided


@dataclass(frozen=True)
class Deselected:
    """A suite test that cannot apply to a file made elsewhere, and why."""

    test: str
    metrics: tuple[str, ...]
    why: str

    def __post_init__(self) -> None:
        extra = sorted(set(self.metrics) - ELSEWHERE_METRICS)
        if extra:
            raise ConfigurationError(f"suite test {self.test}: @pytest.mark.{MARKER} names metrics {extra}, which a "
                                     f"file made elsewhere can be measured on (allowed: {sorted(ELSEWHERE_METRICS)})")
        if not self.why:
            raise ConfigurationError(f"suite test {self.test}: @pytest.mark.{MARKER} needs why=...")


@dataclass(frozen=True)
class ExternalArtifact:
    """A GGUF file read as the model's weights, and how its bit width was chosen."""

    artifact: GGUFArtifact
    bits: int
    bits_how: str
    sha256: str
    fault: str | None = None
    original: Path | None = None  # the file given to --artifact, when a fault judged a broken copy

    @property
    def path(self) -> Path:
        return self.artifact.path

    def record(self, deselected: list[Deselected]) -> dict[str, Any]:
        """results.json ``artifact``: what produced the file and what could not be judged."""
        art = self.artifact
        counts: dict[str, int] = {}
        for t in art.types.values():
            counts[t] = counts.get(t, 0) + 1
        return {
            "path": str(art.path), "bytes": art.bytes, "sha256": self.sha256, "format": "GGUF",
            "reader": f"gguf-py {gguf_artifact.gguf_version()} (GGUFReader, gguf.quants.dequantize)",
            "produced_by": art.produced_by,
            "general": dict(sorted(art.metadata.items())),
            "file_type": art.file_type, "main_type": art.main_type,
            "quantization_version": art.metadata.get("general.quantization_version"),
            "tensor_types": dict(sorted(counts.items())),
            "tensor_names": "llama.cpp" if any(art.names[n] not in ("", n) for n in art.names) else "source",
            "filled_from_source": list(art.filled_from_source),
            "llama_cpp_rule_mismatches": gguf_artifact.plan_mismatches(art),
            "judged_as_bits": self.bits, "bits_how": self.bits_how,
            "fault": self.fault, "original": str(self.original) if self.original else None,
            "not_measured": [{"test": d.test, "metrics": list(d.metrics), "why": d.why} for d in deselected],
        }


def open_external(path: Path, source: Mapping[str, FloatArray], bits: int, bits_how: str,
                  fault: str | None = None, workdir: Path | None = None) -> ExternalArtifact:
    """Read ``path`` (or, with ``fault``, a broken copy written into ``workdir``) against the
    model's weights; FormatError (file, tensor, rule) for a file that does not hold up."""
    from harness.results import sha256_file

    original = None
    if fault is not None:
        spec = get_gguf_fault(fault)
        if workdir is None:
            raise ConfigurationError("a GGUF fault needs a folder for the broken copy")
        original, path = path, workdir / f"{Path(path).stem}-{fault}.gguf"
        spec.apply(original, path)
    art = gguf_artifact.load(path, source)
    return ExternalArtifact(art, bits, bits_how, sha256_file(path), fault, original)


# --- the suite's stages ---------------------------------------------------------------------


def written(ext: ExternalArtifact, ctx: RunContext, bits: int) -> Written:
    """The file as the suite's "written artifact": its bytes on disk. No quantization ran in
    this run, so there is no model and no quantize time (that test is deselected)."""
    from harness.context import Written

    return Written(bits, ctx.criteria.plan(bits), None, ext.path, ext.artifact.bytes, math.nan)


def reloaded(ext: ExternalArtifact, ctx: RunContext, bits: int) -> Reloaded:
    """The file read back: layer rows, unquantized matrices and the accounting. The file
    was read (timed) when the run opened it; the load-time gate benchmarks it again."""
    from harness.context import Reloaded

    art = ext.artifact
    source = ctx.checkpoint.weights
    # roundtrip_exact, plan_mismatches and source_match belong to deselected tests: never read
    return Reloaded(bits, None, dict(art.weights), art.load_seconds, layer_rows(art, source),
                    gguf_artifact.unquantized_matrices(art), False, [], False,
                    accounting(art, source, ctx.checkpoint.ties))


def block_range_ratios(reference: FloatArray, test: FloatArray, block: int) -> tuple[float, float]:
    """(min, max) over the tensor's ggml blocks (``block`` consecutive values of a row) of
    dequantized range / source range; blocks whose source range is zero are left out.
    A block with a wrong scale stands out here although the tensor's cosine barely moves."""
    from harness.context import block_range_ratios as ratios

    return ratios(np.asarray(reference, np.float32).reshape(-1, block), np.asarray(test, np.float32).reshape(-1, block))


def layer_rows(art: GGUFArtifact, source: Mapping[str, FloatArray]) -> list[LayerRow]:
    """``gguf_artifact.layer_rows`` with the worst row and the block range ratios the
    suite's weight gates read (``harness.context.LayerRow``; ``scheme`` is the ggml type)."""
    from harness.context import LayerRow, row_cosine_min

    rows = []
    for r in gguf_artifact.layer_rows(art, source):
        ref, got = np.asarray(source[r.name], np.float32), art.weights[r.name]
        lo, hi = block_range_ratios(ref, got, int(gguf.GGML_QUANT_SIZES[T[r.scheme]][0]))
        rows.append(LayerRow(r.name, r.scheme, METHOD, r.shape, r.parameters, r.cosine, r.sqnr_db,
                             r.relative_error, row_cosine_min(ref, got), lo, hi))
    return rows


def accounting(art: GGUFArtifact, source: Mapping[str, FloatArray], ties: Mapping[str, str]) -> Accounting:
    """The accounting the suite gates, measured on the file as read. ``load`` already
    refuses a missing (not filled), unknown or non-finite tensor with a FormatError, so
    those lists are empty when the suite runs; they are counted again here all the same."""
    from harness.context import Accounting

    missing = [n for n in source if n not in art.weights]
    unexpected = [n for n in art.weights if n not in source]
    changed = []
    for name, stored in art.types.items():
        ref = np.asarray(source[name])
        if stored == "F32":  # kept in float: must be the source's values exactly
            want = ref.astype(np.float32)
        elif stored == "F16":
            want = ref.astype(np.float16).astype(np.float32)
        else:
            continue
        if art.weights[name].shape != want.shape or not np.array_equal(art.weights[name], want):
            changed.append(name)
    # a GGUF reads every float tensor back as float32, whatever the model's float type (a
    # bfloat16 model included): a mismatch is a float read as a buffer or the reverse, or
    # a buffer of another integer type
    dtype_mismatches = [n for n, a in art.weights.items() if n in source
                        and (gguf_artifact.is_buffer(a) != gguf_artifact.is_buffer(source[n])
                             or (gguf_artifact.is_buffer(a) and a.dtype != np.asarray(source[n]).dtype))]
    nonfinite = [n for n, a in art.weights.items() if a.dtype.kind == "f" and not bool(np.all(np.isfinite(a)))]
    # a GGUF records no ties: a tie holds when the file's two tensors read back identical
    tie_mismatches = sorted(a for a, c in ties.items() if a in art.weights and c in art.weights
                            and not np.array_equal(art.weights[a], art.weights[c]))
    return Accounting(missing, unexpected, changed, dtype_mismatches, nonfinite, tie_mismatches)


# --- faults: a GGUF broken the way a buggy converter or exporter would break it ------------

# types whose blocks start with their FP16 scale d (ggml-common.h: block_q4_0 ... block_q5_K,
# block_iq4_nl, block_iq4_xs, block_iq3_xxs, block_iq3_s, block_iq2_*; Q2_K, Q3_K and Q6_K put it last)
_SCALE_FIRST: Final = frozenset({T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.IQ4_NL, T.IQ4_XS,
                                 T.IQ3_XXS, T.IQ3_S, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S})


def _victim(reader: gguf.GGUFReader, path: Path) -> Any:
    """The largest quantized tensor with its scale first in each block that is not an
    embedding table: a layer every input passes through. Of the file's main type when it
    has one (a Q4_K file of MiniLM holds Q4_K only in ffn_down, its other tensors fell back
    to Q5_0: the fault must break the format the file is named for)."""
    candidates = [t for t in reader.tensors if t.tensor_type in _SCALE_FIRST
                  and "embd" not in t.name and "embeddings" not in t.name]
    if not candidates:
        raise ConfigurationError(f"{path}: no quantized tensor of types {sorted(t.name for t in _SCALE_FIRST)} "
                                 "outside the embeddings to break")
    main = gguf_artifact.main_type(gguf_artifact.file_type_name(gguf_artifact._metadata(reader).get(
        "general.file_type")), [t.tensor_type.name for t in reader.tensors])
    of_main = [t for t in candidates if t.tensor_type.name == main]
    return max(of_main or candidates, key=lambda t: int(t.n_elements))


def _patch(src: Path, dst: Path, edit: Callable[[Any, npt.NDArray[np.uint8]], None],
           choose: Callable[[gguf.GGUFReader, Path], Any] | None = None) -> None:
    """Copy ``src`` to ``dst`` with the victim tensor's blocks edited in place (same size);
    the victim is ``_victim``'s unless ``choose`` picks another."""
    reader = gguf.GGUFReader(src)
    victim = (choose or _victim)(reader, src)
    data = bytearray(src.read_bytes())
    size = int(gguf.GGML_QUANT_SIZES[victim.tensor_type][1])
    start = int(victim.data_offset)
    blocks = np.frombuffer(bytes(data[start:start + int(victim.n_bytes)]), np.uint8).reshape(-1, size).copy()
    edit(victim, blocks)
    data[start:start + int(victim.n_bytes)] = blocks.tobytes()
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(bytes(data))


def scales_doubled(src: Path, dst: Path) -> None:
    def edit(_victim: Any, blocks: npt.NDArray[np.uint8]) -> None:
        d = blocks[:, :2].copy().view(np.float16) * np.float16(2)
        blocks[:, :2] = d.view(np.uint8).reshape(-1, 2)
    _patch(src, dst, edit)


def block_nonfinite(src: Path, dst: Path) -> None:
    def edit(_victim: Any, blocks: npt.NDArray[np.uint8]) -> None:
        blocks[len(blocks) // 2, :2] = np.array([np.inf], np.float16).view(np.uint8)
    _patch(src, dst, edit)


def other_model_tensor(src: Path, dst: Path) -> None:
    """The victim's data replaced by a tensor of the same shape and type from another model
    (a seeded Gaussian with the victim's spread: what a converter mapping a name to the
    wrong checkpoint produces)."""
    def edit(victim: Any, blocks: npt.NDArray[np.uint8]) -> None:
        shape = tuple(int(d) for d in reversed(victim.shape.tolist()))
        own = gguf.quants.dequantize(np.asarray(victim.data), victim.tensor_type)
        other = np.random.default_rng(13).normal(0.0, float(np.std(own)), size=shape).astype(np.float32)
        blocks[:] = np.asarray(gguf.quants.quantize(other, victim.tensor_type), np.uint8).reshape(blocks.shape)
    _patch(src, dst, edit)


def group_scales_off(src: Path, dst: Path) -> None:
    """Eight blocks of the victim stored with 4x their FP16 scale (a converter that mixed up
    a few blocks' scales): each such block spans 4x its source range."""
    def edit(_victim: Any, blocks: npt.NDArray[np.uint8]) -> None:
        picked = np.linspace(0, len(blocks) - 1, 8).astype(int)
        d = blocks[picked, :2].copy().view(np.float16) * np.float16(4)
        blocks[picked, :2] = d.view(np.uint8).reshape(-1, 2)
    _patch(src, dst, edit)


def _token_embedding(reader: gguf.GGUFReader, path: Path) -> Any:
    found = [t for t in reader.tensors if t.name == "token_embd.weight"]
    if not found:
        raise ConfigurationError(f"{path}: no token_embd.weight to break")
    return found[0]


def embedding_rows_swapped(src: Path, dst: Path) -> None:
    """64 rows of the token embedding swapped in pairs, whatever its type (a ggml row is a
    whole number of blocks): 32 tokens read each other's vectors."""
    def edit(victim: Any, blocks: npt.NDArray[np.uint8]) -> None:
        rows = int(victim.shape.tolist()[-1])  # ggml lists dimensions fastest first
        per_row = len(blocks) // rows
        grid = blocks.reshape(rows, per_row, -1)
        picked = np.random.default_rng(1).choice(rows, size=64, replace=False)
        grid[picked[0::2]], grid[picked[1::2]] = grid[picked[1::2]].copy(), grid[picked[0::2]].copy()
    _patch(src, dst, edit, _token_embedding)


def _norm_gain(reader: gguf.GGUFReader, path: Path) -> Any:
    found = [t for t in reader.tensors if t.tensor_type == T.F32 and len(t.shape) == 1
             and "norm" in t.name and t.name.endswith(".weight")]
    if not found:
        raise ConfigurationError(f"{path}: no F32 normalisation gain to break")
    return found[0]


def norm_gain_scaled(src: Path, dst: Path) -> None:
    """One normalisation gain, kept in F32 by the converter, stored x1.5."""
    def edit(_victim: Any, blocks: npt.NDArray[np.uint8]) -> None:
        values = blocks.copy().view(np.float32) * np.float32(1.5)
        blocks[:] = values.view(np.uint8).reshape(blocks.shape)
    _patch(src, dst, edit, _norm_gain)


def _rewrite(src: Path, dst: Path, victim_as: Callable[[Any], tuple[npt.NDArray[Any], Any] | None]) -> None:
    """The file written again (gguf-py's writer, its metadata kept) with the victim tensor
    replaced by ``victim_as(victim)``: (data, type), or None to leave it out."""
    from harness.peers import write_gguf

    reader = gguf.GGUFReader(src)
    victim = _victim(reader, src)
    meta = {k: v for k, v in gguf_artifact._metadata(reader).items()
            if k != "general.architecture" and isinstance(v, (str, int)) and not isinstance(v, bool)}
    arch = str(gguf_artifact._metadata(reader).get("general.architecture", "unknown"))
    tensors = []
    for t in reader.tensors:
        stored = victim_as(t) if t.name == victim.name else (np.asarray(t.data), t.tensor_type)
        if stored is not None:
            tensors.append((t.name, *stored))
    write_gguf(dst, tensors, arch, meta)


def tensor_missing(src: Path, dst: Path) -> None:
    """The file rewritten without its victim tensor (a converter that skipped it)."""
    _rewrite(src, dst, lambda _victim: None)


def weight_left_f32(src: Path, dst: Path) -> None:
    """The victim stored as F32 holding its own dequantized values (a converter that left
    one matrix unquantized): every check of its values still passes, the file is larger
    and one weight is not quantized."""
    _rewrite(src, dst, lambda victim: (np.asarray(gguf.quants.dequantize(np.asarray(victim.data),
                                                                          victim.tensor_type), np.float32), T.F32))


@dataclass(frozen=True)
class GGUFFault:
    name: str
    description: str
    apply: Callable[[Path, Path], None]  # (the given file, the broken copy to write)


GGUF_FAULTS: Final[dict[str, GGUFFault]] = {f.name: f for f in (
    GGUFFault("gguf-tensor-missing", "the largest non-embedding tensor left out of the file "
              "(FormatError naming file and tensor)", tensor_missing),
    GGUFFault("gguf-block-nonfinite", "one block's FP16 scale set to infinity in the largest non-embedding tensor "
              "(FormatError naming file and tensor)", block_nonfinite),
    GGUFFault("gguf-scales-doubled", "every block scale of the largest non-embedding tensor doubled, as a buggy "
              "exporter would (weight SQNR gate)", scales_doubled),
    GGUFFault("gguf-other-model-tensor", "the largest non-embedding tensor replaced by another model's tensor of "
              "the same shape and type (weight cosine and output gates)", other_model_tensor),
    GGUFFault("gguf-group-scales-off", "eight blocks of the largest non-embedding tensor stored with 4x their "
              "scale (group range gate)", group_scales_off),
    GGUFFault("gguf-embedding-rows-swapped", "64 rows of the token embedding swapped in pairs (embedding row "
              "gate)", embedding_rows_swapped),
    GGUFFault("gguf-norm-gain-scaled", "one F32 normalisation gain stored x1.5 (kept-tensors gate)",
              norm_gain_scaled),
    GGUFFault("gguf-weight-left-f32", "the largest non-embedding tensor stored as F32 with its own dequantized "
              "values (unquantized-weights, bits-per-weight and compression gates)", weight_left_f32),
)}


def get_gguf_fault(name: str) -> GGUFFault:
    if name not in GGUF_FAULTS:
        raise unknown_name("fault for --artifact", name, GGUF_FAULTS)
    return GGUF_FAULTS[name]
