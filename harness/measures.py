"""The one table of metrics the acceptance suite measures.

Criteria files may only name metrics listed here (an unknown name is a usage error
with a "did you mean"); the report's legend and column units come from here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    higher_is_better: bool
    description: str


_ROWS: Final[tuple[Metric, ...]] = (
    Metric("size_mb", "MB", False, "bytes of the written Parquet v2 artifact / 1e6"),
    Metric("compression_vs_fp32", "x", True, "FP32 safetensors bytes / artifact bytes, both measured on disk"),
    Metric("compression_vs_fp16", "x", True, "FP16 safetensors bytes / artifact bytes, both measured on disk"),
    Metric("bits_per_weight", "bits", False, "artifact bits on disk / parameter count"),
    Metric("unquantized_weights", "tensors", False, "weights of 2+ dimensions left in floating point"),
    Metric("weight_cosine_mean", "", True, "mean over quantized tensors of cosine(original, dequantized)"),
    Metric("weight_cosine_min", "", True, "worst tensor's cosine(original, dequantized)"),
    Metric("weight_sqnr_db_mean", "dB", True, "mean over quantized tensors of the SQNR"),
    Metric("weight_sqnr_db_min", "dB", True, "worst tensor's SQNR"),
    Metric("output_cosine_mean", "", True, "mean cosine between original and quantized sentence embeddings"),
    Metric("output_cosine_p1", "", True, "1st percentile of that cosine"),
    Metric("output_cosine_min", "", True, "worst sentence's cosine"),
    Metric("top5_overlap", "", True, "mean overlap of each sentence's 5 nearest neighbours, original vs quantized"),
    Metric("top1_agreement", "", True, "nearest neighbour unchanged, over sentences whose original top-1 margin >= 0.01"),
    Metric("roundtrip_exact", "bool", True, "1 when codes, scales and zero points reload bit-exact from the artifact"),
    Metric("quantize_seconds", "s", False, "median wall time of quantize_model over the benchmark rounds"),
    Metric("load_seconds", "s", False, "median wall time to load the artifact and dequantize every tensor"),
)

METRICS: Final[dict[str, Metric]] = {m.name: m for m in _ROWS}
