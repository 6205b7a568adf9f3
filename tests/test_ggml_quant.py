"""ggml's own quantizer (harness/ggml_build.py, harness/ggml_quant.py): the library built
by ``make setup`` from the pinned sdist, its bytes read back by gguf-py exactly as ggml's
own ``to_float`` reads them, llama-imatrix's importance, and the typed errors."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from arrowquant_core.errors import ConfigurationError, QuantizationError
from harness import ggml_build, ggml_quant, peers

T = gguf.GGMLQuantizationType
# every type a peer stores: the K-quant/IQ peers' types and their fallbacks
TYPES = sorted({p.ggml_type for p in peers.PEERS.values() if p.quantizer == peers.GGML}
               | {T.Q8_0, T.Q5_1, T.Q5_0, T.Q4_1, T.Q4_0}, key=int)


def test_the_library_is_built_from_the_pinned_sdist() -> None:
    """make setup builds it; absent, this fails with the command (it never skips)."""
    record = ggml_build.read_record()
    assert (record.version, record.sdist_sha256) == (ggml_build.VERSION, ggml_build.SDIST_SHA256)
    assert ggml_build.library_path().is_file() and record.compile_seconds > 0
    assert ggml_build.VERSION == peers._LLAMA_CPP_PYTHON


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    rng = np.random.default_rng(7)
    w = rng.standard_t(4, size=(16, 512)).astype(np.float32) * 0.05  # heavy tails, like trained weights
    w[3, 100] = 0.9  # an outlier
    return w


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_ggml_codes_dequantize_the_same_in_gguf_py(qtype: T, rows: np.ndarray) -> None:
    """Cross-check: ggml's bytes through gguf-py's dequantizer equal ggml's own to_float,
    bit for bit, with and without an importance matrix; and sizes agree with gguf-py's table."""
    imp = np.random.default_rng(3).lognormal(0, 1, rows.shape[1]).astype(np.float32)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    assert (ggml_quant.block_size(qtype), ggml_quant.type_size(qtype)) == (block, size)
    for imatrix in ([imp] if ggml_quant.requires_imatrix(qtype) else [None, imp]):
        q = ggml_quant.quantize(rows, qtype, imatrix)
        assert q.shape == (16, 512 // block * size) and ggml_quant.valid(q, qtype)
        own = ggml_quant.dequantize(q, qtype, rows.shape)
        np.testing.assert_array_equal(np.asarray(gguf.quants.dequantize(q, qtype)).reshape(rows.shape), own)
        sqnr = 10 * np.log10(np.sum(rows ** 2) / np.sum((own - rows) ** 2))
        assert sqnr > size * 8 / block * 3  # ~6 dB per bit, loosely (heavy tails): it quantized, not scrambled


def test_legacy_types_agree_with_gguf_py_quantizer(rows: np.ndarray) -> None:
    """gguf-py's NumPy quantizers are ports of ggml's reference ones: same bytes."""
    for qtype in (T.Q8_0, T.Q4_0):
        np.testing.assert_array_equal(ggml_quant.quantize(rows, qtype), gguf.quants.quantize(rows, qtype))


def test_importance_is_llama_imatrix_mean_square_activation() -> None:
    """imatrix.cpp accumulates x[j]^2 over every input row, quantize.cpp divides by the
    count: the mean square per input column, the GPTQ Hessian's diagonal / 2."""
    x = np.random.default_rng(1).normal(size=(300, 24)).astype(np.float64) * np.arange(1, 25)
    hessian = 2 * x.T @ x / len(x)
    np.testing.assert_allclose(ggml_quant.importance(hessian), np.mean(x ** 2, axis=0), rtol=1e-6)
    assert set(ggml_quant.importances({"a": hessian})) == {"a"}
    with pytest.raises(ConfigurationError, match="square"):
        ggml_quant.importance(np.ones((3, 4)))


def test_imatrix_steers_the_error_to_unimportant_columns(rows: np.ndarray) -> None:
    imp = np.ones(rows.shape[1], np.float32)
    imp[:64] = 100.0  # the first two 32-blocks of each super-block group matter most
    for qtype in (T.Q4_K, T.IQ4_NL, T.Q2_K):
        plain = ggml_quant.dequantize(ggml_quant.quantize(rows, qtype), qtype, rows.shape)
        steered = ggml_quant.dequantize(ggml_quant.quantize(rows, qtype, imp), qtype, rows.shape)
        assert np.sum(imp * (steered - rows) ** 2) < 0.95 * np.sum(imp * (plain - rows) ** 2), qtype.name


def test_bad_inputs_are_typed_errors(rows: np.ndarray) -> None:
    with pytest.raises(QuantizationError, match="'w': rows of 384 values are not a whole number of Q4_K's 256"):
        ggml_quant.quantize(np.zeros((2, 384), np.float32), T.Q4_K, name="w")
    with pytest.raises(QuantizationError, match="only with an importance matrix"):
        ggml_quant.quantize(rows, T.IQ2_XS)
    with pytest.raises(QuantizationError, match="importance matrix has 3 values, rows have 512"):
        ggml_quant.quantize(rows, T.Q4_K, np.ones(3, np.float32))
    with pytest.raises(QuantizationError, match="negative or non-finite"):
        ggml_quant.quantize(rows, T.Q4_K, -np.ones(512, np.float32))
    bad = rows.copy()
    bad[0, 0] = np.nan
    with pytest.raises(QuantizationError, match="non-finite weights"):
        ggml_quant.quantize(bad, T.Q4_K)


def test_a_missing_library_names_the_build_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARROWQUANT_GGML_DIR", str(tmp_path))
    ggml_quant.library.cache_clear()
    try:
        with pytest.raises(ConfigurationError, match=r"libggml-base.so: ggml's quantizer is not built.*"
                                                     r"python -m harness.ggml_build"):
            ggml_quant.library()
        (tmp_path / "libggml-base.so").write_bytes(b"")
        (tmp_path / "build.json").write_text('{"version": "0.3.1", "sdist_sha256": "x", "compiler": "cc", '
                                             '"seconds": 1, "compile_seconds": 1}')
        with pytest.raises(ConfigurationError, match="built from llama-cpp-python 0.3.1.*--force"):
            ggml_quant.library()
    finally:
        monkeypatch.delenv("ARROWQUANT_GGML_DIR")
        ggml_quant.library.cache_clear()
    assert ggml_quant.library() is not None
