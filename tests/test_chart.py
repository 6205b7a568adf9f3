"""The quality-versus-size chart, drawn from real results files.

``tests/golden/adoption/minilm-compare-results.json`` is the results.json of
``python -m harness run --model minilm --compare`` (five INT4 points within 0.04 bits
and 0.025 cosine of each other: the crowding the old chart could not label), and
``dream-mini-int4-results.json`` a dream-mini INT4 run. The layout is checked on the
drawn figure: no label overlaps another label or a marker, every label stays inside the
axes, no two leader lines cross.
"""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path
import xml.etree.ElementTree as ET

import pytest

from harness import chart

GOLDEN = Path(__file__).resolve().parent / "golden" / "adoption"
COMPARE = json.loads((GOLDEN / "minilm-compare-results.json").read_text())
DREAM = json.loads((GOLDEN / "dream-mini-int4-results.json").read_text())


def label_boxes(results: dict) -> tuple[list, object, list]:
    built = chart.build_figure(results)
    assert built is not None
    fig, ax, labels = built
    renderer = fig.canvas.get_renderer()
    from matplotlib.text import Text

    boxes = []
    for label in labels:
        label.update_positions(renderer)
        boxes.append(Text.get_window_extent(label, renderer))
    return labels, ax, boxes


def _with_peers(results: dict) -> dict:
    """The --compare results with llama.cpp's formats beside our methods, as `peers = [...]`
    adds them: figures from the issue-13 run of ``python -m harness.peers --model minilm``
    (Q8_0 8.74 bpw 0.99987, Q5_1 7.55 0.99394, Q5_0 7.32 0.99218, Q4_1 7.08 0.97273,
    Q4_0 6.84 0.97009, Q4_0-pure 4.78 0.96876) plus four more within the INT4 cluster: the
    crowding that made labels collide."""
    crowded = copy.deepcopy(results)
    int4 = next(e for e in crowded["bit_widths"] if e["bits"] == 4)
    int8 = next(e for e in crowded["bit_widths"] if e["bits"] == 8)
    peers = [(int8, "llama.cpp Q8_0", 8.74, 0.99987), (int4, "llama.cpp Q5_1", 7.55, 0.99394),
             (int4, "llama.cpp Q5_0", 7.32, 0.99218), (int4, "llama.cpp Q4_1", 7.08, 0.97273),
             (int4, "llama.cpp Q4_0", 6.84, 0.97009), (int4, "llama.cpp Q4_0-pure", 4.78, 0.96876),
             (int4, "llama.cpp Q4_1-pure", 4.31, 0.9702), (int4, "gptq-kh", 4.29, 0.9881),
             (int4, "gptq-kr", 4.30, 0.9874), (int4, "awq", 4.28, 0.9849)]
    for entry, method, bpw, cos in peers:
        entry.setdefault("methods", []).append({"method": method, "bits_per_weight": bpw, "output_cosine_mean": cos,
                                                "output_cosine_min": cos - 0.02, "size_mb": 1.0,
                                                "quantize_seconds": 0.1, "weight_sqnr_db": 20.0})
    return crowded


CROWDED = _with_peers(COMPARE)


@pytest.mark.parametrize("results", [COMPARE, DREAM, CROWDED], ids=["minilm-compare", "dream-mini", "with-peers"])
def test_labels_do_not_collide(results: dict) -> None:
    import matplotlib

    with matplotlib.rc_context({"font.size": 9}):
        labels, ax, boxes = label_boxes(results)
    pts, _key = chart.points(results)
    assert len(labels) == len(pts)
    for (i, a), (j, b) in itertools.combinations(enumerate(boxes), 2):
        assert not a.overlaps(b), f"labels {labels[i].get_text()!r} and {labels[j].get_text()!r} overlap"
    axes_box = ax.get_window_extent()
    dpi_scale = ax.figure.dpi / 72.0
    for label, box in zip(labels, boxes):
        assert axes_box.x0 <= box.x0 and box.x1 <= axes_box.x1 and axes_box.y0 <= box.y0 and box.y1 <= axes_box.y1
        for p in pts:
            px, py = ax.transData.transform((p.x, p.y))
            r = chart._marker_radius_points(p) * dpi_scale
            assert not (box.x0 < px + r and px - r < box.x1 and box.y0 < py + r and py - r < box.y1), (
                f"label {label.get_text()!r} covers the marker of {p.label}")
    leaders = [label.arrow_patch for label in labels if label.arrow_patch is not None
               and label.arrow_patch.get_visible()]
    segments = []
    for patch in leaders:
        v = ax.transData.transform(patch.get_path().vertices)  # the arrow's path is in data coordinates
        segments.append((v[0][0], v[0][1], v[-1][0], v[-1][1]))
    for a, b in itertools.combinations(segments, 2):
        assert not chart._crosses(a, b), "two leader lines cross"


def test_points_pareto_and_references_come_from_the_results() -> None:
    pts, key = chart.points(COMPARE)
    assert key == "output_cosine_mean"
    base = COMPARE["baselines"]
    fp32 = next(p for p in pts if p.label == "FP32")
    assert fp32.x == pytest.approx(base["fp32_bytes"] * 8 / base["parameters"]) and fp32.y == 1.0
    methods = {(p.bits, p.method) for p in pts if p.kind == "method"}
    assert (4, "gptq") in methods and (2, "residual2") in methods
    assert (2, "rtn") not in methods  # INT2's validated method is drawn once, as its plan
    frontier = chart.pareto(pts)
    assert [p.x for p in frontier] == sorted(p.x for p in frontier)
    assert all(a.y < b.y for a, b in zip(frontier, frontier[1:]))
    for p in pts:
        if p in frontier:  # nothing at most as large is better
            assert not any(q.x <= p.x and q.y > p.y for q in pts), p
        else:  # something on the frontier is at most as large and at least as good
            assert any(q.x <= p.x and q.y >= p.y for q in frontier), p
    assert {(p.bits, p.method) for p in frontier if p.kind != "reference"} >= {(4, "gptq-act-mse"), (8, "rtn")}


def test_the_plan_is_marked_shippable_only_when_it_passed() -> None:
    plans = {p.bits: p for p in chart.points(COMPARE)[0] if p.kind == "plan"}
    assert plans[4].ok and plans[8].ok
    verdicts = copy.deepcopy(COMPARE)  # the per-bit verdict decides, never the chart
    for e in verdicts["bit_widths"]:
        e["verdict"] = {"decision": "do not ship" if e["bits"] == 2 else "ship"}
    plans = {p.bits: p for p in chart.points(verdicts)[0] if p.kind == "plan"}
    assert not plans[2].ok and "failed gates" in plans[2].label and plans[4].ok
    failed = copy.deepcopy(COMPARE)
    for c in failed["criteria"]:
        if c["bits"] == 4:
            c["passed"] = False
            break
    plans = {p.bits: p for p in chart.points(failed)[0] if p.kind == "plan"}
    assert not plans[4].ok and "failed gates" in plans[4].label


def test_render_writes_a_png_and_a_deterministic_svg(tmp_path: Path) -> None:
    first = chart.render_chart(DREAM, tmp_path / "dream")
    assert first[1].read_bytes() == chart.render_chart(DREAM, tmp_path / "again")[1].read_bytes()  # deterministic
    compare = copy.deepcopy(COMPARE)  # INT2 round-to-nearest: its verdict says do not ship
    for e in compare["bit_widths"]:
        e["verdict"] = {"decision": "do not ship" if e["bits"] == 2 else "ship"}
    written = chart.render_chart(compare, tmp_path / "compare")
    assert [p.name for p in written] == ["quality_vs_size.png", "quality_vs_size.svg"]
    assert written[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = ET.parse(written[1]).getroot()
    text = "".join(svg.itertext())
    for expected in ("INT4 plan: gptq-act-mse 0.989", "Pareto frontier", "unquantized reference", "method: hqq",
                     "validated plan: passed every gate", "plan measured, not shippable", "FP32 32.0 bits"):
        assert expected in text, expected
    assert "(shipped plan)" not in text


def test_nothing_measured_draws_nothing(tmp_path: Path) -> None:
    empty = {**COMPARE, "bit_widths": [{**e, "metrics": {}, "methods": []} for e in COMPARE["bit_widths"]]}
    assert chart.render_chart(empty, tmp_path) == []
    assert not list(tmp_path.iterdir())


def test_a_crowded_chart_numbers_its_points_and_keys_them() -> None:
    """Where a label finds no free spot the points are numbered and the texts listed in a
    key under the axes; a chart whose labels fit keeps them inline."""
    import matplotlib

    with matplotlib.rc_context({"font.size": 9}):
        labels, ax, _boxes = label_boxes(CROWDED)
        plain, _ax, _b = label_boxes(COMPARE)
    pts, _key = chart.points(CROWDED)
    assert [label.get_text() for label in labels] == [str(i + 1) for i in range(len(pts))] or \
        sorted(int(label.get_text()) for label in labels) == list(range(1, len(pts) + 1))
    key_text = "\n".join(t.get_text() for a in ax.figure.axes if a is not ax for t in a.texts)
    for i, p in enumerate(pts):
        assert f"{i + 1:>2}  " in key_text
    assert "llama.cpp Q4_0-pure" in key_text and "INT4 plan: gptq-act-mse" in key_text
    assert not any(label.get_text().isdigit() for label in plain), "an uncrowded chart keeps its text labels"


def test_a_plan_label_says_when_the_artifact_mixes_schemes_or_methods() -> None:
    """Criteria overrides store some tensors with another scheme or method: the plan's
    label must not name one method for such a file (it reads the stored layers)."""
    from harness.results import plan_method

    def entry(*layers: tuple[str, str]) -> dict[str, object]:
        return {"method": "gptq-khr", "fallback": "krtn",
                "layers": [{"scheme": s, "method": m} for s, m in layers]}

    assert plan_method(entry(("int4-g32-asym-k8", "gptq-khr"), ("int4-g32-asym-k8", "krtn"))) == "gptq-khr"
    assert plan_method(entry(("int4-g32-asym-k8", "gptq-khr"), ("int8-g32-sym-k8", "gptq-khr"))) == \
        "gptq-khr (2 schemes)"
    assert plan_method(entry(("int8-g32-sym-k8", "gptq-khr"), ("int8-g32-sym-k8", "gptq-kr"))) == "gptq-khr (+gptq-kr)"
