"""Progress on the real stderr: visible while pytest captures, bars on a terminal, plain lines in logs."""

from __future__ import annotations

import io
import os
import select
from pathlib import Path
import subprocess
import sys

from harness.progress import Progress, real_stderr
import importlib.metadata

REPO = Path(__file__).resolve().parent.parent

CAPTURED_TEST = '''
import time
from harness.progress import Progress

def test_progress_escapes_capture():
    progress = Progress(quiet=False, every=0.0)
    progress("calibration capture started")
    with progress.bar(total=3, description="sensitivity pass") as bar:
        for _ in range(3):
            time.sleep(0.01)
            bar.update(1)
'''


def plugin_args() -> list[str]:
    installed = [ep for ep in importlib.metadata.entry_points(group="pytest11") if ep.name == "arrowquant"]
    return [] if installed and installed[0].value == "harness.pytest_plugin" else ["-p", "harness.pytest_plugin"]


def test_progress_reaches_the_real_stderr_while_pytest_captures(tmp_path: Path) -> None:
    (tmp_path / "test_inner.py").write_text(CAPTURED_TEST)
    # the plugin (loaded by its entry point when installed, else named) keeps the real stderr
    # before pytest starts capturing descriptor 2
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *plugin_args(),
                           str(tmp_path)],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # pytest captured sys.stderr during the test; the lines still reached the process's stderr
    assert "calibration capture started" in proc.stderr
    assert "sensitivity pass: 0/3" in proc.stderr and "sensitivity pass: 3/3 in" in proc.stderr
    assert "sensitivity pass: 1/3 (" in proc.stderr and "ETA" in proc.stderr
    assert "\r" not in proc.stderr  # not a terminal: plain lines only
    assert "calibration capture started" not in proc.stdout


def test_plain_lines_are_throttled_and_quiet_prints_nothing() -> None:
    stream = io.StringIO()
    progress = Progress(quiet=False, stream=stream, every=3600.0)
    with progress.bar(total=100, description="compare") as bar:
        for _ in range(100):
            bar.update(1)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].endswith("compare: 0/100") and "compare: 100/100 in" in lines[1]
    silent = io.StringIO()
    quiet = Progress(quiet=True, stream=silent)
    quiet("nothing")
    with quiet.bar(total=5, description="x") as bar:
        bar.update(5)
    assert silent.getvalue() == ""


def test_a_bar_over_nothing_prints_nothing() -> None:
    stream = io.StringIO()
    progress = Progress(quiet=False, stream=stream, every=0.0)
    with progress.bar(total=0, description="INT8 comparing methods"):
        pass
    assert stream.getvalue() == ""
    master, slave = os.openpty()
    with os.fdopen(slave, "w") as tty:
        with Progress(quiet=False, stream=tty).bar(total=0, description="methods"):
            pass
        tty.flush()
        readable = bool(select.select([master], [], [], 0.2)[0])
    os.close(master)
    assert not readable


def test_a_terminal_gets_a_tqdm_bar_with_rate_and_eta() -> None:
    master, slave = os.openpty()
    with os.fdopen(slave, "w") as tty:
        progress = Progress(quiet=False, stream=tty)
        assert progress.interactive
        with progress.bar(total=4, description="methods") as bar:
            for _ in range(4):
                bar.update(1)
        tty.flush()
        chunks = []
        while select.select([master], [], [], 0.5)[0]:
            chunks.append(os.read(master, 65536))
        output = b"".join(chunks).decode()
    os.close(master)
    assert "\r" in output and "methods" in output and "4/4" in output and "step/s" in output


def test_default_stream_is_a_duplicate_of_the_real_stderr() -> None:
    stream = Progress(quiet=False).stream
    assert stream is real_stderr() and stream.fileno() != 2
