"""Static checks of the GitHub Actions workflows under ``.github/workflows``.

Everything here runs offline:

* ``check-jsonschema --builtin-schema vendor.github-workflows`` (the schema is
  vendored inside check-jsonschema, no download);
* ``zizmor --offline`` (only the offline audits run);
* structural assertions on the parsed CI workflow (the jobs run the right
  ``make`` targets, the report/artifact steps survive a failed gate, the
  permissions are read-only, every action is pinned to a commit SHA).

Every structural rule is a function returning a list of problems, so that the
``test_mutation_*`` tests at the bottom can feed it a deliberately broken copy
of the workflow and prove that the rule (and the two external tools) really go
red. A missing tool is an installation bug: the tests fail loudly, they never
skip.

Run-time dependencies: pytest, check-jsonschema (which brings ruamel.yaml, the
YAML parser used here) and zizmor.
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from ruamel.yaml import YAML

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS_DIR = REPO_ROOT / ".github" / "workflows"
CI_WORKFLOW = WORKFLOWS_DIR / "ci.yml"
ZIZMOR_CONFIG = REPO_ROOT / ".github" / "zizmor.yml"

TEST_JOB = "test"
GATE_JOB = "harness-gate"
REPORT_MD = "reports/QUANTIZATION_VALIDATION_REPORT.md"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"

# owner/repo[/path]@<40 lowercase hex>
PINNED_USES = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_./-]+@[0-9a-f]{40}$")
# a `uses:` line and its trailing comment, e.g. `uses: a/b@<sha> # v1.2.3`
USES_LINE = re.compile(r"^\s*(?:-\s+)?uses:\s*['\"]?([^\s'\"#]+)['\"]?\s*(#.*)?$")
VERSION_COMMENT = re.compile(r"#\s*v\d+(?:\.\d+)*\b")
# "runs whatever happened before, unless the run was cancelled"
ALWAYS_CONDITIONS = {"always()", "!cancelled()"}

SUBPROCESS_TIMEOUT = 120  # seconds; each tool normally answers in < 1 s


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _yaml() -> YAML:
    # YAML 1.2 safe loader: `on:` stays the string "on" (PyYAML's YAML 1.1
    # would turn it into True), duplicate keys raise.
    return YAML(typ="safe", pure=True)


def load_yaml(text: str) -> Any:
    return _yaml().load(text)


def dump_yaml(doc: Any) -> str:
    buf = io.StringIO()
    y = _yaml()
    y.default_flow_style = False
    y.dump(doc, buf)
    return buf.getvalue()


def workflow_files() -> list[Path]:
    return sorted(p for p in WORKFLOWS_DIR.iterdir() if p.suffix in {".yml", ".yaml"})


def ci_text() -> str:
    return CI_WORKFLOW.read_text(encoding="utf-8")


def ci_doc() -> dict[str, Any]:
    doc = load_yaml(ci_text())
    assert isinstance(doc, dict), f"{CI_WORKFLOW} is not a YAML mapping"
    return doc


def triggers(doc: dict[Any, Any]) -> Any:
    # True only if someone parses with a YAML 1.1 loader; be tolerant.
    return doc.get("on", doc.get(True))


def jobs(doc: dict[str, Any]) -> dict[str, Any]:
    return doc.get("jobs") or {}


def steps(job: dict[str, Any]) -> list[dict[str, Any]]:
    return job.get("steps") or []


def all_steps(doc: dict[str, Any]) -> Iterator[tuple[str, int, dict[str, Any]]]:
    for job_id, job in jobs(doc).items():
        for index, step in enumerate(steps(job)):
            yield job_id, index, step


def step_label(job_id: str, index: int, step: dict[str, Any]) -> str:
    return f"jobs.{job_id}.steps[{index}] ({step.get('name') or step.get('uses') or 'run'})"


def runs_make_target(script: str, target: str) -> bool:
    """True when a line of the shell script is `make [opts] ... <target> ...`."""
    for line in script.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        for command in re.split(r"&&|\|\||;", line):
            try:
                tokens = shlex.split(command)
            except ValueError:
                continue
            if tokens[:1] != ["make"]:
                continue
            targets = [t for t in tokens[1:] if not t.startswith("-") and "=" not in t]
            if target in targets:
                return True
    return False


def normalise_condition(cond: Any) -> str:
    text = str(cond).strip()
    if text.startswith("${{") and text.endswith("}}"):
        text = text[3:-2]
    return re.sub(r"\s+", "", text)


StepPredicate = Callable[[dict[str, Any]], bool]
Mutation = Callable[[dict[str, Any]], None]


def find_step(job: dict[str, Any], predicate: StepPredicate) -> tuple[int, dict[str, Any] | None]:
    """(index, step) of the first matching step, or (-1, None)."""
    for index, step in enumerate(steps(job)):
        if predicate(step):
            return index, step
    return -1, None


def is_gate_step(step: dict[str, Any]) -> bool:
    return runs_make_target(str(step.get("run", "")), "run")


def is_summary_step(step: dict[str, Any]) -> bool:
    script = str(step.get("run", ""))
    return "GITHUB_STEP_SUMMARY" in script and "QUANTIZATION_VALIDATION_REPORT.md" in script


def is_upload_step(step: dict[str, Any]) -> bool:
    return str(step.get("uses", "")).startswith("actions/upload-artifact@")


def tool_env() -> dict[str, str]:
    env = dict(os.environ)
    # Never let a token in the environment turn on zizmor's online audits.
    for var in ("GH_TOKEN", "GITHUB_TOKEN", "ZIZMOR_GITHUB_TOKEN"):
        env.pop(var, None)
    env["ZIZMOR_OFFLINE"] = "true"
    env["NO_COLOR"] = "1"
    return env


def run_tool(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        cwd=REPO_ROOT,
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )


def describe(proc: subprocess.CompletedProcess[str]) -> str:
    return (
        f"$ {shlex.join(proc.args)}\nexit code {proc.returncode}\n"
        f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    )


def check_jsonschema(paths: list[Path]) -> subprocess.CompletedProcess[str]:
    # `python -m check_jsonschema` works whatever the bin/ layout of the venv.
    return run_tool(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.github-workflows",
            *map(str, paths),
        ]
    )


def zizmor_executable() -> str:
    # zizmor's wheel ships a native binary as a console script, next to the
    # interpreter in a venv; fall back to PATH.
    beside = Path(sys.executable).parent / ("zizmor.exe" if os.name == "nt" else "zizmor")
    if beside.is_file():
        return str(beside)
    found = shutil.which("zizmor")
    if found is None:
        pytest.fail(
            "zizmor is not installed (it is a dev dependency: `pip install zizmor`); "
            f"looked in {beside.parent} and on PATH"
        )
    return found


def zizmor(target: Path) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    argv = [zizmor_executable(), "--offline", "--format", "json", "--strict-collection"]
    # `auditor` is the strictest persona (it also reports pedantic and
    # possibly-false-positive findings); the workflow is clean under it, so
    # any finding at all is a regression.
    argv += ["--persona", "auditor"]
    argv += ["--config", str(ZIZMOR_CONFIG)] if ZIZMOR_CONFIG.is_file() else ["--no-config"]
    argv.append(str(target))
    proc = run_tool(argv)
    try:
        findings = json.loads(proc.stdout) if proc.stdout.strip() else None
    except json.JSONDecodeError:
        findings = None
    if not isinstance(findings, list):
        pytest.fail("zizmor did not produce a JSON list of findings\n" + describe(proc))
    return proc, findings


def summarise_findings(findings: list[dict[str, Any]]) -> str:
    lines = []
    for f in findings:
        det = f.get("determinations", {})
        locs = [
            loc.get("symbolic", {}).get("annotation", "")
            for loc in f.get("locations", [])
        ]
        lines.append(
            f"{f.get('ident')} [{det.get('severity')}/{det.get('confidence')}]: "
            f"{f.get('desc')} {locs}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------
# structural rules: each returns a list of problems (empty == OK)
# --------------------------------------------------------------------------


def problems_triggers(doc: dict[str, Any]) -> list[str]:
    on = triggers(doc)
    problems = []
    if not isinstance(on, dict):
        return [f"`on:` must be a mapping with push and pull_request, got {on!r}"]
    push = on.get("push")
    branches = (push or {}).get("branches") if isinstance(push, dict) else None
    if not branches or "main" not in branches:
        problems.append("`on.push.branches` must include main")
    if "pull_request" not in on:
        problems.append("`on.pull_request` trigger is missing")
    if "pull_request_target" in on:
        problems.append("`pull_request_target` must not be used (runs untrusted code with secrets)")
    return problems


def _permissions_read_only(perms: Any) -> bool:
    if perms in ("read-all", {}):
        return True
    if isinstance(perms, dict):
        return all(value in ("read", "none") for value in perms.values())
    return False


def problems_permissions(doc: dict[str, Any]) -> list[str]:
    problems = []
    if "permissions" not in doc:
        problems.append("top-level `permissions:` is missing (the default token may be read-write)")
    elif not _permissions_read_only(doc["permissions"]):
        problems.append(f"top-level permissions are not read-only: {doc['permissions']!r}")
    for job_id, job in jobs(doc).items():
        if "permissions" in job and not _permissions_read_only(job["permissions"]):
            problems.append(f"jobs.{job_id}.permissions are not read-only: {job['permissions']!r}")
    return problems


def problems_pinned(doc: dict[str, Any]) -> list[str]:
    problems = []
    refs = [(f"jobs.{j}", job.get("uses")) for j, job in jobs(doc).items() if job.get("uses")]
    refs += [(step_label(j, i, s), s.get("uses")) for j, i, s in all_steps(doc) if s.get("uses")]
    for where, uses in refs:
        uses = str(uses)
        if uses.startswith("./"):
            continue  # local action/workflow: versioned with this repository
        if not PINNED_USES.match(uses):
            problems.append(f"{where}: `uses: {uses}` is not pinned to a full 40-hex commit SHA")
    return problems


def problems_version_comments(text: str) -> list[str]:
    problems = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        m = USES_LINE.match(line)
        if not m or m.group(1).startswith("./"):
            continue
        if not VERSION_COMMENT.search(m.group(2) or ""):
            problems.append(f"line {lineno}: `uses: {m.group(1)}` lacks a trailing `# vX.Y.Z` comment")
    return problems


def problems_make_targets(doc: dict[str, Any]) -> list[str]:
    problems = []
    for job_id, target in ((TEST_JOB, "test"), (GATE_JOB, "run")):
        job = jobs(doc).get(job_id)
        if job is None:
            problems.append(f"job `{job_id}` is missing")
            continue
        if not any(runs_make_target(str(s.get("run", "")), target) for s in steps(job)):
            problems.append(f"job `{job_id}` has no step running `make {target}`")
    return problems


def problems_gate_reporting(doc: dict[str, Any]) -> list[str]:
    """The summary and artifact steps run after a failed gate; the job still fails."""
    job = jobs(doc).get(GATE_JOB)
    if job is None:
        return [f"job `{GATE_JOB}` is missing"]
    problems = []
    if job.get("continue-on-error"):
        problems.append(f"jobs.{GATE_JOB} has continue-on-error: a failed gate would pass the job")
    gate_i, gate = find_step(job, is_gate_step)
    summary_i, summary = find_step(job, is_summary_step)
    upload_i, upload = find_step(job, is_upload_step)
    if gate is None:
        return problems + [f"jobs.{GATE_JOB} has no `make run` step"]
    if gate.get("continue-on-error"):
        problems.append("the `make run` step has continue-on-error: a failed gate would pass the job")
    if "if" in gate:
        problems.append(f"the `make run` step must run unconditionally, has `if: {gate['if']}`")
    for what, index, step in (
        ("summary step (appends the report to $GITHUB_STEP_SUMMARY)", summary_i, summary),
        ("upload-artifact step", upload_i, upload),
    ):
        if step is None:
            problems.append(f"jobs.{GATE_JOB}: no {what}")
            continue
        if index < gate_i:
            problems.append(f"jobs.{GATE_JOB}: the {what} comes before the gate step")
        if normalise_condition(step.get("if", "success()")) not in ALWAYS_CONDITIONS:
            problems.append(
                f"jobs.{GATE_JOB}: the {what} does not run after a failed gate "
                f"(`if: {step.get('if')}`; need always() or !cancelled())"
            )
    if summary is not None and "[ -f" not in str(summary.get("run")) and "test -f" not in str(
        summary.get("run")
    ):
        problems.append("the summary step must only append the report if it exists")
    if upload is not None:
        with_ = upload.get("with") or {}
        if str(with_.get("path", "")).strip().rstrip("/") != "reports":
            problems.append(f"the upload step must upload reports/, uploads {with_.get('path')!r}")
        if with_.get("if-no-files-found") != "error":
            problems.append("the upload step must set `if-no-files-found: error`")
    return problems


def problems_hygiene(doc: dict[str, Any]) -> list[str]:
    """Checkout hygiene, no template injection, python/torch set-up, timeouts."""
    problems = []
    env = doc.get("env") or {}
    for job_id, job in jobs(doc).items():
        job_env = {**env, **(job.get("env") or {})}
        if "timeout-minutes" not in job:
            problems.append(f"jobs.{job_id} has no timeout-minutes")
        if job_id in (TEST_JOB, GATE_JOB) and job_env.get("TORCH_INDEX_URL") != TORCH_CPU_INDEX:
            problems.append(f"jobs.{job_id}: TORCH_INDEX_URL must be {TORCH_CPU_INDEX}")
        uses_list = [str(s.get("uses", "")) for s in steps(job)]
        if job_id in (TEST_JOB, GATE_JOB):
            for action in ("actions/checkout@", "actions/setup-python@"):
                if not any(u.startswith(action) for u in uses_list):
                    problems.append(f"jobs.{job_id} does not use {action.rstrip('@')}")
    for job_id, index, step in all_steps(doc):
        where = step_label(job_id, index, step)
        uses = str(step.get("uses", ""))
        with_ = step.get("with") or {}
        if uses.startswith("actions/checkout@") and with_.get("persist-credentials") is not False:
            problems.append(f"{where}: checkout must set `persist-credentials: false`")
        if uses.startswith("actions/setup-python@"):
            if str(with_.get("python-version")) != "3.11":
                problems.append(f"{where}: python-version must be 3.11")
            if with_.get("cache") != "pip" or with_.get("cache-dependency-path") != "pyproject.toml":
                problems.append(f"{where}: pip cache must be keyed on pyproject.toml")
        if "${{" in str(step.get("run", "")):
            problems.append(f"{where}: `${{{{ }}}}` inside `run:` (template injection); pass it via env:")
    return problems


RULES = {
    "triggers": problems_triggers,
    "permissions": problems_permissions,
    "pinned": problems_pinned,
    "make_targets": problems_make_targets,
    "gate_reporting": problems_gate_reporting,
    "hygiene": problems_hygiene,
}


# --------------------------------------------------------------------------
# tests on the real workflows
# --------------------------------------------------------------------------


def test_workflows_exist() -> None:
    files = workflow_files()
    assert CI_WORKFLOW in files, f"{CI_WORKFLOW} is missing; found {files}"


def test_workflows_match_github_schema() -> None:
    files = workflow_files()
    assert files, f"no workflow files in {WORKFLOWS_DIR}"
    proc = check_jsonschema(files)
    assert proc.returncode == 0, "check-jsonschema rejected a workflow\n" + describe(proc)


def test_zizmor_reports_nothing() -> None:
    proc, findings = zizmor(WORKFLOWS_DIR)
    assert findings == [], "zizmor findings:\n" + summarise_findings(findings) + "\n" + describe(proc)
    # With no findings zizmor exits 0; 1/2 would be a tool or collection error.
    assert proc.returncode == 0, describe(proc)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_ci_structure(rule: str) -> None:
    problems = RULES[rule](ci_doc())
    assert problems == [], "\n".join(problems)


def test_every_pin_has_a_version_comment() -> None:
    for path in workflow_files():
        problems = problems_version_comments(path.read_text(encoding="utf-8"))
        assert problems == [], f"{path.name}:\n" + "\n".join(problems)


def test_every_workflow_pins_its_actions() -> None:
    for path in workflow_files():
        doc = load_yaml(path.read_text(encoding="utf-8"))
        problems = problems_pinned(doc) + problems_permissions(doc)
        assert problems == [], f"{path.name}:\n" + "\n".join(problems)


def _summary_script() -> str:
    _, step = find_step(jobs(ci_doc())[GATE_JOB], is_summary_step)
    assert step is not None
    return str(step["run"])


def _run_summary(tmp_path: Path, with_report: bool) -> tuple[subprocess.CompletedProcess[str], str]:
    bash = shutil.which("bash")
    assert bash is not None, "bash is needed to exercise the summary step"
    summary = tmp_path / "step_summary.md"
    summary.write_text("", encoding="utf-8")
    if with_report:
        (tmp_path / "reports").mkdir()
        (tmp_path / REPORT_MD).write_text("# Quantization report\n\nall gates: PASS\n", encoding="utf-8")
    script = tmp_path / "step.sh"
    script.write_text(_summary_script(), encoding="utf-8")
    # GitHub runs `run:` on ubuntu as `bash --noprofile --norc -eo pipefail {0}`.
    proc = subprocess.run(
        [bash, "--noprofile", "--norc", "-eo", "pipefail", str(script)],
        cwd=tmp_path,
        env={"PATH": os.environ.get("PATH", ""), "GITHUB_STEP_SUMMARY": str(summary)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return proc, summary.read_text(encoding="utf-8")


def test_summary_step_appends_the_report(tmp_path: Path) -> None:
    proc, summary = _run_summary(tmp_path, with_report=True)
    assert proc.returncode == 0, describe(proc)
    assert "# Quantization report" in summary and "all gates: PASS" in summary


def test_summary_step_tolerates_a_missing_report(tmp_path: Path) -> None:
    proc, summary = _run_summary(tmp_path, with_report=False)
    assert proc.returncode == 0, "the summary step must not fail when no report exists\n" + describe(proc)
    assert "# Quantization report" not in summary


# --------------------------------------------------------------------------
# mutation tests: prove each check above can go red
# --------------------------------------------------------------------------


def _mutated(mutate: Mutation) -> dict[str, Any]:
    doc = copy.deepcopy(ci_doc())
    mutate(doc)
    return doc


def _gate_step(doc: dict[str, Any], predicate: StepPredicate) -> dict[str, Any]:
    _, step = find_step(jobs(doc)[GATE_JOB], predicate)
    assert step is not None
    return step


def _unpin(doc: dict[str, Any]) -> None:
    step = jobs(doc)[TEST_JOB]["steps"][0]
    step["uses"] = step["uses"].split("@")[0] + "@v5"


def _no_always(doc: dict[str, Any]) -> None:
    del _gate_step(doc, is_upload_step)["if"]


def _swallow_gate_failure(doc: dict[str, Any]) -> None:
    _gate_step(doc, is_gate_step)["continue-on-error"] = True


def _write_permissions(doc: dict[str, Any]) -> None:
    doc["permissions"] = "write-all"


def _wrong_target(doc: dict[str, Any]) -> None:
    _gate_step(doc, is_gate_step)["run"] = "make gate"


def _template_injection(doc: dict[str, Any]) -> None:
    jobs(doc)[TEST_JOB]["steps"].append(
        {"name": "greet", "run": 'echo "${{ github.event.pull_request.title }}"'}
    )


def _persisted_credentials(doc: dict[str, Any]) -> None:
    del jobs(doc)[TEST_JOB]["steps"][0]["with"]["persist-credentials"]


def _unknown_key(doc: dict[str, Any]) -> None:
    jobs(doc)[TEST_JOB]["runs-onn"] = "ubuntu-latest"


def _no_pr_trigger(doc: dict[str, Any]) -> None:
    del doc["on"]["pull_request"]


def _cuda_torch(doc: dict[str, Any]) -> None:
    del doc["env"]["TORCH_INDEX_URL"]


@pytest.mark.parametrize(
    ("mutation", "rule"),
    [
        (_unpin, "pinned"),
        (_no_always, "gate_reporting"),
        (_swallow_gate_failure, "gate_reporting"),
        (_write_permissions, "permissions"),
        (_wrong_target, "make_targets"),
        (_template_injection, "hygiene"),
        (_persisted_credentials, "hygiene"),
        (_no_pr_trigger, "triggers"),
        (_cuda_torch, "hygiene"),
    ],
    ids=lambda v: getattr(v, "__name__", v),
)
def test_mutation_breaks_structure_rule(mutation: Mutation, rule: str) -> None:
    assert RULES[rule](_mutated(mutation)) != [], f"rule {rule!r} did not notice {mutation.__name__}"


def test_mutation_breaks_version_comment_rule() -> None:
    text = re.sub(r"(uses:\s*\S+)\s*#.*", r"\1", ci_text())
    assert problems_version_comments(text) != []


def test_mutation_breaks_schema_check(tmp_path: Path) -> None:
    broken = tmp_path / "ci.yml"
    broken.write_text(dump_yaml(_mutated(_unknown_key)), encoding="utf-8")
    proc = check_jsonschema([broken])
    assert proc.returncode != 0, "check-jsonschema accepted an unknown job key\n" + describe(proc)
    # ... and the round-trip itself is not what breaks it:
    pristine = tmp_path / "pristine.yml"
    pristine.write_text(dump_yaml(ci_doc()), encoding="utf-8")
    proc = check_jsonschema([pristine])
    assert proc.returncode == 0, describe(proc)


@pytest.mark.parametrize(
    ("mutation", "audit"),
    [
        (_unpin, "unpinned-uses"),
        (_template_injection, "template-injection"),
        (_persisted_credentials, "artipacked"),
        (_write_permissions, "excessive-permissions"),
    ],
    ids=lambda v: getattr(v, "__name__", v),
)
def test_mutation_breaks_zizmor(tmp_path: Path, mutation: Mutation, audit: str) -> None:
    broken = tmp_path / "ci.yml"
    broken.write_text(dump_yaml(_mutated(mutation)), encoding="utf-8")
    proc, findings = zizmor(broken)
    idents = {str(f.get("ident")) for f in findings}
    assert audit in idents, f"zizmor missed {audit}; got {sorted(idents)}\n" + describe(proc)
    assert proc.returncode != 0, describe(proc)
