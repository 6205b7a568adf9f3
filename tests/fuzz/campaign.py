"""The hostile-input campaign: every fuzz target, many cases, plus the bombs.

    make fuzz                                       # ARROWQUANT_FUZZ_CAMPAIGN=400 by default
    python tests/fuzz/campaign.py --examples 400 --seed 1 --json campaign.json

For each target it runs ``--examples`` mutated seeds and, where a structure-aware
generator exists, as many generated inputs (Hypothesis, random seed, no shrinking
database), and counts outcomes: accepted, typed error (``ArrowQuantError``), crash (any
other exception). Each crashing input up to 64 KB is saved to
``tests/fuzz/corpus/<target>/crash-<sha256 prefix>.bin``, where the default test run
replays it. Then every bomb runs at campaign scale in a subprocess with its peak RSS
measured (``bombs.measure_all``). Exit 1 if anything crashed.

Each target and kind runs in a child process that writes every input to a file before
reading it. A reader can kill the process outright -- pyarrow 26 turned a malformed
Parquet footer into ``std::terminate`` (SIGABRT) instead of an exception -- and then the
child's last input is the one that did it: the campaign counts that crash, saves the
input to the corpus and goes on with the next target.
"""

from __future__ import annotations

import argparse
from collections import Counter
import hashlib
import json
from pathlib import Path
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent)]

from hypothesis import HealthCheck, given, seed as hypothesis_seed, settings, strategies as st  # noqa: E402

from fuzz import strategies as gen  # noqa: E402
from fuzz.bombs import BOMBS, measure_all  # noqa: E402
from fuzz.targets import SEEDS, TARGETS, mutate, run_target  # noqa: E402

CORPUS = HERE / "corpus"
MAX_SAVED = 64 * 1024

GENERATORS: dict[str, Callable[[Any], bytes]] = {
    "safetensors": gen.safetensors_file,
    "criteria": gen.criteria_text,
    "calibration_jsonl": gen.jsonl_text,
}


def _save_crash(target: str, blob: bytes) -> None:
    if len(blob) <= MAX_SAVED:
        folder = CORPUS / target
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"crash-{hashlib.sha256(blob).hexdigest()[:12]}.bin").write_bytes(blob)


def _campaign(target: str, make: Callable[[Any], bytes], examples: int, seed: int,
              crashes: dict[str, list[str]], inflight: Path | None = None,
              progress: Callable[[Counter[str]], None] | None = None) -> Counter[str]:
    counts: Counter[str] = Counter()

    @hypothesis_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def one(data: st.DataObject) -> None:
        blob = make(data.draw)
        if inflight is not None:  # what the parent saves if this input kills the process
            inflight.write_bytes(blob)
        try:
            counts[run_target(target, blob)] += 1
        except Exception as exc:  # noqa: BLE001 - a crash is what we are looking for
            counts["crash"] += 1
            kind = f"{type(exc).__name__}: {str(exc)[:120]}"
            crashes.setdefault(target, []).append(kind)
            _save_crash(target, blob)
            if len(crashes[target]) <= 3:
                traceback.print_exc()
        if progress is not None:
            progress(counts)

    one()
    return counts


ARTIFACT_GENERATED = ("parquet_v2", "parquet_stream")  # generated from their seed (gen.parquet_artifact)


def _kind_names(target: str) -> list[str]:
    """How the campaign makes inputs for ``target``: mutated seeds, and a generator where one exists."""
    return ["mutated"] + (["generated"] if target in GENERATORS or target in ARTIFACT_GENERATED else [])


def _maker(target: str, kind: str) -> Callable[[Any], bytes]:
    """The input maker of one kind (the seed is built here, in the child that uses it)."""
    if kind == "generated" and target in GENERATORS:
        return GENERATORS[target]
    seed = SEEDS[target]()
    if kind == "generated":
        return lambda draw: gen.parquet_artifact(draw, seed)
    edits = st.lists(st.tuples(st.integers(0, 6), st.integers(0, 1 << 20), st.integers(0, 1 << 16)),
                     min_size=1, max_size=8)
    return lambda draw: mutate(seed, draw(edits))


def _child(target: str, kind: str, examples: int, seed: int, report: Path, inflight: Path) -> int:
    """One target and kind, in this (child) process; counts and crashes go to ``report``."""
    crashes: dict[str, list[str]] = {}

    def write(counts: Counter[str]) -> None:  # after every case: a killed child leaves its counts so far
        report.write_text(json.dumps({"counts": dict(counts), "crashes": crashes.get(target, [])}))

    write(_campaign(target, _maker(target, kind), examples, seed, crashes, inflight, write))
    return 0


def _run_child(target: str, kind: str, examples: int, seed: int, tmp: Path,
               crashes: dict[str, list[str]]) -> Counter[str]:
    report, inflight = tmp / f"{target}-{kind}.json", tmp / f"{target}-{kind}.inflight"
    done = subprocess.run([sys.executable, __file__, "--child", target, kind, "--examples", str(examples),
                           "--seed", str(seed), "--report", str(report), "--inflight", str(inflight)])
    data = json.loads(report.read_text()) if report.is_file() else {"counts": {}, "crashes": []}
    if data["crashes"]:
        crashes.setdefault(target, []).extend(data["crashes"])
    counts = Counter(data["counts"])
    if done.returncode == 0:
        return counts
    # The process died (a signal) or failed outside a case: the input in flight did it.
    how = (f"killed by {signal.Signals(-done.returncode).name}" if done.returncode < 0
           else f"exit {done.returncode}")
    blob = inflight.read_bytes() if inflight.is_file() else b""
    _save_crash(target, blob)
    crashes.setdefault(target, []).append(f"process {how} on a {len(blob)}-byte input "
                                          f"(saved as crash-{hashlib.sha256(blob).hexdigest()[:12]}.bin); "
                                          "the rest of this target's cases did not run")
    print(f"{target} {kind}: the reader's process was {how}; input saved to {CORPUS / target}", file=sys.stderr)
    counts["crash"] += 1
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=400, help="cases per target and kind (default 400)")
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--bomb-scale", type=int, default=256, help="MiB (or x100k entries) per bomb")
    parser.add_argument("--json", type=Path, help="write the campaign's numbers here")
    parser.add_argument("--child", nargs=2, metavar=("TARGET", "KIND"), help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--inflight", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args.child[0], args.child[1], args.examples, args.seed, args.report, args.inflight)

    crashes: dict[str, list[str]] = {}
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="aq-fuzz-") as tmp:
        for target in TARGETS:
            for kind in _kind_names(target):
                t0 = time.perf_counter()
                counts = _run_child(target, kind, args.examples, args.seed, Path(tmp), crashes)
                rows.append({"target": target, "kind": kind, "cases": sum(counts.values()), **counts,
                             "seconds": round(time.perf_counter() - t0, 1)})
    with tempfile.TemporaryDirectory(prefix="aq-bombs-") as tmp:
        bombs = measure_all([(bomb, args.bomb_scale if "dev-zero" not in bomb.name else 1)
                             for bomb in BOMBS.values()], Path(tmp))

    total = sum(r["cases"] for r in rows)
    typed = sum(r.get("typed", 0) for r in rows)
    ok = sum(r.get("ok", 0) for r in rows)
    crashed = sum(r.get("crash", 0) for r in rows)
    print(f"\n{'target':22s} {'kind':10s} {'cases':>6s} {'ok':>6s} {'typed':>6s} {'crash':>6s} {'s':>6s}")
    for r in rows:
        print(f"{r['target']:22s} {r['kind']:10s} {r['cases']:6d} {r.get('ok', 0):6d} {r.get('typed', 0):6d} "
              f"{r.get('crash', 0):6d} {r['seconds']:6.1f}")
    print(f"total {total} cases in {time.perf_counter() - started:.0f} s: {ok} accepted, {typed} typed errors, "
          f"{crashed} crashes; typed-error rate among refusals {typed / max(typed + crashed, 1):.1%} "
          f"(seed {args.seed})")
    print(f"\n{'bomb':26s} {'claims':36s} {'file bytes':>12s} {'+RSS MiB':>9s} {'s':>6s}  outcome")
    for b in bombs:
        print(f"{b['bomb']:26s} {b['claims']:36s} {b['file_bytes']:12d} {b['added_kib'] / 1024:9.1f} "
              f"{b['seconds']:6.2f}  {b['outcome']}")
    for target, kinds_seen in crashes.items():
        print(f"crashes in {target}: {sorted(Counter(kinds_seen).items())[:5]}")
    if args.json:
        args.json.write_text(json.dumps({"seed": args.seed, "examples": args.examples, "targets": rows,
                                         "bombs": bombs, "crashes": crashes}, indent=2) + "\n")
    bomb_crash = any(b["outcome"].startswith("crash") for b in bombs)
    return 1 if crashed or bomb_crash else 0


if __name__ == "__main__":
    raise SystemExit(main())
