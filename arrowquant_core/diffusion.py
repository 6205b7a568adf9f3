"""Quantization of masked-diffusion language models (Dream 7B and its miniature).

The names follow the seed documents, so their users find them: deployment profiles
``edge`` / ``local`` / ``cloud`` (:data:`PROFILES`), :class:`DiffusionQuantConfig`,
:func:`detect_modality` and :class:`ArrowQuantV2` with ``quantize_diffusion_model``,
``validate_quality`` and ``quantize``.

What is built and what is not:

* Text strategy: the weights are quantized per tensor on the scheme the profile names
  (``int{bits}-g{group_size}-{asym|sym}`` from :data:`arrowquant_core.schemes.SCHEMES`),
  with residual 2-bit (R2Q-style, ``residual.py``) at 2 bits and round-to-nearest
  otherwise (:func:`text_method`); 1-D tensors stay in floating point.
* Time-aware activation parameters (:mod:`arrowquant_core.timeaware`): when the caller
  passes a calibration source (``time_aware=``, a :data:`TimeAwareSource`; the core never
  runs a model), per-time-group scales, zero points and statistics for
  :data:`TIME_AWARE_SCHEMES` go to the artifact's aux rows. A failing pass raises with
  ``fail_fast``, else falls back to the base quantization, logged and counted
  (``ArrowQuantV2.fallback_rates``). Without a source ``time_groups`` is only recorded.
* Text and code models take the text strategy. Image and audio models take GPTQ +
  Spatial (:mod:`arrowquant_core.spatial`): channel equalization folded into the weights,
  then GPTQ on the smoothed weights, when the caller passes the model's calibration
  (``calibration=SpatialCalibration(...)``; the core never runs a model, the model's runner
  captures activations). Without it nothing can be smoothed or calibrated: every weight
  takes the SpatialQuantizer's fallback, per-channel quantization (clip search), and the
  result and the artifact count the fallbacks and say why. The artifact records the
  smoothing applied (metadata ``spatial``), so ``validate_quality`` measures the weights
  against the smoothed original, the float model the artifact approximates.

Files read (a model folder)::

    metadata.json                    {"modality": "text", ...}            (required)
    model.safetensors.index.json     + the shards it names                 (sharded), or
    model.safetensors                                                       (single file), or
    <tensor name>.npy                one per tensor                         (legacy layout)

Files written: one format-v2 Parquet file (``storage.save``), whose model metadata
records the mode, modality, strategy, profile, config (JSON), scheme, ``time_groups``
and the SHA-256 of every source weight file. The file appears at ``output_path`` only
after it was written completely *and* read back and measured; on any failure nothing
is left there (a previous file at that path is kept).

>>> import numpy as np
>>> w = {"blk.weight": np.linspace(-1, 1, 512, dtype=np.float32).reshape(2, 256)}
>>> ArrowQuantV2().quantize(w, DiffusionQuantConfig.from_profile("edge")).tensors["blk.weight"].scheme.name
'int2-g256-asym'
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
from dataclasses import dataclass
import hashlib
import json
import logging
import math
import os
from pathlib import Path
import secrets
import time
from typing import Any, Final, Union

import numpy as np
import numpy.typing as npt

from arrowquant_core.actquant import ActScheme
from arrowquant_core.errors import (
    ArrowQuantError,
    ConfigurationError,
    FormatError,
    QuantizationError,
    ValidationError,
    unknown_name,
)
from arrowquant_core.limits import read_json_object
from arrowquant_core.metrics import cosine, sqnr_db
from arrowquant_core.model import Progress, QuantizationConfig, QuantizedModel, quantize_model
from arrowquant_core.safetensors_io import read_npy_folder, read_safetensors, read_safetensors_folder
from arrowquant_core.schemes import BIT_WIDTHS, SCHEMES, Scheme
from arrowquant_core.spatial import SpatialCalibration, SpatialConfig, describe, quantize_spatial, smoothed_reference
from arrowquant_core.storage import load, save
from arrowquant_core.tensor import dequantize_float32
from arrowquant_core.timeaware import TimeAwareCalibrator, TimeGrouping, aux_prefix

__all__ = [
    "DEFAULT_MIN_ACCURACY",
    "MODALITIES",
    "MODES",
    "PROFILES",
    "ArrowQuantV2",
    "DeploymentProfile",
    "DiffusionQuantConfig",
    "DiffusionQuantResult",
    "LayerQuality",
    "ModalityStrategy",
    "QualityReport",
    "detect_modality",
    "get_profile",
    "scheme_for",
]

FloatArray = npt.NDArray[np.floating]
StrPath = Union[str, "os.PathLike[str]"]

MODES: Final[tuple[str, ...]] = ("diffusion",)
DEFAULT_MIN_ACCURACY: Final[float] = 0.70
"""Threshold of ``validate_quality`` when neither the caller nor the artifact gives one."""

METADATA_FILE: Final[str] = "metadata.json"
_INDEX_FILE: Final[str] = "model.safetensors.index.json"
_SINGLE_FILE: Final[str] = "model.safetensors"
_HASH_CHUNK: Final[int] = 1 << 20
_ACTIVATION_NOTE: Final[str] = (
    "not computed: no calibration source was given (time_aware=None), so there are no "
    "per-timestep-group activation parameters")
_LOG: Final = logging.getLogger("arrowquant.diffusion")


# --------------------------------------------------------------------------- text strategy
# (the text/code route: residual 2-bit (R2Q) at 2 bits + time-aware activation parameters)

TimeAwareSource = Callable[[list[TimeAwareCalibrator]], None]
"""Feeds calibration activations: called with the calibrators, it runs the model over its
calibration set (every time group covered) and calls ``observe(group, site, x)``
(``fixtures.dream_mini.runner.DreamRunner.time_aware_source`` is one)."""

TIME_AWARE_SCHEMES: Final[tuple[ActScheme, ...]] = (ActScheme(8, "tensor", False), ActScheme(4, "tensor", False))
"""The static activation schemes whose per-time-group tables the text strategy stores."""


def text_method(bits: int) -> str:
    """The weight method of the text strategy: residual 2-bit (R2Q-style, ``residual.py``)
    at 2 bits, where plain round-to-nearest loses the most; round-to-nearest otherwise.

    >>> text_method(2), text_method(4)
    ('residual2', 'rtn')
    """
    return "residual2" if bits == 2 else "rtn"


def time_aware_pass(time_groups: int, source: TimeAwareSource) -> tuple[dict[str, npt.NDArray[Any]], str]:
    """Run the time-aware calibration: ``(aux arrays, one-line description)``.

    Every scheme of :data:`TIME_AWARE_SCHEMES` gets a time-agnostic table (one group) and
    a time-aware one (``time_groups`` uniform groups), stored under ``aux_prefix``.
    """
    calibrators = [TimeAwareCalibrator(s, g) for s in TIME_AWARE_SCHEMES
                   for g in (TimeGrouping.uniform(1), TimeGrouping.uniform(time_groups))]
    source(calibrators)
    aux: dict[str, npt.NDArray[Any]] = {}
    sites = 0
    for cal in calibrators:
        table = cal.table()
        sites = len(table.sites)
        aux.update(table.to_arrays(aux_prefix(cal.scheme, table.groups)))
    names = ", ".join(s.name for s in TIME_AWARE_SCHEMES)
    return aux, (f"computed: {names} per-tensor scales and zero points for {time_groups} uniform time "
                 f"groups (and 1, time-agnostic) at {sites} Linear inputs, in the aux rows 'timeaware.*'")


# --------------------------------------------------------------------------- schemes


def _group_sizes() -> tuple[int, ...]:
    """The group sizes the scheme table has (derived, not a parallel list)."""
    return tuple(sorted({s.group_size for s in SCHEMES.values() if s.granularity == "group"}))


def scheme_for(bits: int, group_size: int, symmetric: bool = False) -> Scheme:
    """The per-group scheme of the table with these parameters.

    >>> scheme_for(4, 128).name
    'int4-g128-asym'
    """
    for scheme in SCHEMES.values():
        if (scheme.granularity == "group" and scheme.bits == bits
                and scheme.group_size == group_size and scheme.symmetric == symmetric):
            return scheme
    raise ConfigurationError(
        f"no per-group scheme with bits = {bits}, group_size = {group_size}, symmetric = {symmetric} "
        f"in the scheme table (bit widths {list(BIT_WIDTHS)}, group sizes {list(_group_sizes())})")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_fields(owner: str, bits: int, group_size: int, time_groups: int, min_accuracy: float,
                  calibration_samples: int, target_size_mb: float, symmetric: bool) -> None:
    """Shared validation of a profile row and a config: each failure names field, value, rule."""
    if not _is_int(bits) or bits not in BIT_WIDTHS:
        raise ConfigurationError(
            f"{owner}.bits = {bits!r}: must be one of the scheme table's bit widths {list(BIT_WIDTHS)}")
    sizes = _group_sizes()
    if not _is_int(group_size) or group_size not in sizes:
        raise ConfigurationError(
            f"{owner}.group_size = {group_size!r}: must be one of the scheme table's group sizes {list(sizes)}")
    if not _is_int(time_groups) or time_groups < 1:
        raise ConfigurationError(f"{owner}.time_groups = {time_groups!r}: must be an integer >= 1")
    if (not isinstance(min_accuracy, (int, float)) or isinstance(min_accuracy, bool)
            or not 0.0 < float(min_accuracy) <= 1.0):
        raise ConfigurationError(
            f"{owner}.min_accuracy = {min_accuracy!r}: must be a cosine similarity with 0 < min_accuracy <= 1")
    if not _is_int(calibration_samples) or calibration_samples < 1:
        raise ConfigurationError(
            f"{owner}.calibration_samples = {calibration_samples!r}: must be an integer >= 1")
    if (not isinstance(target_size_mb, (int, float)) or isinstance(target_size_mb, bool)
            or not math.isfinite(float(target_size_mb)) or float(target_size_mb) <= 0.0):
        raise ConfigurationError(
            f"{owner}.target_size_mb = {target_size_mb!r}: must be a finite number of megabytes > 0")
    if not isinstance(symmetric, bool):
        raise ConfigurationError(f"{owner}.symmetric = {symmetric!r}: must be True or False")
    scheme_for(bits, group_size, symmetric)  # the combination must be a row of the table


# --------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class DeploymentProfile:
    """A named whole-model preset: a per-group scheme plus quality and size targets.

    The scheme is looked up in the scheme table from ``bits``, ``group_size`` and
    ``symmetric``; no profile stores a scheme name of its own.

    >>> PROFILES["edge"].scheme_name
    'int2-g256-asym'
    """

    name: str
    bits: int
    time_groups: int
    group_size: int
    min_accuracy: float
    calibration_samples: int
    target_size_mb: float
    description: str
    symmetric: bool = False

    def __post_init__(self) -> None:
        _check_fields(f"profile {self.name!r}", self.bits, self.group_size, self.time_groups,
                      self.min_accuracy, self.calibration_samples, self.target_size_mb, self.symmetric)

    def __reduce__(self) -> tuple[Callable[[str], DeploymentProfile], tuple[str]]:
        # Compiled frozen dataclasses cannot be unpickled field by field (docs/MYPYC.md,
        # "Runtime surprises"); rebuild from the table by name.
        return (get_profile, (self.name,))

    @property
    def scheme(self) -> Scheme:
        return scheme_for(self.bits, self.group_size, self.symmetric)

    @property
    def scheme_name(self) -> str:
        return self.scheme.name


# The one table of profiles (seed documents: edge / local / cloud deployment targets).
PROFILES: Final[dict[str, DeploymentProfile]] = {p.name: p for p in (
    DeploymentProfile("edge", 2, 5, 256, 0.65, 32, 35.0,
                      "phones and microcontrollers: smallest file, lowest fidelity"),
    DeploymentProfile("local", 4, 10, 128, 0.85, 128, 200.0,
                      "laptops and workstations: balanced size and fidelity"),
    DeploymentProfile("cloud", 8, 20, 64, 0.95, 512, 2000.0,
                      "servers: near-lossless, size a secondary concern"),
)}


def get_profile(name: str) -> DeploymentProfile:
    """Look a profile up by name; an unknown name says "did you mean" and lists the profiles.

    >>> get_profile("cloud").scheme_name
    'int8-g64-asym'
    """
    profile = PROFILES.get(name)
    if profile is None:
        raise unknown_name("profile", name, PROFILES)
    return profile


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class DiffusionQuantConfig:
    """How a diffusion model is quantized, validated on construction.

    ``time_groups`` is recorded but time-aware activation parameters are not computed
    yet; ``calibration_samples`` is recorded but unused by round-to-nearest.
    ``target_size_mb`` is checked against the written file (the result says whether it
    was met); ``min_accuracy`` is the minimum per-layer cosine ``validate_quality`` uses.

    >>> DiffusionQuantConfig.from_profile("local").scheme.name
    'int4-g128-asym'
    >>> DiffusionQuantConfig(3, 128, 10, 0.85, 128, 200.0)
    Traceback (most recent call last):
    ...
    arrowquant_core.errors.ConfigurationError: DiffusionQuantConfig.bits = 3: must be one of the scheme table's bit widths ...
    """

    bits: int
    group_size: int
    time_groups: int
    min_accuracy: float
    calibration_samples: int
    target_size_mb: float
    symmetric: bool = False
    fail_fast: bool = True

    def __post_init__(self) -> None:
        _check_fields("DiffusionQuantConfig", self.bits, self.group_size, self.time_groups,
                      self.min_accuracy, self.calibration_samples, self.target_size_mb, self.symmetric)
        if not isinstance(self.fail_fast, bool):
            raise ConfigurationError(f"DiffusionQuantConfig.fail_fast = {self.fail_fast!r}: must be True or False")

    def __reduce__(self) -> tuple[type[DiffusionQuantConfig],
                                  tuple[int, int, int, float, int, float, bool, bool]]:
        # docs/MYPYC.md "Runtime surprises": compiled frozen dataclasses need __reduce__ to unpickle.
        return (DiffusionQuantConfig, (self.bits, self.group_size, self.time_groups, self.min_accuracy,
                                       self.calibration_samples, self.target_size_mb, self.symmetric,
                                       self.fail_fast))

    @classmethod
    def from_profile(cls, name: str, fail_fast: bool = True) -> DiffusionQuantConfig:
        """The config of a deployment profile ("edge", "local" or "cloud")."""
        p = get_profile(name)
        return cls(p.bits, p.group_size, p.time_groups, p.min_accuracy, p.calibration_samples,
                   p.target_size_mb, p.symmetric, fail_fast)

    @property
    def scheme(self) -> Scheme:
        """The scheme of the table these settings select."""
        return scheme_for(self.bits, self.group_size, self.symmetric)

    @property
    def profile(self) -> str:
        """The name of the profile with exactly these settings, or "" for a custom config."""
        for p in PROFILES.values():
            if (p.bits, p.group_size, p.time_groups, p.min_accuracy, p.calibration_samples,
                    p.target_size_mb, p.symmetric) == (
                    self.bits, self.group_size, self.time_groups, self.min_accuracy,
                    self.calibration_samples, self.target_size_mb, self.symmetric):
                return p.name
        return ""

    def to_quantization_config(self) -> QuantizationConfig:
        """The model-level config: this scheme everywhere, 1-D tensors kept in float."""
        return QuantizationConfig(self.scheme.name, fail_fast=self.fail_fast)

    def to_json(self) -> str:
        """The settings as sorted JSON (recorded in the artifact's metadata)."""
        return json.dumps({
            "bits": self.bits, "group_size": self.group_size, "time_groups": self.time_groups,
            "min_accuracy": float(self.min_accuracy), "calibration_samples": self.calibration_samples,
            "target_size_mb": float(self.target_size_mb), "symmetric": self.symmetric,
            "fail_fast": self.fail_fast,
        }, sort_keys=True)


# --------------------------------------------------------------------------- modality


@dataclass(frozen=True)
class ModalityStrategy:
    """One row of the modality table: which quantization strategy a modality takes."""

    modality: str
    strategy: str
    built: bool
    description: str

    def __reduce__(self) -> tuple[type[ModalityStrategy], tuple[str, str, bool, str]]:
        return (ModalityStrategy, (self.modality, self.strategy, self.built, self.description))


SPATIAL_STRATEGY: Final[str] = "gptq+spatial"
# The one modality -> strategy table (seed documents' multi-modal plan).
MODALITIES: Final[dict[str, ModalityStrategy]] = {m.modality: m for m in (
    ModalityStrategy("text", "text", True, "token weights; per-group round-to-nearest"),
    ModalityStrategy("code", "text", True, "code is text to the quantizer"),
    ModalityStrategy("image", SPATIAL_STRATEGY, True,
                     "GPTQ after channel equalization folded into the weights (image diffusion transformers)"),
    ModalityStrategy("audio", SPATIAL_STRATEGY, True,
                     "GPTQ after channel equalization folded into the weights (audio diffusion transformers)"),
)}


def _read_metadata(folder: Path) -> dict[str, Any]:
    path = folder / METADATA_FILE
    if not folder.is_dir():
        raise FormatError(f"{folder}: not a model folder (expected a folder holding {METADATA_FILE})")
    try:
        return read_json_object(path, "model metadata")
    except FileNotFoundError:
        raise FormatError(f"{path}: missing; a model folder needs {METADATA_FILE} with a "
                          "\"modality\" key") from None


def _strategy(folder: Path) -> ModalityStrategy:
    path = folder / METADATA_FILE
    data = _read_metadata(folder)
    if "modality" not in data:
        raise FormatError(f"{path}: no \"modality\" key (one of {sorted(MODALITIES)})")
    modality = data["modality"]
    if not isinstance(modality, str):
        raise FormatError(f"{path}: \"modality\" must be a string, got {modality!r}")
    row = MODALITIES.get(modality)
    if row is None:
        raise ConfigurationError(f"{path}: {unknown_name('modality', modality, MODALITIES)}")
    if not row.built:
        built = sorted(m.modality for m in MODALITIES.values() if m.built)
        raise ConfigurationError(
            f"{path}: modality {modality!r} is recognized, but its quantization strategy "
            f"({row.strategy}) is not built yet; models of modality {', '.join(built)} can be quantized")
    return row


def detect_modality(model_path: StrPath) -> str:
    """The modality a model folder's ``metadata.json`` declares, if it can be quantized.

    "text" and "code" take the text strategy. "image" and "audio" are recognized but
    raise ``ConfigurationError`` (their strategy is not built yet); an unknown modality
    raises ``ConfigurationError`` with "did you mean"; a missing or invalid
    ``metadata.json`` raises ``FormatError`` naming the file.
    """
    return _strategy(Path(model_path)).modality


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _Source:
    """The weights of a model folder and the files they came from."""

    layout: str                       # "safetensors", "sharded" or "npy"
    files: tuple[Path, ...]           # the weight files, sorted
    owner: dict[str, Path]            # tensor name -> the file holding it
    weights: dict[str, npt.NDArray[Any]]


def _read_source(folder: Path) -> _Source:
    index = folder / _INDEX_FILE
    if index.is_file() or (folder / _SINGLE_FILE).is_file():
        weights = read_safetensors_folder(folder)  # validates the index and the shards
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            owner = {str(name): folder / str(shard) for name, shard in weight_map.items()}
            layout = "sharded"
        else:
            owner = {name: folder / _SINGLE_FILE for name in weights}
            layout = "safetensors"
    elif any(p.is_file() for p in folder.glob("*.npy")):
        weights = read_npy_folder(folder)
        owner = {name: folder / f"{name}.npy" for name in weights}
        layout = "npy"
    else:
        raise FormatError(f"{folder}: no weights found (expected {_INDEX_FILE} with its shards, "
                          f"{_SINGLE_FILE}, or one <tensor name>.npy per tensor)")
    files = tuple(sorted(set(owner.values())))
    return _Source(layout, files, owner, weights)


def _read_original(path: Path) -> dict[str, npt.NDArray[Any]]:
    if path.is_file() and path.suffix == ".safetensors":
        return read_safetensors(path)
    if not path.is_dir():
        raise FormatError(f"{path}: not a model folder or a .safetensors file")
    return _read_source(path).weights


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class LayerQuality:
    """Quality of one quantized tensor: original weights vs the dequantized artifact."""

    name: str
    scheme: str
    shape: tuple[int, ...]
    cosine: float
    sqnr_db: float

    def __reduce__(self) -> tuple[type[LayerQuality], tuple[str, str, tuple[int, ...], float, float]]:
        return (LayerQuality, (self.name, self.scheme, self.shape, self.cosine, self.sqnr_db))


@dataclass(frozen=True)
class DiffusionQuantResult:
    """What ``quantize_diffusion_model`` wrote and measured.

    ``compression_ratio`` is bytes of the source weight files on disk divided by bytes
    of the written file on disk (both from ``stat``). ``cosine_similarity`` is the mean,
    ``min_cosine_similarity`` the minimum, over quantized layers, of the cosine between
    the original weights and the weights dequantized from the written file.
    ``model_size_mb`` is written bytes / 1e6. ``quantize_seconds`` times
    ``quantize_model`` alone (not reading, hashing, writing or measuring).
    ``skipped`` holds ``(tensor, reason)`` for tensors kept in float with ``fail_fast=False``.
    """

    output_path: Path
    modality: str
    profile: str
    scheme: str
    compression_ratio: float
    cosine_similarity: float
    min_cosine_similarity: float
    model_size_mb: float
    source_size_mb: float
    target_size_mb: float
    within_target_size: bool
    min_accuracy: float
    meets_min_accuracy: bool
    quantize_seconds: float
    layers: tuple[LayerQuality, ...]
    skipped: tuple[tuple[str, str], ...] = ()
    fallbacks: tuple[tuple[str, str], ...] = ()  # (site or tensor, reason): the spatial path's fallbacks

    def __reduce__(self) -> tuple[type[DiffusionQuantResult], tuple[Any, ...]]:
        return (DiffusionQuantResult, (
            self.output_path, self.modality, self.profile, self.scheme, self.compression_ratio,
            self.cosine_similarity, self.min_cosine_similarity, self.model_size_mb,
            self.source_size_mb, self.target_size_mb, self.within_target_size, self.min_accuracy,
            self.meets_min_accuracy, self.quantize_seconds, self.layers, self.skipped, self.fallbacks))


@dataclass(frozen=True)
class QualityReport:
    """Per-layer cosine between original weights and a quantized artifact.

    ``passed`` is ``min_cosine >= threshold``. ``threshold_source`` says where the
    threshold came from: "argument", "artifact" (its recorded config) or "default".
    """

    original_path: Path
    quantized_path: Path
    layers: tuple[LayerQuality, ...]
    mean_cosine: float
    min_cosine: float
    worst_layer: str
    threshold: float
    threshold_source: str
    passed: bool

    def __reduce__(self) -> tuple[type[QualityReport], tuple[Any, ...]]:
        return (QualityReport, (self.original_path, self.quantized_path, self.layers, self.mean_cosine,
                                self.min_cosine, self.worst_layer, self.threshold,
                                self.threshold_source, self.passed))

    def failure(self) -> str | None:
        """A readable failure message, or None when the check passed."""
        if self.passed:
            return None
        return (f"{self.quantized_path}: tensor {self.worst_layer!r} has cosine {self.min_cosine:.6f} "
                f"against {self.original_path}, below the threshold {self.threshold:g} "
                f"({self.threshold_source})")


def _layer_qualities(original: Mapping[str, npt.NDArray[Any]], model: QuantizedModel,
                     where: Path) -> tuple[LayerQuality, ...]:
    layers: list[LayerQuality] = []
    for name in model.order:
        qt = model.tensors.get(name)
        if qt is None:
            continue
        reference = original.get(name)
        if reference is None:
            raise ValidationError(f"{where}: tensor {name!r} is not in the original weights; "
                                  "the two do not describe the same model")
        if tuple(int(d) for d in reference.shape) != qt.shape:
            raise ValidationError(
                f"{where}: tensor {name!r} has shape {list(qt.shape)}, the original "
                f"{list(reference.shape)}; the two do not describe the same model")
        test = dequantize_float32(qt)
        layers.append(LayerQuality(name, qt.scheme.name, qt.shape, cosine(reference, test),
                                   sqnr_db(reference, test)))
    if not layers:
        raise ValidationError(f"{where}: holds no quantized tensor; there is nothing to validate")
    return tuple(layers)


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)


# --------------------------------------------------------------------------- the API


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise unknown_name("mode", mode, MODES)
    return mode


class ArrowQuantV2:
    """Quantize masked-diffusion models to a Parquet v2 artifact and validate it.

    ``mode`` must be "diffusion" (the only mode built).

    >>> ArrowQuantV2(mode="difusion")
    Traceback (most recent call last):
    ...
    arrowquant_core.errors.ConfigurationError: unknown mode 'difusion'; did you mean 'diffusion'? available: diffusion
    """

    def __init__(self, mode: str = "diffusion") -> None:
        self.mode = _check_mode(mode)
        # per weight method: [time-aware passes attempted, passes that fell back]
        self._time_aware_counts: dict[str, list[int]] = {}

    def fallback_rates(self) -> dict[str, dict[str, float]]:
        """Per weight method: time-aware passes attempted, fallbacks to base quantization,
        and their ratio (what the report and results.json show)."""
        return {m: {"attempts": float(a), "fallbacks": float(f), "fallback_rate": f / a if a else 0.0}
                for m, (a, f) in sorted(self._time_aware_counts.items())}

    def _text_strategy(self, weights: Mapping[str, FloatArray], cfg: DiffusionQuantConfig,
                       progress: Progress | None, time_aware: TimeAwareSource | None) -> QuantizedModel:
        """R2Q (2 bits) or RTN weights, then the time-aware pass when a source is given.

        A failing time-aware pass raises with ``fail_fast``; otherwise the model keeps its
        base quantization (no activation tables), the original error is logged and recorded
        in the metadata, and the fallback is counted per method (``fallback_rates``).
        """
        method = text_method(cfg.bits)
        qcfg = QuantizationConfig(cfg.scheme.name, method=method, fail_fast=cfg.fail_fast)
        model = quantize_model(weights, qcfg, progress)
        meta = _base_metadata(cfg, self.mode)
        meta["weight_method"] = method
        if time_aware is None:
            return _with_metadata(model, meta)
        counts = self._time_aware_counts.setdefault(method, [0, 0])
        counts[0] += 1
        try:
            aux, note = time_aware_pass(cfg.time_groups, time_aware)
        except Exception as exc:  # the source runs user code: any failure is the pass failing
            if cfg.fail_fast:
                raise QuantizationError(
                    f"time-aware pass ({cfg.time_groups} groups) failed: {type(exc).__name__}: {exc}") from exc
            counts[1] += 1
            _LOG.warning("time-aware pass failed, falling back to base quantization (%s): %s: %s",
                         method, type(exc).__name__, exc)
            meta["activation_params"] = f"fallback to base quantization: {type(exc).__name__}: {exc}"
            return _with_metadata(model, meta)
        meta["activation_params"] = note
        return dataclasses.replace(_with_metadata(model, meta), aux={**model.aux, **aux})

    def __repr__(self) -> str:
        return f"ArrowQuantV2(mode={self.mode!r})"

    def quantize(self, weights: Mapping[str, FloatArray],
                 config: DiffusionQuantConfig | str | None = None,
                 progress: Progress | None = None,
                 time_aware: TimeAwareSource | None = None) -> QuantizedModel:
        """Quantize in memory with the text strategy; the model's metadata records mode,
        config, time_groups and what happened to the activation parameters.

        ``config`` is a DiffusionQuantConfig, a profile name, or None for "local".
        ``time_aware`` feeds calibration activations (see :data:`TimeAwareSource`); the
        per-time-group tables then go to the model's ``aux`` arrays.
        """
        cfg = _config(config)
        return self._text_strategy(weights, cfg, progress, time_aware)

    def quantize_diffusion_model(self, model_path: StrPath, output_path: StrPath,
                                 config: DiffusionQuantConfig | str | None = None,
                                 progress: Progress | None = None,
                                 calibration: SpatialCalibration | None = None,
                                 time_aware: TimeAwareSource | None = None) -> DiffusionQuantResult:
        """Read a model folder, quantize it, write ``output_path`` (Parquet v2), measure.

        ``config`` is a DiffusionQuantConfig or a profile name; None means "local". ``progress(done, total, name)`` is
        called once per tensor. Exceeding ``target_size_mb`` is reported in the result
        (``within_target_size``), not raised. Text and code take the text strategy
        (``_text_strategy``): with a ``time_aware`` source the per-time-group activation
        tables are written to the artifact's aux rows; without one ``time_groups`` is only
        recorded in the metadata. ``calibration`` feeds the image / audio route (GPTQ +
        Spatial); it is ignored by the text route, and ``time_aware`` by the spatial one.
        """
        cfg = _config(config)
        folder = Path(model_path)
        target = Path(output_path)
        row = _strategy(folder)
        if target.is_dir():
            raise ConfigurationError(f"output_path {target}: is a folder; give the path of the file to write")
        source = _read_source(folder)
        if target.resolve() in {f.resolve() for f in source.files}:
            raise ConfigurationError(f"output_path {target}: is one of the source weight files")
        hashes = {str(f.relative_to(folder)): _sha256(f) for f in source.files}
        source_bytes = sum(os.stat(f).st_size for f in source.files)

        names = tuple(source.weights)
        done_count = [0]

        def on_tensor(done: int, total: int, name: str) -> None:
            done_count[0] = done
            if progress is not None:
                progress(done, total, name)

        started = time.perf_counter()
        reference: Mapping[str, npt.NDArray[Any]] = source.weights
        spatial_meta: dict[str, str] = {}
        fallbacks: tuple[tuple[str, str], ...] = ()
        try:
            if row.strategy == SPATIAL_STRATEGY:
                quantized, reference, spatial_meta, fallbacks = _spatial(source.weights, cfg, calibration, on_tensor)
            else:
                quantized = self._text_strategy(source.weights, cfg, on_tensor, time_aware)
        except QuantizationError as exc:
            if done_count[0] < len(names):
                failing = names[done_count[0]]
                raise QuantizationError(f"{source.owner[failing]}: {exc}") from None
            raise
        seconds = time.perf_counter() - started
        if not quantized.tensors:
            raise QuantizationError(f"{folder}: no tensor was quantized (skipped: {quantized.skipped})")

        meta = {**_base_metadata(cfg, self.mode), **quantized.metadata}
        meta.update({
            "modality": row.modality,
            "strategy": row.strategy,
            "source_layout": source.layout,
            "source_files": json.dumps(hashes, sort_keys=True),
            "source_bytes": str(source_bytes),
            "skipped": json.dumps(quantized.skipped, sort_keys=True),
            **spatial_meta,
        })
        model = _with_metadata(quantized, meta)

        # Write beside the target, read back and measure, then rename: output_path
        # appears only when everything succeeded (storage.save is itself atomic).
        partial = target.with_name(f".{target.name}.{secrets.token_hex(6)}.partial")
        try:
            save(model, partial)
            written_bytes = os.stat(partial).st_size
            layers = _layer_qualities(reference, load(partial), partial)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)

        cosines = [layer.cosine for layer in layers]
        size_mb = written_bytes / 1e6
        worst = min(cosines)
        return DiffusionQuantResult(
            output_path=target, modality=row.modality, profile=cfg.profile, scheme=cfg.scheme.name,
            compression_ratio=source_bytes / written_bytes, cosine_similarity=_mean(cosines),
            min_cosine_similarity=worst, model_size_mb=size_mb, source_size_mb=source_bytes / 1e6,
            target_size_mb=float(cfg.target_size_mb), within_target_size=size_mb <= cfg.target_size_mb,
            min_accuracy=float(cfg.min_accuracy), meets_min_accuracy=worst >= cfg.min_accuracy,
            quantize_seconds=seconds, layers=layers,
            skipped=tuple(sorted(quantized.skipped.items())), fallbacks=fallbacks)

    def validate_quality(self, original_path: StrPath, quantized_path: StrPath,
                         min_accuracy: float | None = None,
                         raise_on_failure: bool = False) -> QualityReport:
        """Per-layer cosine between original weights and a Parquet v2 artifact.

        ``original_path`` is a model folder (any layout ``quantize_diffusion_model``
        reads) or a ``.safetensors`` file. The threshold is ``min_accuracy`` if given,
        else the artifact's recorded config, else ``DEFAULT_MIN_ACCURACY``; ``passed`` is
        ``min cosine >= threshold``. A failed check raises ``ValidationError`` only with
        ``raise_on_failure=True``. An artifact that is not a quantization of the original
        (a tensor missing or of another shape) or holds no quantized tensor raises
        ``ValidationError`` always: there is no quality to report.
        """
        original = Path(original_path)
        artifact = Path(quantized_path)
        model = load(artifact)
        threshold, origin = _threshold(min_accuracy, model.metadata, artifact)
        weights = _read_original(original)
        record = model.metadata.get("spatial")
        if record is not None:  # a smoothed artifact approximates the smoothed original
            weights = smoothed_reference(weights, record)
        layers = _layer_qualities(weights, model, artifact)
        worst = min(layers, key=lambda layer: layer.cosine)
        report = QualityReport(
            original_path=original, quantized_path=artifact, layers=layers,
            mean_cosine=_mean([layer.cosine for layer in layers]), min_cosine=worst.cosine,
            worst_layer=worst.name, threshold=threshold, threshold_source=origin,
            passed=worst.cosine >= threshold)
        message = report.failure()
        if raise_on_failure and message is not None:
            raise ValidationError(message)
        return report


def _spatial(weights: Mapping[str, FloatArray], cfg: DiffusionQuantConfig,
             calibration: SpatialCalibration | None, progress: Progress | None,
             ) -> tuple[QuantizedModel, dict[str, npt.NDArray[Any]], dict[str, str], tuple[tuple[str, str], ...]]:
    """The image / audio route: GPTQ + Spatial with calibration, the per-channel fallback without."""
    fallback = f"int{cfg.bits}-channel-sym"
    if calibration is None:
        reason = ("no calibration activations were given, so nothing could be smoothed or GPTQ-calibrated; "
                  f"quantized per channel ({fallback}, clip search)")
        model = quantize_model(weights, QuantizationConfig(fallback, fail_fast=cfg.fail_fast, method="clip"), progress)
        fallbacks = tuple((name, reason) for name in model.tensors)
        meta = {"spatial": json.dumps({"smoothed": [], "fallbacks": {"*": reason}}, sort_keys=True),
                "spatial_fallbacks": str(len(fallbacks)), "spatial_smoothed_sites": "0"}
        return model, dict(weights), meta, fallbacks
    spatial_config = SpatialConfig(cfg.scheme.name, "gptq", fallback_scheme=fallback)
    result = quantize_spatial({k: np.asarray(v, np.float32) for k, v in weights.items()}, calibration.sites,
                              calibration.activations, spatial_config, calibration.hessians, calibration.groups)
    if progress is not None:
        total = len(result.model.order)
        for done, name in enumerate(result.model.order, start=1):
            progress(done, total, name)
    meta = {"spatial": describe(result, calibration.sites), "spatial_fallbacks": str(len(result.fallbacks)),
            "spatial_smoothed_sites": str(len(result.factors))}
    reference: dict[str, npt.NDArray[Any]] = dict(result.smoothed)
    return result.model, reference, meta, tuple(sorted(result.fallbacks.items()))


def _config(config: DiffusionQuantConfig | str | None) -> DiffusionQuantConfig:
    # Compiled, a value of another type is refused with a TypeError at the call boundary
    # before this check runs (docs/MYPYC.md, "Runtime surprises"); the check serves pure-Python mode.
    if config is None:
        return DiffusionQuantConfig.from_profile("local")
    if isinstance(config, str):
        return DiffusionQuantConfig.from_profile(config)
    if not isinstance(config, DiffusionQuantConfig):
        raise ConfigurationError(
            f"config must be a DiffusionQuantConfig or a profile name, "
            f"got {type(config).__name__}")
    return config


def _base_metadata(cfg: DiffusionQuantConfig, mode: str) -> dict[str, str]:
    return {
        "mode": mode,
        "profile": cfg.profile,
        "config": cfg.to_json(),
        "scheme": cfg.scheme.name,
        "time_groups": str(cfg.time_groups),
        "activation_params": _ACTIVATION_NOTE,
    }


def _with_metadata(model: QuantizedModel, extra: Mapping[str, str]) -> QuantizedModel:
    metadata = dict(model.metadata)
    metadata.update(extra)
    return dataclasses.replace(model, metadata=metadata)


def _threshold(min_accuracy: float | None, metadata: Mapping[str, str], artifact: Path) -> tuple[float, str]:
    if min_accuracy is not None:
        value = float(min_accuracy)
        if not 0.0 < value <= 1.0:
            raise ConfigurationError(f"min_accuracy = {min_accuracy!r}: must satisfy 0 < min_accuracy <= 1")
        return value, "argument"
    recorded = metadata.get("config")
    if recorded is None:
        return DEFAULT_MIN_ACCURACY, "default"
    try:
        data = json.loads(recorded)
        value = float(data["min_accuracy"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise FormatError(f"{artifact}: recorded config {recorded!r} has no numeric \"min_accuracy\"") from None
    if not 0.0 < value <= 1.0:
        raise FormatError(f"{artifact}: recorded min_accuracy {value} is outside (0, 1]")
    return value, "artifact"
