"""The frozen configuration of one harness run (what the CLI parses into)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from arrowquant_core.errors import ConfigurationError
from arrowquant_core.diffusion import get_profile
from arrowquant_core.schemes import BIT_WIDTHS


@dataclass(frozen=True)
class RunConfig:
    """One run: which model, which bit widths, which criteria, where to write.

    ``bits`` empty means every bit width the criteria file covers. ``profile`` (edge,
    local, cloud) selects the criteria file ``<model>-<profile>.toml``. ``fault`` names a
    deliberate quantizer fault (see ``harness.faults``) for proving the gates work.
    ``baseline`` is the results.json of an earlier run that rules like
    ``metric >= baseline - 0.002`` are judged against (``harness.baseline``).
    ``artifact`` is a GGUF file produced elsewhere, judged in place of quantizing the
    model (``harness.external``): one bit width's criteria, ``bits`` or inferred from the
    file; ``fault`` then names a GGUF fault (``harness.external.GGUF_FAULTS``).
    """

    model: str
    bits: tuple[int, ...] = ()
    criteria: Path | None = None
    out: Path = Path("reports")
    fault: str | None = None
    profile: str | None = None
    compare: bool = False  # also run the method comparisons the criteria list (slower)
    benchmark_rounds: int = 3
    quiet: bool = False
    runner: str | None = None  # override runner detection ("none": weights only)
    baseline: Path | None = None
    fail_fast: bool = False  # a failing time-aware pass stops the run instead of falling back
    artifact: Path | None = None  # a GGUF made elsewhere, judged instead of quantizing (harness.external)

    def __post_init__(self) -> None:
        bad = [b for b in self.bits if b not in BIT_WIDTHS]
        if bad:
            raise ConfigurationError(f"--bits {bad}: supported bit widths are {list(BIT_WIDTHS)}")
        if len(set(self.bits)) != len(self.bits):
            raise ConfigurationError(f"--bits {list(self.bits)}: a bit width is repeated")
        if self.profile is not None:
            get_profile(self.profile)  # unknown profile: ConfigurationError with "did you mean"
        if self.baseline is not None and not Path(self.baseline).is_file():
            raise ConfigurationError(f"--baseline {self.baseline}: no such file (a results.json of an earlier run)")
        if self.artifact is not None:
            from harness.gguf_artifact import check_gguf

            check_gguf(Path(self.artifact))  # a GGUF file, or ConfigurationError before any work
            if len(self.bits) > 1:
                raise ConfigurationError(f"--artifact with --bits {','.join(map(str, self.bits))}: a file is judged "
                                         "by one bit width's criteria; give one, or none to infer it from the file")
            if self.compare:
                raise ConfigurationError("--artifact with --compare: the comparison quantizes the model itself; "
                                         "judge the file without --compare (python -m harness.peers gives the "
                                         "llama.cpp rows alone)")
        if self.benchmark_rounds < 1:
            raise ConfigurationError(f"benchmark_rounds = {self.benchmark_rounds}: must be >= 1")
