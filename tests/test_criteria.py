"""Criteria as data: the grammar, validation and the failure text."""

from __future__ import annotations

from pathlib import Path
import re

import pytest

from arrowquant_core.errors import ConfigurationError
from harness.criteria import available, default_criteria_path, load_criteria, parse_rule


def test_rule_grammar_and_check() -> None:
    c = parse_rule("output_cosine_mean >= 0.99", 4, why="because")
    assert c.check(0.995) is None
    assert c.check(0.98) == "INT4 output_cosine_mean = 0.98 violates output_cosine_mean >= 0.99 (because)"
    assert c.check(float("nan")) is not None, "NaN never passes a gate"
    assert parse_rule("unquantized_weights == 0", 8).check(0) is None
    assert parse_rule("load_seconds < 5", 8).check(5.0) is not None


@pytest.mark.parametrize("text, needle", [
    ("output_cosine_mean => 0.9", "not 'metric OP number'"),
    ("cosine >= 0.9", "unknown metric"),
    ("output_cosine_mean >= high", "not 'metric OP number'"),
])
def test_bad_rules(text: str, needle: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(needle)):
        parse_rule(text, 4)


@pytest.mark.parametrize("body, needle", [
    ("", "at least one [bits.N]"),
    ('[bits.4]\nscheme = "int8-g128-asym"\n', "is not 4-bit"),
    ('[bits.4]\nscheme = "int4-g65-asym"\n', "unknown scheme"),
    ('[bits.4]\ngates = []\n', "needs scheme"),
    ('[bits.4]\nscheme = "int4-g64-asym"\ngates = [3]\n', "must be a string"),
    ('[bits.4]\nscheme = "int4-g64-asym"\nreport = ["nope"]\n', "unknown metric"),
    ("[bits.4\n", "invalid TOML"),
    ('[bits.4]\nscheme = "int4-g64-asym"\noverrides = [["*emb*"]]\n', 'must be ["glob", "scheme"]'),
    ('[bits.4]\nscheme = "int4-g64-asym"\noverrides = [["*emb*", "int3-g64-asym"]]\n', "unknown scheme"),
    ('[bits.4]\nscheme = "int4-g32-asym-k8"\nmethod = "gptq-khr"\ncompare = ["gptq"]\n'
     'overrides = [["*emb*", "int2-g32-asym-k8"]]\n', "cannot store scales as codes"),
    ('[bits.8]\nscheme = "int8-g32-sym-k8"\nmethod = "krtn"\nmethod_overrides = [["*v*", "gptq"]]\n',
     "cannot store scales as codes"),
    ('[bits.8]\nscheme = "int8-g32-sym-k8"\nmethod = "krtn"\nmethod_overrides = [["*v*"]]\n',
     'must be ["glob", "method"]'),
])
def test_bad_files(tmp_path: Path, body: str, needle: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(body)
    with pytest.raises(ConfigurationError, match=re.escape(needle)) as exc:
        load_criteria(path)
    assert str(path) in str(exc.value)


def test_shipped_criteria_files_load() -> None:
    names = list(available())
    assert {"minilm", "weights"} <= set(names)
    for name in names:
        criteria = load_criteria(default_criteria_path(name))
        assert criteria.plans, name
        for plan in criteria.plans.values():
            assert all(c.why for c in plan.gates), f"{name} INT{plan.bits}: every shipped gate says why"


def test_overrides_fix_a_scheme_per_tensor(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[bits.4]\nscheme = "int4-g32-asym-k8"\nmethod = "gptq-khr"\n'
                    'overrides = [["*word_embeddings*", "int2-g32-asym-k8"], ["*", "int8-g32-sym-k8"]]\n')
    plan = load_criteria(path).plan(4)
    assert plan.scheme_for("embeddings.word_embeddings.weight") == "int2-g32-asym-k8", "first match wins"
    assert plan.scheme_for("encoder.layer.0.output.dense.weight") == "int8-g32-sym-k8"
    path.write_text('[bits.4]\nscheme = "int4-g32-asym-k8"\nmethod = "krtn"\n'
                    'method_overrides = [["*value*", "gptq-kr"]]\n')
    plan = load_criteria(path).plan(4)
    assert plan.scheme_for("x") == "int4-g32-asym-k8"
    assert (plan.method_for("l.value.weight"), plan.method_for("l.key.weight")) == ("gptq-kr", "krtn")
    assert plan.needs_calibration, "a GPTQ method override needs the calibration Hessians"


def test_all_section_applies_to_every_bit_width() -> None:
    criteria = load_criteria(default_criteria_path("minilm"))
    for bits in (8, 4, 2):
        assert criteria.gates_for(bits, "quantize_seconds"), bits
