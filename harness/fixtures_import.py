"""Import the project's ``fixtures`` package under whichever name it has here.

In the repository the model sources live in the folder ``fixtures/`` and the project's
tests import them as ``fixtures``. An installed wheel must not put a top-level
``fixtures`` into site-packages: that name belongs to the long-standing ``fixtures``
testing library on PyPI. So the build maps the folder to the package
``arrowquant_fixtures`` (``setup.py``: ``package_dir``), and harness code asks this module
instead of writing ``import fixtures``:

* a checkout (``python -m harness`` from the repository root, the project's tests):
  ``fixtures`` is importable *and* is the folder next to ``harness/`` → use it, so the
  harness and the tests share one set of module objects (one model registry);
* a regular or editable install used from anywhere else → ``arrowquant_fixtures``.

Inside ``fixtures/`` every import is relative, so the package works under both names.

>>> fixtures_module("checkpoint").__name__ in {"fixtures.checkpoint", "arrowquant_fixtures.checkpoint"}
True
"""

from __future__ import annotations

from functools import cache
import importlib
import importlib.util
from pathlib import Path
from types import ModuleType

INSTALLED_NAME = "arrowquant_fixtures"
CHECKOUT_NAME = "fixtures"
_CHECKOUT_DIR = Path(__file__).resolve().parent.parent / CHECKOUT_NAME


@cache
def package_name() -> str:
    """``"fixtures"`` in a checkout, ``"arrowquant_fixtures"`` when installed."""
    try:
        spec = importlib.util.find_spec(CHECKOUT_NAME)
    except (ImportError, ValueError):
        spec = None
    origin = spec.origin if spec is not None else None
    if origin is not None and Path(origin).resolve().parent == _CHECKOUT_DIR:
        return CHECKOUT_NAME
    return INSTALLED_NAME


def fixtures_module(submodule: str = "") -> ModuleType:
    """The project's fixtures package, or one of its modules (``"checkpoint"``)."""
    name = package_name() + (f".{submodule}" if submodule else "")
    return importlib.import_module(name)
