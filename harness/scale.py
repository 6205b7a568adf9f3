"""The scaling benchmark (``make scale``): streaming validation from 3.5M to 7.6B parameters.

For each Dream-shaped size (bf16, as Dream-v0-Base-7B ships) the generated folder is
cached under ``$ARROWQUANT_CACHE`` (``~/.cache/arrowquant/dream-<size>-bf16-seed0``;
written once, minutes at 7B), then ``python -m harness run --model FOLDER --bits 4
--stream`` runs in a fresh process. Its wall time and peak RSS (VmHWM, from
``streaming_results.json``) are tabled and fitted by least squares against the
parameter count (seconds) and against the largest tensor (peak RSS: what streaming
should track) and the parameter count (what it must not track), and written to
``reports/scaling.md`` and ``reports/scaling.json``.

Sizes: the fixture presets (``mini``, ``small``, ``medium``, ``7b``) plus ``7b-4l``, the
real 7B widths with 4 layers (2.0B parameters, the 7B's largest tensors): at the same
largest tensor, peak RSS should not move with the layer count.

Not in the default test run: the 7B size alone writes 15 GB and takes about 15 minutes.
``python -m harness.scale --sizes mini,small`` runs a subset.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
import subprocess
import sys
import time
from typing import Any, Final

import numpy as np

from arrowquant_core.atomic import write_bytes_atomic
from harness.fixtures_import import fixtures_module

SIZES: Final[tuple[str, ...]] = ("mini", "small", "medium", "7b-4l", "7b")


def config_for(size: str) -> Any:
    DreamConfig = fixtures_module("dream_mini.config").DreamConfig
    if size == "7b-4l":
        import dataclasses

        return dataclasses.replace(DreamConfig.dream_7b(), num_hidden_layers=4)
    return DreamConfig.sized(size)


def cache_root() -> Path:
    return Path(os.environ.get("ARROWQUANT_CACHE", Path.home() / ".cache" / "arrowquant"))


def ensure_folder(size: str, say: Any) -> Path:
    """The generated bf16 folder of ``size``, written once (a finished ``model.safetensors``
    appears atomically, so its presence means it is complete)."""
    folder = cache_root() / f"dream-{size}-bf16-seed0"
    if (folder / "model.safetensors").is_file():
        return folder
    generate = fixtures_module("dream_mini.generator").generate
    say(f"generating Dream {size} (bf16) into {folder}")
    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    generate(folder, config=config_for(size), seed=0, dtype="bfloat16")
    say(f"generated in {time.perf_counter() - t0:.0f} s")
    return folder


def run_size(size: str, out: Path, say: Any) -> dict[str, Any]:
    folder = ensure_folder(size, say)
    target = out / "scale" / size
    command = [sys.executable, "-m", "harness", "run", "--model", str(folder), "--bits", "4", "--stream",
               "--out", str(target), "--quiet"]
    say(f"{size}: {' '.join(command[1:])}")
    t0 = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if run.returncode not in (0, 1):
        raise RuntimeError(f"{size}: exit {run.returncode}\n{run.stderr[-4000:]}")
    return {**_row(size, target), "wall_seconds": wall, "command": " ".join(command[1:])}


def _row(size: str, target: Path) -> dict[str, Any]:
    """One table row from a size's ``streaming_results.json`` (wall time added by the caller)."""
    results = json.loads((target / "streaming_results.json").read_text())
    entry = results["bit_widths"][0]
    metrics = entry["metrics"]
    return {"size": size, "parameters": results["model"]["parameters"], "file_bytes": results["model"]["file_bytes"],
            "largest_tensor_bytes": results["model"]["largest_tensor_bytes"],
            "quantize_seconds": metrics["quantize_seconds"], "readback_seconds": metrics["readback_seconds"],
            "kl_seconds": metrics.get("kl_seconds"), "kl_mean": metrics.get("kl_mean"),
            "peak_rss_bytes": results["run"]["peak_rss_bytes"], "verdict": results["verdict"],
            "weight_cosine_min": metrics["weight_cosine_min"]}


def fit(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b x``; (a, b). One point: (0, y / x)."""
    if len(x) < 2:
        return 0.0, y[0] / x[0] if x and x[0] else math.nan
    b, a = np.polyfit(np.asarray(x, np.float64), np.asarray(y, np.float64), 1)
    return float(a), float(b)


def render(rows: list[dict[str, Any]]) -> str:
    params = [float(r["parameters"]) for r in rows]
    a_t, b_t = fit(params, [r["wall_seconds"] for r in rows])
    a_m, b_m = fit([float(r["largest_tensor_bytes"]) for r in rows], [float(r["peak_rss_bytes"]) for r in rows])
    a_p, b_p = fit(params, [float(r["peak_rss_bytes"]) for r in rows])
    lines = ["# Streaming validation: scaling (INT4 g64 round-to-nearest, weight level)", "",
             "Each row: `python -m harness run --model <generated Dream folder, bf16> --bits 4 --stream` in a fresh "
             "process on this machine (2 cores shared with other jobs); wall time measured around the process, "
             "peak RSS = its VmHWM. `python -m harness.scale` (make scale) wrote this table.", "",
             "| size | parameters | file GB | largest tensor MB | wall s | quantize s | read back + measure s | "
             "KL pass s | KL mean | peak RSS GiB | s per 1e9 params | worst tensor cosine | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kl_s, kl = r.get("kl_seconds"), r.get("kl_mean")
        lines.append(f"| {r['size']} | {r['parameters'] / 1e6:.1f}M | {r['file_bytes'] / 1e9:.2f} | "
                     f"{r['largest_tensor_bytes'] / 1e6:.0f} | {r['wall_seconds']:.1f} | {r['quantize_seconds']:.1f} | "
                     f"{r['readback_seconds']:.1f} | {'-' if kl_s is None else f'{kl_s:.1f}'} | "
                     f"{'-' if kl is None else f'{kl:.3f}'} | {r['peak_rss_bytes'] / 2**30:.2f} | "
                     f"{r['wall_seconds'] / r['parameters'] * 1e9:.1f} | {r['weight_cosine_min']:.4f} | "
                     f"{r['verdict']} |")
    lines += ["", "Least-squares fits over these rows:", "",
              f"- wall seconds = {a_t:.1f} + {b_t * 1e9:.1f} x (parameters / 1e9)",
              f"- peak RSS bytes = {a_m / 2**20:.0f} MiB + {b_m:.2f} x largest tensor bytes",
              f"- peak RSS bytes = {a_p / 2**20:.0f} MiB + {b_p:.4f} x parameters "
              f"({b_p * 1e9 / 2**30:.3f} GiB per 1e9 parameters)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, from {', '.join(SIZES)}")
    parser.add_argument("--out", type=Path, default=Path("reports"))
    parser.add_argument("--render-only", action="store_true",
                        help="re-render scaling.md from scaling.json and each size's streaming_results.json")
    args = parser.parse_args(argv)
    if args.render_only:
        rows = [{**r, **_row(r["size"], args.out / "scale" / r["size"])}
                for r in json.loads((args.out / "scaling.json").read_text())]
        write_bytes_atomic(args.out / "scaling.json", json.dumps(rows, indent=1).encode())
        write_bytes_atomic(args.out / "scaling.md", render(rows).encode())
        print(args.out / "scaling.md")
        return 0
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown size(s) {unknown}; known: {list(SIZES)}")

    def say(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    rows = []
    for size in sizes:
        rows.append(run_size(size, args.out, say))
        say(f"{size}: {rows[-1]['wall_seconds']:.1f} s, peak RSS {rows[-1]['peak_rss_bytes'] / 2**30:.2f} GiB")
        # after every size, so a long run that is stopped still leaves its table
        write_bytes_atomic(args.out / "scaling.json", json.dumps(rows, indent=1).encode())
        write_bytes_atomic(args.out / "scaling.md", render(rows).encode())
    print(args.out / "scaling.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
