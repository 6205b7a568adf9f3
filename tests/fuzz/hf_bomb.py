"""A transformers model folder whose config.json claims far more model than its weights.

The runner builds the model config.json describes, then loads the checkpoint into it. A
config of 100,000 layers over the tiny GPT-2's two used to be built whole before the
missing tensors were noticed (24 GB and minutes); now ``hf_common.check_config`` refuses
it from names and shapes alone. torch and transformers are imported with this module, so
the bomb child (``bombs.measure_all``) counts only what reading the folder costs.
"""

from __future__ import annotations

import json
from pathlib import Path
import shutil
from typing import Any

import torch  # noqa: F401 - imported here so the measured call does not pay for it
import transformers  # noqa: F401

from arrowquant_core.safetensors_io import read_safetensors_folder
from fixtures.runners import build_runner
from fixtures.runners.hf_causal_lm import HFCausalLMRunner  # noqa: F401 - the runner's imports, up front


def make_folder(path: Path, scale: int) -> Path:
    """The tiny GPT-2 folder with ``n_layer = scale * 50,000``; returns its config.json."""
    from fixtures import tiny_lm

    folder = path.parent / "model"
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(tiny_lm.ensure_tiny_gpt2(), folder)
    config = json.loads((folder / "config.json").read_text())
    config["n_layer"] = scale * 50_000
    (folder / "config.json").write_text(json.dumps(config))
    return folder / "config.json"


def build_from_config(path: Path) -> Any:
    folder = path.parent
    return build_runner(folder, read_safetensors_folder(folder), "hf-causal-lm")
