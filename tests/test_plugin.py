"""Adopting the gate from another repository: the pytest plugin, the Python API, the package names.

The ``scratch`` fixture builds a repository outside this one (its own ``pytest.ini``,
``tests/`` and criteria file, no conftest) where pytest runs in a subprocess with the
plugin's command-line options and the ``arrowquant_validate`` fixture. The baseline is a
real earlier run (``tests/golden/adoption/dream-mini-int4-results.json``) into which a
better past ``kl_mean`` is injected — the fault a regression gate exists to catch.

Here (default suite) the runs stop before the model loads: options, the fixture, an
incomparable baseline, an inert plugin. The full gate of dream-mini that fails on the
injected regression takes about a minute on the 2-core machine, so it lives in
``e2e/test_adoption_e2e.py`` (``make e2e``), outside the default suite's time budget.

The plugin is loaded through its ``pytest11`` entry point when this environment has it
installed (``pip install -e .``), else with ``-p harness.pytest_plugin`` (a worktree whose
sources are not the installed ones); the entry point's declaration in pyproject.toml is
checked separately.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
from pathlib import Path
import subprocess
import sys
import tomllib
import zipfile

import pytest

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "golden" / "adoption"
TIMEOUT = 600

TEAM_TEST = '''
def test_our_own_code_still_works():
    assert 1 + 1 == 2


def test_int4_gate_through_the_fixture(arrowquant_validate, tmp_path):
    # the model as an argument, the rest from the --arrowquant-* options
    result = arrowquant_validate("dream-mini", out=tmp_path / "fixture-run")
    assert result.verdict == "FAIL"
    failed = {c["metric"] for c in result.results["criteria"] if not c["passed"]}
    assert failed == {"kl_mean"}, result.results["tests"]["failures"]
'''


def plugin_args() -> list[str]:
    installed = [ep for ep in importlib.metadata.entry_points(group="pytest11") if ep.name == "arrowquant"]
    if installed and installed[0].value == "harness.pytest_plugin":
        return []
    return ["-p", "harness.pytest_plugin"]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("team-repo")
    (repo / "pytest.ini").write_text("[pytest]\ntestpaths = tests\n")
    (repo / "tests").mkdir()
    (repo / "tests" / "test_team.py").write_text(TEAM_TEST)
    gates = (GOLDEN / "gates.toml").read_text().replace(
        '    { rule = "kl_mean <= 1.5"',
        '    { rule = "size_mb <= baseline * 1.05", why = "the artifact may grow at most 5% per release" },\n'
        '    { rule = "kl_mean <= baseline * 1.05", why = "output divergence may grow at most 5% per release" },\n'
        '    { rule = "kl_mean <= 1.5"')
    assert gates.count("baseline *") == 2
    (repo / "gates.toml").write_text(gates)
    past = json.loads((GOLDEN / "dream-mini-int4-results.json").read_text())
    # injected regression: the last release claims half the divergence measured today
    past["bit_widths"][0]["metrics"]["kl_mean"] /= 2
    (repo / "last-release.json").write_text(json.dumps(past))
    return repo


def run_pytest(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest", *plugin_args(), "-p", "no:cacheprovider", *args],
                          cwd=repo, env=env(), capture_output=True, text=True, timeout=TIMEOUT, check=False)


def test_one_run_without_a_model_option_adds_no_gate_and_the_fixture_refuses_a_bad_baseline(
        scratch: Path) -> None:
    """Every option but the model is accepted and adds no test; loading the plugin imports
    nothing heavy; the fixture takes its defaults from the options, and a baseline made
    with another criteria file is refused before the model loads (a usage error in the
    team's test: an error, never a pass)."""
    (scratch / "tests" / "test_light.py").write_text(
        "import sys\n\ndef test_light():\n    assert 'numpy' not in sys.modules and 'harness.runner' not in sys.modules\n")
    try:
        proc = run_pytest(scratch, "-v", "--arrowquant-bits", "4", "--arrowquant-criteria",
                          str(REPO / "harness" / "criteria" / "dream-mini.toml"), "--arrowquant-baseline",
                          "last-release.json", "--arrowquant-out", "x", "--arrowquant-profile", "local")
    finally:
        (scratch / "tests" / "test_light.py").unlink()
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "test_light PASSED" in out and "test_our_own_code_still_works PASSED" in out, out
    assert "test_int4_gate_through_the_fixture FAILED" in out and "arrowquant-gate" not in out, out
    assert "baseline not comparable" in out and "made with criteria gates.toml, this run uses dream-mini.toml" in out
    assert not (scratch / "x").exists()


def test_the_entry_point_and_console_script_are_declared() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["pytest11"] == {"arrowquant": "harness.pytest_plugin"}
    assert project["scripts"]["arrowquant"] == "harness.cli:main"


def test_the_api_is_typed_and_documented() -> None:
    import inspect

    from harness import api

    signature = inspect.signature(api.validate)
    assert list(signature.parameters)[:1] == ["model"]
    assert {"bits", "criteria", "out", "baseline", "profile"} <= set(signature.parameters)
    assert signature.return_annotation == "RunResult"
    assert "baseline" in (api.validate.__doc__ or "")


def test_the_wheel_installs_fixtures_under_a_project_name(tmp_path: Path) -> None:
    """No top-level ``fixtures`` in site-packages (it would shadow the PyPI ``fixtures``
    library); the installed harness finds ``arrowquant_fixtures`` from outside the repository."""
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(wheels)], env={**env(), "ARROWQUANT_PURE": "1"}, cwd=tmp_path,
                           capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = wheels.glob("arrowquant-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"arrowquant_core", "arrowquant_fixtures", "harness"}
    assert "arrowquant_fixtures/minilm/eval_sentences.txt" in names  # package data moved with it
    assert "harness/pytest_plugin.py" in names and "harness/suite/conftest.py" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "[pytest11]\narrowquant = harness.pytest_plugin" in zipfile.ZipFile(wheel).read(entry_points).decode()
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    # the modules a run imports, and the paths that read the thread count: --threads, a bad
    # ARROWQUANT_THREADS (a usage error, exit 2, once fixtures.parallel is found), provenance
    probe = ("import os, sys; from harness.fixtures_import import package_name, fixtures_module; "
             "import harness.context, harness.results; from harness.cli import main; "
             "assert harness.results.provenance([], {}, None)['threads']['measurement'] >= 1; "
             "assert main(['run', '--model', './no/such/dir', '--threads', '1']) == 2; "
             "os.environ['ARROWQUANT_THREADS'] = 'x'; assert main(['run', '--model', 'dream-mini']) == 2; "
             "m = fixtures_module('checkpoint'); print(package_name(), m.__file__, sorted(m.MODELS)[:2])")
    # only the extracted wheel (and the venv's third-party packages), not the repository
    site_env = {**os.environ, "PYTHONPATH": str(target), "PYTHONSAFEPATH": "1"}
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=site_env, capture_output=True,
                          text=True, timeout=TIMEOUT, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "No module named 'fixtures'" not in proc.stderr, proc.stderr
    name, path, _models = proc.stdout.split(" ", 2)
    assert name == "arrowquant_fixtures" and Path(path).is_relative_to(target), proc.stdout


def test_harness_never_imports_the_checkout_name_of_fixtures() -> None:
    """``import fixtures`` works only from the repository root; harness code reaches the
    package through ``harness.fixtures_import`` (installed, it is ``arrowquant_fixtures``).
    A ``from fixtures.parallel import ...`` in harness/ once broke every run started
    outside the checkout: this finds any such import, outside ``if TYPE_CHECKING:``."""
    offenders = []
    for path in sorted((REPO / "harness").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        typing_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and ast.unparse(block.test) == "TYPE_CHECKING" for node in ast.walk(block)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            if any(n == "fixtures" or n.startswith("fixtures.") for n in names):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, f"harness imports `fixtures` directly (use harness.fixtures_import): {offenders}"

