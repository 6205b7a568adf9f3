"""Exit codes of ``python -m harness``, in one place.

    0  every gate passed
    1  at least one gate failed (a test failed, errored, or a criterion was not met)
    2  usage error or bad input: bad option, unknown model/metric/scheme, unreadable
       criteria file, a model file that is corrupt or holds NaN/Inf weights
    3  the harness itself failed (a bug or an environment problem, not a verdict)
"""

from __future__ import annotations

from typing import Final

OK: Final = 0
GATE_FAILED: Final = 1
USAGE: Final = 2
HARNESS_ERROR: Final = 3

DESCRIPTIONS: Final[dict[int, str]] = {
    OK: "every gate passed",
    GATE_FAILED: "at least one gate failed",
    USAGE: "usage error or bad input (bad option, unknown name, unreadable criteria, corrupt model)",
    HARNESS_ERROR: "the harness itself failed",
}


def epilog() -> str:
    return "exit codes:\n" + "\n".join(f"  {code}  {text}" for code, text in DESCRIPTIONS.items())
