"""Golden digests of the quantized codes: faster kernels must produce the same bytes.

Issue 11 rewrites the hot kernels (fused min/max, no defensive copy, lane-wise
unpacking). Their output must stay bit-exact with the codes, scales and zero points the
project produced before (commit 8f8a85d), so artifacts written by an older version load
and compare identically. ``tests/golden/kernel_codes.json`` holds a short sha256 of
every array per case, not the arrays: every scheme of the table on a seeded tensor with
ragged groups and the named edge rows, the float16 / bfloat16 / float64 inputs, the
calibrated methods that share the kernels (clip, HQQ, GPTQ, residual 2-bit), and the
real MiniLM linear weights. Dequantized values are digested too, so the unpacking path
is covered.

The GPTQ cases go through BLAS (the Hessian's product, GPTQ's Cholesky and updates), and
OpenBLAS picks its kernels by processor: the AVX-512 kernels of an Intel Xeon sum in
another order than the AVX2 ones of the AMD EPYC these digests were recorded on, and two
GPTQ cases' scales differed in their last bits (the codes did not). Those cases run in a
child process with ``OPENBLAS_CORETYPE=Haswell``, the AVX2 kernels every x86-64 processor
since 2013 runs (OpenBLAS's Zen cores use them too), so the digests say whether our code
changed, not which processor ran it. The child checks that OpenBLAS took that core.

Regenerate ONLY when a change of codes is intended (and say why in the commit):

    PYTHONPATH=$PWD python -m tests.test_golden_codes
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import hashlib
import json
import os
from pathlib import Path
import subprocess
import sys
from typing import Any

import ml_dtypes
import numpy as np
import numpy.typing as npt
import pytest

from arrowquant_core.methods import quantize_tensor
from arrowquant_core.safetensors_io import read_safetensors
from arrowquant_core.schemes import SCHEMES, get_scheme
from arrowquant_core.tensor import QuantizedTensor, dequantize, quantize
from fixtures.minilm.model import weights_file

GOLDEN = Path(__file__).parent / "golden" / "kernel_codes.json"
SEED = 20261201
# Schemes the harness uses on MiniLM (criteria/minilm.toml) plus per-channel symmetric.
MINILM_SCHEMES = ("int8-g128-asym", "int8-channel-sym", "int4-g64-asym", "int2-g32-asym")


def digest(array: npt.NDArray[Any]) -> str:
    """16 hex digits of sha256 over dtype, shape and little-endian bytes."""
    a = np.ascontiguousarray(array)
    h = hashlib.sha256(f"{a.dtype.str}{list(a.shape)}".encode())
    h.update(a.tobytes())
    return h.hexdigest()[:16]


def record(qt: QuantizedTensor) -> dict[str, str]:
    return {"codes": digest(qt.codes), "scales": digest(qt.scales), "zeros": digest(qt.zeros),
            "params": digest(qt.params), "dequantized": digest(dequantize(qt))}


def seeded_matrix(rng: np.random.Generator, rows: int = 12, cols: int = 200) -> npt.NDArray[np.float64]:
    """Heavy-tailed rows; 200 columns leave a ragged last group for every group size.

    Named rows: 0 all zeros, 1 constant, 2 one huge outlier, 3 all negative, 4 all
    positive, 5 tiny but normal values (1e-20 scale).
    """
    m = rng.standard_t(4, size=(rows, cols)) * 0.05
    m[0] = 0.0
    m[1] = 0.375
    m[2, 17] = 30.0
    m[3] = -np.abs(m[3]) - 0.01
    m[4] = np.abs(m[4]) + 0.01
    m[5] *= 1e-20
    return m


def cases() -> Iterator[tuple[str, Callable[[], QuantizedTensor]]]:
    """(case id, thunk) for every golden case; thunks build inputs from their own seed."""
    def rng(tag: str) -> np.random.Generator:
        return np.random.default_rng([SEED, int(hashlib.sha256(tag.encode()).hexdigest()[:8], 16)])

    # the K schemes (scales stored as codes) came after these digests were recorded and
    # only take their own methods (krtn, gptq-k...): tests/test_kquant.py holds them
    for name in sorted(n for n, sch in SCHEMES.items() if not sch.scale_bits):
        for dtype in ("float32", "float16", "bfloat16", "float64"):
            def rtn(name: str = name, dtype: str = dtype) -> QuantizedTensor:
                x = seeded_matrix(rng(f"{name}/{dtype}"))
                target = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
                return quantize(x.astype(target), name, f"{name}/{dtype}")
            yield f"rtn/{name}/{dtype}", rtn
    # other shapes: a vector, a 3-D tensor, a single row narrower than the group
    shapes: dict[str, tuple[int, ...]] = {"vector": (300,), "3d": (3, 8, 20), "narrow": (1, 7)}
    for label, shape in shapes.items():
        for name in ("int8-tensor-sym", "int4-channel-asym", "int4-g32-sym", "int2-g16-asym"):
            def shaped(name: str = name, shape: tuple[int, ...] = shape, label: str = label) -> QuantizedTensor:
                x = rng(f"{label}/{name}").standard_normal(shape).astype(np.float32)
                return quantize(x, name, label)
            yield f"rtn-shape/{label}/{name}", shaped
    # methods that reuse the kernels (min/max params, quantize_with, safe_reciprocal)
    for method, name in (("clip", "int4-g64-asym"), ("clip", "int2-g32-sym"), ("hqq", "int4-g64-asym"),
                         ("hqq", "int2-g32-asym"), ("residual2", "int2-g32-asym")):
        def plain(method: str = method, name: str = name) -> QuantizedTensor:
            x = seeded_matrix(rng(f"{method}/{name}")).astype(np.float32)
            return quantize_tensor(x, get_scheme(name), "w", method)
        yield f"method/{method}/{name}", plain
    for method, name in (("gptq", "int4-g64-asym"), ("gptq-act-mse", "int4-g32-asym"),
                         ("gptq", "int8-channel-sym"), ("gptq-mse", "int2-g16-asym")):
        def gptq(method: str = method, name: str = name) -> QuantizedTensor:
            r = rng(f"{method}/{name}")
            w = (r.standard_normal((16, 128)) * 0.05).astype(np.float32)
            acts = r.standard_normal((256, 128)).astype(np.float32)
            acts[:, 3] *= 20.0  # one outlier feature, as in LLM activations
            hessian = (2.0 * acts.T.astype(np.float64) @ acts / acts.shape[0]).astype(np.float32)
            return quantize_tensor(w, get_scheme(name), "w", method, hessian)
        yield f"method/{method}/{name}", gptq


def minilm_records() -> dict[str, dict[str, str]]:
    """One combined digest per scheme over every 2-D MiniLM weight, in file order."""
    weights = read_safetensors(weights_file())
    linear = {n: w for n, w in weights.items() if w.ndim == 2 and w.dtype.kind == "f"}
    out: dict[str, dict[str, str]] = {}
    for scheme in MINILM_SCHEMES:
        combined = {key: hashlib.sha256() for key in ("codes", "scales", "zeros", "dequantized")}
        for name, w in linear.items():
            rec = record(quantize(w, scheme, name))
            for key, h in combined.items():
                h.update(rec[key].encode())
        out[f"minilm/{scheme}"] = {key: h.hexdigest()[:16] for key, h in combined.items()}
    return out


PINNED_CORE = "Haswell"


def blas_dependent(case: str) -> bool:
    return case.startswith("method/gptq")


def _records_here(names: list[str]) -> dict[str, Any]:
    """The child's side of ``pinned_records``: OpenBLAS's core and these cases' records."""
    from threadpoolctl import threadpool_info

    table = dict(cases())
    cores = sorted({str(i.get("architecture")) for i in threadpool_info() if i.get("internal_api") == "openblas"})
    return {"cores": cores, "records": {c: record(table[c]()) for c in names}}


def pinned_records() -> dict[str, dict[str, str]]:
    """The BLAS-dependent cases' records, computed in a child process on OpenBLAS's
    ``PINNED_CORE`` kernels (the environment variable is read when NumPy loads OpenBLAS,
    so it cannot be set in this process)."""
    names = [c for c, _ in cases() if blas_dependent(c)]
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OPENBLAS_CORETYPE": PINNED_CORE, "OPENBLAS_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    code = ("import json, sys; from tests.test_golden_codes import _records_here; "
            "print(json.dumps(_records_here(json.loads(sys.argv[1]))))")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(names)], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["cores"] == [PINNED_CORE], (
        f"OpenBLAS ran {out['cores']} kernels with OPENBLAS_CORETYPE={PINNED_CORE}: this machine cannot "
        f"reproduce the GPTQ digests, which were recorded on those kernels")
    records: dict[str, dict[str, str]] = out["records"]
    return records


def current() -> dict[str, dict[str, str]]:
    table = {case: record(thunk()) for case, thunk in cases() if not blas_dependent(case)}
    table.update(pinned_records())
    table.update(minilm_records())
    return table


@pytest.fixture(scope="module")
def golden() -> dict[str, dict[str, str]]:
    data: dict[str, dict[str, str]] = json.loads(GOLDEN.read_text(encoding="utf-8"))
    return data


def test_golden_file_covers_every_case(golden: dict[str, dict[str, str]]) -> None:
    expected = {case for case, _ in cases()} | {f"minilm/{s}" for s in MINILM_SCHEMES}
    assert set(golden) == expected
    assert len([c for c in golden if c.startswith("rtn/")]) == 4 * sum(1 for s in SCHEMES.values() if not s.scale_bits)


@pytest.fixture(scope="module")
def pinned() -> dict[str, dict[str, str]]:
    return pinned_records()


@pytest.mark.parametrize("case", [c for c, _ in cases()])
def test_codes_match_golden(case: str, golden: dict[str, dict[str, str]], request: pytest.FixtureRequest) -> None:
    if blas_dependent(case):
        got = request.getfixturevalue("pinned")[case]
    else:
        got = record(dict(cases())[case]())
    diff = {k: (golden[case][k], v) for k, v in got.items() if golden[case][k] != v}
    assert not diff, f"{case}: arrays changed (golden, now): {diff}"


def test_minilm_codes_match_golden(golden: dict[str, dict[str, str]]) -> None:
    got = minilm_records()
    diff = {case: rec for case, rec in got.items() if rec != golden[case]}
    assert not diff, f"MiniLM digests changed: {diff} (golden: {[golden[c] for c in diff]})"


def test_digest_sees_a_one_bit_change() -> None:
    x = np.arange(64, dtype=np.uint8)
    y = x.copy()
    y[40] ^= 1
    assert digest(x) != digest(y)
    assert digest(x) != digest(x.reshape(8, 8))  # shape is part of the digest


if __name__ == "__main__":
    GOLDEN.write_text(json.dumps(current(), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {GOLDEN}")
