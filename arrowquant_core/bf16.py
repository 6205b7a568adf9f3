"""bfloat16, imported only when a bfloat16 tensor is met.

NumPy has no bfloat16; ``ml_dtypes`` adds it. ml_dtypes 0.7.0's extension takes about
0.9 s to import on this project's 2-core machines (0.6.0: 0.05 s; the time is spent in
the extension's own initialisation), and every command used to pay it at start-up,
``--help`` and float32 models included. The core therefore imports it on first use.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np


def bfloat16() -> np.dtype[Any]:
    """NumPy's bfloat16 dtype (ml_dtypes), importing ml_dtypes on the first call."""
    import ml_dtypes  # deferred: see the module docstring
    dtype: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
    return dtype


def is_bfloat16(dtype: np.dtype[Any]) -> bool:
    """Whether ``dtype`` is ml_dtypes' bfloat16, without importing ml_dtypes: an array
    cannot hold that dtype unless ml_dtypes was imported already."""
    return "ml_dtypes" in sys.modules and dtype == bfloat16()
