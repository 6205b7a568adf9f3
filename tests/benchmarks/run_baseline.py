"""Re-measure the run-time baseline of ``test_bench_runs.py`` on this machine.

Issue 11 asks for each run's time as a ratio to the old code's time *on the same
machine*. ``reports/baselines/run_times.json`` holds the old code's wall seconds and the
machine they were measured on; ``test_bench_runs.py`` refuses a baseline from another
machine. This script makes one here:

    python tests/benchmarks/run_baseline.py            # = make bench-baseline; ~3 min

It checks out the baseline commit (the file's ``commit``, e526cc0: the code before the
run-time work) as a temporary git worktree, compiles its core with mypyc in place, runs
each of the file's three commands in a fresh process from that tree, with this
checkout's interpreter, ``OPENBLAS_NUM_THREADS=1 HF_HUB_OFFLINE=1`` (as the benchmark
runs the current code), times the whole process, reads the verdict and suite size from
its ``results.json``, rewrites the file and removes the worktree. The previous machine's
figures are kept under ``previous``. Nothing from the current checkout's code is run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from pathlib import Path
import subprocess
import sys
import tempfile
import time
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BASELINE = REPO / "reports" / "baselines" / "run_times.json"


def machine() -> str:
    """What the ratio depends on: the processor's name, the core count and the memory."""
    model = "unknown processor"
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "unknown memory"
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{round(int(line.split()[1]) / 2**20)} GiB"
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {memory}"


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def measure(rounds: int = 1) -> dict[str, Any]:
    old: dict[str, Any] = json.loads(BASELINE.read_text(encoding="utf-8"))
    commit = str(old["commit"])
    tree = Path(tempfile.mkdtemp(prefix=f"arrowquant-{commit}-"))
    added = _run(["git", "worktree", "add", "--detach", str(tree), commit], REPO)
    if added.returncode != 0:
        raise SystemExit(f"run_baseline: cannot check out {commit} as a worktree: {added.stderr.strip()}")
    try:
        print(f"compiling {commit}'s core in {tree} ...", flush=True)
        built = _run([sys.executable, "setup.py", "build_ext", "--inplace"], tree)
        if built.returncode != 0:
            raise SystemExit(f"run_baseline: {commit}'s core did not compile:\n{built.stderr[-2000:]}")
        env = {k: v for k, v in os.environ.items() if k != "ARROWQUANT_THREADS"}
        env.update({"OPENBLAS_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "PYTHONPATH": str(tree)})
        runs: dict[str, Any] = {}
        for name, entry in old["runs"].items():
            seconds: list[float] = []
            loads: list[float] = []
            for i in range(rounds):
                out = tree / f"out-{name}-{i}"
                t0 = time.perf_counter()
                done = _run([sys.executable, "-m", "harness", "run", *entry["args"], "--out", str(out), "--quiet"],
                            tree, env)
                seconds.append(round(time.perf_counter() - t0, 1))
                loads.append(round(os.getloadavg()[0], 2))
                if not (out / "results.json").is_file():
                    raise SystemExit(f"run_baseline: {commit}'s {name} run wrote no results.json (exit "
                                     f"{done.returncode}):\n{done.stderr[-2000:]}")
                results = json.loads((out / "results.json").read_text(encoding="utf-8"))
                print(f"{name}: {seconds[-1]} s, exit {done.returncode}, verdict {results['verdict']}, "
                      f"{results['tests']['total']} tests", flush=True)
            seconds_sorted = sorted(seconds)
            runs[name] = {**{k: v for k, v in entry.items() if k not in ("seconds", "median_seconds",
                                                                        "loadavg_1min_at_end", "verdict",
                                                                        "tests_total", "exit_code")},
                          "seconds": seconds, "median_seconds": seconds_sorted[len(seconds) // 2],
                          "loadavg_1min_at_end": loads, "verdict": results["verdict"],
                          "tests_total": results["tests"]["total"], "exit_code": done.returncode}
    finally:
        _run(["git", "worktree", "remove", "--force", str(tree)], REPO)
    previous = {k: old[k] for k in ("machine", "measured_at", "how", "runs") if k in old}
    return {
        "what": old["what"], "commit": commit, "machine": machine(),
        "how": (f"{commit} checked out as a temporary git worktree with its core compiled by mypyc in place, "
                "run from that tree (PYTHONPATH=<tree>, cwd <tree>) with this checkout's interpreter: "
                "OPENBLAS_NUM_THREADS=1 HF_HUB_OFFLINE=1 python -m harness run ARGS --out DIR --quiet; "
                "wall time of the whole process, interpreter start-up and imports included; "
                f"{rounds} round(s) each, by tests/benchmarks/run_baseline.py (make bench-baseline)"),
        "measured_at": datetime.date.today().isoformat(), "runs": runs,
        "previous": previous,  # the figures this file held before (one level; git keeps the rest)
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1, help="runs of each command (the median is the baseline)")
    args = parser.parse_args(argv)
    data = measure(args.rounds)
    tmp = BASELINE.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, BASELINE)  # whole or not at all
    print(f"wrote {BASELINE} ({data['machine']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
