"""Acceptance criteria as data.

A criteria file is TOML, one per model (``harness/criteria/<model>.toml``), overridable
with ``--criteria FILE``::

    [bits.4]
    scheme = "int4-g64-asym"            # how this bit width is quantized
    gates = [
        "compression_vs_fp32 >= 6",     # compact grammar: metric, comparison, threshold
        { rule = "output_cosine_mean >= 0.95", why = "measured 0.965 on ..." },
    ]
    report = ["output_cosine_min"]     # measured and shown, not gated

    [all]                               # gates for every bit width
    gates = ["quantize_seconds <= 60"]

``Criterion.check(value)`` returns ``None`` or the failure text that becomes the test's
failure message: the metric, the measured value, the rule and the bit width.

A rule may also be relative to a baseline run (``--baseline results.json``)::

    "output_cosine_mean >= baseline - 0.002"    # may lose at most 0.002
    "quantize_seconds <= baseline * 1.10"       # at most 10% slower
    "top1_agreement >= baseline"                # no worse at all

Such a criterion has ``relative`` set and no usable threshold until
``Criterion.resolve(baseline_values)`` turns it into an absolute one (see
``harness/baseline.py``); ``load_criteria`` refuses relative rules unless asked to keep
them, so a run without a baseline fails at the start with a clear message.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
import math
import operator
from pathlib import Path
import re
import tomllib
from typing import Any, Callable, Final

from arrowquant_core.errors import ConfigurationError, unknown_name
from arrowquant_core.schemes import get_scheme
from harness.measures import METRICS

_OPS: Final[dict[str, Callable[[float, float], bool]]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq,
}
_RULE = re.compile(r"^\s*([a-z0-9_]+)\s*(>=|<=|==|>|<)\s*([-+0-9.eE]+|inf)\s*$")
# "metric OP baseline", "metric OP baseline - 0.002", "metric OP baseline * 1.1"
_RELATIVE_RULE = re.compile(
    r"^\s*([a-z0-9_]+)\s*(>=|<=|==|>|<)\s*baseline\s*(?:([-+*])\s*([0-9.]+(?:[eE][-+]?[0-9]+)?))?\s*$")
CRITERIA_DIR: Final = Path(__file__).resolve().parent / "criteria"


@dataclass(frozen=True)
class Criterion:
    bits: int
    metric: str
    op: str
    threshold: float
    why: str = ""
    # relative to a baseline: "" (absolute), "=" (baseline itself), "+", "-" or "*" with
    # ``offset``; ``threshold`` is NaN until ``resolve`` makes the criterion absolute
    relative: str = ""
    offset: float = 0.0

    @property
    def rule(self) -> str:
        if self.relative == "=":
            return f"{self.metric} {self.op} baseline"
        if self.relative:
            return f"{self.metric} {self.op} baseline {self.relative} {self.offset:g}"
        return f"{self.metric} {self.op} {self.threshold:g}"

    def resolve(self, baseline_values: Mapping[str, float], source: str = "baseline") -> Criterion:
        """The absolute criterion for this baseline's measured values (same bit width).

        >>> parse_rule("output_cosine_mean >= baseline - 0.002", 4).resolve({"output_cosine_mean": 0.96}).rule
        'output_cosine_mean >= 0.958'
        """
        if not self.relative:
            return self
        if self.metric not in baseline_values:
            raise ConfigurationError(f"rule {self.rule!r} (INT{self.bits}): the {source} has no measured "
                                     f"{self.metric} for INT{self.bits}")
        base = float(baseline_values[self.metric])
        if math.isnan(base):
            raise ConfigurationError(f"rule {self.rule!r} (INT{self.bits}): {self.metric} in the {source} is NaN")
        threshold = {"=": base, "+": base + self.offset, "-": base - self.offset,
                     "*": base * self.offset}[self.relative]
        why = f"{self.rule} with baseline {base:.6g} ({source})" + (f"; {self.why}" if self.why else "")
        return Criterion(self.bits, self.metric, self.op, threshold, why)

    @property
    def id(self) -> str:
        return f"int{self.bits}:{self.rule}"

    def check(self, value: float) -> str | None:
        """None when ``value`` meets the rule, otherwise a readable failure."""
        if self.relative:
            return (f"INT{self.bits} {self.metric} = {value:.6g}: rule {self.rule} needs a baseline "
                    "(--baseline results.json)")
        ok = not math.isnan(value) and _OPS[self.op](value, self.threshold)
        if ok:
            return None
        return f"INT{self.bits} {self.metric} = {value:.6g} violates {self.rule}" + (
            f" ({self.why})" if self.why else "")


@dataclass(frozen=True)
class LadderSpec:
    """The fallback ladder: rungs from the requested bit width up, and its thresholds.

    ``layer_threshold`` is the largest damage (1 - calibration score with only that layer
    quantized) a layer may keep on a rung; ``target`` the calibration score the whole
    model must reach (further promotions by damage per byte until it does).
    """

    rungs: tuple[tuple[str, str], ...]  # (scheme or "fp16", method)
    layer_threshold: float
    target: float
    fail_fast: bool = False
    budget_mb: float | None = None  # set: best quality within this planned size instead


@dataclass(frozen=True)
class BitPlan:
    bits: int
    scheme: str
    gates: tuple[Criterion, ...]
    report: tuple[str, ...] = ()
    method: str = "rtn"
    compare: tuple[str, ...] = ()  # methods compared at this bit width (reported, not gated)
    ladder: LadderSpec | None = None
    # A Hessian method on a tensor without calibration activations (an embedding table,
    # or a model without a runner) is an error unless this names the allowed fallback.
    fallback: str | None = None

    @property
    def needs_calibration(self) -> bool:
        from arrowquant_core.methods import METHODS

        methods = {self.method, *self.compare} | ({m for _s, m in self.ladder.rungs} if self.ladder else set())
        return any(METHODS[m].needs_hessian for m in methods if m in METHODS) or self.ladder is not None


@dataclass(frozen=True)
class Criteria:
    source: Path
    model: str
    plans: dict[int, BitPlan] = field(default_factory=dict)

    def plan(self, bits: int) -> BitPlan:
        if bits not in self.plans:
            raise ConfigurationError(
                f"{self.source}: no [bits.{bits}] section; this criteria file covers "
                f"{sorted(self.plans)} bit(s)")
        return self.plans[bits]

    def gates_for(self, bits: int, metric: str) -> tuple[Criterion, ...]:
        return tuple(c for c in self.plan(bits).gates if c.metric == metric)


def parse_rule(text: str, bits: int, why: str = "", where: str = "") -> Criterion:
    """Parse ``"metric >= 0.99"``.

    >>> parse_rule("output_cosine_mean >= 0.99", 4).check(0.98)
    'INT4 output_cosine_mean = 0.98 violates output_cosine_mean >= 0.99'
    """
    relative = _RELATIVE_RULE.match(text)
    if relative is not None:
        metric, op, sign, number = relative.groups()
        if metric not in METRICS:
            raise ConfigurationError(f"{where}{unknown_name('metric', metric, METRICS)}")
        return Criterion(bits=bits, metric=metric, op=op, threshold=math.nan, why=why,
                         relative=sign or "=", offset=float(number) if number else 0.0)
    match = _RULE.match(text)
    if match is None:
        raise ConfigurationError(f"{where}rule {text!r} is not 'metric OP number' or 'metric OP baseline "
                                 f"[+-* number]' with OP in {list(_OPS)}")
    metric, op, number = match.groups()
    if metric not in METRICS:
        raise ConfigurationError(f"{where}{unknown_name('metric', metric, METRICS)}")
    return Criterion(bits=bits, metric=metric, op=op, threshold=float(number), why=why)


def _gates(entries: Any, bits: int, where: str) -> list[Criterion]:
    if not isinstance(entries, list):
        raise ConfigurationError(f"{where}'gates' must be a list")
    out: list[Criterion] = []
    for entry in entries:
        if isinstance(entry, str):
            out.append(parse_rule(entry, bits, where=where))
        elif isinstance(entry, dict) and isinstance(entry.get("rule"), str):
            out.append(parse_rule(entry["rule"], bits, str(entry.get("why", "")), where))
        else:
            raise ConfigurationError(f"{where}gate {entry!r} must be a string or {{rule = ..., why = ...}}")
    return out


def _check_method(method: str, scheme: str, where: str) -> None:
    from arrowquant_core.methods import check_method

    try:
        check_method(method, get_scheme(scheme))
    except ConfigurationError as exc:
        raise ConfigurationError(f"{where}{exc}") from None


def _ladder(data: Any, scheme: str, method: str, where: str) -> LadderSpec | None:
    """``ladder = { rungs = [["int4-g64-asym", "gptq"], ["int8-g128-asym", "rtn"], ["fp16", ""]],
    layer_threshold = 0.01, target = 0.93 }`` (meet the bar at the smallest size) or
    ``{ rungs = [...], budget_mb = 8 }`` (best quality within a size); the first rung is
    the section's scheme/method."""
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ConfigurationError(f"{where}ladder must be a table")
    rungs: list[tuple[str, str]] = [(scheme, method)]
    for rung in data.get("rungs", []):
        if not (isinstance(rung, list) and len(rung) == 2 and all(isinstance(x, str) for x in rung)):
            raise ConfigurationError(f"{where}ladder rung {rung!r} must be [scheme, method]")
        if rung[0] != "fp16":
            _check_method(rung[1], rung[0], where)
        rungs.append((rung[0], rung[1]))
    budget = data.get("budget_mb")
    if budget is not None:
        if not isinstance(budget, (int, float)) or budget <= 0:
            raise ConfigurationError(f"{where}ladder budget_mb = {budget!r} must be a positive number")
        return LadderSpec(tuple(rungs), 0.0, 1.0, False, float(budget))
    try:
        threshold, target = float(data["layer_threshold"]), float(data["target"])
    except (KeyError, TypeError, ValueError):
        raise ConfigurationError(f"{where}ladder needs numeric layer_threshold and target "
                                 "(or budget_mb for the size-budget mode)") from None
    if not 0.0 < target <= 1.0 or threshold < 0.0:
        raise ConfigurationError(f"{where}ladder target must be in (0, 1] and layer_threshold >= 0")
    return LadderSpec(tuple(rungs), threshold, target, bool(data.get("fail_fast", False)))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigurationError(f"criteria file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"criteria file {path}: invalid TOML ({exc})") from None


def _with_parent(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """``inherit = "other.toml"`` (a file next to this one): start from that file's
    sections; this file's ``[all]`` and ``[bits.N]`` sections replace the parent's whole."""
    parent_name = data.get("inherit")
    if parent_name is None:
        return data
    if not isinstance(parent_name, str) or "/" in parent_name or "\\" in parent_name:
        raise ConfigurationError(f"criteria file {path}: inherit must name a file in the same folder")
    parent = _read_toml(path.parent / parent_name)
    if "inherit" in parent:
        raise ConfigurationError(f"criteria file {path}: {parent_name} inherits again; one level only")
    merged = {**parent, **{k: v for k, v in data.items() if k not in ("bits", "inherit")}}
    merged["bits"] = {**parent.get("bits", {}), **data.get("bits", {})}
    return merged


def load_criteria(path: Path, model: str = "", allow_relative: bool = False) -> Criteria:
    """Read and validate a criteria file; every problem is a ConfigurationError.

    Rules relative to a baseline are refused unless ``allow_relative`` (the caller then
    resolves them, see ``harness.baseline``)."""
    data = _with_parent(_read_toml(path), path)
    shared = _gates(data.get("all", {}).get("gates", []), 0, f"{path} [all]: ")
    sections = data.get("bits")
    if not isinstance(sections, dict) or not sections:
        raise ConfigurationError(f"criteria file {path}: needs at least one [bits.N] section")
    plans: dict[int, BitPlan] = {}
    for key, section in sections.items():
        where = f"{path} [bits.{key}]: "
        if not key.isdigit():
            raise ConfigurationError(f"{where}section name must be a bit width")
        bits = int(key)
        scheme = section.get("scheme")
        if not isinstance(scheme, str):
            raise ConfigurationError(f"{where}needs scheme = \"<name>\"")
        try:
            scheme_bits = get_scheme(scheme).bits
        except ConfigurationError as exc:
            raise ConfigurationError(f"{where}{exc}") from None
        if scheme_bits != bits:
            raise ConfigurationError(f"{where}scheme {scheme!r} is not {bits}-bit")
        gates = _gates(section.get("gates", []), bits, where)
        gates += [Criterion(bits, c.metric, c.op, c.threshold, c.why, c.relative, c.offset) for c in shared]
        relative = [g.rule for g in gates if g.relative]
        if relative and not allow_relative:
            raise ConfigurationError(f"{where}rules {relative} are relative to a baseline; pass "
                                     "--baseline results.json (a results.json of an earlier run)")
        report = section.get("report", [])
        for metric in report:
            if metric not in METRICS:
                raise ConfigurationError(f"{where}report: {unknown_name('metric', metric, METRICS)}")
        method = str(section.get("method", "rtn"))
        compare = tuple(str(m) for m in section.get("compare", []))
        for name in (method, *compare):
            _check_method(name, scheme, where)
        fallback = section.get("fallback")
        if fallback is not None:
            from arrowquant_core.methods import FALLBACK

            if fallback != FALLBACK:
                raise ConfigurationError(f"{where}fallback = {str(fallback)[:40]!r}: the only fallback for a "
                                         f"Hessian method without activations is {FALLBACK!r}")
        plans[bits] = BitPlan(bits=bits, scheme=scheme, gates=tuple(gates), report=tuple(report),
                              method=method, compare=compare,
                              ladder=_ladder(section.get("ladder"), scheme, method, where),
                              fallback=fallback)
    return Criteria(source=path, model=str(data.get("model", model)), plans=plans)


def default_criteria_path(model: str, profile: str | None = None) -> Path:
    return CRITERIA_DIR / (f"{model}-{profile}.toml" if profile else f"{model}.toml")


WEIGHTS_ONLY = "weights"  # criteria base for a model no runner can run


def criteria_base(model: str, runner_kind: str | None) -> str:
    """Which default criteria file a model uses: a named model its own
    (``minilm.toml``); a path the one of its runner (``runner-hf-causal-lm.toml``); a
    model without a runner ``weights.toml`` (weight-level gates only)."""
    if (CRITERIA_DIR / f"{model}.toml").is_file():
        return model
    return f"runner-{runner_kind}" if runner_kind else WEIGHTS_ONLY


def profiles_for(base: str) -> list[str]:
    """Deployment profiles with a criteria file for ``base`` (``minilm-edge.toml`` -> edge)."""
    from arrowquant_core.diffusion import PROFILES

    return sorted(p.stem[len(base) + 1:] for p in CRITERIA_DIR.glob(f"{base}-*.toml")
                  if p.stem[len(base) + 1:] in PROFILES)


def profiled() -> dict[str, list[str]]:
    """``{profile: [criteria bases that have it]}`` over every criteria file."""
    from arrowquant_core.diffusion import PROFILES

    out: dict[str, list[str]] = {}
    for path in sorted(CRITERIA_DIR.glob("*.toml")):
        base, _, suffix = path.stem.rpartition("-")
        if base and suffix in PROFILES:
            out.setdefault(suffix, []).append(base)
    return out


def available() -> Iterable[str]:
    return sorted(p.stem for p in CRITERIA_DIR.glob("*.toml"))
