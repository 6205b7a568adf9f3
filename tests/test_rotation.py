"""Randomized Hadamard rotation (rotation.py) and GPTQ fed by importance-weighted ranges (igptq.py).

Oracles: the explicit Sylvester Hadamard matrix for the butterfly transform, the
explicit ``R^T H R`` for the rotated Hessian, and a column-by-column float64 GPTQ with
fixed group parameters for ``gptq_matrix(params=...)``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

import arrowquant_core as aq
from arrowquant_core.errors import ConfigurationError
from arrowquant_core.gptq import factor_hessian, gptq_matrix, hessian_from_activations, prepare_hessian
from arrowquant_core.igptq import quantize_igptq
from arrowquant_core.kernels import safe_reciprocal
from arrowquant_core.methods import quantize_tensor
from arrowquant_core.rotation import ROTATED_METHODS, fwht, rotate, rotate_hessian, signs, unrotate
from arrowquant_core.schemes import get_scheme

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


def sylvester(n: int) -> F64:
    h = np.array([[1.0]])
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    out: F64 = h / np.sqrt(n)
    return out


def rotation_matrix(cols: int, block: int) -> F64:
    out: F64 = signs(cols).astype(np.float64)[:, None] * np.kron(np.eye(cols // block), sylvester(block))
    return out


@pytest.mark.parametrize(("cols", "block"), [(64, 64), (384, 64), (256, 128), (96, 32)])
def test_butterfly_equals_the_explicit_hadamard_matrix(cols: int, block: int) -> None:
    x = np.random.default_rng(cols).standard_normal((5, cols))
    assert np.allclose(fwht(x, block), x @ np.kron(np.eye(cols // block), sylvester(block)), atol=1e-12)
    r = rotation_matrix(cols, block)
    assert np.allclose(rotate(x, block), x @ r, atol=1e-12)
    assert np.allclose(unrotate(rotate(x, block), block), x, atol=1e-12)
    assert np.allclose(r.T @ r, np.eye(cols), atol=1e-12)


def test_rotated_hessian_is_r_transpose_h_r() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 128)).astype(np.float32)
    h = hessian_from_activations(x)
    r = rotation_matrix(128, 64)
    expected = r.T @ h.astype(np.float64) @ r
    got = rotate_hessian(h, 64)
    assert np.allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert np.array_equal(got, got.T)


def test_signs_are_pinned_to_the_width() -> None:
    # The rotation is not stored: a changed sign stream would silently change every
    # artifact written with a rotated method. These are PCG64's raw bits for the seed.
    assert signs(8).tolist() == signs(8).tolist()
    assert signs(384)[:8].tolist() == [1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, 1.0]  # golden
    assert signs(384)[:8].tolist() != signs(1536)[:8].tolist()


def test_dequantize_undoes_the_rotation() -> None:
    rng = np.random.default_rng(4)
    w = rng.standard_normal((16, 128)).astype(np.float32)
    w[:, 5] *= 20  # an outlier input column: what the rotation spreads out
    qt = quantize_tensor(w, get_scheme("int4-g32-asym-k8"), "fc", "iclip-h")
    assert qt.method == "iclip-h" and ROTATED_METHODS["iclip-h"] == 64
    plain = aq.dequantize(aq.quantize(rotate(w, 64).astype(np.float32), "int4-g32-asym"))
    assert np.allclose(aq.dequantize(qt), unrotate(aq.dequantize(
        aq.QuantizedTensor(qt.name, qt.scheme, qt.shape, qt.dtype, qt.codes, qt.scales, qt.zeros, "iclip")), 64),
        atol=1e-6)
    # incoherence: rotated quantization of an outlier-heavy weight beats the plain one
    err_rot = float(np.sum((aq.dequantize(qt) - w) ** 2))
    err_plain = float(np.sum((aq.dequantize(quantize_tensor(w, get_scheme("int4-g32-asym-k8"), "fc", "iclip")) - w) ** 2))
    assert err_rot < err_plain
    assert plain.shape == w.shape


def test_rotation_needs_a_width_that_the_block_divides() -> None:
    w = np.ones((4, 96), np.float32)
    h = np.eye(96, dtype=np.float32)
    with pytest.raises(ConfigurationError, match="not a multiple of the Hadamard block 64"):
        quantize_igptq(w, "int4-g32-asym", "fc", h, rotation=64, method="gptq-ih")
    # through the method table, a tensor the rotation does not fit is quantized unrotated and says so
    assert quantize_tensor(w, get_scheme("int4-g32-asym"), "fc", "iclip-h").method == "iclip"


def reference_static_gptq(w: F32, h: F32, bits: int, group: int, scales: F32, zeros: npt.NDArray[np.uint8],
                          perm: npt.NDArray[np.intp]) -> npt.NDArray[np.uint8]:
    """Column by column, float64, fixed (rows, n_groups) parameters, columns visited in ``perm``."""
    qmax = float(2 ** bits - 1)
    rows, cols = w.shape
    wk = w.astype(np.float64)[:, perm].copy()
    hk = h.astype(np.float64)[perm][:, perm]
    hk += 0.01 * np.mean(np.diag(hk)) * np.eye(cols)
    u = np.linalg.cholesky(np.linalg.inv(hk)).T
    codes = np.zeros((rows, cols), np.uint8)
    for j in range(cols):
        k = int(perm[j]) // group
        s = scales[:, k]
        z = zeros[:, k].astype(np.float64)
        q = np.clip(np.rint(wk[:, j] * safe_reciprocal(s).astype(np.float64)) + z, 0, qmax)
        codes[:, perm[j]] = q
        err = (wk[:, j] - (q - z) * s) / u[j, j]
        wk[:, j + 1:] -= np.outer(err, u[j, j + 1:])
    return codes


def test_gptq_with_fixed_parameters_matches_the_reference() -> None:
    rng = np.random.default_rng(9)
    w = rng.standard_normal((10, 96)).astype(np.float32)
    a = rng.standard_normal((96, 96))
    h = (a @ a.T / 96 + 0.05 * np.eye(96)).astype(np.float32)
    scales = rng.uniform(0.2, 0.6, (10, 3)).astype(np.float32)
    zeros = rng.integers(5, 11, (10, 3)).astype(np.uint8)
    u, perm = factor_hessian(h, 96, 0.01, True, "w")
    assert perm is not None
    codes, s, z = gptq_matrix(w, u, 4, False, 32, 40, perm, float64=True, params=(scales, zeros))
    assert np.array_equal(s, scales) and np.array_equal(z, zeros)
    ref = reference_static_gptq(w, h, 4, 32, scales, zeros, perm)
    assert np.array_equal(codes, ref), f"{int(np.sum(codes != ref))} codes differ"
    u_nat, _ = prepare_hessian(h, 96, 0.01, "w")
    codes_nat, _s, _z = gptq_matrix(w, u_nat, 4, False, 32, 128, None, float64=True, params=(scales, zeros))
    assert np.array_equal(codes_nat, reference_static_gptq(w, h, 4, 32, scales, zeros, np.arange(96)))


def correlated(rng: np.random.Generator, n: int, cols: int) -> F32:
    base = rng.standard_normal((n, cols // 4))
    x = base @ rng.standard_normal((cols // 4, cols)) + 0.1 * rng.standard_normal((n, cols))
    x *= rng.uniform(0.2, 3.0, cols)
    return x.astype(np.float32)


@pytest.mark.parametrize("scheme", ["int4-g32-asym-k8", "int2-g16-asym-k8", "int4-g64-asym"])
def test_gptq_i_beats_its_own_ranges_rounded_plainly_on_the_layer_output(scheme: str) -> None:
    rng = np.random.default_rng(12)
    x = correlated(rng, 600, 128)
    h = hessian_from_activations(x)
    w = rng.standard_normal((32, 128)).astype(np.float32)
    sch = get_scheme(scheme)

    def out_err(method: str) -> float:
        d = aq.dequantize(quantize_tensor(w, sch, "fc", method, h)) - w
        return float(np.sum((d @ x.T) ** 2))

    assert out_err("gptq-i") < 0.8 * out_err("iclip")
    assert out_err("gptq-ih") < 0.8 * out_err("iclip-h")
    assert out_err("gptq-k") < 0.8 * out_err("iclip")
    assert out_err("gptq-kh") < 0.8 * out_err("iclip-h")
    # MiniLM's INT4/INT2 default: rotation and GPTQ, min/max ranges, against plain RTN on the grid
    assert out_err("gptq-khr") < 0.8 * out_err("krtn")


def test_hessian_methods_fall_back_to_their_named_method_without_a_hessian() -> None:
    w = np.random.default_rng(0).standard_normal((30, 64)).astype(np.float32)
    sch = get_scheme("int4-g32-asym-k8")
    assert quantize_tensor(w, sch, "emb", "gptq-i").method == "iclip"
    assert quantize_tensor(w, sch, "emb", "gptq-ih").method == "iclip-h"
    assert quantize_tensor(w, sch, "emb", "gptq-kh128").method == "iclip"
    assert quantize_tensor(w, sch, "emb", "gptq-k").method == "iclip"
    assert quantize_tensor(w, sch, "emb", "gptq-kh").method == "iclip-h"
    assert quantize_tensor(w, sch, "emb", "gptq-khr").method == "krtn"


def test_gptq_k_is_gptq_act_mse_on_plain_schemes() -> None:
    # With float32 scales and no weighting, the k family's static ranges are the plain MSE
    # clip search: the same codes as gptq-act-mse (static groups, activation order).
    rng = np.random.default_rng(8)
    x = correlated(rng, 400, 128)
    h = hessian_from_activations(x)
    w = rng.standard_normal((12, 128)).astype(np.float32)
    sch = get_scheme("int4-g32-asym")
    a = quantize_tensor(w, sch, "fc", "gptq-k", h)
    b = quantize_tensor(w, sch, "fc", "gptq-act-mse", h)
    assert np.array_equal(a.scales, b.scales) and np.array_equal(a.zeros, b.zeros)
    assert float(np.mean(a.codes == b.codes)) > 0.99
