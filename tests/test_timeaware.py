"""Tests of time-grouped activation calibration (arrowquant_core.timeaware).

Kinds: exact round trips (table -> named arrays -> table), an oracle (per-group
parameters equal act_params of that group's own min/max), the groupings' contracts, and
the typed errors of malformed tables.
"""

from __future__ import annotations

import numpy as np
import pytest

from arrowquant_core.actquant import ActScheme, act_params, act_range, fake_quant
from arrowquant_core.errors import ConfigurationError, FormatError, QuantizationError
from arrowquant_core.timeaware import MAX_STEPS, TimeAwareCalibrator, TimeGrouping, TimeGroupTable, stratify


def _table(scheme: ActScheme, groups: int = 4, seed: int = 0) -> tuple[TimeGroupTable, dict[int, np.ndarray]]:
    rng = np.random.default_rng(seed)
    cal = TimeAwareCalibrator(scheme, TimeGrouping.uniform(groups))
    seen: dict[int, np.ndarray] = {}
    for g in range(groups):
        # the spread grows with the group: activation drift across timesteps
        x = (rng.normal(size=(3, 10, 6)) * (1 + g)).astype(np.float32)
        cal.observe(g, "a", x)
        cal.observe(g, "b", x[..., :4] * 2)
        seen[g] = x
    return cal.table(), seen


@pytest.mark.parametrize("gran", ["tensor", "channel"])
def test_parameters_per_group_are_those_of_the_groups_own_range(gran: str) -> None:
    scheme = ActScheme(8, gran, symmetric=False)
    table, seen = _table(scheme)
    for g, x in seen.items():
        want = act_params(*act_range(x, gran), scheme)
        got = table.params(g, "a")
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]), g
        st = table.stats["a"][g]
        assert st[0] == pytest.approx(float(x.mean()), abs=1e-5)
        assert st[1] == pytest.approx(float(x.std()), rel=1e-4)
        assert (st[2], st[3]) == (x.min(), x.max())


def test_time_aware_parameters_fit_each_group_better_than_one_set() -> None:
    """With drift, the union range of one time-agnostic set wastes levels on early groups."""
    scheme = ActScheme(4, "tensor", symmetric=False)
    table, seen = _table(scheme)
    agnostic = TimeAwareCalibrator(scheme, TimeGrouping.uniform(1))
    for x in seen.values():
        agnostic.observe(0, "a", x)
    one = agnostic.table()
    x0 = seen[0]
    err_aware = np.abs(fake_quant(x0, scheme, *table.params(0, "a")) - x0).mean()
    err_one = np.abs(fake_quant(x0, scheme, *one.params(0, "a")) - x0).mean()
    assert err_aware * 2 < err_one


@pytest.mark.parametrize("gran", ["tensor", "channel"])
def test_table_round_trips_through_named_arrays_exactly(gran: str) -> None:
    table, _ = _table(ActScheme(4, gran))
    arrays = table.to_arrays("x.")
    assert all(k.startswith("x.") for k in arrays)
    back = TimeGroupTable.from_arrays(arrays, prefix="x.")
    assert back.scheme == table.scheme and back.grouping == table.grouping and back.sites == table.sites
    for site in table.sites:
        for a, b in ((table.scales, back.scales), (table.zeros, back.zeros), (table.stats, back.stats)):
            assert a[site].tobytes() == b[site].tobytes()


def test_missing_or_bad_arrays_are_format_errors() -> None:
    table, _ = _table(ActScheme(8, "tensor"))
    arrays = table.to_arrays()
    for drop in ("timeaware.header", "timeaware.edges", "timeaware.b.zero"):
        broken = {k: v for k, v in arrays.items() if k != drop}
        with pytest.raises(FormatError, match="missing"):
            TimeGroupTable.from_arrays(broken, "model.parquet")
    wrong = dict(arrays)
    wrong["timeaware.a.scale"] = arrays["timeaware.a.scale"][:2]
    with pytest.raises(FormatError, match="inconsistent"):
        TimeGroupTable.from_arrays(wrong)
    garbage = dict(arrays)
    garbage["timeaware.header"] = np.frombuffer(b"{not json", np.uint8)
    with pytest.raises(FormatError, match="header"):
        TimeGroupTable.from_arrays(garbage)


def test_uniform_grouping_covers_every_timestep() -> None:
    g = TimeGrouping.uniform(10)
    t = np.arange(MAX_STEPS)
    groups = g.groups_of(t)
    assert groups.tolist() == [int(x) // 100 for x in t]
    assert [g.group_of(int(x)) for x in (0, 99, 100, 999, 5000, -3)] == [0, 0, 1, 9, 9, 0]


def test_quantile_grouping_balances_skewed_timesteps() -> None:
    steps = [5, 10, 15, 20, 25, 30, 500, 990]
    q = TimeGrouping.quantile(4, steps)
    counts = np.bincount(q.groups_of(np.array(steps)), minlength=q.groups)
    assert q.kind == "quantile" and q.groups == 4 and counts.tolist() == [2, 2, 2, 2]
    assert np.bincount(TimeGrouping.uniform(4).groups_of(np.array(steps))).tolist()[0] == 6


def test_stratify_fills_only_thin_groups_inside_them() -> None:
    g = TimeGrouping.uniform(5)
    extra = stratify(g, [10, 20, 30, 990], 2)
    have = np.bincount(g.groups_of(np.array([10, 20, 30, 990] + extra)), minlength=5)
    assert have.min() >= 2 and len(extra) == 2 + 2 + 2 + 1
    assert stratify(g, list(range(0, 1000, 50)), 2) == []


def test_a_group_without_calibration_data_is_named() -> None:
    cal = TimeAwareCalibrator(ActScheme(8, "tensor"), TimeGrouping.uniform(3))
    cal.observe(0, "fc", np.ones((2, 4), np.float32))
    cal.observe(2, "fc", np.ones((2, 4), np.float32))
    with pytest.raises(QuantizationError, match="time group 1 .*333.*666"):
        cal.table()


def test_errors() -> None:
    with pytest.raises(ConfigurationError, match="dynamic"):
        TimeAwareCalibrator(ActScheme(8, "token"), TimeGrouping.uniform(2))
    with pytest.raises(ConfigurationError, match="increase"):
        TimeGrouping((0.0, 500.0, 500.0, 1000.0))
    with pytest.raises(ConfigurationError, match="from 0 to 1000"):
        TimeGrouping((0.0, 10.0))
    with pytest.raises(ConfigurationError, match="time groups"):
        TimeGrouping.uniform(0)
    cal = TimeAwareCalibrator(ActScheme(8, "channel"), TimeGrouping.uniform(1))
    cal.observe(0, "fc", np.ones((2, 4), np.float32))
    with pytest.raises(QuantizationError, match="4"):
        cal.observe(0, "fc", np.ones((2, 5), np.float32))
    with pytest.raises(QuantizationError, match="NaN"):
        cal.observe(0, "fc", np.full((2, 4), np.nan, np.float32))
    with pytest.raises(ConfigurationError, match="time group 3"):
        cal.table().params(3, "fc")
    with pytest.raises(ConfigurationError, match="no parameters for site 'fd'"):
        cal.table().params(0, "fd")
