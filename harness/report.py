"""Render QUANTIZATION_VALIDATION_REPORT.md (and the GitHub step summary) from results.json.

All decisions and number formatting happen here, in ``view()``; the Jinja2 template
only lays the precomputed rows out (StrictUndefined: a missing field is an error, not a
blank cell).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jinja2

from arrowquant_core.schemes import SCHEMES
from harness.escape import md_code, md_text
from harness.measures import METRICS
from harness.results import OUTPUTS_MEASURED, WEIGHTS_ONLY, plan_method, write_text_atomic

TEMPLATES = Path(__file__).resolve().parent / "templates"
WORST_LAYERS = 10
SUMMARY_COLUMNS = (
    ("size_mb", "Size MB", "{:.2f}"), ("compression_vs_fp32", "vs FP32", "{:.2f}x"),
    ("compression_vs_fp16", "vs FP16", "{:.2f}x"), ("bits_per_weight", "Bits/weight", "{:.2f}"),
    ("weight_cosine_mean", "W cos mean", "{:.5f}"), ("weight_cosine_min", "W cos min", "{:.5f}"),
    ("output_cosine_mean", "Out cos mean", "{:.5f}"), ("output_cosine_p1", "Out cos p1", "{:.5f}"),
    ("output_cosine_min", "Out cos min", "{:.5f}"), ("top5_overlap", "Top-5 overlap", "{:.3f}"),
    ("top1_agreement", "Top-1 agree", "{:.3f}"),
    ("kl_mean", "KL mean", "{:.4f}"), ("kl_p99", "KL p99", "{:.3f}"),
    ("masked_top1_agreement", "Masked top-1", "{:.3f}"), ("sampler4_agreement", "4-step agree", "{:.3f}"),
    ("sampler8_agreement", "8-step agree", "{:.3f}"),
    ("quantize_seconds", "Quantize s", "{:.2f}"), ("load_seconds", "Load s", "{:.3f}"),
)


def _fmt(value: Any, pattern: str = "{:.4g}") -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return "∞" if value > 0 else ("−∞" if value < 0 else "NaN")
    return pattern.format(value)


def _num(value: Any) -> float:
    if isinstance(value, str):
        return float(value)  # "inf" / "nan" as written by results._clean
    return float(value) if value is not None else math.nan


def _collapsed(m: dict[str, Any]) -> str:
    """Why a bit width's measured outputs are poor, or '' (output metrics only)."""
    if "output_cosine_mean" in m and _num(m["output_cosine_mean"]) < 0.9:
        return (f"mean output cosine {_num(m['output_cosine_mean']):.3f} "
                f"(worst sentence {_num(m.get('output_cosine_min')):.3f})")
    if "masked_top1_agreement" in m and _num(m["masked_top1_agreement"]) < 0.5:
        return (f"only {_num(m['masked_top1_agreement']):.0%} of masked predictions unchanged "
                f"(mean KL {_num(m.get('kl_mean')):.2f} nats)")
    if "next_token_top1_agreement" in m and _num(m["next_token_top1_agreement"]) < 0.8:
        return (f"only {_num(m['next_token_top1_agreement']):.0%} of next-token predictions unchanged "
                f"(mean KL {_num(m.get('kl_mean')):.2f} nats)")
    if "pooled_cosine_mean" in m and _num(m["pooled_cosine_mean"]) < 0.9:
        return f"mean pooled output cosine {_num(m['pooled_cosine_mean']):.3f}"
    return ""


def _outputs_measured(results: dict[str, Any]) -> bool:
    return results.get("verdict_scope", "") != WEIGHTS_ONLY


# (mean-like, worst-like) output quality per runner kind, first present wins
QUALITY_KEYS = (("output_cosine_mean", "output_cosine_min"), ("masked_top1_agreement", "top1_agreement_worst_group"),
                ("next_token_top1_agreement", "kl_max"), ("pooled_cosine_mean", "pooled_cosine_min"))


def quality_key(m: dict[str, Any]) -> str:
    return next((a for a, _b in QUALITY_KEYS if a in m), "output_cosine_mean")


def quality_min_key(m: dict[str, Any]) -> str:
    return next((b for a, b in QUALITY_KEYS if a in m), "output_cosine_min")


def _cell(value: Any) -> str:
    """A runner table's cell: our own number formatting for numbers ("—" when not a
    number), escaped text for anything else (runner tables may carry names)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return md_text(value)
    return "—" if isinstance(value, float) and math.isnan(value) else _fmt(value, "{:.4g}")


def recommendations(results: dict[str, Any]) -> list[str]:
    """Advice derived from the measured numbers and the per-bit verdicts only; nothing
    is said of outputs that were not measured."""
    out: list[str] = []
    by_bits = {e["bits"]: e for e in results["bit_widths"]}
    measured = _outputs_measured(results)
    ship = [b for b, e in by_bits.items() if (e.get("verdict") or {}).get("decision") == "ship"]
    if not measured:
        out.append("WEIGHTS ONLY: no runner could run this model, so its outputs were not measured. The gates "
                   "below judge the weights and the artifact; they say nothing about what the model outputs. "
                   "Pass --runner NAME (see `python -m harness list`) if the model is one a runner can run.")
    if ship:
        best = min(ship)
        m = by_bits[best]["metrics"]
        what = "passes every gate, outputs included" if measured else "passes every weight-level gate"
        out.append(f"Smallest configuration that {what}: INT{best} ({md_text(by_bits[best]['scheme'])}, "
                   f"{md_text(plan_method(by_bits[best]))}), {_fmt(m.get('size_mb'), '{:.2f}')} MB, "
                   f"{_fmt(m.get('compression_vs_fp32'), '{:.2f}')}x smaller than FP32.")
    for bits, entry in sorted(by_bits.items(), reverse=True):
        m = entry["metrics"]
        collapse = _collapsed(m) if measured else ""
        decision = (entry.get("verdict") or {}).get("decision")
        if collapse:
            verdict = ("its gates pass, but read the numbers before shipping" if decision == "ship"
                       else "do not ship it")
            out.append(f"INT{bits} ({md_text(entry['scheme'])}, {md_text(plan_method(entry))}) measured "
                       f"{collapse}; {verdict}.")
        if entry["layers"]:
            worst = min(entry["layers"], key=lambda l: _num(l["cosine"]))
            if _num(worst["cosine"]) < 0.999:
                out.append(f"INT{bits}: the most damaged tensor is {md_code(worst['name'])} (cosine "
                           f"{_num(worst['cosine']):.4f}, SQNR {_fmt(_num(worst['sqnr_db']), '{:.1f}')} dB); "
                           "it is the first candidate for more bits.")
    for bits, entry in sorted(by_bits.items(), reverse=True):
        failed = (entry.get("verdict") or {}).get("failed_gates", [])
        if failed:
            out.append(f"INT{bits}: do not ship; it fails {len(failed)} gate(s): "
                       f"{', '.join(md_code(r) for r in failed)}.")
    return out


def criteria_note(record: Any) -> str:
    """sha256 of the criteria file and whether it is the committed default (a weakened
    gate must show in the report, not only in results.json)."""
    if not isinstance(record, dict):
        return " (no criteria digest recorded)"
    note = f", sha256 {md_code(str(record.get('sha256'))[:16] + '…')}"
    if record.get("differs_from_default") is False:
        return note + f", identical to the committed default ({md_text(record.get('default_source'))})"
    if record.get("default_file"):
        return note + (f" — **DIFFERS from the committed default** {md_code(record['default_file'])} "
                       f"({md_text(record.get('default_source'))}): gates may have been changed")
    return note + " — **no committed default for this model**"


def _artifact_view(record: Any) -> dict[str, Any] | None:
    """The "Artifact judged" section: a file produced elsewhere (``--artifact``)."""
    if not isinstance(record, dict):
        return None
    mismatches = record.get("llama_cpp_rule_mismatches")
    return {
        "path": md_code(record.get("path")), "bytes": md_text(f"{record.get('bytes', 0):,}"),
        "sha256": md_code(record.get("sha256")), "reader": md_text(record.get("reader")),
        "produced_by": md_text(record.get("produced_by")),
        "general": [(md_code(k), md_text(v)) for k, v in (record.get("general") or {}).items()],
        "types": ", ".join(f"{md_text(k)} × {md_text(v)}" for k, v in (record.get("tensor_types") or {}).items()),
        "names": md_text(record.get("tensor_names")),
        "filled": ", ".join(md_code(n) for n in record.get("filled_from_source") or []),
        "rules": ("not modelled for this file type" if mismatches is None else
                  "every tensor has the type llama.cpp's rules give it" if not mismatches else
                  "; ".join(md_text(m) for m in mismatches[:10]) + (f" and {len(mismatches) - 10} more"
                                                                    if len(mismatches) > 10 else "")),
        "bits": md_text(record.get("judged_as_bits")), "bits_how": md_text(record.get("bits_how")),
        "fault": md_code(record.get("fault")) if record.get("fault") else None,
        "original": md_code(record.get("original")) if record.get("original") else None,
        "not_measured": [(md_code(d.get("test")), md_text(d.get("why"))) for d in record.get("not_measured") or []],
    }


def view(results: dict[str, Any]) -> dict[str, Any]:
    prov, run = results["provenance"], results["run"]
    entries = results["bit_widths"]
    present = [c for c in SUMMARY_COLUMNS if any(c[0] in e["metrics"] for e in entries)]
    summary_rows = [[f"INT{md_text(e['bits'])}", md_code(e['scheme']),
                     "ladder" if e.get("plan") else md_code(e.get('method', 'rtn'))]
                    + [_fmt(e["metrics"].get(key), pattern) for key, _t, pattern in present]
                    for e in entries]
    worst = []
    for e in entries:
        layers = sorted(e["layers"], key=lambda l: _num(l["cosine"]))[:WORST_LAYERS]
        stored: dict[str, int] = {}
        for l in e["layers"]:
            stored[l.get("method", "?")] = stored.get(l.get("method", "?"), 0) + 1
        worst.append({"bits": e["bits"],
                      "stored": md_text(", ".join(f"{m} × {n}" for m, n in sorted(stored.items()))),
                      "rows": [
            [md_code(l['name']), md_text(l.get("method", "?")), md_text("×".join(map(str, l["shape"]))),
             md_text(f"{l['parameters']:,}"),
             _fmt(_num(l["cosine"]), "{:.5f}"), _fmt(_num(l["sqnr_db"]), "{:.2f}"),
             _fmt(_num(l.get("row_cosine_min")), "{:.4f}")] for l in layers]})
    verdicts = [[f"INT{md_text(e['bits'])}", f"**{md_text(str((e.get('verdict') or {}).get('decision', '?')).upper())}**",
                 ("yes" if (e.get("verdict") or {}).get("outputs_measured") else "**no**"),
                 (", ".join(md_code(r) for r in (e.get("verdict") or {}).get("failed_gates", [])) or "all gates met")
                 + (f"; not measured (produced elsewhere): {', '.join(md_code(r) for r in e['verdict']['not_measured'])}"
                    if (e.get("verdict") or {}).get("not_measured") else "")]
                for e in entries]
    model_info = results.get("model") or {}
    regression = results.get("baseline") or {}
    gated = {(c["bits"], c["metric"]) for c in results["criteria"]}
    deltas = [[f"INT{md_text(d['bits'])}", md_code(d["metric"]), _fmt(d["value"], "{:.6g}"),
               _fmt(d["baseline"], "{:.6g}"), _fmt(d["delta"], "{:+.4g}"),
               "gated" if (d["bits"], d["metric"]) in gated else "reported"]
              for d in regression.get("deltas", [])]
    runner_tables = [{"bits": e["bits"], "title": key.replace("_", " "),
                      "header": [md_text(c) for c in rows[0]],
                      "rows": [[_cell(r.get(c)) for c in rows[0]] for r in rows]}
                     for e in entries for key, rows in (e.get("tables") or {}).items()]
    fallbacks = []
    for e in entries:
        fb = e.get("fallbacks") or {}
        for method, m in (fb.get("methods") or {}).items():
            if m.get("fallback"):
                fallbacks.append(f"INT{md_text(e['bits'])} {md_code(method)}: {m['fell_back']} of {m['tensors']} "
                                 f"tensors fell back to {md_code(m['fallback'])} (rate {_fmt(m['fallback_rate'], '{:.3f}')})"
                                 + (f": {', '.join(md_code(n) for n in m['tensors_fell_back'][:8])}"
                                    + (" …" if len(m['tensors_fell_back']) > 8 else "") if m["fell_back"] else ""))
    passes = (entries[0].get("fallbacks") or {}).get("time_aware", []) if entries else []
    for p in passes:
        fallbacks.append(f"{md_text(p['pass'])}: " + (f"**failed, fell back to base quantization** ({md_text(p['error'])})"
                                                     if p["fell_back"] else "ran (no fallback)"))
    ordered = sorted(results["criteria"], key=lambda c: (-c["bits"], c["metric"]))
    groups = [{"bits": e["bits"], "rows": [
        [md_text(g["mask_ratio"]), _fmt(g["kl_mean"], "{:.4f}"), _fmt(g["kl_p99"], "{:.4f}"),
         _fmt(g["top1_agreement"], "{:.3f}"), str(int(g["positions"]))] for g in e.get("timestep_groups", [])]}
        for e in entries if e.get("timestep_groups")]
    methods = [{"bits": e["bits"], "scheme": md_code(e["scheme"]), "rows": [
        [md_code(m['method']), _fmt(m["quantize_seconds"], "{:.2f}"), _fmt(m["size_mb"], "{:.2f}"),
         _fmt(m["bits_per_weight"], "{:.2f}"), _fmt(_num(m["weight_sqnr_db"]), "{:.2f}"),
         _fmt(m.get(quality_key(m)), "{:.4f}"), _fmt(m.get(quality_min_key(m)), "{:.4f}")]
        for m in e.get("methods", [])]} for e in entries if e.get("methods")]
    plans: list[dict[str, Any]] = []
    for e in entries:
        p = e.get("plan")
        if not p:
            continue
        counts: dict[str, int] = {}
        for layer in p["layers"]:
            counts[layer["rung"]] = counts.get(layer["rung"], 0) + 1
        plans.append({
            "bits": e["bits"], "promotions": p["promotions"], "score": _fmt(p["calibration_score"], "{:.4f}"),
            "seconds": _fmt(p.get("plan_seconds"), "{:.1f}"), "rungs": " → ".join(md_text(r) for r in p["rungs"]),
            "mix": ", ".join(f"{n} × {md_text(r)}" for r, n in counts.items()),
            "bits_per_weight": _fmt(e["metrics"].get("bits_per_weight"), "{:.2f}"),
            "rows": [[md_code(l['name']), md_text(l["stored"]), _fmt(l["damage"][0], "{:.5f}"),
                      _fmt(l["weight_cosine"], "{:.4f}"), md_text(f"{l['parameters']:,}"), md_text(l["reason"])]
                     for l in p["layers"]]})
    criteria = [[f"INT{md_text(c['bits'])}", md_code(c['rule']), _fmt(_num(c["value"]), "{:.6g}"),
                 ("PASS" if c["passed"] is True else ("**NOT MEASURED**" if c["test"] == "not measured" else
                                                      "not measured (produced elsewhere)" if c["passed"] is None
                                                      else "**FAIL**")),
                 md_text(c["why"])] for c in ordered]
    tests = results["tests"]
    base = results.get("baselines") or {}
    inputs = [f"{md_code(i['path'])} ({md_text(format(i['bytes'], ','))} bytes, "
              f"sha256 {md_code(str(i['sha256'])[:16] + '…')})" for i in prov["inputs"]]
    used_schemes = sorted({e["scheme"] for e in entries})
    used_metrics = sorted({k for e in entries for k in e["metrics"] if k in METRICS})
    return {
        "verdict": md_text(results["verdict"]),
        "scope": md_text(results.get("verdict_scope", OUTPUTS_MEASURED)),
        "verdicts": verdicts,
        "ties": [f"{md_code(a)} → {md_code(c)}" for a, c in (model_info.get("ties") or {}).items()],
        "buffers": [md_code(b) for b in model_info.get("buffers", [])],
        "conv_grouping": md_text(model_info["conv_grouping"]) if model_info.get("conv_grouping") else None,
        "model": md_text(run["model"]),
        "fault": md_code(run["fault"]) if run.get("fault") else None,
        "started_at": md_text(run["started_at"]),
        "wall_seconds": _fmt(run.get("wall_seconds"), "{:.1f}"),
        "bits": ", ".join(f"INT{md_text(e['bits'])}" for e in entries),
        "tests": {k: md_text(v) for k, v in tests.items() if k in ("total", "passed", "failed", "errors")},
        "gates_total": len(results["criteria"]),
        "gates_failed": sum(1 for c in results["criteria"] if c["passed"] is not True and c["passed"] is not None),
        "gates_elsewhere": sum(1 for c in results["criteria"] if c["passed"] is None),
        "artifact": _artifact_view(run.get("artifact")),
        "failures": [{"test": md_code(f["test"]), "message": md_text(f["message"])} for f in tests["failures"]],
        "environment": [
            ("Git commit", md_code(prov['git_commit']) + (" (uncommitted changes)" if prov["git_dirty"] else "")),
            ("Python", md_text(prov["python"])), ("Platform", md_text(prov["platform"])),
            ("CPU", md_text(f"{prov['cpu']} ({prov['cores']} cores)")),
            ("Core compiled with mypyc", "yes" if prov["core_compiled"] else "NO (pure Python)"),
            ("Threads", md_text(", ".join(f"{k}={v}" for k, v in prov["threads"].items()))),
            ("Packages", md_text(", ".join(f"{k} {v}" for k, v in prov["packages"].items()))),
            ("Model files", "; ".join(inputs) or "—"),
            ("Evaluation", md_text(", ".join(f"{k}={v}" for k, v in (prov.get("runner") or {}).items()))
             or "weights only"),
            ("Baselines", md_text(f"FP32 {base.get('fp32_bytes', 0):,} bytes, FP16 {base.get('fp16_bytes', 0):,} "
                                  f"bytes, {base.get('parameters', 0):,} parameters — {base.get('how', '—')}")),
            ("Criteria", md_code(run['criteria_file']) + criteria_note(run.get("criteria_integrity"))),
        ],
        "summary_header": ["Bits", "Scheme", "Method"] + [title for _k, title, _p in present],
        "summary_rows": summary_rows,
        "worst": worst,
        "timestep_groups": groups,
        "runner_tables": runner_tables,
        "fallbacks": fallbacks,
        "deltas": deltas,
        "baseline_source": (f"{md_code(regression.get('path'))} (model {md_text(regression.get('model'))}, "
                            f"verdict {md_text(regression.get('verdict'))}, commit "
                            f"{md_code(str(regression.get('git_commit'))[:12])})") if regression else None,
        "methods": methods,
        "method_quality": "output cosine" if any("output_cosine_mean" in m for e in entries for m in e.get("methods", []))
        else "masked top-1 agreement",
        "plans": plans,
        "chart": results.get("chart"),
        "criteria": criteria,
        "recommendations": recommendations(results),
        "scheme_legend": [(f"`{s}`", SCHEMES[s].description) for s in used_schemes if s in SCHEMES],
        "metric_legend": [(f"`{m}`", METRICS[m].description) for m in used_metrics],
    }


def render(results: dict[str, Any], template: str = "report.md.j2") -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
                             autoescape=False, keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
    return env.get_template(template).render(**view(results))


def render_report(results: dict[str, Any], path: Path) -> Path:
    """Write the Markdown report (and its chart, next to it) atomically.

    The chart (``harness.chart``: PNG and SVG, legend, FP32/FP16 references, Pareto
    frontier) is drawn when at least two configurations were measured; one point is a
    table row, not a chart."""
    from harness.chart import points as chart_points_of, render_chart as draw

    measured = [p for p in chart_points_of(results)[0] if p.kind != "reference"]
    charts = draw(results, path.parent) if len(measured) >= 2 else []
    png = next((c.name for c in charts if c.suffix == ".png"), None)
    return write_text_atomic(path, render({**results, "chart": png}))
