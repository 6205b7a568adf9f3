"""Every gate must be able to fail: each gate of every criteria file is shown failing by
an injected fault in some test, keyed by the code that measures it (tests/gate_keys.py).

The fault tests export what they show (``SHOWN_FAILING``), built from the tables their
assertions use, so a gate added to a criteria file without a fault fails here.
"""

from __future__ import annotations

from pathlib import Path

from harness.criteria import load_criteria
from tests import test_dit_faults, test_fault_injection, test_runner_faults, test_stream_faults
from tests.gate_keys import gate_key

CRITERIA = Path(__file__).resolve().parents[1] / "harness" / "criteria"

# Gates no fault test fails, and why that is acceptable.
NOT_FAULTED = {
    ("suite", "load_seconds"): "no fault slows the load without breaking the file (a writer's fault "
                               "changes what is read, which other gates catch first); the rule goes through "
                               "the same code tests/test_criteria.py shows failing",
    ("streaming", "quantize_seconds"): "the streaming faults rewrite the file after the timed quantization; the "
                                       "suite's quantize_seconds is shown failing (quantizer-stalls)",
}

SHOWN = (test_fault_injection.SHOWN_FAILING | test_dit_faults.SHOWN_FAILING | test_runner_faults.SHOWN_FAILING
         | test_stream_faults.SHOWN_FAILING)


def gated() -> dict[tuple[str, str], list[str]]:
    """(measured by, metric) -> the criteria files (and bit widths) that gate on it."""
    out: dict[tuple[str, str], list[str]] = {}
    for path in sorted(CRITERIA.glob("*.toml")):
        criteria = load_criteria(path)
        for bits, plan in sorted(criteria.plans.items()):
            for gate in plan.gates:
                out.setdefault(gate_key(criteria.model, gate.metric), []).append(f"{path.name} INT{bits}")
    return out


def test_every_gate_is_shown_failing_by_a_fault() -> None:
    missing = {key: where for key, where in gated().items() if key not in SHOWN and key not in NOT_FAULTED}
    assert not missing, "gates no fault test fails:\n" + "\n".join(f"  {k}: {v[:3]}" for k, v in sorted(missing.items()))


def test_exemptions_are_still_gates_and_unfaulted() -> None:
    keys = gated()
    assert set(NOT_FAULTED) <= set(keys), sorted(set(NOT_FAULTED) - set(keys))
    assert not set(NOT_FAULTED) & SHOWN, sorted(set(NOT_FAULTED) & SHOWN)
