"""The public surface of arrowquant_core: ``__all__`` matches what the package exports
(like httpx's tests/test_exported_members.py), and the error tree is what callers expect."""

from __future__ import annotations

import ast
import doctest
import importlib
from pathlib import Path
import types

import numpy as np
import pytest

import arrowquant_core
from arrowquant_core import errors

ERRORS = ["ArrowQuantError", "ConfigurationError", "QuantizationError", "ValidationError", "FormatError"]


def public_names() -> set[str]:
    """Names a user sees on the package: not private, not a submodule, and not the
    ``annotations`` feature object that ``from __future__ import annotations`` leaves behind."""
    return {
        name for name, value in vars(arrowquant_core).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and not (name == "annotations" and type(value).__name__ == "_Feature")
    }


def test_all_matches_the_exported_names() -> None:
    exported = set(arrowquant_core.__all__)
    assert len(arrowquant_core.__all__) == len(exported), "duplicates in __all__"
    assert exported - public_names() == set(), "in __all__ but not defined"
    assert public_names() - exported == set(), "public but missing from __all__ (or make it private)"


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from arrowquant_core import *", namespace)  # noqa: S102 - the behaviour under test
    namespace.pop("__builtins__")
    assert set(namespace) == set(arrowquant_core.__all__)


@pytest.mark.parametrize("name", [
    "quantize", "dequantize", "pack", "unpack", "save", "load", "save_weights", "load_weights",
    "quantize_model", "get_scheme", "format_version", "is_compiled",
    "SCHEMES", "Scheme", "QuantizationConfig", "QuantizedModel", "QuantizedTensor", *ERRORS,
])
def test_required_names_are_exported(name: str) -> None:
    assert name in arrowquant_core.__all__
    assert getattr(arrowquant_core, name) is not None


@pytest.mark.parametrize("name", ERRORS)
def test_error_tree(name: str) -> None:
    cls = getattr(arrowquant_core, name)
    assert cls is getattr(errors, name)
    assert issubclass(cls, arrowquant_core.ArrowQuantError)
    assert issubclass(cls, Exception)
    if name != "ArrowQuantError":
        assert issubclass(cls, ValueError), f"{name} must be catchable as ValueError"
        with pytest.raises(ValueError, match="boom"):
            raise cls("boom")


def test_the_four_specific_errors_are_distinct() -> None:
    classes = [getattr(arrowquant_core, name) for name in ERRORS[1:]]
    for a in classes:
        for b in classes:
            assert (a is b) == issubclass(a, b), f"{a.__name__} vs {b.__name__}"


def test_did_you_mean_helper() -> None:
    exc = errors.unknown_name("scheme", "int5", ["int4", "int8"])
    assert isinstance(exc, arrowquant_core.ConfigurationError)
    assert str(exc) in (
        "unknown scheme 'int5'; did you mean 'int4'? available: int4, int8",
        "unknown scheme 'int5'; did you mean 'int8'? available: int4, int8")
    assert str(errors.unknown_name("profile", "zzz", ["edge", "cloud"])) == (
        "unknown profile 'zzz'; available: cloud, edge")


def test_scheme_table_is_exported_as_the_same_object() -> None:
    from arrowquant_core.schemes import SCHEMES

    assert arrowquant_core.SCHEMES is SCHEMES
    assert arrowquant_core.get_scheme("int4-g64-asym") is SCHEMES["int4-g64-asym"]


def docstring_examples() -> list[tuple[str, str, str]]:
    """``(module, qualified name, docstring)`` for every docstring with a ``>>>`` example
    in the core's sources. mypyc drops ``__doc__`` from compiled functions, so the
    examples are read from the .py files and run against the compiled objects."""
    found = []
    for module in arrowquant_core.COMPILED_MODULES:
        source = Path(arrowquant_core.__file__).parent / f"{module}.py"
        tree = ast.parse(source.read_text(encoding="utf-8"))
        stack: list[tuple[str, ast.AST]] = [(module, tree)]
        while stack:
            prefix, node = stack.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.ClassDef)):
                    qualname = f"{prefix}.{child.name}"
                    doc = ast.get_docstring(child)
                    if doc and ">>>" in doc:
                        found.append((module, qualname, doc))
                    stack.append((qualname, child))
    return sorted(found)


EXAMPLES = docstring_examples()


def test_the_core_has_docstring_examples() -> None:
    assert len(EXAMPLES) >= 10


@pytest.mark.parametrize(("module", "qualname", "doc"), EXAMPLES, ids=[q for _, q, _ in EXAMPLES])
def test_docstring_example(module: str, qualname: str, doc: str) -> None:
    namespace = {"np": np, **vars(importlib.import_module(f"arrowquant_core.{module}"))}
    test = doctest.DocTestParser().get_doctest(doc, namespace, qualname, None, 0)
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)
