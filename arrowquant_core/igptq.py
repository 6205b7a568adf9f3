"""GPTQ fed by importance-weighted group ranges, optionally in a Hadamard-rotated basis.

The composition the issue asks for ("importance-weighted clip search feeding GPTQ"):

1. optionally rotate the weight's input dimension, ``W R``, and its Hessian, ``R^T H R``
   (``rotation.py``: randomized block Hadamard, QuIP#-style incoherence);
2. choose every group's scale and integer zero point up front with the clip search
   of ``kquant.search_params``, each value's squared error weighted by ``diag(H)`` of
   its input column (llama.cpp's imatrix weighting; ``importance=False``: unweighted,
   which measured better on MiniLM, see ``methods.py``); for K-schemes the scales are
   searched on their stored code grid, so what GPTQ rounds against is exactly what
   the file holds;
3. run GPTQ (``gptq.gptq_matrix``) in activation order with those parameters fixed
   (AutoGPTQ's static groups: parameters from the original weights, module docstring
   of ``gptq.py``, 6.), so the rounding error of every column is spread over the columns
   not yet quantized.

The tensor's ``method`` records the rotation (``rotation.ROTATED_METHODS``), and
``tensor.dequantize_float32`` undoes it.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from arrowquant_core.clip import DEFAULT_GRID
from arrowquant_core.gptq import check_options, factor_hessian, gptq_group_size, gptq_matrix
from arrowquant_core.kquant import column_importance, groups_per_super, importance_blocks, search_params
from arrowquant_core.rotation import check_block, rotate, rotate_hessian
from arrowquant_core.schemes import Scheme, get_scheme
from arrowquant_core.tensor import QuantizedTensor, as_float32, blocks_of, from_codes, layout

F32 = npt.NDArray[np.float32]


def quantize_igptq(array: object, scheme: Scheme | str, name: str, hessian: object, rotation: int = 0,
                   method: str = "gptq-i", damp: float = 0.01, block_size: int = 128,
                   importance: bool = True, grid: tuple[float, ...] = DEFAULT_GRID) -> QuantizedTensor:
    """GPTQ with static group ranges from the grid search, weighted by ``diag(H)`` if
    ``importance`` (else plain squared error); ``rotation`` = Hadamard block (0: none).

    >>> from arrowquant_core.gptq import hessian_from_activations
    >>> rng = np.random.default_rng(0)
    >>> h = hessian_from_activations(rng.standard_normal((256, 64)).astype(np.float32))
    >>> w = rng.standard_normal((8, 64)).astype(np.float32)
    >>> quantize_igptq(w, "int4-g32-asym-k8", "fc", h, rotation=64, method="gptq-ih").method
    'gptq-ih'
    """
    sch = get_scheme(scheme) if isinstance(scheme, str) else scheme
    check_options(block_size, damp, name)
    values, dtype = as_float32(array, name)
    shape = tuple(int(d) for d in values.shape)
    group = gptq_group_size(sch, shape, name)
    cols = shape[1]
    h = np.asarray(hessian, dtype=np.float32) if isinstance(hessian, np.ndarray) else hessian
    if rotation:
        check_block(cols, rotation, name)
        values = rotate(values, rotation).astype(np.float32)
        column_importance(h, cols, name)  # validates the shape before rotating
        h = rotate_hessian(np.asarray(h), rotation)
    weights = importance_blocks(column_importance(h, cols, name), shape, sch) if importance else None
    blocks, _layout = blocks_of(values, sch)
    per = groups_per_super(sch) if sch.scale_bits else 1
    _codes, scales, zeros = search_params(blocks, sch.bits, sch.symmetric, sch.scale_bits, per, weights, grid)
    u, perm = factor_hessian(h, cols, damp, True, name, float32=True)
    rows, _cols, block, n_groups = layout(shape, sch)
    codes, _s, _z = gptq_matrix(values, u, sch.bits, sch.symmetric, group, block_size, perm,
                                params=(scales.reshape(rows, n_groups), zeros.reshape(rows, n_groups)))
    pad = block * n_groups - cols
    if pad:
        codes = np.pad(codes, ((0, 0), (0, pad)))
    return from_codes(name, sch, shape, dtype, codes.reshape(rows * n_groups, block), scales, zeros, method)
