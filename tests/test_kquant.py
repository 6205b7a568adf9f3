"""K-quant-style scale codes and the importance-weighted clip search (kquant.py).

Kinds: an oracle (a slow per-block loop that is obviously the definition), Hypothesis
properties of the power-of-two scale grid and its byte form, the storage round trip
of every new scheme/method through a real Parquet file, and the error paths.
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
import numpy as np
import numpy.typing as npt
import pytest

import arrowquant_core as aq
from arrowquant_core.clip import DEFAULT_GRID
from arrowquant_core.errors import ConfigurationError, FormatError
from arrowquant_core.gptq import hessian_from_activations
from arrowquant_core.kquant import (
    decode_scales,
    encode_scales,
    exponents_for,
    quantize_iclip,
    search_params,
)
from arrowquant_core.methods import METHODS, check_method, quantize_tensor
from arrowquant_core.schemes import SCHEMES, SUPER_BLOCK, get_scheme

F32 = npt.NDArray[np.float32]
K_SCHEMES = sorted(n for n, s in SCHEMES.items() if s.scale_bits)
K_METHODS = sorted(n for n, m in METHODS.items() if m.k_schemes)


def reference_search(x: F32, w: F32, bits: int, scale_bits: int, per: int) -> tuple[F32, F32]:
    """Asymmetric search by its definition, one block at a time, float64 error."""
    qmax = 2 ** bits - 1
    cmax = 2 ** scale_bits - 1
    n = x.shape[0]
    lo = np.minimum(x.min(axis=1), 0).astype(np.float64)
    hi = np.maximum(x.max(axis=1), 0).astype(np.float64)
    full = ((hi - lo).astype(np.float32) / np.float32(qmax)).astype(np.float32)
    best_s = np.zeros(n, np.float32)
    best_q = np.zeros(x.shape, np.float64)
    for i in range(n):
        sb = i // per
        smax = float(full[sb * per:(sb + 1) * per].max())
        e = 0
        if smax > 0:
            e = int(np.ceil(np.log2(smax / cmax)))
            while smax > cmax * 2.0 ** e:
                e += 1
            while smax <= cmax * 2.0 ** (e - 1):
                e -= 1
        step = 2.0 ** e
        best = np.inf
        for f in (1.0,) + tuple(g for g in DEFAULT_GRID if g != 1.0):
            f32 = np.float32(f)
            s = np.float32((float(hi[i] * f32) - float(lo[i] * f32)) / qmax)
            if s > 0:
                s = np.float32(step * min(max(round(s / step), 1), cmax))
            z = min(max(round(-float(lo[i] * f32) / float(s)), 0), qmax) if s > 0 else 0
            q = np.clip(np.rint(x[i] / s if s > 0 else 0 * x[i]) + z, 0, qmax)
            deq = (q - z) * float(s)
            err = float(np.sum(w[i] * (deq - x[i]) ** 2))
            if err < best * (1 - 1e-9):
                best, best_s[i], best_q[i] = err, s, deq
    return best_s, best_q.astype(np.float32)


def test_search_matches_the_definition_block_by_block() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 32)).astype(np.float32)
    x[5] = 0.0  # an all-zero group
    x[7, 3] = 9.0  # an outlier that clipping should cut
    w = rng.uniform(0.01, 4.0, x.shape).astype(np.float32)
    codes, scales, zeros = search_params(x, 4, False, 8, 8, w)
    ref_s, ref_deq = reference_search(x, w, 4, 8, 8)
    deq = (codes.astype(np.float32) - zeros[:, None]) * scales[:, None]
    bad = np.flatnonzero(~np.isclose(scales, ref_s, rtol=1e-6, atol=0))
    assert bad.size == 0, f"{bad.size} groups differ; first {int(bad[0])}: {scales[bad[0]]} vs {ref_s[bad[0]]}"
    assert np.allclose(deq, ref_deq, rtol=1e-5, atol=1e-6)


@settings(derandomize=True, max_examples=40, deadline=None)
@given(st.floats(1e-30, 1e30), st.sampled_from([63, 255]))
def test_exponent_is_the_smallest_that_holds_the_maximum(m: float, cmax: int) -> None:
    e = int(exponents_for(np.array([m], np.float32), cmax)[0])
    v = float(np.float32(m))
    assert v <= cmax * 2.0 ** e
    assert v > cmax * 2.0 ** (e - 1)


@settings(derandomize=True, max_examples=25, deadline=None)
@given(st.integers(0, 2**31), st.sampled_from(K_SCHEMES), st.integers(1, 40), st.floats(1e-6, 1e3))
def test_searched_scales_encode_and_decode_bit_exact(seed: int, scheme: str, rows: int, spread: float) -> None:
    sch = get_scheme(scheme)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, 3 * sch.group_size)) * spread).astype(np.float32)
    qt = quantize_iclip(x, sch, "w")
    blob = encode_scales(qt.scales, sch, "w")
    n_super = -(-qt.scales.size // (SUPER_BLOCK // sch.group_size))
    assert len(blob) == 2 * n_super + qt.scales.size
    back = decode_scales(blob, sch, int(qt.scales.size), "w")
    assert back.dtype == np.float32
    assert np.array_equal(back.view(np.uint32), qt.scales.view(np.uint32))


def test_scales_off_the_grid_are_refused_by_name() -> None:
    sch = get_scheme("int4-g32-asym-k8")
    with pytest.raises(FormatError, match=r"'fc'.*not a 8-bit code"):
        encode_scales(np.array([1.0, 0.3], np.float32), sch, "fc")
    with pytest.raises(FormatError, match="scale bytes"):
        decode_scales(b"\x00" * 5, sch, 2, "fc")
    with pytest.raises(FormatError, match="does not fit 6 bits"):
        decode_scales(b"\x00\x00" + bytes([64]), get_scheme("int4-g32-asym-k6"), 1, "fc")


def test_importance_weighting_never_loses_on_the_weighted_error() -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((300, 32)).astype(np.float32)
    x[:, 0] *= 6  # an outlier column the importance says matters
    w = np.ones_like(x)
    w[:, 0] = 50.0

    def weighted(c: npt.NDArray[np.uint8], s: F32, z: npt.NDArray[np.uint8]) -> F32:
        deq = (c.astype(np.float32) - z[:, None]) * s[:, None]
        out: F32 = np.sum(w * (deq - x) ** 2, axis=1)
        return out

    plain = weighted(*search_params(x, 4, False, 8, 8, None))
    weighted_search = weighted(*search_params(x, 4, False, 8, 8, w))
    assert bool(np.all(weighted_search <= plain * (1 + 1e-6)))
    assert float(weighted_search.sum()) < 0.9 * float(plain.sum())


def test_k_schemes_take_only_the_methods_that_store_scale_codes() -> None:
    assert K_METHODS == ["gptq-i", "gptq-ih", "gptq-k", "gptq-kh", "gptq-kh128", "gptq-khr", "gptq-kr", "iclip", "iclip-h",
                         "krtn"]
    with pytest.raises(ConfigurationError, match="cannot store scales as codes"):
        check_method("gptq-act-mse", get_scheme("int4-g32-asym-k8"))
    with pytest.raises(ConfigurationError, match="cannot store scales as codes"):
        aq.QuantizationConfig("int2-g16-asym-k8", method="rtn")
    with pytest.raises(ConfigurationError, match="scale_bits"):
        aq.Scheme("int4-g128-asym-k8", 4, False, "group", 128, 8)
    assert get_scheme("int2-g16-asym-k8").description.endswith("super-scale per 256 values")


def test_krtn_is_round_to_nearest_when_the_grid_holds_the_scales() -> None:
    # the one non-zero group per super-block has min/max scale 1.0, which sits on the
    # power-of-two grid (code 128 x 2**-7): krtn's codes are round-to-nearest's
    x = np.zeros((3, 256), np.float32)
    x[:, :32] = np.linspace(-1.0, 14.0, 32, dtype=np.float32)  # range 15 -> scale 1.0
    sch = get_scheme("int4-g32-asym-k8")
    ours = quantize_tensor(x, sch, "w", "krtn")
    ref = aq.quantize(x, "int4-g32-asym")
    assert ours.method == "krtn"
    assert np.array_equal(ours.codes, ref.codes) and np.array_equal(ours.scales, ref.scales)


def test_k_scheme_costs_fewer_bytes_than_float_scales() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 256)).astype(np.float32)
    plain = quantize_tensor(x, get_scheme("int4-g32-asym"), "w", "iclip")
    coded = quantize_tensor(x, get_scheme("int4-g32-asym-k8"), "w", "iclip")
    assert len(encode_scales(coded.scales, coded.scheme, "w")) * 3 < plain.scales.nbytes


@pytest.mark.parametrize("scheme", ["int4-g32-asym-k8", "int2-g16-asym-k8", "int8-g64-sym-k6", "int4-g32-asym"])
def test_storage_round_trip_is_bit_exact(tmp_path: Path, scheme: str) -> None:
    rng = np.random.default_rng(11)
    x = rng.standard_normal((500, 128)).astype(np.float32)
    h = hessian_from_activations(x * rng.uniform(0.1, 3.0, 128).astype(np.float32))
    weights = {
        "emb.weight": (rng.standard_normal((50, 128)) * 0.05).astype(np.float16),
        "fc1.weight": rng.standard_normal((24, 128)).astype(np.float32),
        "fc2.weight": rng.standard_normal((16, 128)).astype(np.float32),
        "fc1.bias": rng.standard_normal(24).astype(np.float32),
    }
    config = aq.QuantizationConfig(scheme, method="gptq-kh", method_overrides=(("fc2.*", "gptq-i"),))
    model = aq.quantize_model(weights, config, hessians={"fc1.weight": h, "fc2.weight": h})
    assert {n: t.method for n, t in model.tensors.items()} == {
        "emb.weight": "iclip-h", "fc1.weight": "gptq-kh", "fc2.weight": "gptq-i"}
    path = aq.save(model, tmp_path / "m.parquet")
    back = aq.load(path)
    for name, qt in model.tensors.items():
        other = back.tensors[name]
        assert other.method == qt.method and other.scheme is qt.scheme and other.dtype == qt.dtype
        for field in ("codes", "scales", "zeros"):
            assert np.array_equal(getattr(other, field).view(np.uint8), getattr(qt, field).view(np.uint8)), field
        assert np.array_equal(aq.dequantize(other), aq.dequantize(qt))
    assert aq.load_weights(path)["emb.weight"].dtype == np.float16


def test_a_damaged_scale_code_fails_the_load(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = np.random.default_rng(2).standard_normal((8, 64)).astype(np.float32)
    model = aq.quantize_model({"w": x}, aq.QuantizationConfig("int4-g32-asym-k6", method="iclip"))
    path = aq.save(model, tmp_path / "m.parquet")
    table = pq.read_table(path)
    scales = table.column("scales").to_pylist()
    scales[0] = scales[0][:-1] + bytes([200])  # a code > 63 for 6-bit codes
    table = table.set_column(table.schema.get_field_index("scales"), "scales",
                             pa.array(scales, pa.large_binary()))
    pq.write_table(table, path)
    with pytest.raises(FormatError):
        aq.load(path)
