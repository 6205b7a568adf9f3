"""The suite runs against the mypyc build: prove the compiled modules are the ones imported.

No skip: an interpreted core here is an install bug (run ``pip install -e .`` with the
build requirements), and this test must fail so it is fixed, not hidden (docs/STYLE.md rule 14).
"""

from __future__ import annotations

import importlib
import importlib.machinery
from pathlib import Path
import types

import pytest

import arrowquant_core

SUFFIXES = tuple(importlib.machinery.EXTENSION_SUFFIXES)


def test_compiled_module_list_covers_the_core() -> None:
    assert set(arrowquant_core.COMPILED_MODULES) >= {
        "errors", "kernels", "metrics", "model", "schemes", "storage", "tensor"}


@pytest.mark.parametrize("name", arrowquant_core.COMPILED_MODULES)
def test_module_is_an_extension_module(name: str) -> None:
    module = importlib.import_module(f"arrowquant_core.{name}")
    assert str(module.__file__).endswith(SUFFIXES), (
        f"arrowquant_core.{name} was imported from {module.__file__}, not a compiled extension; "
        "rebuild with `pip install -e .`")


@pytest.mark.parametrize("name", arrowquant_core.COMPILED_MODULES)
def test_extension_is_not_older_than_its_source(name: str) -> None:
    # An edited .py next to a stale .so: the suite would test yesterday's code.
    module = importlib.import_module(f"arrowquant_core.{name}")
    built = Path(str(module.__file__))
    source = built.parent / f"{name}.py"
    assert source.is_file(), f"{source} missing"
    assert source.stat().st_mtime <= built.stat().st_mtime, (
        f"{source.name} is newer than {built.name}: rebuild with `pip install -e .`")


def test_public_functions_are_compiled() -> None:
    assert isinstance(arrowquant_core.quantize, types.BuiltinFunctionType)
    for name in ("dequantize", "pack", "unpack", "save", "load", "quantize_model", "get_scheme"):
        assert isinstance(getattr(arrowquant_core, name), types.BuiltinFunctionType), name


def test_is_compiled() -> None:
    assert arrowquant_core.is_compiled() is True
