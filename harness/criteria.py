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

from arrowquant_core.errors import ConfigurationError, FormatError, unknown_name
from arrowquant_core.limits import cut, read_capped, short
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
MAX_CRITERIA_BYTES: Final = 1 << 20
"""A criteria file is a few KB; anything past 1 MiB (or a device, FIFO, /dev/zero) is refused."""


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
    peers: tuple[str, ...] = ()  # llama.cpp formats compared beside them (harness.peers.PEERS)
    ladder: LadderSpec | None = None
    # A Hessian method on a tensor without calibration activations (an embedding table,
    # or a model without a runner) is an error unless this names the allowed fallback.
    fallback: str | None = None
    # Hessian methods run with every Hessian the model's runner can capture (dream-mini:
    # plain and mask-aware), at this bit width's scheme, in every run (reported; the
    # ``*_hessian_*`` metrics can be gated)
    hessian_comparison: tuple[str, ...] = ()
    # (glob, scheme) per tensor, first match wins (``QuantizationConfig.overrides``): a mixed
    # precision plan fixed in the criteria, e.g. the word embeddings at INT2 inside an INT4 model
    overrides: tuple[tuple[str, str], ...] = ()
    # (glob, method) per tensor likewise (``QuantizationConfig.method_overrides``): e.g. GPTQ on
    # the few tensors where error feedback pays, round-to-nearest elsewhere
    method_overrides: tuple[tuple[str, str], ...] = ()

    def quantization_config(self, method: str | None = None) -> Any:
        """The core's ``QuantizationConfig`` of this plan (``method``: every tensor by that
        method, as a compared method runs, keeping the scheme overrides)."""
        from arrowquant_core.model import QuantizationConfig

        return QuantizationConfig(self.scheme, method=method or self.method, overrides=self.overrides,
                                  method_overrides=() if method else self.method_overrides)

    def scheme_for(self, name: str) -> str:
        """The scheme ``name`` is stored with (the core's rule: the first override that matches)."""
        return str(self.quantization_config().scheme_for(name).name)

    def method_for(self, name: str) -> str:
        """The method that picks ``name``'s codes (the core's rule: the first method override that matches)."""
        return str(self.quantization_config().method_for(name))

    @property
    def needs_calibration(self) -> bool:
        from arrowquant_core.methods import METHODS

        methods = ({self.method, *self.compare, *(m for _p, m in self.method_overrides)}
                   | ({m for _s, m in self.ladder.rungs} if self.ladder else set()))
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
        raise ConfigurationError(f"{where}rule {short(text)} is not 'metric OP number' or 'metric OP baseline "
                                 f"[+-* number]' with OP in {list(_OPS)}")
    metric, op, number = match.groups()
    if metric not in METRICS:
        raise ConfigurationError(f"{where}{unknown_name('metric', short(metric, 60), METRICS)}")
    try:
        threshold = float(number)
    except ValueError:
        raise ConfigurationError(f"{where}rule {short(text)}: threshold {short(number)} is not a number") from None
    return Criterion(bits=bits, metric=metric, op=op, threshold=threshold, why=why)


def _gates(entries: Any, bits: int, where: str) -> list[Criterion]:
    if not isinstance(entries, list):
        raise ConfigurationError(f"{where}'gates' must be a list")
    out: list[Criterion] = []
    for entry in entries:
        if isinstance(entry, str):
            out.append(parse_rule(entry, bits, where=where))
        elif isinstance(entry, dict) and isinstance(entry.get("rule"), str) \
                and isinstance(entry.get("why", ""), str):
            out.append(parse_rule(entry["rule"], bits, str(entry.get("why", "")), where))
        else:
            raise ConfigurationError(f"{where}gate {short(entry)} must be a string or {{rule = \"...\", why = \"...\"}}")
    return out


def _check_method(method: str, scheme: str, where: str) -> None:
    from arrowquant_core.methods import check_method

    try:
        check_method(method, get_scheme(scheme))
    except ConfigurationError as exc:
        raise ConfigurationError(f"{where}{cut(str(exc))}") from None


def _overrides(data: Any, method: str, compare: tuple[str, ...], where: str) -> tuple[tuple[str, str], ...]:
    """``overrides = [["*word_embeddings*", "int2-g32-asym-k8"], ...]``: each a [glob, scheme]
    that the bit width's method (and every compared one) can store."""
    out: list[tuple[str, str]] = []
    for item in _list_of(data, object, "overrides", where):
        if not (isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) and x for x in item)):
            raise ConfigurationError(f"{where}overrides entry {short(item)} must be [\"glob\", \"scheme\"]")
        pattern, scheme = item
        try:
            get_scheme(scheme)
        except ConfigurationError as exc:
            raise ConfigurationError(f"{where}overrides {short(pattern)}: {cut(str(exc))}") from None
        for name in (method, *compare):
            _check_method(name, scheme, f"{where}overrides {short(pattern)}: ")
        out.append((pattern, scheme))
    return tuple(out)


def _method_overrides(data: Any, scheme: str, overrides: tuple[tuple[str, str], ...],
                      where: str) -> tuple[tuple[str, str], ...]:
    """``method_overrides = [["*attention.self.value*", "gptq-kr"], ...]``: each a [glob, method]
    that can store the bit width's scheme and every scheme override."""
    out: list[tuple[str, str]] = []
    for item in _list_of(data, object, "method_overrides", where):
        if not (isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) and x for x in item)):
            raise ConfigurationError(f"{where}method_overrides entry {short(item)} must be [\"glob\", \"method\"]")
        pattern, method = item
        for name in (scheme, *(s for _p, s in overrides)):
            _check_method(method, name, f"{where}method_overrides {short(pattern)}: ")
        out.append((pattern, method))
    return tuple(out)


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
    for rung in _list_of(data.get("rungs", []), object, "ladder rungs", where):
        if not (isinstance(rung, list) and len(rung) == 2 and all(isinstance(x, str) for x in rung)):
            raise ConfigurationError(f"{where}ladder rung {short(rung)} must be [scheme, method]")
        if rung[0] != "fp16":
            _check_method(rung[1], rung[0], where)
        rungs.append((rung[0], rung[1]))
    budget = data.get("budget_mb")
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget < math.inf:
            raise ConfigurationError(f"{where}ladder budget_mb = {short(budget)} must be a positive number")
        return LadderSpec(tuple(rungs), 0.0, 1.0, False, float(budget))
    try:
        threshold, target = float(data["layer_threshold"]), float(data["target"])
    except (KeyError, TypeError, ValueError):
        raise ConfigurationError(f"{where}ladder needs numeric layer_threshold and target "
                                 "(or budget_mb for the size-budget mode)") from None
    if not 0.0 < target <= 1.0 or not 0.0 <= threshold < math.inf:
        raise ConfigurationError(f"{where}ladder target must be in (0, 1] and layer_threshold >= 0")
    fail_fast = data.get("fail_fast", False)
    if not isinstance(fail_fast, bool):
        raise ConfigurationError(f"{where}ladder fail_fast = {short(fail_fast)} must be true or false")
    return LadderSpec(tuple(rungs), threshold, target, fail_fast)


def _list_of(value: Any, kind: type, what: str, where: str) -> list[Any]:
    if not isinstance(value, list) or not all(isinstance(v, kind) for v in value):
        raise ConfigurationError(f"{where}{what} = {short(value)} must be a list"
                                 + (f" of {kind.__name__}" if kind is not object else ""))
    return value


def _table(value: Any, what: str, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigurationError(f"{where}{what} must be a table ([section]), got {type(value).__name__}")
    return value


def read_criteria_text(path: Path) -> str:
    """The text of a criteria file, read under the one input rule (regular file, at most
    ``MAX_CRITERIA_BYTES``, UTF-8); every failure is a ConfigurationError naming the file."""
    try:
        raw = read_capped(path, MAX_CRITERIA_BYTES, "criteria file")
    except FileNotFoundError:
        raise ConfigurationError(f"criteria file {path} does not exist") from None
    except FormatError as exc:
        raise ConfigurationError(str(exc)) from None
    except OSError as exc:
        raise ConfigurationError(f"criteria file {path}: cannot be read ({exc.strerror})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigurationError(f"criteria file {path}: line {line}: not valid UTF-8 (byte {exc.start})") from None


def _peers(entries: Any, where: str) -> tuple[str, ...]:
    """``peers = ["Q8_0", "Q4_0"]``: llama.cpp formats (quantized by gguf-py) compared
    beside the methods under ``--compare``; names from ``harness.peers.PEERS``."""
    if not entries:
        return ()
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise ConfigurationError(f"{where}peers must be a list of llama.cpp format names, e.g. [\"Q4_0\"]")
    from harness.peers import get_peer  # imports gguf: only when a file lists peers

    for name in entries:
        try:
            get_peer(name)
        except ConfigurationError as exc:
            raise ConfigurationError(f"{where}{exc}") from None
    if len(set(entries)) != len(entries):
        raise ConfigurationError(f"{where}peers {entries}: a format is repeated")
    return tuple(entries)


def _read_toml(path: Path) -> dict[str, Any]:
    text = read_criteria_text(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"criteria file {path}: invalid TOML ({short(str(exc))})") from None
    except (RecursionError, ValueError, MemoryError) as exc:
        raise ConfigurationError(f"criteria file {path}: invalid TOML ({type(exc).__name__})") from None
    return data


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
        raise ConfigurationError(f"criteria file {path}: {short(parent_name)} inherits again; one level only")
    bits_parent = _table(parent.get("bits", {}), "[bits]", f"criteria file {path.parent / parent_name}: ")
    bits_child = _table(data.get("bits", {}), "[bits]", f"criteria file {path}: ")
    merged = {**parent, **{k: v for k, v in data.items() if k not in ("bits", "inherit")}}
    merged["bits"] = {**bits_parent, **bits_child}
    return merged


def inherited_path(path: Path) -> Path | None:
    """The parent criteria file ``path`` inherits from, if any (for its digest)."""
    parent = _read_toml(path).get("inherit")
    return path.parent / parent if isinstance(parent, str) else None


def load_criteria(path: Path, model: str = "", allow_relative: bool = False) -> Criteria:
    """Read and validate a criteria file; every problem is a ConfigurationError naming the
    file, the section and the rule (wrong types included), never a raw TypeError.

    Rules relative to a baseline are refused unless ``allow_relative`` (the caller then
    resolves them, see ``harness.baseline``)."""
    data = _with_parent(_read_toml(path), path)
    shared_section = _table(data.get("all", {}), "[all]", f"criteria file {path}: ")
    shared = _gates(shared_section.get("gates", []), 0, f"{path} [all]: ")
    sections = data.get("bits")
    if not isinstance(sections, dict) or not sections:
        raise ConfigurationError(f"criteria file {path}: needs at least one [bits.N] section")
    model_name = data.get("model", model)
    if not isinstance(model_name, str):
        raise ConfigurationError(f"criteria file {path}: model = {short(model_name)} must be a string")
    plans: dict[int, BitPlan] = {}
    for key, section_obj in sections.items():
        where = f"{path} [bits.{cut(key, 40)}]: "
        if not (key.isascii() and key.isdigit() and len(key) <= 2):
            raise ConfigurationError(f"{where}section name must be a bit width")
        bits = int(key)
        section = _table(section_obj, f"[bits.{key}]", where)
        scheme = section.get("scheme")
        if not isinstance(scheme, str):
            raise ConfigurationError(f"{where}needs scheme = \"<name>\"")
        try:
            scheme_bits = get_scheme(scheme).bits
        except ConfigurationError as exc:
            raise ConfigurationError(f"{where}{cut(str(exc))}") from None
        if scheme_bits != bits:
            raise ConfigurationError(f"{where}scheme {short(scheme)} is not {bits}-bit")
        gates = _gates(section.get("gates", []), bits, where)
        gates += [Criterion(bits, c.metric, c.op, c.threshold, c.why, c.relative, c.offset) for c in shared]
        relative = [g.rule for g in gates if g.relative]
        if relative and not allow_relative:
            raise ConfigurationError(f"{where}rules {relative} are relative to a baseline; pass "
                                     "--baseline results.json (a results.json of an earlier run)")
        report = _list_of(section.get("report", []), str, "report", where)
        for metric in report:
            if metric not in METRICS:
                raise ConfigurationError(f"{where}report: {unknown_name('metric', short(metric, 60), METRICS)}")
        method = section.get("method", "rtn")
        if not isinstance(method, str):
            raise ConfigurationError(f"{where}method = {short(method)} must be a string")
        compare = tuple(_list_of(section.get("compare", []), str, "compare", where))
        for name in (method, *compare):
            _check_method(name, scheme, where)
        hessian_comparison = tuple(_list_of(section.get("hessian_comparison", []), str, "hessian_comparison", where))
        for name in hessian_comparison:
            _check_method(name, scheme, where)
            from arrowquant_core.methods import get_method

            if not get_method(name).needs_hessian:
                raise ConfigurationError(f"{where}hessian_comparison: {short(name)} does not use a Hessian "
                                         "(list GPTQ-family methods, e.g. \"gptq\")")
        fallback = section.get("fallback")
        if fallback is not None:
            from arrowquant_core.methods import get_method

            ladder = section.get("ladder")
            rungs = ladder.get("rungs", []) if isinstance(ladder, dict) else []
            rung_methods = [r[1] for r in rungs if isinstance(r, list) and len(r) == 2 and r[0] != "fp16"]
            allowed = sorted({get_method(m).fallback for m in (method, *rung_methods) if m in _method_names()})
            if fallback not in allowed:
                raise ConfigurationError(f"{where}fallback = {short(fallback)}: a Hessian method without activations "
                                         f"falls back to {allowed} (the method's own fallback), nothing else")
        overrides = _overrides(section.get("overrides", []), method, compare, where)
        plans[bits] = BitPlan(bits=bits, scheme=scheme, gates=tuple(gates), report=tuple(report),
                              method=method, compare=compare, peers=_peers(section.get("peers", []), where),
                              ladder=_ladder(section.get("ladder"), scheme, method, where),
                              fallback=fallback, hessian_comparison=hessian_comparison,
                              overrides=overrides,
                              method_overrides=_method_overrides(section.get("method_overrides", []), scheme,
                                                                 overrides, where))
    return Criteria(source=path, model=model_name, plans=plans)


def _method_names() -> set[str]:
    from arrowquant_core.methods import METHODS

    return set(METHODS)


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
