"""The diffusion API (arrowquant_core.diffusion) end to end on real files.

Every test works on a generated Dream miniature (``fixtures.dream_mini.generate``,
~3.5M parameters, 14 MB FP32) written to a temporary folder: profiles, layouts
(single safetensors, shards + index, legacy .npy), modality detection, progress,
quality validation, determinism and the failure paths (nothing left at output_path).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest

from arrowquant_core.diffusion import (
    DEFAULT_MIN_ACCURACY,
    MODALITIES,
    PROFILES,
    ArrowQuantV2,
    DeploymentProfile,
    DiffusionQuantConfig,
    DiffusionQuantResult,
    detect_modality,
    get_profile,
)
from arrowquant_core.errors import ConfigurationError, FormatError, QuantizationError, ValidationError
from arrowquant_core.model import QuantizationConfig, QuantizedModel, quantize_model
from arrowquant_core.safetensors_io import read_safetensors, write_safetensors
from arrowquant_core.schemes import BIT_WIDTHS, SCHEMES
from arrowquant_core.storage import load, save
from fixtures.dream_mini import generate

PROFILE_NAMES = ("edge", "local", "cloud")
# derived from the scheme table, as the module derives them (the table may grow)
GROUP_SIZES_IN_TABLE = sorted({s.group_size for s in SCHEMES.values() if s.granularity == "group"})


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("dream") / "m", seed=0)


@pytest.fixture(scope="module")
def results(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, DiffusionQuantResult]:
    """One run per profile, shared by the tests that inspect them (~0.5 s each)."""
    out = tmp_path_factory.mktemp("out")
    api = ArrowQuantV2(mode="diffusion")
    return {name: api.quantize_diffusion_model(model_dir, out / f"{name}.parquet",
                                               DiffusionQuantConfig.from_profile(name))
            for name in PROFILE_NAMES}


def assert_same_logical_content(a: QuantizedModel, b: QuantizedModel) -> None:
    assert a.order == b.order
    assert a.metadata == b.metadata
    assert sorted(a.tensors) == sorted(b.tensors)
    for name, qa in a.tensors.items():
        qb = b.tensors[name]
        assert (qa.scheme, qa.shape, qa.dtype) == (qb.scheme, qb.shape, qb.dtype), name
        assert qa.codes.tobytes() == qb.codes.tobytes(), name
        assert qa.scales.tobytes() == qb.scales.tobytes(), name
        assert qa.zeros.tobytes() == qb.zeros.tobytes(), name
    for name, fa in a.floats.items():
        assert fa.tobytes() == b.floats[name].tobytes(), name


# --------------------------------------------------------------------------- profiles and config


def test_profile_table_is_exactly_the_seed_table() -> None:
    rows = {p.name: (p.bits, p.time_groups, p.group_size, p.min_accuracy, p.calibration_samples,
                     p.target_size_mb, p.scheme_name) for p in PROFILES.values()}
    assert rows == {
        "edge": (2, 5, 256, 0.65, 32, 35.0, "int2-g256-asym"),
        "local": (4, 10, 128, 0.85, 128, 200.0, "int4-g128-asym"),
        "cloud": (8, 20, 64, 0.95, 512, 2000.0, "int8-g64-asym"),
    }
    for profile in PROFILES.values():
        assert profile.scheme is SCHEMES[profile.scheme_name]


def test_get_profile_says_did_you_mean() -> None:
    assert get_profile("edge") is PROFILES["edge"]
    with pytest.raises(ConfigurationError, match=r"unknown profile 'lokal'; did you mean 'local'\? "
                                                 r"available: cloud, edge, local"):
        get_profile("lokal")


def test_config_from_profile_and_conversion() -> None:
    config = DiffusionQuantConfig.from_profile("edge")
    assert (config.bits, config.group_size, config.time_groups, config.min_accuracy,
            config.calibration_samples, config.target_size_mb, config.symmetric, config.fail_fast) == (
        2, 256, 5, 0.65, 32, 35.0, False, True)
    assert config.scheme is SCHEMES["int2-g256-asym"]
    assert config.profile == "edge"
    assert config.to_quantization_config() == QuantizationConfig("int2-g256-asym", fail_fast=True)
    custom = DiffusionQuantConfig(4, 32, 3, 0.9, 16, 10.0, symmetric=True, fail_fast=False)
    assert custom.profile == ""
    assert custom.to_quantization_config() == QuantizationConfig("int4-g32-sym", fail_fast=False)


@pytest.mark.parametrize(("field", "value", "rule"), [
    ("bits", 3, "bit widths " + re.escape(str(list(BIT_WIDTHS)))),
    ("group_size", 100, "group sizes " + re.escape(str(GROUP_SIZES_IN_TABLE))),
    ("time_groups", 0, ">= 1"),
    ("min_accuracy", 0.0, "0 < min_accuracy <= 1"),
    ("min_accuracy", 1.5, "0 < min_accuracy <= 1"),
    ("min_accuracy", math.nan, "0 < min_accuracy <= 1"),
    ("calibration_samples", 0, ">= 1"),
    ("target_size_mb", -1.0, "> 0"),
    ("target_size_mb", math.inf, "> 0"),
])
def test_config_validation_names_field_value_and_rule(field: str, value: object, rule: str) -> None:
    kwargs: dict[str, object] = dict(bits=4, group_size=128, time_groups=10, min_accuracy=0.85,
                                     calibration_samples=128, target_size_mb=200.0)
    kwargs[field] = value
    with pytest.raises(ConfigurationError) as info:
        DiffusionQuantConfig(**kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert f"DiffusionQuantConfig.{field} = {value!r}" in message
    assert re.search(rule, message), message


def test_profile_rows_are_validated_too() -> None:
    with pytest.raises(ConfigurationError, match=r"profile 'tiny'.bits = 1"):
        DeploymentProfile("tiny", 1, 5, 256, 0.5, 8, 1.0, "too small")


def test_frozen_values_pickle() -> None:
    config = DiffusionQuantConfig.from_profile("cloud")
    assert pickle.loads(pickle.dumps(config)) == config
    assert pickle.loads(pickle.dumps(PROFILES["edge"])) is PROFILES["edge"]
    assert pickle.loads(pickle.dumps(MODALITIES["code"])) == MODALITIES["code"]


# --------------------------------------------------------------------------- end to end, per profile


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_profile_end_to_end(name: str, model_dir: Path, results: dict[str, DiffusionQuantResult]) -> None:
    result = results[name]
    profile = PROFILES[name]
    source = model_dir / "model.safetensors"
    written = os.stat(result.output_path).st_size
    assert result.compression_ratio == os.stat(source).st_size / written
    assert result.model_size_mb == written / 1e6
    assert result.within_target_size and result.model_size_mb < profile.target_size_mb
    assert result.meets_min_accuracy and result.min_cosine_similarity >= profile.min_accuracy
    assert (result.modality, result.profile, result.scheme) == ("text", name, profile.scheme_name)
    assert result.min_cosine_similarity <= result.cosine_similarity <= 1.0
    assert math.isclose(result.cosine_similarity,
                        math.fsum(layer.cosine for layer in result.layers) / len(result.layers))
    assert {layer.scheme for layer in result.layers} == {profile.scheme_name}
    assert result.quantize_seconds > 0 and result.skipped == ()
    assert pickle.loads(pickle.dumps(result)) == result

    artifact = load(result.output_path)
    assert sorted(layer.name for layer in result.layers) == sorted(artifact.tensors)
    assert all(array.ndim == 1 for array in artifact.floats.values())  # norms and biases stay float
    meta = artifact.metadata
    assert (meta["mode"], meta["modality"], meta["strategy"], meta["profile"]) == ("diffusion", "text", "text", name)
    assert meta["time_groups"] == str(profile.time_groups)
    assert "not computed" in meta["activation_params"]
    assert json.loads(meta["config"])["min_accuracy"] == profile.min_accuracy
    assert json.loads(meta["source_files"]) == {
        "model.safetensors": hashlib.sha256(source.read_bytes()).hexdigest()}
    assert sorted(p.name for p in result.output_path.parent.iterdir() if p.name.startswith(".")) == []


def test_cosine_orders_the_profiles(results: dict[str, DiffusionQuantResult]) -> None:
    edge, local, cloud = (results[n] for n in PROFILE_NAMES)
    assert cloud.cosine_similarity > local.cosine_similarity > edge.cosine_similarity
    assert cloud.min_cosine_similarity > local.min_cosine_similarity > edge.min_cosine_similarity
    assert edge.model_size_mb < local.model_size_mb < cloud.model_size_mb
    # (not "edge < 35 MB", the profile's target: this miniature's FP32 file is 14 MB, so that cannot fail)


def test_default_config_is_local_and_a_profile_name_is_accepted(model_dir: Path, tmp_path: Path) -> None:
    result = ArrowQuantV2().quantize_diffusion_model(model_dir, tmp_path / "q.parquet")
    assert (result.profile, result.scheme) == ("local", "int4-g128-asym")
    by_name = ArrowQuantV2().quantize_diffusion_model(model_dir, tmp_path / "e.parquet", "edge")
    assert (by_name.profile, by_name.scheme) == ("edge", "int2-g256-asym")


def test_target_size_exceeded_is_reported_not_raised(model_dir: Path, tmp_path: Path) -> None:
    config = DiffusionQuantConfig(8, 64, 20, 0.95, 512, target_size_mb=1.0)
    result = ArrowQuantV2().quantize_diffusion_model(model_dir, tmp_path / "q.parquet", config)
    assert result.model_size_mb > 1.0 and not result.within_target_size
    assert result.output_path.is_file() and result.profile == ""


# --------------------------------------------------------------------------- layouts


def test_legacy_npy_layout_gives_the_same_codes(tmp_path: Path, results: dict[str, DiffusionQuantResult]) -> None:
    folder = generate(tmp_path / "npy", seed=0, legacy_npy=True)
    result = ArrowQuantV2().quantize_diffusion_model(folder, tmp_path / "q.parquet",
                                                     DiffusionQuantConfig.from_profile("local"))
    npy_files = sorted(folder.glob("*.npy"))
    assert result.compression_ratio == sum(os.stat(p).st_size for p in npy_files) / os.stat(result.output_path).st_size
    from_npy, from_safetensors = load(result.output_path), load(results["local"].output_path)
    assert from_npy.metadata["source_layout"] == "npy"
    assert len(json.loads(from_npy.metadata["source_files"])) == len(npy_files)
    assert_same_logical_content(
        QuantizedModel(from_npy.tensors, from_npy.floats, from_npy.order),
        QuantizedModel(from_safetensors.tensors, from_safetensors.floats, from_safetensors.order))


def test_sharded_layout_with_index(model_dir: Path, tmp_path: Path) -> None:
    weights = read_safetensors(model_dir / "model.safetensors")
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "metadata.json").write_text(json.dumps({"modality": "code"}))
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, members in shards.items():
        write_safetensors(folder / shard, {n: weights[n] for n in members})
    weight_map = {n: shard for shard, members in shards.items() for n in members}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    result = ArrowQuantV2().quantize_diffusion_model(folder, tmp_path / "q.parquet")
    assert result.modality == "code"
    assert result.compression_ratio == sum(os.stat(folder / s).st_size for s in shards) / os.stat(result.output_path).st_size
    assert sorted(json.loads(load(result.output_path).metadata["source_files"])) == sorted(shards)


# --------------------------------------------------------------------------- modality


def write_metadata(folder: Path, content: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metadata.json").write_text(content, encoding="utf-8")
    return folder


@pytest.mark.parametrize("modality", ["text", "code"])
def test_text_and_code_take_the_text_strategy(modality: str, tmp_path: Path) -> None:
    assert MODALITIES[modality].strategy == "text"
    assert detect_modality(write_metadata(tmp_path, json.dumps({"modality": modality}))) == modality


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_image_and_audio_take_gptq_spatial(modality: str, tmp_path: Path) -> None:
    # the route itself is exercised on dit-mini by tests/test_dit_route.py
    assert MODALITIES[modality].strategy == "gptq+spatial" and MODALITIES[modality].built
    assert detect_modality(write_metadata(tmp_path / "m", json.dumps({"modality": modality}))) == modality


def test_unknown_modality_says_did_you_mean(tmp_path: Path) -> None:
    folder = write_metadata(tmp_path, json.dumps({"modality": "txet"}))
    with pytest.raises(ConfigurationError, match=r"unknown modality 'txet'; did you mean 'text'\? "
                                                 r"available: audio, code, image, text"):
        detect_modality(folder)


@pytest.mark.parametrize(("content", "problem"), [
    (None, "missing"),
    ("{not json", "not valid JSON: Expecting property name enclosed in double quotes at line 1"),
    ("[" * 100_000, "not valid JSON: maximum recursion depth"),
    ('{"modality": "text", "modality": "image"}', "key 'modality' appears twice"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"model_family": "dream"}', 'no "modality" key'),
    ('{"modality": 3}', '"modality" must be a string'),
])
def test_bad_metadata_is_a_format_error_naming_the_file(content: str | None, problem: str, tmp_path: Path) -> None:
    if content is not None:
        write_metadata(tmp_path, content)
    with pytest.raises(FormatError) as info:
        detect_modality(tmp_path)
    assert str(tmp_path / "metadata.json") in str(info.value) and problem in str(info.value)


# --------------------------------------------------------------------------- progress, quantize in memory


def test_progress_is_called_once_per_tensor(model_dir: Path, tmp_path: Path) -> None:
    calls: list[tuple[int, int, str]] = []
    ArrowQuantV2().quantize_diffusion_model(model_dir, tmp_path / "q.parquet",
                                            DiffusionQuantConfig.from_profile("edge"),
                                            progress=lambda d, t, n: calls.append((d, t, n)))
    names = sorted(read_safetensors(model_dir / "model.safetensors"))
    assert [c[0] for c in calls] == list(range(1, len(names) + 1))
    assert {c[1] for c in calls} == {len(names)}
    assert [c[2] for c in calls] == names


def test_quantize_in_memory() -> None:
    rng = np.random.default_rng(0)
    weights = {"w": rng.standard_normal((8, 256)).astype(np.float32), "b": np.zeros(8, np.float32)}
    model = ArrowQuantV2().quantize(weights, DiffusionQuantConfig.from_profile("cloud"))
    assert model.tensors["w"].scheme.name == "int8-g64-asym" and list(model.floats) == ["b"]
    assert model.metadata["time_groups"] == "20" and model.metadata["profile"] == "cloud"


# --------------------------------------------------------------------------- validate_quality


def test_validate_quality_passes_with_the_recorded_threshold(
        model_dir: Path, results: dict[str, DiffusionQuantResult]) -> None:
    local = results["local"]
    report = ArrowQuantV2().validate_quality(model_dir, local.output_path)
    assert report.passed and report.failure() is None
    assert (report.threshold, report.threshold_source) == (0.85, "artifact")
    assert report.layers == local.layers
    assert (report.mean_cosine, report.min_cosine) == (local.cosine_similarity, local.min_cosine_similarity)
    assert report.worst_layer == min(local.layers, key=lambda layer: layer.cosine).name
    explicit = ArrowQuantV2().validate_quality(model_dir / "model.safetensors", local.output_path,
                                               min_accuracy=0.999)
    assert (explicit.threshold_source, explicit.passed) == ("argument", False)


def test_validate_quality_against_another_model_fails(
        tmp_path: Path, results: dict[str, DiffusionQuantResult]) -> None:
    other = generate(tmp_path / "seed1", seed=1)
    artifact = results["local"].output_path
    report = ArrowQuantV2().validate_quality(other, artifact)  # no raise unless asked
    assert not report.passed and report.min_cosine < 0.1
    with pytest.raises(ValidationError) as info:
        ArrowQuantV2().validate_quality(other, artifact, raise_on_failure=True)
    message = str(info.value)
    assert repr(report.worst_layer) in message
    assert f"cosine {report.min_cosine:.6f}" in message and "threshold 0.85" in message


def test_validate_quality_default_threshold(model_dir: Path, tmp_path: Path) -> None:
    weights = read_safetensors(model_dir / "model.safetensors")
    path = save(quantize_model(weights, QuantizationConfig("int4-g64-asym")), tmp_path / "plain.parquet")
    report = ArrowQuantV2().validate_quality(model_dir, path)
    assert (report.threshold, report.threshold_source, report.passed) == (DEFAULT_MIN_ACCURACY, "default", True)


# --------------------------------------------------------------------------- determinism


def test_two_runs_give_identical_codes_and_scales(model_dir: Path, tmp_path: Path) -> None:
    api = ArrowQuantV2()
    config = DiffusionQuantConfig.from_profile("edge")
    first = api.quantize_diffusion_model(model_dir, tmp_path / "a.parquet", config)
    second = api.quantize_diffusion_model(model_dir, tmp_path / "b.parquet", config)
    assert_same_logical_content(load(first.output_path), load(second.output_path))
    assert first.layers == second.layers


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("mode", "hint"), [("difusion", "did you mean 'diffusion'"),
                                            ("autoregressive", "available: diffusion")])
def test_bad_mode(mode: str, hint: str) -> None:
    with pytest.raises(ConfigurationError, match=rf"unknown mode '{mode}'.*{hint}"):
        ArrowQuantV2(mode=mode)


def test_bad_config_type_and_output_folder(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"unknown profile 'egde'; did you mean 'edge'"):
        ArrowQuantV2().quantize_diffusion_model(model_dir, tmp_path / "q.parquet", "egde")
    # compiled, the call boundary refuses the type with a TypeError (docs/MYPYC.md); pure Python,
    # the readable check does: either way the message names the expected type
    with pytest.raises((ConfigurationError, TypeError), match="DiffusionQuantConfig"):
        ArrowQuantV2().quantize_diffusion_model(model_dir, tmp_path / "q.parquet", {"bits": 4})  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="is a folder"):
        ArrowQuantV2().quantize_diffusion_model(model_dir, tmp_path)


def test_nan_in_npy_file_names_the_file_and_tensor(tmp_path: Path) -> None:
    folder = generate(tmp_path / "npy", seed=0, legacy_npy=True)
    bad = folder / "model.layers.1.mlp.up_proj.weight.npy"
    array = np.load(bad)
    array[2, 3] = np.nan
    np.save(bad, array)
    out = tmp_path / "out" / "q.parquet"
    with pytest.raises(QuantizationError) as info:
        ArrowQuantV2().quantize_diffusion_model(folder, out)
    assert str(bad) in str(info.value) and "'model.layers.1.mlp.up_proj.weight'" in str(info.value)
    assert not out.parent.exists()


def test_nan_in_safetensors_keeps_the_previous_artifact(model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "nan"
    folder.mkdir()
    (folder / "metadata.json").write_text(json.dumps({"modality": "text"}))
    weights = read_safetensors(model_dir / "model.safetensors")
    weights["model.norm.weight"][0] = np.inf
    write_safetensors(folder / "model.safetensors", weights)
    out = tmp_path / "q.parquet"
    out.write_bytes(b"previous artifact")
    with pytest.raises(QuantizationError, match=r"model\.safetensors: tensor 'model\.norm\.weight': 1 non-finite"):
        ArrowQuantV2().quantize_diffusion_model(folder, out)
    assert out.read_bytes() == b"previous artifact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan", "q.parquet"]


def test_core_module_imports_no_harness_code() -> None:
    code = ("import sys, arrowquant_core.diffusion; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'fixtures', 'harness', 'pytest', 'jinja2', 'torch'}); print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_fail_fast_off_keeps_a_bad_tensor_in_float_and_reports_it(tmp_path: Path) -> None:
    folder = generate(tmp_path / "npy", seed=0, legacy_npy=True)
    bad = folder / "model.layers.0.mlp.gate_proj.weight.npy"
    array = np.load(bad)
    array[0, 0] = np.nan
    np.save(bad, array)
    config = DiffusionQuantConfig.from_profile("edge", fail_fast=False)
    result = ArrowQuantV2().quantize_diffusion_model(folder, tmp_path / "q.parquet", config)
    assert [name for name, _ in result.skipped] == ["model.layers.0.mlp.gate_proj.weight"]
    assert "non-finite" in result.skipped[0][1]
    artifact = load(result.output_path)
    assert "model.layers.0.mlp.gate_proj.weight" in artifact.floats
    assert "model.layers.0.mlp.gate_proj.weight" in json.loads(artifact.metadata["skipped"])
