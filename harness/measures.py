"""The one table of metrics the acceptance suite measures.

Criteria files may only name metrics listed here (an unknown name is a usage error
with a "did you mean"); the report's legend and column units come from here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from harness.fixtures_import import fixtures_module

# the weight-activation configurations dream-mini's runner measures (one table, there)
_dream_runner = fixtures_module("dream_mini.runner")
ACT_CONFIGS, ACT_METRICS = _dream_runner.ACT_CONFIGS, _dream_runner.ACT_METRICS


LEVELS = ("artifact", "weight", "output", "time")


@dataclass(frozen=True)
class Metric:
    name: str
    level: str  # artifact | weight | output (needs a runner) | time
    unit: str
    higher_is_better: bool
    description: str


_ROWS: Final[tuple[Metric, ...]] = (
    Metric("size_mb", "artifact", "MB", False, "bytes of the written Parquet v2 artifact / 1e6"),
    Metric("compression_vs_fp32", "artifact", "x", True, "FP32 safetensors bytes / artifact bytes, both measured on disk"),
    Metric("compression_vs_fp16", "artifact", "x", True, "FP16 safetensors bytes / artifact bytes, both measured on disk"),
    Metric("bits_per_weight", "artifact", "bits", False, "artifact bits on disk / parameter count"),
    Metric("unquantized_weights", "artifact", "tensors", False, "weights of 2+ dimensions left in floating point"),
    Metric("missing_tensors", "artifact", "tensors", False, "source tensors absent from the artifact"),
    Metric("unexpected_tensors", "artifact", "tensors", False, "artifact tensors the source does not have"),
    Metric("kept_tensors_changed", "artifact", "tensors", False,
           "float tensors kept unquantized and integer/boolean buffers that do not reload bit-exact"),
    Metric("dtype_mismatches", "artifact", "tensors", False, "tensors whose dequantized dtype is not the source's"),
    Metric("nonfinite_tensors", "artifact", "tensors", False, "dequantized tensors holding NaN or infinity"),
    Metric("tie_mismatches", "artifact", "tensors", False,
           "tied tensors recorded differently from the identical tensors found in the source"),
    Metric("embedding_row_cosine_min", "weight", "", True,
           "worst single row's cosine over the quantized embedding tables (one token's vector)"),
    Metric("group_range_ratio_min", "weight", "", True,
           "smallest dequantized/source value range over every quantization group"),
    Metric("group_range_ratio_max", "weight", "", False,
           "largest dequantized/source value range over every quantization group (a wrong group scale)"),
    Metric("weight_cosine_mean", "weight", "", True, "mean over quantized tensors of cosine(original, dequantized)"),
    Metric("weight_cosine_min", "weight", "", True, "worst tensor's cosine(original, dequantized)"),
    Metric("weight_sqnr_db_mean", "weight", "dB", True, "mean over quantized tensors of the SQNR"),
    Metric("weight_sqnr_db_min", "weight", "dB", True, "worst tensor's SQNR"),
    Metric("output_cosine_mean", "output", "", True, "mean cosine between original and quantized sentence embeddings"),
    # hf-encoder: last hidden states per token, and mean-pooled per sentence
    Metric("hidden_cosine_mean", "output", "", True, "mean cosine of each token's last hidden state to the original's"),
    Metric("hidden_cosine_min", "output", "", True, "worst token's last-hidden-state cosine"),
    Metric("pooled_cosine_mean", "output", "", True, "mean cosine of each mean-pooled sentence vector to the original's"),
    Metric("pooled_cosine_min", "output", "", True, "worst sentence's mean-pooled cosine"),
    # hf-causal-lm: next-token distributions (llama.cpp's perplexity --kl-divergence)
    Metric("kl_max", "output", "nats", False, "largest KL(original || quantized) at any evaluated position"),
    Metric("next_token_top1_agreement", "output", "", True, "positions whose most likely next token is unchanged"),
    Metric("perplexity_ratio", "output", "x", False, "quantized model's perplexity / the original's on the evaluation text"),
    Metric("reference_perplexity", "output", "", False, "the original model's perplexity on the evaluation text"),
    Metric("kl_median", "output", "nats", False, "median KL(original || quantized) over evaluated positions"),
    Metric("kl_mean_worst_sentence", "output", "nats", False, "highest mean KL of any one evaluation sentence"),
    Metric("delta_p_rms", "output", "", False,
           "RMS change of the probability of the original's top token (llama.cpp's RMS delta-p)"),
    Metric("pooler_cosine_mean", "output", "", True, "mean cosine of the model's pooler output to the original's"),
    Metric("pooler_cosine_min", "output", "", True, "worst sentence's pooler-output cosine"),
    Metric("output_cosine_p1", "output", "", True, "1st percentile of that cosine"),
    Metric("output_cosine_min", "output", "", True, "worst sentence's cosine"),
    Metric("top5_overlap", "output", "", True, "mean overlap of each sentence's 5 nearest neighbours, original vs quantized"),
    Metric("top1_agreement", "output", "", True, "nearest neighbour unchanged, over sentences whose original top-1 margin >= 0.01"),
    # dream-mini (masked-diffusion denoiser), at masked positions of the evaluation set
    Metric("kl_mean", "output", "nats", False, "mean KL(original || quantized) of the model's predicted token distributions"),
    Metric("kl_p99", "output", "nats", False, "99th percentile of that KL over positions"),
    Metric("masked_top1_agreement", "output", "", True, "fraction of masked positions whose argmax is unchanged"),
    Metric("kl_mean_worst_group", "output", "nats", False, "highest mean KL of any mask-ratio group (timestep group)"),
    Metric("top1_agreement_worst_group", "output", "", True, "lowest top-1 agreement of any mask-ratio group"),
    Metric("sampler4_agreement", "output", "", True, "4-step greedy unmasking: fraction of final tokens equal"),
    Metric("sampler8_agreement", "output", "", True, "8-step greedy unmasking: fraction of final tokens equal"),
    Metric("sampler4_first_divergence", "output", "step", True, "4-step: first step where trajectories differ (-1 never)"),
    Metric("sampler8_first_divergence", "output", "step", True, "8-step: first step where trajectories differ (-1 never)"),
    # dit-mini (image and audio diffusion transformers): noise prediction on evaluation samples
    # across the schedule, 20-step DDIM from shared noise, and the spatial comparison
    Metric("noise_cosine_mean", "output", "", True, "mean cosine of predicted noise, original vs quantized"),
    Metric("noise_cosine_min", "output", "", True, "worst sample's noise-prediction cosine"),
    Metric("noise_cosine_worst_group", "output", "", True, "lowest mean noise cosine of any timestep group"),
    Metric("noise_mse_mean", "output", "", False, "mean squared difference of predicted noise"),
    Metric("noise_mse_worst_group", "output", "", False, "highest noise MSE of any timestep group"),
    Metric("sample_cosine_mean", "output", "", True, "DDIM final latents from the same noise: mean cosine"),
    Metric("sample_cosine_min", "output", "", True, "DDIM final latents: worst seed's cosine"),
    Metric("sample_psnr_db_mean", "output", "dB", True, "DDIM final latents: mean PSNR (range [-1, 1])"),
    Metric("sample_psnr_db_min", "output", "dB", True, "DDIM final latents: worst seed's PSNR"),
    Metric("w8a8_gptq_smooth_noise_cosine", "output", "", True,
           "GPTQ + smoothing, int8 per-channel weights, static per-tensor 8-bit activations: noise cosine"),
    Metric("w8a8_gptq_smooth_sample_psnr_db", "output", "dB", True, "the same W8A8 model: DDIM final-latent PSNR"),
    Metric("w4a8_gptq_smooth_noise_cosine", "output", "", True,
           "GPTQ + smoothing, int4 group-64 weights, static per-tensor 8-bit activations: noise cosine"),
    Metric("w4a8_gptq_smooth_sample_psnr_db", "output", "dB", True, "the same W4A8 model: DDIM final-latent PSNR"),
    Metric("spatial_fallbacks", "output", "sites", False,
           "smoothing sites that fell back to per-channel weights, over the whole spatial comparison"),
    Metric("plan_mismatches", "artifact", "tensors", False,
           "tensors whose stored scheme/method differs from the plan (ladder or config)"),
    Metric("promotions", "weight", "", False, "ladder promotions (one rung up each) the plan needed"),
    Metric("calibration_score", "output", "", True,
           "the planned model's score on the calibration set (what the ladder targets)"),
    Metric("source_match", "artifact", "bool", True,
           "1 when the artifact's recorded source digest is that of the model under test"),
    Metric("roundtrip_exact", "artifact", "bool", True, "1 when codes, scales and zero points reload bit-exact from the artifact"),
    # dream-mini time-aware: frontier flips, and every weight-activation configuration the
    # runner measures (keys "{config}_{metric}", derived from the runner's own tables)
    Metric("frontier_flip_rate4", "output", "", False,
           "4-step unmasking, teacher-forced on the original's trajectory: fraction of its commits flipped"),
    Metric("frontier_flip_rate8", "output", "", False,
           "8-step unmasking, teacher-forced on the original's trajectory: fraction of its commits flipped"),
    *(Metric(f"{c.key}_{m}", "output", "nats" if m.startswith("kl") else "",
             not (m.startswith("kl") or m.startswith("frontier")), f"{c.label} activations: {d}")
      for c in ACT_CONFIGS for m, d in ACT_METRICS.items()),
    Metric("a8_timeaware_kl_ratio", "output", "", False,
           "A8 per-tensor static: KL with time-aware activation parameters / KL with time-agnostic ones"),
    Metric("a4_timeaware_kl_ratio", "output", "", False,
           "A4 per-tensor static: KL with time-aware activation parameters / KL with time-agnostic ones"),
    Metric("activation_tables_stored", "artifact", "", True,
           "1: the activation tables were read from the artifact; 0: a table is missing there; "
           "-1: not checked (no artifact tables handed to the runner)"),
    Metric("activation_tables_match", "artifact", "", True,
           "1: every activation table in the artifact equals the one calibrated from this model "
           "(bit for bit); 0: one differs or is missing; -1: not checked"),
    # hessian_comparison (dream-mini: GPTQ with the plain and the mask-aware Hessian), the
    # first method the criteria list, at the bit width's scheme, weight-only outputs
    Metric("hessian_plain_kl_mean", "output", "nats", False,
           "GPTQ with the plain calibration Hessian: mean KL at masked positions"),
    Metric("hessian_mask_aware_kl_mean", "output", "nats", False,
           "GPTQ with the mask-aware Hessian (masked targets weighted by certainty): mean KL at masked positions"),
    Metric("hessian_mask_aware_kl_ratio", "output", "", False,
           "KL with the mask-aware Hessian / KL with the plain one (below 1: mask-aware helps)"),
    Metric("hessian_plain_vs_shipped_kl_ratio", "output", "", False,
           "KL of GPTQ with the plain Hessian / KL of the shipped artifact (below 1: calibration helps)"),
    # end dream-mini time-aware
    Metric("quantize_seconds", "time", "s", False, "wall time of the quantization that produced the artifact (calibration capture and sensitivity pass excluded)"),
    Metric("load_seconds", "time", "s", False, "median wall time to load the artifact and dequantize every "
           "tensor (on the run's measurement threads, --threads)"),
    # the streaming run (harness/streaming.py)
    Metric("readback_seconds", "time", "s", False,
           "streaming run: wall time to read the artifact back row group by row group and measure every tensor"),
    Metric("peak_rss_gib", "time", "GiB", False,
           "streaming run: the process's peak resident memory (VmHWM) after quantizing and measuring this bit width"),
)

METRICS: Final[dict[str, Metric]] = {m.name: m for m in _ROWS}
