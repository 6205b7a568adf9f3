"""GGUF faults through the whole run (``--artifact`` with ``--inject-fault gguf-*``).

Outside the default suite (``testpaths = ["tests"]``): each is a whole acceptance-suite
run on the real MiniLM, ~20 s on the 2-core machine, which the default suite's budget
does not allow; ``tests/test_external_artifact.py`` checks the same faults against the
same criteria through the suite's per-layer measure. Run with ``make e2e``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import peers
from harness.config import RunConfig
from harness.runner import run

# fault -> a gate of MiniLM's INT4 criteria (its real runner: outputs measured) that must fail
EXPECTED = {
    "gguf-scales-doubled": {"weight_sqnr_db_min", "group_range_ratio_max"},
    "gguf-other-model-tensor": {"weight_cosine_min", "output_cosine_mean"},
    "gguf-group-scales-off": {"group_range_ratio_max"},
    "gguf-embedding-rows-swapped": {"embedding_row_cosine_min"},
    "gguf-norm-gain-scaled": {"kept_tensors_changed"},
    "gguf-weight-left-f32": {"unquantized_weights", "bits_per_weight", "compression_vs_fp32"},
}
# faults whose victim is the largest non-embedding tensor, the worst layer by SQNR
LAYER_FAULTS = {"gguf-scales-doubled", "gguf-other-model-tensor"}


@pytest.mark.parametrize("fault", sorted(EXPECTED))
def test_gguf_fault_fails_a_named_gate(fault: str, tmp_path: Path) -> None:
    from fixtures.minilm.model import original_weights

    path = peers.quantize(original_weights(), peers.get_peer("Q4_0"), tmp_path / "minilm-Q4_0.gguf",
                          model_name="minilm").path
    result = run(RunConfig(model="minilm", artifact=path, fault=fault, out=tmp_path / "run", quiet=True,
                           benchmark_rounds=1))
    failed = {c["metric"] for c in result.results["criteria"] if c["passed"] is False}
    assert result.verdict == "FAIL" and EXPECTED[fault] <= failed, failed
    assert result.results["run"]["artifact"]["fault"] == fault
    assert f"injected fault `{fault}`" in result.report_path.read_text()
    if fault == "gguf-weight-left-f32":
        # the clean file already fails these three gates (llama.cpp keeps two embeddings in F32:
        # tests/test_external_artifact.py); the fault must add its victim to what they count
        metrics = result.results["bit_widths"][0]["metrics"]
        assert metrics["unquantized_weights"] == 3, metrics["unquantized_weights"]
        return
    if fault not in LAYER_FAULTS:
        return
    layers = result.results["bit_widths"][0]["layers"]
    worst = min(layers, key=lambda l: l["sqnr_db"])
    assert worst["name"] == "encoder.layer.0.intermediate.dense.weight" and worst["scheme"] == "Q4_0"  # the victim
