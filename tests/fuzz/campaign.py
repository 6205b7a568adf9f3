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
"""

from __future__ import annotations

import argparse
from collections import Counter
import hashlib
import json
from pathlib import Path
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


def _campaign(target: str, make: Callable[[Any], bytes], examples: int, seed: int,
              crashes: dict[str, list[str]]) -> Counter[str]:
    counts: Counter[str] = Counter()

    @hypothesis_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def one(data: st.DataObject) -> None:
        blob = make(data.draw)
        try:
            counts[run_target(target, blob)] += 1
        except Exception as exc:  # noqa: BLE001 - a crash is what we are looking for
            counts["crash"] += 1
            kind = f"{type(exc).__name__}: {str(exc)[:120]}"
            crashes.setdefault(target, []).append(kind)
            if len(blob) <= MAX_SAVED:
                folder = CORPUS / target
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"crash-{hashlib.sha256(blob).hexdigest()[:12]}.bin").write_bytes(blob)
            if len(crashes[target]) <= 3:
                traceback.print_exc()

    one()
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=400, help="cases per target and kind (default 400)")
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--bomb-scale", type=int, default=256, help="MiB (or x100k entries) per bomb")
    parser.add_argument("--json", type=Path, help="write the campaign's numbers here")
    args = parser.parse_args()

    seeds = {name: make() for name, make in SEEDS.items()}
    edits = st.lists(st.tuples(st.integers(0, 6), st.integers(0, 1 << 20), st.integers(0, 1 << 16)),
                     min_size=1, max_size=8)
    crashes: dict[str, list[str]] = {}
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for target in TARGETS:
        kinds: dict[str, Callable[[Any], bytes]] = {
            "mutated": lambda draw, t=target: mutate(seeds[t], draw(edits))}
        if target in GENERATORS:
            kinds["generated"] = GENERATORS[target]
        if target == "parquet_v2":
            kinds["generated"] = lambda draw: gen.parquet_artifact(draw, seeds["parquet_v2"])
        for kind, make in kinds.items():
            t0 = time.perf_counter()
            counts = _campaign(target, make, args.examples, args.seed, crashes)
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
