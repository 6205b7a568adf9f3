"""Tests of the scheme table: names, validation, lookup, pickling."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import re

import pytest

from arrowquant_core.errors import ConfigurationError
from arrowquant_core.schemes import SCHEMES, Scheme, get_scheme

NAME = re.compile(r"int(?P<bits>[0-9]+)-(?:(?P<where>tensor|channel)|g(?P<group>[0-9]+))-(?P<sym>sym|asym)"
                  r"(?:-k(?P<scale_bits>[0-9]+))?")
ALL = sorted(SCHEMES)


def fields(scheme: Scheme) -> dict[str, object]:
    return {f.name: getattr(scheme, f.name) for f in dataclasses.fields(Scheme)}


# ------------------------------------------------------------------------------ the table

@pytest.mark.parametrize("name", ALL)
def test_name_parses_back_to_the_fields(name: str) -> None:
    scheme = SCHEMES[name]
    match = NAME.fullmatch(name)
    assert match is not None, f"{name!r} does not read int{{bits}}-{{tensor|channel|gN}}-{{sym|asym}}"
    assert scheme.name == name
    assert scheme.bits == int(match["bits"])
    assert scheme.symmetric == (match["sym"] == "sym")
    assert scheme.scale_bits == int(match["scale_bits"] or 0)
    if match["group"] is not None:
        assert (scheme.granularity, scheme.group_size) == ("group", int(match["group"]))
    else:
        assert (scheme.granularity, scheme.group_size) == (match["where"], 0)


@pytest.mark.parametrize("name", ALL)
def test_every_scheme_is_valid_and_self_consistent(name: str) -> None:
    scheme = SCHEMES[name]
    rebuilt = Scheme(scheme.name, scheme.bits, scheme.symmetric, scheme.granularity, scheme.group_size,
                     scheme.scale_bits)
    assert rebuilt == scheme  # __post_init__ accepts every row
    assert scheme.levels == 2 ** scheme.bits
    assert scheme.qmax == 2 ** scheme.bits - 1
    assert scheme.codes_per_byte * scheme.bits == 8
    assert f"{scheme.bits}-bit" in scheme.description
    if scheme.granularity == "group":
        assert str(scheme.group_size) in scheme.description
    assert ("asymmetric" in scheme.description) == (not scheme.symmetric)


def test_table_has_every_combination_exactly_once() -> None:
    every = [(s.bits, s.granularity, s.group_size, s.symmetric, s.scale_bits) for s in SCHEMES.values()]
    assert len(every) == len(set(every))
    k_rows = {c for c in every if c[4]}
    assert k_rows == {(b, "group", g, sym, k) for b in (8, 4, 2) for g in (16, 32, 64) for sym in (True, False)
                      for k in (6, 8)}  # the K-quant family (kquant.py)
    combos = [c[:4] for c in every if not c[4]]
    assert {s.bits for s in SCHEMES.values()} == {8, 4, 2}
    assert {s.granularity for s in SCHEMES.values()} == {"tensor", "channel", "group"}
    for bits in (8, 4, 2):
        for sym in (True, False):
            assert (bits, "tensor", 0, sym) in combos
            assert (bits, "channel", 0, sym) in combos
            groups = sorted(g for b, gr, g, s in combos if (b, gr, s) == (bits, "group", sym))
            assert groups == [16, 32, 64, 128, 256]


def test_get_scheme_returns_the_table_row() -> None:
    for name in ALL:
        assert get_scheme(name) is SCHEMES[name]


@pytest.mark.parametrize(("name", "close"), [
    ("int5-g64-asym", "-g64-asym"),
    ("int4-g64-assym", "int4-g64-asym"),
    ("INT8-channel-sym", "int8-channel-sym"),
])
def test_unknown_scheme_says_did_you_mean(name: str, close: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        get_scheme(name)
    message = str(info.value)
    assert repr(name) in message
    assert "did you mean" in message
    hint = message.split("did you mean", 1)[1].split("?", 1)[0]
    assert close in hint, message
    assert "available:" in message and "int8-tensor-sym" in message


def test_unknown_scheme_without_close_match_lists_what_is_available() -> None:
    with pytest.raises(ConfigurationError, match="unknown scheme 'zzz'") as info:
        get_scheme("zzz")
    assert all(name in str(info.value) for name in ALL)


# ------------------------------------------------------------------------- construction

@pytest.mark.parametrize(("kwargs", "rule"), [
    ({"bits": 3}, "bits = 3"),
    ({"bits": 16}, "bits = 16"),
    ({"bits": 0}, "bits = 0"),
    ({"granularity": "row"}, "granularity 'row'"),
    ({"granularity": "group", "group_size": 0}, "group_size = 0"),
    ({"granularity": "group", "group_size": -32}, "group_size = -32"),
    ({"granularity": "tensor", "group_size": 64}, "group_size = 64"),
    ({"granularity": "channel", "group_size": 32}, "group_size = 32"),
])
def test_scheme_is_validated_on_construction(kwargs: dict[str, object], rule: str) -> None:
    base: dict[str, object] = {"name": "custom", "bits": 4, "symmetric": True,
                               "granularity": "tensor", "group_size": 0}
    base.update(kwargs)
    with pytest.raises(ConfigurationError) as info:
        Scheme(**base)  # type: ignore[arg-type]
    assert "'custom'" in str(info.value)
    assert rule in str(info.value)


def test_scheme_is_frozen() -> None:
    scheme = SCHEMES["int4-g64-asym"]
    with pytest.raises(AttributeError):
        scheme.bits = 8  # type: ignore[misc]
    assert scheme.bits == 4


# ----------------------------------------------------------------------------- pickling

@pytest.mark.parametrize("protocol", range(2, pickle.HIGHEST_PROTOCOL + 1))
def test_table_schemes_pickle_round_trip(protocol: int) -> None:
    for name in ALL:
        back = pickle.loads(pickle.dumps(SCHEMES[name], protocol=protocol))
        assert back == SCHEMES[name]
        assert back is SCHEMES[name]  # rebuilt from the table, not a stray copy
    assert copy.deepcopy(SCHEMES["int2-g32-sym"]) is SCHEMES["int2-g32-sym"]


@pytest.mark.parametrize("scheme_fields", [
    # parameters that are valid, under a name that does not say them
    {"name": "my-int4-g16", "bits": 4, "symmetric": False, "granularity": "group", "group_size": 16},
    # a table name on another row's fields
    {"name": "int8-tensor-sym", "bits": 4, "symmetric": False, "granularity": "channel", "group_size": 0},
])
def test_a_scheme_name_always_identifies_its_parameters(scheme_fields: dict[str, object]) -> None:
    # Files store schemes by name and pickling rebuilds them from the table by name, so a
    # Scheme whose name does not identify its parameters is refused at construction.
    with pytest.raises(ConfigurationError, match="its parameters name it"):
        Scheme(**scheme_fields)  # type: ignore[arg-type]


def test_every_valid_parameter_set_is_a_table_row() -> None:
    for name, scheme in SCHEMES.items():
        rebuilt = Scheme(name, scheme.bits, scheme.symmetric, scheme.granularity, scheme.group_size,
                         scheme.scale_bits)
        assert fields(rebuilt) == fields(scheme)
        assert pickle.loads(pickle.dumps(rebuilt)) is SCHEMES[name]
