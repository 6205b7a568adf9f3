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
    ``artifact`` is a GGUF file quantized elsewhere (llama.cpp, gguf-py), judged by the
    same suite in place of our quantizer's output (``harness.gguf_artifact``).
    """

    model: str
    bits: tuple[int, ...] = ()
    criteria: Path | None = None
    out: Path = Path("reports")
    fault: str | None = None
    profile: str | None = None
    compare: bool = False  # also run the method comparisons the criteria list (slower)
    artifact: Path | None = None  # judge this GGUF file (made elsewhere) instead of quantizing
    benchmark_rounds: int = 3
    quiet: bool = False
    runner: str | None = None  # override runner detection ("none": weights only)

    def __post_init__(self) -> None:
        bad = [b for b in self.bits if b not in BIT_WIDTHS]
        if bad:
            raise ConfigurationError(f"--bits {bad}: supported bit widths are {list(BIT_WIDTHS)}")
        if len(set(self.bits)) != len(self.bits):
            raise ConfigurationError(f"--bits {list(self.bits)}: a bit width is repeated")
        if self.profile is not None:
            get_profile(self.profile)  # unknown profile: ConfigurationError with "did you mean"
        if self.artifact is not None:
            if self.artifact.suffix.lower() != ".gguf":
                raise ConfigurationError(f"--artifact {self.artifact}: only GGUF files (.gguf) can be judged")
            if not self.artifact.is_file():
                raise ConfigurationError(f"--artifact {self.artifact}: no such file")
            if self.fault is not None:
                raise ConfigurationError("--artifact judges a file made elsewhere; --inject-fault breaks our own "
                                         "quantizer, which then does not run: use one or the other")
        if self.benchmark_rounds < 1:
            raise ConfigurationError(f"benchmark_rounds = {self.benchmark_rounds}: must be >= 1")
