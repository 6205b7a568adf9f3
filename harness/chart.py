"""The quality-against-size chart, rendered with matplotlib to PNG and SVG.

Input is the ``results.json`` dict. Every point is a measurement of this run:

* x: bits per weight **on disk** (artifact bytes × 8 / parameters), on a log2 axis so
  INT2 ... FP32 all stay readable;
* y: the model's output quality against the original (mean output cosine for
  embedding models, masked top-1 agreement for the diffusion LLM);
* one point per method compared (``--compare``: colour = bit width, marker = method);
* the plan each bit width was validated with: a star when its verdict is "ship" (every
  gate met, outputs included where a runner measured them), a cross when it is not — a
  failed plan is never drawn as the shipped choice;
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

from harness.results import plan_method

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
    """The bit width's own verdict (ship = every gate met, outputs included where a runner
    measured them); the chart never second-guesses the gates."""
    entry = next((e for e in results.get("bit_widths", []) if int(e.get("bits", -1)) == bits), {})
    verdict = entry.get("verdict") or {}
    if "decision" in verdict:
        return verdict["decision"] == "ship"
    gates = [c for c in results.get("criteria", []) if c.get("bits") == bits]
    return bool(gates) and all(c.get("passed") for c in gates)


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
        if not e.get("plan"):  # the plan's own method is drawn once, as the plan
            out = [p for p in out if not (p.kind == "method" and p.bits == bits and p.method == e.get("method"))]
        if key in metrics and "bits_per_weight" in metrics and math.isfinite(_num(metrics[key])):
            y = _num(metrics[key])
            ok = _gates_passed(results, bits)
            method = "mixed plan" if e.get("plan") else plan_method(e)
            why = "" if ok else " — failed gates"
            out.append(Point("plan", f"INT{bits} {method}{why}", _num(metrics["bits_per_weight"]), y, bits,
                             method, ok))
    base = results.get("baselines") or {}
    parameters = base.get("parameters") or 0
    for name, field in (("FP32", "fp32_bytes"), ("FP16", "fp16_bytes")):
        if parameters and base.get(field):
            out.append(Point("reference", name, base[field] * 8 / parameters, 1.0))
    return out, key


def pareto(pts: list[Point]) -> list[Point]:
    """Points not beaten on both axes (smaller or equal size and higher or equal quality), by size."""
    frontier: list[Point] = []
    for p in sorted(pts, key=lambda p: (p.x, -p.y)):
        if not frontier or p.y > frontier[-1].y:
            frontier.append(p)
    return frontier


Segment = tuple[float, float, float, float]


def _crosses(a: Segment, b: Segment) -> bool:
    """Whether two segments properly intersect (sharing an end point does not count)."""
    def orient(ax: float, ay: float, bx: float, by: float, cx: float, cy: float) -> float:
        return (bx - ax) * (cy - ay) - (by - ay) * (cx - ax)
    d1 = orient(b[0], b[1], b[2], b[3], a[0], a[1])
    d2 = orient(b[0], b[1], b[2], b[3], a[2], a[3])
    d3 = orient(a[0], a[1], a[2], a[3], b[0], b[1])
    d4 = orient(a[0], a[1], a[2], a[3], b[2], b[3])
    return d1 * d2 < 0 and d3 * d4 < 0


def _through(segment: Segment, box: Any) -> bool:
    """Whether a segment passes through a box (display coordinates)."""
    x0, y0, x1, y1 = box.x0, box.y0, box.x1, box.y1
    if box.contains(segment[0], segment[1]) or box.contains(segment[2], segment[3]):
        return True
    edges = [(x0, y0, x1, y0), (x1, y0, x1, y1), (x1, y1, x0, y1), (x0, y1, x0, y0)]
    return any(_crosses(segment, e) for e in edges)


def _marker_radius_points(p: Point) -> float:
    area = {"method": 40.0, "reference": 70.0}.get(p.kind, 200.0 if p.ok else 110.0)
    return math.sqrt(area) / 2 + 1.0


def _place_labels(ax: Any, renderer: Any, pts: list[Point], texts: list[str],
                  lines: list[tuple[list[float], list[float]]] = (),  # type: ignore[assignment]
                  dense: bool = False) -> tuple[list[Any], list[int]]:
    """Greedy non-overlapping label layout in display coordinates, with leader lines.

    Crowded points choose first (they have the fewest free spots); each label tries
    eight directions at growing distances and keeps the first box that overlaps no
    marker, no earlier label and stays inside the axes. Returns the labels in placing
    order and the indices of the points that found no free spot."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    axes_box = ax.get_window_extent(renderer)
    px_per_point = ax.figure.dpi / 72.0
    taken: list[Bbox] = []
    for p in pts:
        px, py = ax.transData.transform((p.x, p.y))
        r = _marker_radius_points(p) * px_per_point
        taken.append(Bbox.from_extents(px - r, py - r, px + r, py + r))
    for xs, ys in lines:  # drawn lines are obstacles too: sample them every few pixels
        screen_line = ax.transData.transform(list(zip(xs, ys)))
        for (x0, y0), (x1, y1) in zip(screen_line[:-1], screen_line[1:]):
            steps = max(1, int(math.hypot(x1 - x0, y1 - y0) / 4))
            for k in range(steps + 1):
                x, y = x0 + (x1 - x0) * k / steps, y0 + (y1 - y0) * k / steps
                taken.append(Bbox.from_extents(x - 1.5, y - 1.5, x + 1.5, y + 1.5))
    screen = [ax.transData.transform((p.x, p.y)) for p in pts]  # for the crowding order
    crowd = [sum(1 for q in screen if math.hypot(q[0] - s[0], q[1] - s[1]) < 60) for s in screen]
    order = sorted(range(len(pts)), key=lambda i: (-crowd[i], i))
    directions = [(1, 0), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1), (0, 1), (0, -1)]
    if dense:  # short tags: more angles and longer leaders before giving up
        directions += [(1, 0.5), (1, -0.5), (-1, 0.5), (-1, -0.5), (0.5, 1), (-0.5, 1), (0.5, -1), (-0.5, -1)]
    radii = (9, 20, 32, 46, 62, 80, 100, 125, 150) + ((180, 215, 255, 300) if dense else ())
    placed = []
    failed: list[int] = []
    leaders: list[Segment] = []
    boxes: list[Any] = []
    for i in order:
        p = pts[i]
        px, py = ax.transData.transform((p.x, p.y))
        label = ax.annotate(texts[i], (p.x, p.y), xytext=(9, 0), textcoords="offset points", fontsize=8,
                            va="center", ha="left", zorder=5,
                            arrowprops={"arrowstyle": "-", "color": "#999999", "lw": 0.6,
                                        "shrinkA": 1, "shrinkB": 5})
        chosen: tuple[float, float, str, Bbox] | None = None
        for radius in radii:
            for dx, dy in directions:
                ox, oy = dx * radius, dy * radius * 0.55
                ha = "left" if dx > 0 else ("right" if dx < 0 else "center")
                label.set_position((ox, oy))
                label.set_ha(ha)
                label.update_positions(renderer)  # an annotation places its text only when drawn
                box = Text.get_window_extent(label, renderer).expanded(1.03, 1.2)
                inside = axes_box.x0 <= box.x0 and box.x1 <= axes_box.x1 and axes_box.y0 <= box.y0 and box.y1 <= axes_box.y1
                if not inside or any(box.overlaps(other) for other in taken):
                    continue
                # the leader runs from the point to the label's near edge; it may cross no
                # other leader and no other label, and no leader may cross this label
                near_x = box.x0 if dx > 0 else (box.x1 if dx < 0 else (box.x0 + box.x1) / 2)
                near_y = (box.y0 + box.y1) / 2 if dy == 0 else (box.y0 if dy > 0 else box.y1)
                leader = (px, py, near_x, near_y)
                if radius > 9 and (any(_crosses(leader, other) for other in leaders)
                                   or any(_through(leader, other) for other in boxes)):
                    continue
                if any(_through(other, box) for other in leaders):
                    continue
                chosen = (ox, oy, ha, box)
                break
            if chosen:
                break
        if chosen is None:  # no free spot: the plain right-hand position (the caller retries numbered)
            failed.append(i)
            label.set_position((9, 0))
            label.set_ha("left")
            label.update_positions(renderer)
            chosen = (9.0, 0.0, "left", Text.get_window_extent(label, renderer))
        ox, oy, ha, box = chosen
        label.set_position((ox, oy))
        label.set_ha(ha)
        taken.append(box)
        boxes.append(box)
        if math.hypot(ox, oy) > 12:
            near_x = box.x0 if ox > 0 else (box.x1 if ox < 0 else (box.x0 + box.x1) / 2)
            near_y = (box.y0 + box.y1) / 2 if oy == 0 else (box.y0 if oy > 0 else box.y1)
            leaders.append((px, py, near_x, near_y))
        if label.arrow_patch is not None:
            label.arrow_patch.set_visible(math.hypot(ox, oy) > 12)
        placed.append(label)
    return placed, failed


KEY_COLUMNS = 2  # columns of the numbered key under a crowded chart


def render_chart(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write ``quality_vs_size.png`` and ``.svg`` into ``out_dir``; [] when nothing was measured."""
    import matplotlib

    with matplotlib.rc_context({"svg.hashsalt": "arrowquant", "font.size": 9, "svg.fonttype": "none"}):
        built = build_figure(results)
        if built is None:
            return []
        fig, _ax, _labels = built
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for suffix in ("png", "svg"):
            path = out_dir / f"{CHART_STEM}.{suffix}"
            tmp = path.with_name(f".{path.name}.tmp")
            fig.savefig(tmp, format=suffix, metadata={"Date": None} if suffix == "svg" else {"Software": None})
            tmp.replace(path)
            written.append(path)
    return written


def build_figure(results: dict[str, Any], numbered: bool = False) -> tuple[Any, Any, list[Any]] | None:
    """The figure, its axes and the placed labels; None when nothing was measured.

    Points are labelled with their text where every label finds a free spot; when one
    does not (a crowded cluster: llama.cpp's formats beside our methods at ~4.3 bits), the
    figure is drawn again with a number at each point and the texts in a key under the
    axes, so no label ever sits on another."""
    pts, key = points(results)
    measured = [p for p in pts if p.kind != "reference"]
    if not measured or key is None:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, NullLocator

    # rc settings (fonts, SVG hash salt) come from render_chart's rc_context
    rows = math.ceil(len(pts) / KEY_COLUMNS)
    fig = Figure(figsize=(10, 6 + (0.17 * rows + 0.3 if numbered else 0)), dpi=150, layout="constrained")
    FigureCanvasAgg(fig)
    if numbered:
        grid = fig.add_gridspec(2, 1, height_ratios=[6, 0.17 * rows + 0.3])
        ax = fig.add_subplot(grid[0])
        key_ax = fig.add_subplot(grid[1])
        key_ax.set_axis_off()
    else:
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
    step_x = [v for a, b in zip(fx, fx[1:] + fx[-1:]) for v in (a, b)]
    step_y = [v for v in fy for _ in (0, 1)]

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
    texts = []
    for p in pts:
        if p.kind == "method":
            texts.append(f"INT{p.bits} {p.method} {p.y:.3f}")
        elif p.kind == "plan":
            texts.append(f"INT{p.bits} plan: {p.method} {p.y:.3f}" if p.ok else f"{p.label} ({p.y:.3f})")
        else:
            texts.append(f"{p.label} {p.x:.1f} bits")
    # settle the constrained layout (legend included) first, then freeze it: labels are
    # placed in display coordinates, which a later re-layout would shift
    if numbered:
        per_column = rows
        for c in range(KEY_COLUMNS):
            chunk = [f"{i + 1:>2}  {texts[i]}" for i in range(c * per_column, min(len(pts), (c + 1) * per_column))]
            key_ax.text(c / KEY_COLUMNS, 1.0, "\n".join(chunk), transform=key_ax.transAxes, va="top", ha="left",
                        fontsize=7.5, family="monospace")
        texts = [str(i + 1) for i in range(len(pts))]
    fig.canvas.draw()
    fig.set_layout_engine("none")
    labels, failed = _place_labels(ax, fig.canvas.get_renderer(), pts, texts, [(step_x, step_y)], dense=numbered)
    if failed and not numbered:
        return build_figure(results, numbered=True)
    return fig, ax, labels
