"""The quality-against-size chart, rendered with matplotlib to PNG and SVG.

Input is the ``results.json`` dict. Every point is a measurement of this run:

* x: bits per weight **on disk** (artifact bytes × 8 / parameters), on a log2 axis so
  INT2 ... FP32 all stay readable;
* y: the model's output quality against the original (mean output cosine for
  embedding models, masked top-1 agreement for the diffusion LLM);
* one point per method compared (``--compare``: colour = bit width, marker = method);
* the plan each bit width was validated with: a star when it passed every gate with
  usable outputs ("shippable"), a cross when it did not — a failed or collapsed plan is
  never drawn as the shipped choice;
* the FP32 and FP16 references: the safetensors copies written and measured in the
  run (x from their bytes on disk; y = 1 by definition, the original against itself);
* the Pareto frontier: the points no other point beats on both size and quality.

Labels are placed by a small greedy layout (``_place_labels``): each label tries
positions around its point at growing distances and takes the first whose box overlaps
no other label, no marker and stays inside the axes; a leader line joins labels placed
away from their point. matplotlib (rather than the hand-written SVG before) because it
gives a legend, log axes, text extents for the layout, and PNG output for GitHub job
summaries, where a relative SVG link cannot resolve.
"""

from __future__ import annotations

from dataclasses import dataclass
import math
from pathlib import Path
from typing import Any

CHART_STEM = "quality_vs_size"
BIT_COLOURS = {8: "#1b9e77", 4: "#7570b3", 3: "#e7298a", 2: "#d95f02"}
METHOD_MARKERS = {"rtn": "o", "clip": "s", "hqq": "D", "gptq": "^", "gptq-act": "v", "gptq-mse": "<",
                  "gptq-act-mse": ">", "residual2": "P"}
REFERENCE_COLOUR = "#444444"


@dataclass(frozen=True)
class Point:
    kind: str        # "method", "plan" or "reference"
    label: str       # short text drawn next to the point
    x: float         # bits per weight on disk
    y: float         # output quality
    bits: int = 0    # 0 for references
    method: str = ""
    ok: bool = True  # plan: passed every gate with usable outputs

    def __post_init__(self) -> None:
        if not (math.isfinite(self.x) and self.x > 0):
            raise ValueError(f"chart point {self.label!r}: bits per weight {self.x} must be a positive number")


def _num(value: Any) -> float:
    if isinstance(value, str):
        return float(value)
    return float(value) if value is not None else math.nan


def _quality_key(metrics: dict[str, Any]) -> str | None:
    for key in ("output_cosine_mean", "masked_top1_agreement"):
        if key in metrics:
            return key
    return None


QUALITY_TITLES = {"output_cosine_mean": "mean output cosine to the original",
                  "masked_top1_agreement": "masked top-1 agreement with the original"}


def _gates_passed(results: dict[str, Any], bits: int) -> bool:
    gates = [c for c in results.get("criteria", []) if c.get("bits") == bits]
    return bool(gates) and all(c.get("passed") for c in gates)


def _collapsed(key: str, value: float) -> bool:
    """The report's own test of unusable outputs (report._collapsed), on one number."""
    return value < 0.9 if key == "output_cosine_mean" else value < 0.5


def points(results: dict[str, Any]) -> tuple[list[Point], str | None]:
    """Every measured point and the quality metric's name (None when nothing to draw)."""
    out: list[Point] = []
    keys = {k for e in results.get("bit_widths", [])
            for k in [_quality_key(e.get("metrics", {}))] + [_quality_key(m) for m in e.get("methods", [])] if k}
    if not keys:
        return [], None
    key = "output_cosine_mean" if "output_cosine_mean" in keys else sorted(keys)[0]
    for e in results.get("bit_widths", []):
        bits = int(e["bits"])
        for m in e.get("methods", []):
            if key in m and "bits_per_weight" in m and math.isfinite(_num(m[key])):
                out.append(Point("method", m["method"], _num(m["bits_per_weight"]), _num(m[key]), bits, m["method"]))
        metrics = e.get("metrics", {})
        if key in metrics and "bits_per_weight" in metrics and math.isfinite(_num(metrics[key])):
            y = _num(metrics[key])
            ok = _gates_passed(results, bits) and not _collapsed(key, y)
            method = "mixed plan" if e.get("plan") else str(e.get("method", "rtn"))
            why = "" if ok else (" — failed gates" if not _gates_passed(results, bits) else " — outputs collapsed")
            out.append(Point("plan", f"INT{bits} {method}{why}", _num(metrics["bits_per_weight"]), y, bits,
                             method, ok))
    base = results.get("baselines") or {}
    parameters = base.get("parameters") or 0
    for name, field in (("FP32", "fp32_bytes"), ("FP16", "fp16_bytes")):
        if parameters and base.get(field):
            out.append(Point("reference", f"{name} original", base[field] * 8 / parameters, 1.0))
    return out, key


def pareto(pts: list[Point]) -> list[Point]:
    """Points not beaten on both axes (smaller or equal size and higher or equal quality), by size."""
    frontier: list[Point] = []
    for p in sorted(pts, key=lambda p: (p.x, -p.y)):
        if not frontier or p.y > frontier[-1].y:
            frontier.append(p)
    return frontier


def _place_labels(ax: Any, renderer: Any, pts: list[Point], texts: list[str], marker_px: float = 8.0) -> list[Any]:
    """Greedy non-overlapping label layout in display coordinates, with leader lines.

    Crowded points choose first (they have the fewest free spots); each label tries
    eight directions at growing distances and keeps the first box that overlaps no
    marker, no earlier label and stays inside the axes."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    axes_box = ax.get_window_extent(renderer)
    taken: list[Bbox] = []
    for p in pts:
        px, py = ax.transData.transform((p.x, p.y))
        taken.append(Bbox.from_extents(px - marker_px, py - marker_px, px + marker_px, py + marker_px))
    screen = [ax.transData.transform((p.x, p.y)) for p in pts]
    crowd = [sum(1 for q in screen if math.hypot(q[0] - s[0], q[1] - s[1]) < 60) for s in screen]
    order = sorted(range(len(pts)), key=lambda i: (-crowd[i], i))
    directions = [(1, 0), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1), (0, 1), (0, -1)]
    placed = []
    for i in order:
        p = pts[i]
        label = ax.annotate(texts[i], (p.x, p.y), xytext=(9, 0), textcoords="offset points", fontsize=8,
                            va="center", ha="left", zorder=5,
                            arrowprops={"arrowstyle": "-", "color": "#999999", "lw": 0.6,
                                        "shrinkA": 1, "shrinkB": 5})
        chosen: tuple[float, float, str, Bbox] | None = None
        for radius in (9, 20, 32, 46, 62, 80, 100, 125, 150):
            for dx, dy in directions:
                ox, oy = dx * radius, dy * radius * 0.55
                ha = "left" if dx > 0 else ("right" if dx < 0 else "center")
                label.set_position((ox, oy))
                label.set_ha(ha)
                box = Text.get_window_extent(label, renderer).expanded(1.03, 1.2)
                inside = axes_box.x0 <= box.x0 and box.x1 <= axes_box.x1 and axes_box.y0 <= box.y0 and box.y1 <= axes_box.y1
                if inside and not any(box.overlaps(other) for other in taken):
                    chosen = (ox, oy, ha, box)
                    break
            if chosen:
                break
        if chosen is None:  # no free spot: the plain right-hand position
            label.set_position((9, 0))
            label.set_ha("left")
            chosen = (9.0, 0.0, "left", Text.get_window_extent(label, renderer))
        ox, oy, ha, box = chosen
        label.set_position((ox, oy))
        label.set_ha(ha)
        taken.append(box)
        if label.arrow_patch is not None:
            label.arrow_patch.set_visible(math.hypot(ox, oy) > 12)
        placed.append(label)
    return placed


def render_chart(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write ``quality_vs_size.png`` and ``.svg`` into ``out_dir``; [] when nothing was measured."""
    pts, key = points(results)
    measured = [p for p in pts if p.kind != "reference"]
    if not measured or key is None:
        return []
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, NullLocator

    with matplotlib.rc_context({"svg.hashsalt": "arrowquant", "font.size": 9, "svg.fonttype": "none"}):
        fig = Figure(figsize=(10, 6), dpi=150, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.set_xscale("log", base=2)
        xs = [p.x for p in pts]
        ys = [p.y for p in pts]
        ax.set_xlim(min(xs) / 1.35, max(xs) * 1.6)
        low = min(ys)
        span = max(1.0 - low, 0.02)
        ax.set_ylim(low - 0.12 * span, 1.0 + 0.12 * span)
        ticks = [t for t in (1, 1.5, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48) if min(xs) / 1.35 <= t <= max(xs) * 1.6]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{t:g}" for t in ticks])
        ax.grid(True, color="#e5e5e5", lw=0.6)
        ax.set_axisbelow(True)
        ax.set_xlabel("bits per weight on disk (artifact bytes × 8 / parameters, log scale)")
        ax.set_ylabel(QUALITY_TITLES.get(key, key))
        model = (results.get("run") or {}).get("model", "")
        ax.set_title(f"{model}: output quality against size — every point measured in this run", loc="left")

        frontier = pareto(pts)
        fx = [p.x for p in frontier]
        fy = [p.y for p in frontier]
        ax.step(fx, fy, where="post", color="#888888", lw=1.2, ls="--", zorder=1)

        for p in pts:
            if p.kind == "method":
                ax.scatter([p.x], [p.y], s=40, marker=METHOD_MARKERS.get(p.method, "o"),
                           color=BIT_COLOURS.get(p.bits, "#333333"), edgecolors="white", linewidths=0.5, zorder=3)
            elif p.kind == "plan":
                ax.scatter([p.x], [p.y], s=200 if p.ok else 110, marker="*" if p.ok else "X",
                           color=BIT_COLOURS.get(p.bits, "#333333") if p.ok else "white",
                           edgecolors="black" if p.ok else BIT_COLOURS.get(p.bits, "#333333"),
                           linewidths=0.8 if p.ok else 1.6, zorder=4)
            else:
                ax.scatter([p.x], [p.y], s=70, marker="o", color="white", edgecolors=REFERENCE_COLOUR,
                           linewidths=1.5, zorder=4)

        texts = []
        for p in pts:
            if p.kind == "method":
                texts.append(f"INT{p.bits} {p.method} {p.y:.3f}")
            elif p.kind == "plan":
                texts.append(f"{p.label} {p.y:.3f}" if p.ok else f"{p.label} ({p.y:.3f})")
            else:
                texts.append(f"{p.label} ({p.x:.1f} bits)")
        fig.canvas.draw()
        _place_labels(ax, fig.canvas.get_renderer(), pts, texts)

        handles: list[Any] = []
        for bits in sorted({p.bits for p in measured}, reverse=True):
            handles.append(Line2D([], [], ls="", marker="s", ms=8, color=BIT_COLOURS.get(bits, "#333333"),
                                  label=f"INT{bits}"))
        for method in [m for m in METHOD_MARKERS if any(p.method == m and p.kind == "method" for p in pts)]:
            handles.append(Line2D([], [], ls="", marker=METHOD_MARKERS[method], ms=7, color="#666666",
                                  label=f"method: {method}"))
        if any(p.kind == "plan" and p.ok for p in pts):
            handles.append(Line2D([], [], ls="", marker="*", ms=13, color="#bbbbbb", markeredgecolor="black",
                                  label="validated plan: passed every gate"))
        if any(p.kind == "plan" and not p.ok for p in pts):
            handles.append(Line2D([], [], ls="", marker="X", ms=9, color="white", markeredgecolor="#333333",
                                  markeredgewidth=1.5, label="plan measured, not shippable"))
        if any(p.kind == "reference" for p in pts):
            handles.append(Line2D([], [], ls="", marker="o", ms=8, color="white", markeredgecolor=REFERENCE_COLOUR,
                                  markeredgewidth=1.5, label="unquantized reference"))
        handles.append(Line2D([], [], color="#888888", ls="--", label="Pareto frontier"))
        fig.legend(handles=handles, loc="outside right upper", frameon=False, fontsize=8)

        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for suffix in ("png", "svg"):
            path = out_dir / f"{CHART_STEM}.{suffix}"
            tmp = path.with_name(f".{path.name}.tmp")
            fig.savefig(tmp, format=suffix, metadata={"Date": None} if suffix == "svg" else {"Software": None})
            tmp.replace(path)
            written.append(path)
    return written
