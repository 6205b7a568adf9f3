"""Progress people can see: timestamped lines and bars with rate and ETA, on the real stderr.

The harness runs its acceptance suite with pytest in-process, and pytest's capture
redirects stderr while a test runs — not only ``sys.stderr`` but file descriptor 2
itself (``--capture=fd``, the default), so even ``sys.__stderr__`` lands in the captured
output. Progress printed from inside a test (the calibration capture, the sensitivity
pass, ``--compare``) used to vanish there for 40-60 s. This module therefore keeps a
duplicate of descriptor 2 taken *before* any capture starts (``remember_real_stderr``):
the first ``Progress`` (the runner makes one before it starts the suite) or the import
of ``harness.pytest_plugin`` (pytest imports plugins before it starts capturing, so a
team's own pytest run with the gate works too), and writes there.

On a terminal, ``bar()`` draws a tqdm bar (rate, ETA; tqdm because it redraws in place,
handles narrow terminals and non-UTF-8 consoles, and is already installed with
transformers). When stderr is not a terminal (CI logs, a pipe, a file) it prints plain
lines instead: the start, at most one line per ``PLAIN_EVERY_SECONDS`` with count, rate
and ETA, and the end — never carriage returns in a log file.

Same call interface as the old ``harness.context.Progress``::

    progress = Progress(quiet=False)
    progress("loading model 'minilm'")
    with progress.bar(total=36, description="sensitivity") as bar:
        for layer in layers:
            ...
            bar.update(1)
"""

from __future__ import annotations

import atexit
from collections.abc import Iterator
from contextlib import contextmanager
import os
import sys
import time
from typing import IO, Protocol

PLAIN_EVERY_SECONDS = 10.0

_real_stderr: IO[str] | None = None


def remember_real_stderr() -> IO[str]:
    """A stream on a duplicate of descriptor 2 as it is now; the first call wins.

    Call it before pytest starts capturing; later calls return the same stream."""
    global _real_stderr
    if _real_stderr is None:
        try:
            stream = os.fdopen(os.dup(2), "w", buffering=1, encoding=getattr(sys.__stderr__, "encoding", None)
                               or "utf-8", errors="replace")
            atexit.register(stream.close)
            _real_stderr = stream
        except OSError:  # no descriptor 2 (a detached service): the interpreter's stderr
            _real_stderr = sys.__stderr__ if sys.__stderr__ is not None else sys.stderr
    return _real_stderr


def real_stderr() -> IO[str]:
    """The process's stderr even while pytest captures it (see ``remember_real_stderr``)."""
    return remember_real_stderr()


class Bar(Protocol):
    def update(self, n: int = 1) -> None: ...


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass


class _PlainBar:
    """Log-friendly progress: a line at start, every PLAIN_EVERY_SECONDS, and at the end."""

    def __init__(self, progress: Progress, total: int, description: str, every: float) -> None:
        self.progress, self.total, self.description, self.every = progress, total, description, every
        self.done = 0
        self.start = self.last = time.perf_counter()
        progress(f"{description}: 0/{total}")

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every and self.done < self.total:
            self.last = now
            self.progress(f"{self.description}: {self.line(now)}")

    def line(self, now: float) -> str:
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        return (f"{self.done}/{self.total} ({rate:.2f}/s, ETA {eta:.0f}s)" if self.done < self.total
                else f"{self.done}/{self.total} in {elapsed:.1f}s ({rate:.2f}/s)")

    def close(self) -> None:
        self.progress(f"{self.description}: {self.line(time.perf_counter())}")


class Progress:
    """Timestamped progress lines and bars on the real stderr (stdout stays clean for pipes)."""

    def __init__(self, quiet: bool, stream: IO[str] | None = None, every: float = PLAIN_EVERY_SECONDS) -> None:
        self.quiet = quiet
        self.start = time.perf_counter()
        self.stream = stream if stream is not None else real_stderr()
        self.every = every

    @property
    def interactive(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        try:
            return bool(isatty and isatty())
        except ValueError:  # a closed stream
            return False

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.start:6.1f}s] {message}", file=self.stream, flush=True)

    @contextmanager
    def bar(self, total: int, description: str) -> Iterator[Bar]:
        """A bar over ``total`` steps; ``.update(n)`` after each. Plain lines off a terminal.
        A bar over no steps prints nothing (a run without ``--compare`` has no methods to
        compare, and ``0/0`` lines only hid the run's real progress)."""
        if self.quiet or total <= 0:
            yield _NullBar()
            return
        if not self.interactive:
            plain = _PlainBar(self, total, description, self.every)
            yield plain
            plain.close()
            return
        from tqdm import tqdm

        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError, AttributeError):
            columns = 0
        elapsed = time.perf_counter() - self.start
        # a terminal that reports no width (a fresh pty, some CI consoles) would get an empty bar
        with tqdm(total=total, desc=f"[{elapsed:6.1f}s] {description}", file=self.stream, leave=True,
                  dynamic_ncols=columns > 0, ncols=None if columns > 0 else 100, unit="step",
                  mininterval=0.2) as bar:
            yield bar
