"""arrowquant_core: INT8/INT4/INT2 quantization of model weights, and its Parquet storage.

The public surface is small and symmetric: ``quantize``/``dequantize`` one tensor,
``quantize_model`` a whole checkpoint, ``pack``/``unpack`` codes, ``save``/``load`` a
quantized model (format v2) and ``save_weights``/``load_weights`` float tensors (the
v1 path, which also reads v2 files). Compiled with mypyc; see ``is_compiled()``.
"""

from __future__ import annotations

from arrowquant_core.diffusion import (
    PROFILES,
    ArrowQuantV2,
    DeploymentProfile,
    DiffusionQuantConfig,
    DiffusionQuantResult,
    QualityReport,
    detect_modality,
    get_profile,
)
from arrowquant_core.errors import (
    ArrowQuantError,
    ConfigurationError,
    FormatError,
    QuantizationError,
    ValidationError,
)
from arrowquant_core.gptq import HessianAccumulator, hessian_from_activations
from arrowquant_core.kernels import pack, unpack
from arrowquant_core.methods import METHODS, Method, get_method, quantize_tensor
from arrowquant_core.metrics import cosine, relative_error, row_cosines, sqnr_db
from arrowquant_core.model import QuantizationConfig, QuantizedModel, quantize_model
from arrowquant_core.plan import MixedPlan, Rung, plan_budget, plan_quality, realize
from arrowquant_core.schemes import SCHEMES, Scheme, get_scheme
from arrowquant_core.storage import format_version, load, load_weights, save, save_weights
from arrowquant_core.tensor import QuantizedTensor, dequantize, quantize

__all__ = [
    "COMPILED_MODULES",
    "PROFILES",
    "SCHEMES",
    "METHODS",
    "ArrowQuantV2",
    "DeploymentProfile",
    "DiffusionQuantConfig",
    "DiffusionQuantResult",
    "QualityReport",
    "detect_modality",
    "get_profile",
    "ArrowQuantError",
    "ConfigurationError",
    "FormatError",
    "HessianAccumulator",
    "Method",
    "MixedPlan",
    "QuantizationConfig",
    "QuantizationError",
    "QuantizedModel",
    "QuantizedTensor",
    "Rung",
    "Scheme",
    "ValidationError",
    "cosine",
    "dequantize",
    "format_version",
    "get_method",
    "get_scheme",
    "hessian_from_activations",
    "is_compiled",
    "load",
    "load_weights",
    "pack",
    "plan_budget",
    "plan_quality",
    "quantize",
    "quantize_model",
    "quantize_tensor",
    "realize",
    "relative_error",
    "row_cosines",
    "save",
    "save_weights",
    "sqnr_db",
    "unpack",
]

COMPILED_MODULES = ("actquant", "atomic", "clip", "diffusion", "errors", "gptq", "hqq", "igptq", "kernels", "kquant",
                    "limits", "methods", "metrics", "model", "plan", "residual", "rotation", "safetensors_io", "schemes",
                    "spatial", "storage", "tensor", "timeaware")


def is_compiled() -> bool:
    """True when every core module was imported from a mypyc-built extension module."""
    import importlib
    import importlib.machinery

    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    for name in COMPILED_MODULES:
        module = importlib.import_module(f"arrowquant_core.{name}")
        if not str(getattr(module, "__file__", "")).endswith(suffixes):
            return False
    return True
