"""The composite GitHub Action (``action.yml``): validated offline, and its steps run in a scratch repository.

Offline validation mirrors ``tests/test_workflows.py``: ``check-jsonschema
--builtin-schema vendor.github-actions`` (the action metadata schema vendored inside
check-jsonschema), ``zizmor --offline``, and structural rules (inputs and outputs the
issue asks for, every ``uses:`` pinned to a commit SHA, no ``${{ }}`` expanded inside a
shell script, the summary and uploads survive a failed gate). Each tool and rule is shown
to go red on a broken copy.

``run_action`` executes the action the way a runner would, as far as that is possible
offline: each step's ``if:`` is evaluated for the few expressions the action uses, the
``${{ inputs.* }}`` / ``${{ steps.*.outputs.* }}`` / ``${{ github.action_path }}`` in
``env:`` and ``with:`` are substituted, ``run:`` steps execute with the runner's own
shell command line (``bash --noprofile --norc -eo pipefail``) and ``GITHUB_OUTPUT`` /
``GITHUB_STEP_SUMMARY`` files. ``uses:`` steps (setup-python, upload-artifact) need the
network and GitHub's services and are not run: the upload of the chart is stood in for
by its output (a ``file://`` URL of the PNG) so the summary step that links it runs.
ArrowQuant is already installed here, so the action runs with ``install: false``.

The test here gates with a baseline from another criteria file (refused before the
model loads: verdict ERROR, exit 2, a summary that says why) so it stays within the
suite's time budget. ``e2e/test_adoption_e2e.py`` (``make e2e``) runs the same steps
gating dream-mini for real against an injected regression (verdict FAIL, exit 1, the
report and the chart link in the summary).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
import re
import shutil
import subprocess
import sys
from typing import Any

import pytest
from ruamel.yaml import YAML

REPO = Path(__file__).resolve().parent.parent
ACTION = REPO / "action.yml"
GOLDEN = REPO / "tests" / "golden" / "adoption"
PINNED = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_./-]+@[0-9a-f]{40}$")
EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")
TIMEOUT = 900


def load(text: str) -> Any:
    return YAML(typ="safe", pure=True).load(text)


def dump(doc: Any, path: Path) -> Path:
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    with open(path, "w", encoding="utf-8") as handle:
        yaml.dump(doc, handle)
    return path


def action() -> dict[str, Any]:
    doc = load(ACTION.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


def tool(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed (dev dependency: pip install -e '.[dev]')")
    return found


def check_schema(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.github-actions", str(path)],
                          capture_output=True, text=True, timeout=120, check=False)


def zizmor(path: Path) -> list[dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if k not in {"GH_TOKEN", "GITHUB_TOKEN", "ZIZMOR_GITHUB_TOKEN"}}
    proc = subprocess.run([tool("zizmor"), "--offline", "--format", "json", str(path)], capture_output=True,
                          text=True, timeout=120, check=False, env={**env, "ZIZMOR_OFFLINE": "true", "NO_COLOR": "1"})
    try:
        findings = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"zizmor gave no JSON (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    assert isinstance(findings, list)
    return findings


# -- structural rules: each returns the problems it finds ---------------------------------


def structure_problems(doc: dict[str, Any]) -> list[str]:
    problems = []
    inputs, outputs = doc.get("inputs") or {}, doc.get("outputs") or {}
    for name in ("model", "bits", "profile", "criteria", "baseline"):
        if name not in inputs:
            problems.append(f"input {name!r} missing")
    for name in ("verdict", "results-path"):
        if name not in outputs:
            problems.append(f"output {name!r} missing")
    runs = doc.get("runs") or {}
    if runs.get("using") != "composite":
        problems.append("runs.using is not composite")
    steps = runs.get("steps") or []
    for index, step in enumerate(steps):
        label = f"steps[{index}] ({step.get('name')})"
        uses = step.get("uses")
        if uses and not PINNED.match(str(uses)):
            problems.append(f"{label}: {uses} is not pinned to a commit SHA")
        if "run" in step:
            if not step.get("shell"):
                problems.append(f"{label}: a composite run step needs shell:")
            if EXPRESSION.search(str(step["run"])):
                problems.append(f"{label}: ${{{{ }}}} expanded inside the script (pass it through env:)")
    summary = [s for s in steps if "GITHUB_STEP_SUMMARY" in str(s.get("run", ""))]
    uploads = [s for s in steps if str(s.get("uses", "")).startswith("actions/upload-artifact@")]
    if not summary:
        problems.append("no step writes the job summary")
    if not any(str((s.get("with") or {}).get("path", "")).rstrip("/").endswith("inputs.out }}") for s in uploads):
        problems.append("the reports folder is not uploaded")
    if not any(str((s.get("with") or {}).get("archive", "")).lower() == "false" for s in uploads):
        problems.append("the chart is not uploaded as an image of its own (archive: false)")
    for step in summary + uploads:
        if "!cancelled()" not in str(step.get("if", "")) and "always()" not in str(step.get("if", "")):
            problems.append(f"step {step.get('name')!r} does not run after a failed gate")
    return problems


def test_action_passes_the_schema_zizmor_and_the_structural_rules() -> None:
    proc = check_schema(ACTION)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert zizmor(ACTION) == []
    assert structure_problems(action()) == []


def test_each_check_goes_red_on_a_broken_copy(tmp_path: Path) -> None:
    broken = copy.deepcopy(action())
    del broken["runs"]["using"]
    (tmp_path / "no-using").mkdir()
    assert check_schema(dump(broken, tmp_path / "no-using" / "action.yml")).returncode != 0
    injected = copy.deepcopy(action())
    gate = next(s for s in injected["runs"]["steps"] if s.get("id") == "gate")
    gate["run"] = 'python -m harness run --model "${{ inputs.model }}"\n'
    (tmp_path / "injected").mkdir()
    findings = zizmor(dump(injected, tmp_path / "injected" / "action.yml"))
    assert any(f.get("ident") == "template-injection" for f in findings), findings
    assert any("expanded inside the script" in p for p in structure_problems(injected))
    unpinned = copy.deepcopy(action())
    unpinned["runs"]["steps"][0]["uses"] = "actions/setup-python@v6"
    assert any("not pinned" in p for p in structure_problems(unpinned))
    no_always = copy.deepcopy(action())
    for step in no_always["runs"]["steps"]:
        step.pop("if", None)
    assert any("does not run after a failed gate" in p for p in structure_problems(no_always))


# -- running the steps -------------------------------------------------------------------


def _evaluate(expression: str, context: dict[str, Any]) -> str:
    """The few expressions action.yml uses: inputs.x, steps.id.outputs.y, github.action_path."""
    parts = expression.split(".")
    if parts[0] == "inputs":
        return str(context["inputs"].get(parts[1], ""))
    if parts[0] == "steps" and parts[2] == "outputs":
        return str(context["steps"].get(parts[1], {}).get(parts[3], ""))
    if expression == "github.action_path":
        return str(REPO)
    raise AssertionError(f"expression {expression!r} is not handled by the offline runner")


def _substitute(text: str, context: dict[str, Any]) -> str:
    return EXPRESSION.sub(lambda m: _evaluate(m.group(1), context), text)


def _condition(condition: str | None, context: dict[str, Any], workdir: Path) -> bool:
    if condition is None:
        return True
    text = EXPRESSION.sub(lambda m: m.group(1), str(condition)).strip()
    if text == "inputs.install == 'true'":
        return context["inputs"]["install"] == "true"
    if text == "!cancelled()":
        return True
    hashed = re.fullmatch(r"!cancelled\(\) && hashFiles\(format\('\{0\}/(.+)', inputs\.out\)\) != ''", text)
    if hashed:
        return (workdir / context["inputs"]["out"] / hashed.group(1)).is_file()
    raise AssertionError(f"condition {condition!r} is not handled by the offline runner")


def _read_outputs(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if "=" in line:
            key, value = line.split("=", 1)
            out[key] = value
    return out


def run_action(workdir: Path, inputs: dict[str, str]) -> dict[str, Any]:
    doc = action()
    declared = {k: str(v.get("default", "")) for k, v in doc["inputs"].items()}
    context: dict[str, Any] = {"inputs": {**declared, **inputs}, "steps": {}}
    summary = workdir / "step-summary.md"
    summary.write_text("")
    ran, codes = [], {}
    bindir = Path(sys.executable).parent
    for index, step in enumerate(doc["runs"]["steps"]):
        if not _condition(step.get("if"), context, workdir):
            continue
        name = step.get("name", f"step {index}")
        if "uses" in step:
            if step.get("id") == "chart":  # stand-in for upload-artifact's output
                path = workdir / _substitute(step["with"]["path"], context)
                context["steps"]["chart"] = {"artifact-url": path.resolve().as_uri()}
            continue
        assert step["shell"] == "bash"
        output = workdir / f"output-{index}.txt"
        output.write_text("")
        script = workdir / f"step-{index}.sh"
        script.write_text(step["run"])
        env = {**os.environ, "GITHUB_OUTPUT": str(output), "GITHUB_STEP_SUMMARY": str(summary),
               "GITHUB_ACTION_PATH": str(REPO), "PYTHONPATH": str(REPO),
               "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.update({k: _substitute(str(v), context) for k, v in (step.get("env") or {}).items()})
        proc = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)], cwd=workdir,
                              env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False)
        ran.append(name)
        codes[name] = proc.returncode
        if step.get("id"):
            context["steps"][step["id"]] = _read_outputs(output)
        if proc.returncode != 0 and step is not doc["runs"]["steps"][-1]:
            raise AssertionError(f"step {name!r} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return {"ran": ran, "codes": codes, "outputs": context["steps"].get("gate", {}),
            "summary": summary.read_text(encoding="utf-8"), "chart": context["steps"].get("chart")}


def scratch_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "team-repo"
    repo.mkdir()
    gates = (GOLDEN / "gates.toml").read_text().replace(
        '    { rule = "kl_mean <= 1.5"',
        '    { rule = "kl_mean <= baseline * 1.05", why = "output divergence may grow at most 5% per release" },\n'
        '    { rule = "kl_mean <= 1.5"')
    (repo / "gates.toml").write_text(gates)
    past = json.loads((GOLDEN / "dream-mini-int4-results.json").read_text())
    past["bit_widths"][0]["metrics"]["kl_mean"] /= 2  # injected regression: the past was better
    (repo / "last-release.json").write_text(json.dumps(past))
    return repo


def test_the_action_steps_run_in_a_scratch_repository(tmp_path: Path) -> None:
    repo = scratch_repo(tmp_path)
    refused = run_action(repo, {"model": "dream-mini", "bits": "4", "baseline": "last-release.json",
                                "install": "false", "out": "refused"})
    assert refused["outputs"]["verdict"] == "ERROR" and refused["outputs"]["exit-code"] == "2"
    assert refused["outputs"]["results-path"] == ""
    assert refused["codes"]["Fail when the gate failed"] == 2
    assert "Set up Python" not in refused["ran"] and "Install ArrowQuant" not in refused["ran"]
    assert "## ArrowQuant gate for `dream-mini`: ERROR (exit code 2)" in refused["summary"]
    assert "baseline not comparable" in refused["summary"]  # the gate's own words, from its stderr
