"""Quality per bit on the real MiniLM: output cosine (mean / worst sentence) vs bits per weight.

Issue 13, items 3 and 4. Every figure is measured here: the whole model is quantized
with a configuration (scheme + method, per-tensor overrides), written with
``arrowquant_core.save``, its bytes on disk divided by the parameter count give bits
per weight, it is reloaded with ``load_weights`` and the sentence embeddings of the
*evaluation* corpus are compared with FP32 (``MiniLMRunner.compare``). The mean cosine
on a calibration subset (``MiniLMRunner.calibration_score``) is reported beside it:
choices between configurations are made on that column, never on the evaluation one.

The default suite runs one configuration (the proposed INT4 default) against the
current one, both timed in the same process. The whole table is a script:

    PYTHONPATH=$PWD OPENBLAS_NUM_THREADS=1 python tests/benchmarks/test_bench_quality_per_bit.py [NAME ...]

Measured on this machine (2 cores shared by 8 sessions, 2026-12-01; bpw = bytes on
disk x 8 / parameters; cosine mean / worst evaluation sentence; "calib" columns on the
32-sentence calibration subset):

    configuration                        bpw   calib  c-worst    mean   worst
    int8-g128/rtn (before)             7.960 0.99983  0.9997  0.99983  0.9995
    int8-g64-sym-k8/gptq-kr            7.769 0.99995  0.9999  0.99994  0.9998
    int4-g64/gptq-act-mse (before)     4.303 0.98988  0.9684  0.98866  0.9663
    int4-g32-k8/gptq-kh                4.251 0.99376  0.9881  0.99269  0.9788
    int4-g16-k8/gptq-kh+emb-g32-k6     4.426 0.99474  0.9885  0.99399  0.9792
    int4-g16-k8/gptq-kh128+emb-g32-k6  4.427 0.99416  0.9914  0.99348  0.9840
    budget=3.15 (plan_budget)          3.094 0.96915     -    0.96898  0.9184
    budget=2.75 (plan_budget)          2.673 0.93942     -    0.93159  0.7128
    int2-g16-k8/gptq-kh128             2.595 0.87622  0.8050  0.86702  0.5873
    int2-g64/gptq-act-mse (before)     2.422 0.81430  0.7220  0.79312  0.4310

Issue 13's defaults and the candidates measured for them (2026-12-01, same command):

    configuration                        bpw   calib  c-worst    mean   worst
    int8-g32-sym-k8/krtn (krtn only)    7.971 0.99986  0.9998  0.99986  0.9996
    int8-g32-k8/krtn                    8.266 0.99990  0.9998  0.99989  0.9997
    int8-g64-sym-k8/krtn                7.766 0.99982  0.9997  0.99982  0.9994
    int8-g64-k8/iclip                   8.013 0.99986  0.9998  0.99985  0.9995
    int8-g64-sym-k8/gptq-kr             7.770 0.99995  0.9999  0.99994  0.9998
    int4-g32-k8/gptq-khr (all INT4)     4.240 0.99294  0.9896  0.99213  0.9756
    int4-g32-k8/gptq-kr                 4.237 0.99238  0.9861  0.99127  0.9733
    int4-g32-k8/gptq-k                  4.251 0.99253  0.9887  0.99129  0.9747
    int4-g32-k8/gptq-kh+emb-krtn        4.246 0.99307  0.9880  0.99211  0.9800
    int4-g32-k8/gptq-kh+emb-iclip       4.254 0.99317  0.9889  0.99213  0.9800
    int2-g16-k8/gptq-khr (all INT2)     2.517 0.85352  0.8017  0.83464  0.6159
    int2-g16-k8/gptq-kr                 2.516 0.84543  0.7117  0.83089  0.5843
    int2-g32-k8/gptq-kh                 2.271 0.85143  0.7929  0.83666  0.4286

Issue 13 item 1, mixed precision per tensor (2026-12-01, same command; "sec" = quantization
seconds in that process, busy 2-core machine; budgetr = plan_budget with gptq-khr rungs, its
sensitivity pass of one model run per tensor included in its seconds):

    configuration                        bpw   calib  c-worst    mean   worst    sec
    budgetr=3.15 (plan_budget)          3.011 0.96282     -    0.96251  0.9157   73.8
    mix31a/gptq-khr                     2.995 0.95884  0.9341  0.95904  0.9046    6.3
    mix31b/gptq-khr                     3.096 0.94494  0.9234  0.93621  0.8846    5.2
    mix31c/gptq-khr (3-bit criteria)    3.072 0.96408  0.9405  0.96477  0.9072   11.8
    budgetr=2.75 (plan_budget)          2.561 0.91989     -    0.91326  0.7152   48.3
    mix27a/gptq-khr                     2.690 0.91159  0.8623  0.90055  0.6610    6.2
    mix27b/gptq-khr                     2.613 0.92591  0.8679  0.92091  0.7383    4.0
    mix27c/gptq-khr                     2.673 0.93221  0.8840  0.92842  0.8094    3.9
    mix27c/gptq-kr (INT2 default)       2.670 0.93812  0.9090  0.93019  0.8578    6.8
    budgetr48=4.62 (plan_budget)        4.670 0.99654     -    0.99618  0.9831   56.2
    mix45a/gptq-khr                     4.415 0.99466  0.9924  0.99419  0.9798   10.6
    mix45b/gptq-khr                     4.472 0.99322  0.9899  0.99238  0.9767    9.8
    mix45c/gptq-khr (INT4 default)      4.472 0.99571  0.9932  0.99514  0.9804   17.7
    mix45d/gptq-khr                     4.464 0.99480  0.9925  0.99434  0.9801   18.5
    mix8a/krtn                          7.973 0.99988  0.9998  0.99987  0.9996    4.0
    mix8b/krtn (INT8 default)           7.972 0.99991  0.9999  0.99991  0.9998    0.7
    mix8c/krtn                          7.974 0.99989  0.9998  0.99989  0.9996    0.7

The cheap proxy for the plan's sensitivity, ``hessian_damage`` below, against the damage measured
with one tensor quantized (``rank=int2-g16-asym-k8/gptq-khr``): Spearman -0.11 over the 40 weight
tensors (3.4 s against 54 s); absolute instead of relative error, per row, or with gptq-khr's
error instead of round-to-nearest's: -0.34 to 0.09. The layer-local error misses how much each
tensor's output moves the sentence embedding (query/key projections: large local error,
0.0003-0.0006 damage; the last attention output: small local error, 0.014), so the plans
above use the measured sensitivity once and ship its choice as criteria globs.

(Seconds on this shared machine moved 2-3x with the other sessions' load, so they are not
in this table: the time rules are ratios measured in one process by
``test_bench_methods.py::test_bench_time_rules_of_the_shipped_methods``.)

(``--list`` prints the configuration names; ``budget=3.0`` runs ``plan.plan_budget`` with
``BUDGET_RUNGS`` at that many bits per weight, sensitivity scored on calibration sentences;
``budget48=4.45`` the same with ``BUDGET_RUNGS_HIGH``.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
import sys
import tempfile
import time
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from threadpoolctl import threadpool_limits

import arrowquant_core as aq

F32 = npt.NDArray[np.float32]
GPTQ_BUDGET_S = 5.0  # issue 13 item 4, on a quiet machine; checked here as a ratio to gptq-act-mse


@dataclass(frozen=True)
class Config:
    name: str
    config: aq.QuantizationConfig
    note: str = ""


def _cfg(scheme: str, method: str, overrides: tuple[tuple[str, str], ...] = (),
         method_overrides: tuple[tuple[str, str], ...] = ()) -> aq.QuantizationConfig:
    return aq.QuantizationConfig(scheme, method=method, overrides=overrides, method_overrides=method_overrides)


EMB = "*embeddings*"
WORD = "*word_embeddings*"
I2G32 = "int2-g32-asym-k8"
I2G16 = "int2-g16-asym-k8"
I4G32 = "int4-g32-asym-k8"
I8 = "int8-g32-sym-k8"
# Mixed precision fixed per tensor kind (issue 13 item 1), from the damage measured with one
# tensor at a time quantized at INT2 (``rank=int2-g16-asym-k8/gptq-khr`` below): the word
# embeddings (52% of the parameters) must be INT2 below ~3.2 bits per weight; query / key /
# attention-output projections cost least at INT2 (0.0003-0.001 each), the value
# projections and the last layer's attention output most per byte (0.001-0.014).
QK = (("*attention.self.query*", I2G32), ("*attention.self.key*", I2G32))
MIX31A = ((WORD, I2G32), *QK)
MIX31B = ((WORD, I2G16), *QK, ("*attention.output.dense*", I2G32), ("pooler*", I2G32))
MIX31C = (("*layer.5.attention.self.key*", I4G32), ("*layer.5.attention.self.value*", I8),
          ("*layer.5.attention.output.dense*", I8), (WORD, I2G32), ("*attention.self.query*", I2G16),
          ("*attention.self.key*", I2G16), ("pooler*", I2G32))
MIX27A = (("*layer.5.attention.output.dense*", I4G32), ("*attention.self.value*", I4G32),
          ("*layer.0.intermediate*", I4G32), ("*layer.5.intermediate*", I4G32))
# the plan budgetr=2.75 chose (values, intermediates, the last layers' attention output and
# key, the small embedding tables at INT4), every intermediate included, as globs
MIX27B = (("*attention.self.value*", I4G32), ("*intermediate.dense*", I4G32),
          ("*layer.4.attention.output.dense*", I4G32), ("*layer.5.attention.output.dense*", I4G32),
          ("*layer.5.attention.self.key*", I4G32), ("*position_embeddings*", I4G32), ("*token_type_embeddings*", I4G32))
MIX27C = (*MIX27B, ("*.layer.?.output.dense*", I2G16))
MIX45A = (("*attention.self.value*", I8), ("*layer.5.attention.output.dense*", I8))
MIX45B = ((WORD, "int4-g16-asym-k8"),)
# from the plan budgetr48=4.62 chose (4.67 bits): the INT8 tensors that fit 4.5 bits
MIX45C = (("*attention.self.value*", I8), ("*layer.5.attention.output.dense*", I8),
          ("*layer.5.attention.self.key*", I8), ("*position_embeddings*", I8), ("*token_type_embeddings*", I8))
MIX45D = (("*attention.self.value*", I8), ("*layer.4.attention.output.dense*", I8),
          ("*layer.5.attention.output.dense*", I8), ("*layer.5.attention.self.key*", I8))
CONFIGS: dict[str, Config] = {c.name: c for c in (
    Config("int8-g128/rtn", _cfg("int8-g128-asym", "rtn"), "INT8 default before issue 13"),
    Config("int8-g32-sym-k8/krtn", _cfg("int8-g32-sym-k8", "krtn"), "INT8 krtn everywhere"),
    Config("int8-g32-k8/krtn", _cfg("int8-g32-asym-k8", "krtn")),
    Config("int4-g32-k8/gptq-khr", _cfg("int4-g32-asym-k8", "gptq-khr"), "INT4 gptq-khr everywhere"),
    Config("mix31a/gptq-khr", _cfg(I4G32, "gptq-khr", MIX31A), "INT4, word embeddings + query/key at INT2 g32"),
    Config("mix31b/gptq-khr", _cfg(I4G32, "gptq-khr", MIX31B),
           "INT4, word embeddings INT2 g16, query/key/attention-output/pooler at INT2 g32"),
    Config("mix31c/gptq-khr", _cfg(I4G32, "gptq-khr", MIX31C),
           "mix31a with query/key INT2 g16, layer 5 key INT4, layer 5 value/attention output INT8, pooler INT2"),
    Config("mix27a/gptq-khr", _cfg(I2G16, "gptq-khr", MIX27A),
           "INT2 g16, values + last attention output + 2 intermediates at INT4"),
    Config("mix27b/gptq-khr", _cfg(I2G32, "gptq-khr", MIX27B), "INT2 g32, budgetr=2.75's INT4 tensors"),
    Config("mix27c/gptq-khr", _cfg(I2G32, "gptq-khr", MIX27C), "mix27b, FFN output projections INT2 g16"),
    Config("mix27c/gptq-kr", _cfg(I2G32, "gptq-kr", MIX27C), "mix27c without the rotation (INT2 default)"),
    Config("mix45a/gptq-khr", _cfg(I4G32, "gptq-khr", MIX45A), "INT4, values + last attention output INT8"),
    Config("mix45b/gptq-khr", _cfg(I4G32, "gptq-khr", MIX45B), "INT4, word embeddings INT4 g16"),
    Config("mix45c/gptq-khr", _cfg(I4G32, "gptq-khr", MIX45C), "mix45a + layer 5 key + small embeddings INT8"),
    Config("mix45d/gptq-khr", _cfg(I4G32, "gptq-khr", MIX45D), "mix45a + layer 4 attention output + layer 5 key INT8"),
    Config("mix8a/krtn", _cfg(I8, "krtn", method_overrides=(("*.layer.?.output.dense*", "gptq-kr"),)),
           "INT8 krtn, GPTQ on the feed-forward output projections"),
    Config("mix8b/krtn", _cfg(I8, "krtn", method_overrides=(("*attention.self.value*", "gptq-kr"),
                                                            ("*attention.output.dense*", "gptq-kr"))),
           "INT8 krtn, GPTQ on the value and attention-output projections"),
    Config("mix8c/krtn", _cfg(I8, "krtn", method_overrides=(("*intermediate.dense*", "gptq-kr"),)),
           "INT8 krtn, GPTQ on the intermediates"),
    Config("int4-g32-k8/gptq-kr", _cfg("int4-g32-asym-k8", "gptq-kr")),
    Config("int4-g32-k8/gptq-kh+emb-krtn", _cfg("int4-g32-asym-k8", "gptq-kh", method_overrides=((EMB, "krtn"),))),
    Config("int2-g16-k8/gptq-khr", _cfg("int2-g16-asym-k8", "gptq-khr"), "INT2 g16 gptq-khr everywhere"),
    Config("int2-g16-k8/gptq-kr", _cfg("int2-g16-asym-k8", "gptq-kr")),
    Config("int8-g64-k8/iclip", _cfg("int8-g64-asym-k8", "iclip")),
    Config("int8-g32-k8/iclip", _cfg("int8-g32-asym-k8", "iclip")),
    Config("int8-g32-k8/gptq-i", _cfg("int8-g32-asym-k8", "gptq-i")),
    Config("int4-g64/gptq-act-mse", _cfg("int4-g64-asym", "gptq-act-mse"), "current INT4 default"),
    Config("int4-g64/gptq-i", _cfg("int4-g64-asym", "gptq-i")),
    Config("int4-g64/gptq-kh", _cfg("int4-g64-asym", "gptq-kh")),
    Config("int4-g32-k8/gptq-i", _cfg("int4-g32-asym-k8", "gptq-i")),
    Config("int4-g32-k8/gptq-kh", _cfg("int4-g32-asym-k8", "gptq-kh")),
    Config("int4-g32-k8/gptq-kh128", _cfg("int4-g32-asym-k8", "gptq-kh128")),
    Config("int4-g16-k8/gptq-kh", _cfg("int4-g16-asym-k8", "gptq-kh")),
    Config("int4-g32-k6/gptq-kh", _cfg("int4-g32-asym-k6", "gptq-kh")),
    Config("int4-g16-k8/gptq-kh+emb-g32-k6", _cfg("int4-g16-asym-k8", "gptq-kh", ((EMB, "int4-g32-asym-k6"),))),
    Config("int4-g16-k8/gptq-kh128+emb-g32-k6", _cfg("int4-g16-asym-k8", "gptq-kh128", ((EMB, "int4-g32-asym-k6"),))),
    Config("int4-g16-k8/gptq-kh+emb-g32-k8", _cfg("int4-g16-asym-k8", "gptq-kh", ((EMB, "int4-g32-asym-k8"),))),
    Config("int4-g16-k8/gptq-kh+emb-g32-k8-plain", _cfg("int4-g16-asym-k8", "gptq-kh", ((EMB, "int4-g32-asym-k8"),),
                                                        ((EMB, "iclip"),))),
    Config("int8-g64-sym-k8/gptq-kr", _cfg("int8-g64-sym-k8", "gptq-kr")),
    Config("int8-g64-sym-k8/krtn", _cfg("int8-g64-sym-k8", "krtn")),
    Config("int8-g64-sym-k8/gptq-k", _cfg("int8-g64-sym-k8", "gptq-k")),
    Config("int8-g64-k6/gptq-k", _cfg("int8-g64-asym-k6", "gptq-k")),
    Config("int2-g64/gptq-act-mse", _cfg("int2-g64-asym", "gptq-act-mse"), "current INT2 GPTQ"),
    Config("int2-g16-k8/gptq-i", _cfg("int2-g16-asym-k8", "gptq-i")),
    Config("int2-g16-k8/gptq-kh", _cfg("int2-g16-asym-k8", "gptq-kh")),
    Config("int2-g16-k8/gptq-kh128", _cfg("int2-g16-asym-k8", "gptq-kh128")),
    Config("int2-g32-k8/gptq-kh", _cfg("int2-g32-asym-k8", "gptq-kh")),
    Config("int2-g16-k8/gptq-kh+emb4", _cfg("int2-g16-asym-k8", "gptq-kh", ((EMB, "int4-g32-asym-k8"),))),
    Config("int2-g32-k8/gptq-kh+emb4", _cfg("int2-g32-asym-k8", "gptq-kh", ((EMB, "int4-g32-asym-k8"),))),
    Config("int4-g32-k8/gptq-kh+emb2", _cfg("int4-g32-asym-k8", "gptq-kh", ((EMB, "int2-g16-asym-k8"),))),
    Config("int4-g32-k8/gptq-kh+emb2g32", _cfg("int4-g32-asym-k8", "gptq-kh", ((EMB, "int2-g32-asym-k8"),))),
)}


def minilm() -> tuple[dict[str, F32], dict[str, F32]]:
    from fixtures.minilm.activations import calibration_hessians
    from fixtures.minilm.model import original_weights

    return original_weights(), calibration_hessians()


def measure(weights: Mapping[str, F32], hessians: Mapping[str, F32], config: aq.QuantizationConfig,
            runner: Any, calibration: Callable[[dict[str, Any]], float] | None = None) -> dict[str, float]:
    """Quantize, save, reload, compare: the row of the quality-per-bit table."""
    with threadpool_limits(limits=1, user_api="blas"):
        start = time.perf_counter()
        model = aq.quantize_model(weights, config, hessians=hessians)
        seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:
        path = aq.save(model, Path(folder) / "model.parquet")
        size = path.stat().st_size
        reloaded = aq.load(path)
        back = aq.load_weights(path)
    exact = all(np.array_equal(reloaded.tensors[n].codes, t.codes) and np.array_equal(reloaded.tensors[n].scales, t.scales)
                and np.array_equal(reloaded.tensors[n].zeros, t.zeros) for n, t in model.tensors.items())
    out = runner.compare(back)
    row = {"output_cosine_mean": float(out["output_cosine_mean"]), "output_cosine_min": float(out["output_cosine_min"]),
           "bits_per_weight": 8.0 * size / model.parameter_count, "bytes": float(size),
           "quantize_seconds": seconds, "roundtrip_exact": float(exact)}
    if calibration is not None:
        row["calibration_cosine_mean"] = float(calibration(dict(back)))
        row["calibration_cosine_min"] = float(_calibration_runner().compare(back)["output_cosine_min"])
    return row


_CAL: list[Any] = []


def _calibration_runner() -> Any:
    """A runner on the calibration subset the ladder scores (``MiniLMRunner.calibration_score``):
    its worst sentence is what configurations are chosen by, beside the mean."""
    if not _CAL:
        from fixtures.minilm import model as minilm
        from fixtures.minilm.runner import LADDER_SENTENCES, MiniLMRunner

        sentences = minilm.read_sentences(minilm.CALIBRATION_SENTENCES)[::10][:LADDER_SENTENCES]
        _CAL.append(MiniLMRunner(sentences))
    return _CAL[0]


@pytest.fixture(scope="module")
def data() -> tuple[dict[str, F32], dict[str, F32], Any]:
    from fixtures.minilm.runner import MiniLMRunner

    weights, hessians = minilm()
    return weights, hessians, MiniLMRunner()


@pytest.fixture(autouse=True)
def one_blas_thread() -> Iterator[None]:
    with threadpool_limits(limits=1, user_api="blas"):
        yield


PROPOSED_INT4 = "mix45c/gptq-khr"  # the shipped INT4 default (harness/criteria/minilm.toml)


def test_proposed_int4_default_is_better_per_bit_than_the_current_one(
        data: tuple[dict[str, F32], dict[str, F32], Any]) -> None:
    """The proposed INT4 default, measured end to end (quantize, save, reload, embed).

    The former default (int4-g64-asym / gptq-act-mse) measured 0.9887 / 0.966 at 4.30
    bits per weight; gptq-khr everywhere 0.9921 / 0.9756 at 4.24; the default since issue 13
    (gptq-khr, INT8 on the tensors of ``MIX45C``) 0.99514 / 0.9804 at 4.472 (module docstring
    command). The floors sit under the last, above the others, so losing the mix fails.
    """
    weights, hessians, runner = data
    row = measure(weights, hessians, CONFIGS[PROPOSED_INT4].config, runner)
    assert row["roundtrip_exact"] == 1.0
    assert row["bits_per_weight"] <= 4.5, row
    assert row["output_cosine_mean"] >= 0.9945, row
    assert row["output_cosine_min"] >= 0.978, row
    # Speed as a ratio to the current GPTQ default in the same process (a busy machine
    # slows both), on the tensors that cost the most: the word embeddings (clip search)
    # and one layer's six Linears (GPTQ). Whole model: 12.4 s vs 28.2 s measured on a busy
    # machine; the <= 5 s budget holds for gptq-act-mse on a quiet one.
    part = {n: a for n, a in weights.items() if "word_embeddings" in n or ".layer.0." in n}
    old_s = _seconds(part, hessians, CONFIGS["int4-g64/gptq-act-mse"].config)
    new_s = _seconds(part, hessians, CONFIGS[PROPOSED_INT4].config)
    assert new_s <= 2.0 * old_s, (new_s, old_s)


def _seconds(weights: Mapping[str, F32], hessians: Mapping[str, F32], config: aq.QuantizationConfig) -> float:
    with threadpool_limits(limits=1, user_api="blas"):
        start = time.perf_counter()
        aq.quantize_model(weights, config, hessians=hessians)
        return time.perf_counter() - start


BUDGET_RUNGS: tuple[tuple[str, str], ...] = (
    ("int2-g32-asym-k8", "gptq-kh"), ("int4-g32-asym-k8", "gptq-kh"))
# plan.Rung.planned_bytes counts stored bytes before zstd; the file is smaller (scale and
# zero codes compress). Measured planned / on-disk for uniform INT2 g32-k8 and INT4 g32-k8
# models: ~1.10 and ~1.07; the realized bits per weight are measured and reported anyway.
PLANNED_PER_DISK = 1.09
BUDGET_RUNGS_KHR: tuple[tuple[str, str], ...] = (
    ("int2-g32-asym-k8", "gptq-khr"), ("int4-g32-asym-k8", "gptq-khr"))
BUDGET_RUNGS_KHR_HIGH: tuple[tuple[str, str], ...] = (
    ("int4-g32-asym-k8", "gptq-khr"), ("int8-g32-sym-k8", "gptq-khr"))
BUDGET_RUNGS_HIGH: tuple[tuple[str, str], ...] = (
    ("int4-g32-asym-k8", "gptq-kh"), ("int8-g32-asym-k8", "gptq-i"))


def measure_budget(weights: Mapping[str, F32], hessians: Mapping[str, F32], target_bpw: float, runner: Any,
                   rungs: tuple[tuple[str, str], ...] = BUDGET_RUNGS) -> dict[str, float]:
    """``plan.plan_budget`` at a planned size of ``target_bpw`` (float tensors included), scored on
    calibration sentences; the realized model is then measured like any configuration."""
    calibration = runner.calibration_score()
    names = [n for n, a in weights.items() if a.ndim == 2 and a.dtype.kind == "f"]
    floats = sum(4.0 * a.size for n, a in weights.items() if a.ndim != 2)
    params = sum(int(a.size) for a in weights.values())
    budget = target_bpw * params / 8.0 * PLANNED_PER_DISK - floats
    ladder = tuple(aq.Rung(s, m) for s, m in rungs)
    with threadpool_limits(limits=1, user_api="blas"):
        start = time.perf_counter()
        plan = aq.plan_budget(weights, names, ladder, calibration, budget, hessians=hessians)
        model = aq.realize(weights, plan, hessians=hessians)
        seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:
        path = aq.save(model, Path(folder) / "model.parquet")
        size = path.stat().st_size
        back = aq.load_weights(path)
    out = runner.compare(back)
    counts = {r.label: sum(1 for d in plan.decisions if d.rung == i) for i, r in enumerate(ladder)}
    print(f"  plan at {target_bpw} bpw: " + ", ".join(f"{k} x{v}" for k, v in counts.items()))
    for d in plan.decisions:
        if d.rung:
            print(f"    {d.name} -> {ladder[d.rung].label}")
    return {"output_cosine_mean": float(out["output_cosine_mean"]), "output_cosine_min": float(out["output_cosine_min"]),
            "bits_per_weight": 8.0 * size / params, "quantize_seconds": seconds,
            "calibration_cosine_mean": plan.score, "roundtrip_exact": 1.0}


def hessian_damage(weights: Mapping[str, F32], names: list[str], scheme: str,
                   hessians: Mapping[str, F32]) -> dict[str, float]:
    """The cheap sensitivity proxy issue 13 item 1 proposed: each tensor's relative output error
    ``tr(dW H dW^T) / tr(W H W^T)`` after round-to-nearest on ``scheme``'s grid (GPTQ's layer
    objective, arXiv:2210.17323 eq. 1; HAWQ-V2, arXiv:1911.03852, ranks layers by a Hessian-weighted
    perturbation too), ``H`` the identity for a tensor without a Hessian. No model run."""
    sch = aq.get_scheme(scheme)
    out: dict[str, float] = {}
    for name in names:
        w = weights[name].astype(np.float64)
        qt = aq.quantize_tensor(weights[name], sch, name, "krtn" if sch.scale_bits else "rtn")
        delta = aq.dequantize(qt).astype(np.float64) - w
        h = hessians.get(name)
        hm = np.eye(w.shape[1]) if h is None else h.astype(np.float64)
        out[name] = float(np.sum((delta @ hm) * delta)) / float(np.sum((w @ hm) * w))
    return out


def rank_agreement(weights: Mapping[str, F32], hessians: Mapping[str, F32], runner: Any,
                   rung: tuple[str, str]) -> float:
    """Spearman rank correlation between the proxy's damage (``plan.hessian_damage``) and the
    damage measured by running the model with one tensor quantized (``plan.sensitivity``,
    calibration sentences), over every weight matrix at ``rung``."""
    from scipy.stats import spearmanr

    names = [n for n, a in weights.items() if a.ndim == 2 and a.dtype.kind == "f"]
    from arrowquant_core.plan import sensitivity

    with threadpool_limits(limits=1, user_api="blas"):
        start = time.perf_counter()
        proxy = hessian_damage(weights, names, rung[0], hessians)
        proxy_s = time.perf_counter() - start
        start = time.perf_counter()
        slow = sensitivity(weights, names, (aq.Rung(*rung),), runner.calibration_score(), hessians, levels=(0,))
        slow_s = time.perf_counter() - start
    for n in names:
        print(f"    {n:60s} proxy {proxy[n]:.5f}  measured {slow[n][0]:.5f}")
    rho = float(spearmanr([proxy[n] for n in names], [slow[n][0] for n in names]).statistic)
    print(f"  {rung}: Spearman {rho:.3f} over {len(names)} tensors; proxy {proxy_s:.1f} s, measured {slow_s:.1f} s")
    return rho


def main(argv: list[str]) -> int:
    if "--list" in argv:
        for c in CONFIGS.values():
            print(c.name, c.note)
        return 0
    from fixtures.minilm.runner import MiniLMRunner

    names = argv or list(CONFIGS)
    weights, hessians = minilm()
    runner = MiniLMRunner()
    calibration = runner.calibration_score()
    print(f"{'configuration':34s} {'bpw':>6s} {'calib':>8s} {'c-worst':>7s} {'mean':>8s} {'worst':>7s} {'sec':>6s}")
    for name in names:
        if name.startswith("rank="):  # rank=SCHEME/METHOD: the proxy against the measured sensitivity
            rank_agreement(weights, hessians, runner, tuple(name.split("=", 1)[1].split("/", 1)))  # type: ignore[arg-type]
            continue
        if name.startswith("budget"):  # budget=B: INT2/INT4 rungs; budget48=B: INT4/INT8 rungs
            rungs = (BUDGET_RUNGS_HIGH if name.startswith("budget48=") else
                     BUDGET_RUNGS_KHR_HIGH if name.startswith("budgetr48=") else
                     BUDGET_RUNGS_KHR if name.startswith("budgetr=") else BUDGET_RUNGS)
            row = measure_budget(weights, hessians, float(name.split("=", 1)[1]), runner, rungs)
        else:
            row = measure(weights, hessians, CONFIGS[name].config, runner, calibration)
        print(f"{name:34s} {row['bits_per_weight']:6.3f} {row['calibration_cosine_mean']:8.5f} "
              f"{row.get('calibration_cosine_min', float('nan')):7.4f} "
              f"{row['output_cosine_mean']:8.5f} {row['output_cosine_min']:7.4f} {row['quantize_seconds']:6.1f}"
              + ("" if row["roundtrip_exact"] == 1.0 else "  ROUNDTRIP NOT EXACT"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
