"""Hostile inputs, one class per test: every reader refuses with a typed error naming the
file (and tensor or line) and the rule, in bounded memory and time, with a bounded
message (issue 10). Bomb-like cases run in a subprocess so their peak RSS is measured on
its own (tests/fuzz/bombs.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path
import struct

import ml_dtypes
import numpy as np
import pytest

from arrowquant_core.errors import ConfigurationError, FormatError, QuantizationError
from arrowquant_core.limits import MESSAGE_LIMIT, read_capped
from arrowquant_core.safetensors_io import read_npy_folder, read_safetensors, write_safetensors
from fixtures.calibration import MAX_LINE_CHARS, content_hash, read_jsonl, read_parquet
from fuzz.bombs import BOMBS, measure_all
from harness.criteria import MAX_CRITERIA_BYTES, load_criteria

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def raw_safetensors(path: Path, header: dict[str, object], data: bytes = b"") -> Path:
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


# --------------------------------------------------------------------------- criteria


CRITERIA_CASES = {
    "bits-not-a-table": ('bits = 3\n', "needs at least one"),
    "section-not-a-table": ('[bits]\n4 = 5\n', "must be a table"),
    "all-not-a-table": ('all = [1]\n[bits.4]\nscheme = "int4-g64-asym"\n', r"\[all\] must be a table"),
    "gates-not-a-list": ('[bits.4]\nscheme = "int4-g64-asym"\ngates = "x >= 1"\n', "'gates' must be a list"),
    "gate-of-wrong-type": ('[bits.4]\nscheme = "int4-g64-asym"\ngates = [3]\n', "must be a string"),
    "why-not-a-string": ('[bits.4]\nscheme = "int4-g64-asym"\ngates = [{rule = "weight_cosine_min >= 0.9", why = 3}]\n',
                         "must be a string"),
    "threshold-not-a-number": ('[bits.4]\nscheme = "int4-g64-asym"\ngates = ["weight_cosine_min >= e"]\n',
                               "is not a number"),
    "report-not-a-list": ('[bits.4]\nscheme = "int4-g64-asym"\nreport = 3\n', "report = 3 must be a list"),
    "report-of-ints": ('[bits.4]\nscheme = "int4-g64-asym"\nreport = [3]\n', "must be a list of str"),
    "method-not-a-string": ('[bits.4]\nscheme = "int4-g64-asym"\nmethod = 4\n', "method = 4 must be a string"),
    "compare-not-a-list": ('[bits.4]\nscheme = "int4-g64-asym"\ncompare = "clip"\n', "compare"),
    "rungs-not-a-list": ('[bits.4]\nscheme = "int4-g64-asym"\nladder = {rungs = 3}\n', "ladder rungs"),
    "fail-fast-not-bool": ('[bits.4]\nscheme = "int4-g64-asym"\n'
                           'ladder = {rungs = [], layer_threshold = 0.1, target = 0.9, fail_fast = "yes"}\n',
                           "fail_fast"),
    "model-not-a-string": ('model = 3\n[bits.4]\nscheme = "int4-g64-asym"\n', "model = 3 must be a string"),
    "huge-bit-section": ('[bits.99999999999999999999]\nscheme = "int4-g64-asym"\n', "must be a bit width"),
    "long-rule-is-cut": ('[bits.4]\nscheme = "int4-g64-asym"\ngates = ["' + "x" * 100_000 + '"]\n',
                         "characters"),
}


@pytest.mark.parametrize("case", list(CRITERIA_CASES))
def test_criteria_of_the_wrong_type_are_configuration_errors(tmp_path: Path, case: str) -> None:
    text, needle = CRITERIA_CASES[case]
    path = tmp_path / "c.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigurationError, match=needle) as info:
        load_criteria(path)
    assert str(path) in str(info.value) and len(str(info.value)) < 2000


def test_criteria_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes(b'model = "x"\n[bits.4]\nscheme = "\xff"\n')
    with pytest.raises(ConfigurationError, match=r"line 3: not valid UTF-8"):
        load_criteria(path)


def test_criteria_devices_fifos_folders_and_oversized_files_are_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)  # opening it for reading would block for ever without a writer
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * (MAX_CRITERIA_BYTES + 1))
    for path, needle in [(Path("/dev/zero"), "not a regular file"), (fifo, "not a regular file"),
                         (tmp_path, "is a folder"), (big, "exceeds the limit")]:
        with pytest.raises(ConfigurationError, match=needle):
            load_criteria(path)


def test_read_capped_stops_at_the_cap_even_if_the_file_grows(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10)
    assert read_capped(path, 10, "f") == b"x" * 10
    with pytest.raises(FormatError, match="exceeds the limit of 9 bytes"):
        read_capped(path, 9, "f")


# --------------------------------------------------------------------------- calibration


def test_calibration_devices_fifos_and_long_lines_are_format_errors(tmp_path: Path) -> None:
    fifo = tmp_path / "cal.jsonl"
    os.mkfifo(fifo)
    for path in (Path("/dev/zero"), fifo):
        with pytest.raises(FormatError, match="not a regular file"):
            read_jsonl(path)
        with pytest.raises(FormatError, match="not a regular file"):
            content_hash(path)
    with pytest.raises(FormatError, match="not a regular file"):
        read_parquet(Path("/dev/zero"))
    long = tmp_path / "long.jsonl"
    long.write_bytes(b'{"input_ids": [1], "mask_ratio": 0.5}\n{"input_ids": [' + b"1," * MAX_LINE_CHARS + b"1]}\n")
    with pytest.raises(FormatError, match=r"line 2: \d+ characters exceeds the limit"):
        read_jsonl(long)


def test_calibration_deep_nesting_is_a_format_error(tmp_path: Path) -> None:
    path = tmp_path / "cal.jsonl"
    path.write_bytes(b"[" * 200_000 + b"\n")
    with pytest.raises(FormatError, match="line 1"):
        read_jsonl(path)


# --------------------------------------------------------------------------- safetensors / .npy


def test_zero_size_tensor_with_absurd_shape_is_refused_before_numpy(tmp_path: Path) -> None:
    path = raw_safetensors(tmp_path / "m.safetensors", {"w": {"dtype": "F32", "shape": [0, 2**62, 2**62],
                                                              "data_offsets": [0, 0]}})
    with pytest.raises(FormatError, match=r"tensor 'w': shape \[0, 4611686018427387904, .*not representable"):
        read_safetensors(path)


def test_error_messages_quote_user_data_within_bounds(tmp_path: Path) -> None:
    name = "n" * 1_000_000
    path = raw_safetensors(tmp_path / "m.safetensors", {name: {"dtype": "F32", "shape": [1] * 100_000,
                                                               "data_offsets": [0, 4]}}, b"\0" * 4)
    with pytest.raises(FormatError) as info:
        read_safetensors(path)
    assert len(str(info.value)) < len(str(path)) + 6 * MESSAGE_LIMIT
    assert "100000 items" in str(info.value) and "1000000 characters" in str(info.value)


@pytest.mark.parametrize(("header", "data", "needle"), [
    ("{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000,), }", 16, "lying header"),
    ("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", 28, "holds 28 data bytes"),
    ("{'descr': '<f4', 'fortran_order': False, 'shape': (-1,), }", 0, "non-negative"),
    ("{'descr': '<f4', 'fortran_order': False, 'shape': 'x', }", 0, "not a plain .npy array"),
    ("{'descr': '<f4', 'fortran_order': False, 'shape': (0, 2**70), }", 0, "not a plain .npy array"),
    ("{'descr': '<f4', 'fortran_order': False, 'shape': (0, 1180591620717411303424), }", 0, "not representable"),
    ("{'descr': 'O', 'fortran_order': False, 'shape': (1,), }", 8, "pickles are never loaded"),
    ("{'descr': '<f4', 'fortran_order': False, 'shape': (1,)", 4, "not a plain .npy array"),
    ("__import__('os').system('echo pwned')", 0, "not a plain .npy array"),
], ids=["lies-huge", "lies-small", "negative", "shape-not-tuple", "expression", "absurd-zero-size", "object",
        "unparsable", "code"])
def test_npy_headers_that_lie_or_do_not_parse(tmp_path: Path, header: str, data: int, needle: str) -> None:
    text = header + " " * (-(len(header) + 11) % 64) + "\n"
    path = tmp_path / "w.npy"
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1") + bytes(data))
    with pytest.raises(FormatError, match=needle) as info:
        read_npy_folder(tmp_path)
    assert str(info.value).startswith(f"{path}: ")


def test_npy_fortran_and_big_endian_arrays_read_right(tmp_path: Path) -> None:
    a = np.asfortranarray(np.arange(6, dtype=">f4").reshape(2, 3))
    np.save(tmp_path / "w.npy", a)
    got = read_npy_folder(tmp_path)["w"]
    assert got.dtype == np.dtype("<f4") and got.flags.c_contiguous and got.tolist() == a.tolist()


def test_bf16_nan_and_inf_are_caught_at_load(tmp_path: Path) -> None:
    from fixtures.checkpoint import load_model

    for bad in (np.nan, np.inf):
        w = np.ones((4, 8), dtype=ml_dtypes.bfloat16)
        w[1, 2] = bad
        path = tmp_path / f"m{bad}.safetensors"
        write_safetensors(path, {"w": w})
        with pytest.raises(QuantizationError, match=r"tensor 'w': 1 non-finite value\(s\).*index \[1, 2\]"):
            load_model(str(path))


def test_cli_maps_hostile_model_files_to_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from harness.cli import main

    path = raw_safetensors(tmp_path / "m.safetensors", {"w": {"dtype": "F32", "shape": [0, 2**62, 2**62],
                                                              "data_offsets": [0, 0]}})
    assert main(["run", "--model", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "not representable" in err and "Traceback" not in err


@pytest.mark.parametrize("config, needle", [
    (b"[" * 100_000, "maximum recursion depth"),
    (b'{"model_type": "\xff"}', "not valid UTF-8"),
    (b'{"model_type": "bert", "model_type": "gpt2"}', "appears twice"),
    (None, "not a regular file"),  # config.json is /dev/zero: refused, not read for ever
])
def test_hostile_config_json_of_a_model_folder_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         config: bytes | None, needle: str) -> None:
    """A model folder's config.json is someone else's file too: read within a cap by the
    one JSON reader (limits.read_json). Deep nesting used to escape as a RecursionError
    (exit 3)."""
    from harness.cli import main

    folder = tmp_path / "model"
    folder.mkdir()
    write_safetensors(folder / "model.safetensors", {"a.weight": np.ones((8, 64), np.float32)})
    if config is None:
        (folder / "config.json").symlink_to("/dev/zero")
    else:
        (folder / "config.json").write_bytes(config)
    assert main(["run", "--model", str(folder), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "config.json" in err and "Traceback" not in err


@pytest.mark.parametrize("edit, needle", [
    ({"n_layer": 100_000}, "num_hidden_layers = 100000, but the checkpoint holds 2 layer(s) under 'transformer.h.'"),
    ({"n_layer": 4}, "missing 24 tensor(s) the model needs"),
    ({"n_embd": 100_000}, "the model expects [300000]"),
    ({"n_positions": 10**6}, "'transformer.wpe.weight' has shape [64, 128], the model expects [1000000, 128]"),
    ({"vocab_size": 10**8}, "the model expects [100000000, 128]"),
])
def test_config_json_claiming_more_than_the_weights_is_refused_before_it_is_built(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: dict[str, int], needle: str) -> None:
    """The runner checks config.json against the checkpoint's names and shapes on the meta
    device before building anything (hf_common.check_config): 100,000 layers over the
    tiny GPT-2's two used to take 24 GB and minutes. The memory side is the bomb
    hf-config-layers below."""
    import shutil

    from fixtures import tiny_lm
    from harness.cli import main

    folder = tmp_path / "model"
    shutil.copytree(tiny_lm.ensure_tiny_gpt2(), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **edit}))
    assert main(["run", "--model", str(folder), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err


@pytest.mark.parametrize("edit, needle", [
    ({"num_attention_heads": 1}, "config.json: DreamConfig.num_attention_heads = 1 is not divisible"),
    ({"vocab_size": 10**8}, "shape (1000, 512) does not match the config's (100000000, 512)"),
    ({"num_hidden_layers": 100_000}, "model.layers.2.input_layernorm.weight']: missing"),
])
def test_a_dream_config_that_does_not_fit_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          edit: dict[str, int], needle: str) -> None:
    import shutil

    from fixtures.dream_mini.runner import ensure_fixture
    from harness.cli import main

    folder = tmp_path / "dream"
    shutil.copytree(ensure_fixture(), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **edit}))
    assert main(["run", "--model", str(folder), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert needle in err and str(folder) in err and "Traceback" not in err, err


# --------------------------------------------------------------------------- bombs


BOMB_SCALES = {  # small enough for the default run; `make fuzz` runs them at campaign size
    "parquet-zstd-codes": 32, "safetensors-header-max": 1, "safetensors-header-99MB": 1,
    "safetensors-long-shape": 1, "npy-lying-shape": 1, "jsonl-long-line": 4, "criteria-dev-zero": 1,
    "calibration-dev-zero": 1, "gguf-string-array": 8, "hf-config-layers": 2,
}
VALID_BOMBS = {"safetensors-header-max", "gguf-string-array"}  # valid files: read, within the bounds


def test_bombs_are_read_in_memory_bounded_by_their_real_size(tmp_path: Path) -> None:
    """Each bomb, in one subprocess (peak RSS reset before each): refused with a typed
    error (the valid ones, VALID_BOMBS, are read), within 32x its real size plus 64 MiB of
    added RSS, 20 s and a 1,000-character message."""
    reports = measure_all([(BOMBS[name], scale) for name, scale in BOMB_SCALES.items()], tmp_path)
    for report in reports:
        assert not report["outcome"].startswith("crash"), report
        assert report["added_kib"] * 1024 <= 32 * report["file_bytes"] + 64 * MiB, report
        assert report["seconds"] < 20, report
        assert report["message_chars"] < 1000, report
        if report["bomb"] not in VALID_BOMBS:
            assert report["outcome"].startswith("typed:"), report


def test_a_none_scheme_is_a_configuration_error_not_a_type_error() -> None:
    """Where a scheme is looked up from outside data (criteria, artifacts, the functions
    that take a scheme or its name), None is a ConfigurationError naming the rule.
    ``QuantizationConfig(None)`` is refused by the compiled dataclass itself before any
    of our code runs ("str object expected; got None"), which the CLI never reaches:
    criteria are validated first."""
    from arrowquant_core.schemes import get_scheme

    with pytest.raises(ConfigurationError, match="must be a scheme name"):
        get_scheme(None)
    # through a dataclass field read from a file: the criteria loader's own check
    from harness.criteria import load_criteria

    bad = Path(__import__("tempfile").mkdtemp()) / "c.toml"
    bad.write_text("[bits.4]\nscheme = 4\n")
    with pytest.raises(ConfigurationError, match="scheme"):
        load_criteria(bad)


def test_report_of_a_device_or_a_deeply_nested_results_file_is_exit_2(tmp_path: Path) -> None:
    from harness.cli import main

    nested = tmp_path / "results.json"
    nested.write_bytes(b"[" * 100_000)
    assert main(["report", "/dev/zero"]) == 2
    assert main(["report", str(nested)]) == 2
    assert main(["verify", str(nested)]) == 2
