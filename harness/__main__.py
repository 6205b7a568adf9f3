"""``python -m harness``: the command line (harness/cli.py), and a quick exit.

Once the command is done and every ``atexit`` handler has run, the process ends with
``os._exit`` and skips the interpreter's teardown of its modules: with torch and
sentence-transformers loaded, that teardown took 0.9-1.1 s of every run here and does
no work a run needs (results, reports and artifacts are written, flushed and closed
before the command returns; non-daemon threads were joined before ``atexit``).
"""

import atexit
import os
import sys

_exit_code: list[int] = []


def _exit_now() -> None:
    # Registered first, so it runs after every atexit handler registered later. Only
    # after a normal return of main() (an uncaught exception keeps the interpreter's own
    # exit), and not under coverage.py, whose handler is registered before this module runs.
    if _exit_code and "coverage" not in sys.modules:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe or stream: nothing left to write
                pass
        os._exit(_exit_code[0])


atexit.register(_exit_now)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # 2-thread BLAS is 60x slower here (docs/MYPYC.md)
from harness.cli import main  # noqa: E402

_exit_code.append(main())
raise SystemExit(_exit_code[0])
