"""The one table of quantization schemes.

A scheme fixes how one tensor is quantized: bit width, symmetric or asymmetric, and
granularity (one scale per tensor, per output channel, or per group of ``group_size``
consecutive values along a row). CLI choices, validation, packing dispatch and the
report legend are all derived from ``SCHEMES``; nothing keeps a parallel list.

Names read ``int{bits}-{granularity}-{sym|asym}`` where granularity is ``tensor``,
``channel`` or ``g{group_size}``: ``int4-g64-asym`` is 4-bit, one scale and one integer
zero point per 64 values.

Like llama.cpp's ``GGML_QUANT_SIZES`` table (gguf-py/gguf/constants.py), the table is
data; unlike llama.cpp's fixed block of 32, the group size is part of the scheme.

A second family stores the group scales themselves quantized, K-quant style
(llama.cpp ``block_q4_K`` / ``block_q2_K`` in ggml-common.h: per super-block of
``QK_K = 256`` weights one fp16 super-scale, per sub-block of 16 or 32 weights a 6-bit
(Q4_K) or 4-bit (Q2_K) scale code). Here: ``int{bits}-g{group_size}-{sym|asym}-k{scale_bits}``
keeps the integer zero point per group and stores each group's scale as a
``scale_bits``-bit code times one float32 super-scale per ``SUPER_BLOCK`` values (the
``kquant.py`` module docstring gives the exact layout). ``int4-g32-asym-k8`` costs
``4 + (8 + 8) / 32 + 32 / 256 = 4.625`` bits per weight before compression, against
``4 + 40 / 32 = 5.25`` for ``int4-g32-asym``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from arrowquant_core.errors import ConfigurationError, unknown_name

BIT_WIDTHS: Final[tuple[int, ...]] = (8, 4, 2)
# 16 serves the calibrated INT2 methods (GPTQ INT2 needs small groups); 32-256 the rest.
GROUP_SIZES: Final[tuple[int, ...]] = (16, 32, 64, 128, 256)
GRANULARITIES: Final[tuple[str, ...]] = ("tensor", "channel", "group")
# K-quant-style schemes: scale code widths, the group sizes they come in, super-block size.
SCALE_BITS: Final[tuple[int, ...]] = (6, 8)
K_GROUP_SIZES: Final[tuple[int, ...]] = (16, 32, 64)
SUPER_BLOCK: Final[int] = 256


@dataclass(frozen=True)
class Scheme:
    """One row of the scheme table.

    >>> SCHEMES["int4-g64-asym"].levels
    16
    """

    name: str
    bits: int
    symmetric: bool
    granularity: str
    group_size: int  # 0 unless granularity == "group"
    scale_bits: int = 0  # 0: float32 scales; else scale codes of this width (kquant.py)

    def __post_init__(self) -> None:
        if self.bits not in BIT_WIDTHS:
            raise ConfigurationError(
                f"scheme {self.name!r}: bits = {self.bits} is not one of {list(BIT_WIDTHS)}")
        if self.granularity not in GRANULARITIES:
            raise ConfigurationError(
                f"scheme {self.name!r}: granularity {self.granularity!r} is not one of {list(GRANULARITIES)}")
        if self.granularity == "group" and self.group_size not in GROUP_SIZES:
            raise ConfigurationError(
                f"scheme {self.name!r}: group_size = {self.group_size} is not one of {list(GROUP_SIZES)}")
        if self.granularity != "group" and self.group_size != 0:
            raise ConfigurationError(
                f"scheme {self.name!r}: group_size = {self.group_size} must be 0 unless granularity is 'group'")
        if self.scale_bits and (self.scale_bits not in SCALE_BITS or self.granularity != "group"
                                or self.group_size not in K_GROUP_SIZES):
            raise ConfigurationError(
                f"scheme {self.name!r}: scale_bits = {self.scale_bits} needs one of {list(SCALE_BITS)} "
                f"and a group size in {list(K_GROUP_SIZES)}")
        # The name is derived, never free: files store schemes by name, so a name that
        # did not identify its parameters would reload as a different scheme.
        canonical = _scheme_name(self.bits, self.granularity, self.group_size, self.symmetric, self.scale_bits)
        if self.name != canonical:
            raise ConfigurationError(f"scheme {self.name!r}: its parameters name it {canonical!r}")

    def __reduce__(self) -> tuple[object, tuple[str]]:
        # Compiled frozen dataclasses cannot be unpickled field by field (docs/MYPYC.md,
        # "Runtime surprises"); rebuilding from the table by name keeps multiprocessing working.
        return (get_scheme, (self.name,))

    @property
    def levels(self) -> int:
        """Number of integer codes, 2**bits."""
        return 1 << self.bits

    @property
    def qmax(self) -> int:
        """Largest code; codes are unsigned in [0, qmax]."""
        return (1 << self.bits) - 1

    @property
    def codes_per_byte(self) -> int:
        return 8 // self.bits

    @property
    def description(self) -> str:
        """One line for the report legend."""
        if self.granularity == "group":
            where = f"one scale per group of {self.group_size} values"
        elif self.granularity == "channel":
            where = "one scale per output channel (row)"
        else:
            where = "one scale for the whole tensor"
        kind = ("symmetric (zero point fixed at mid-range)" if self.symmetric
                else "asymmetric (integer zero point, 0.0 exact)")
        if self.scale_bits:
            where += (f", stored as {self.scale_bits}-bit codes of a float32 super-scale per "
                      f"{SUPER_BLOCK} values")
        return f"{self.bits}-bit, {kind}, {where}"


def _scheme_name(bits: int, granularity: str, group_size: int, symmetric: bool, scale_bits: int = 0) -> str:
    where = f"g{group_size}" if granularity == "group" else granularity
    tail = f"-k{scale_bits}" if scale_bits else ""
    return f"int{bits}-{where}-{'sym' if symmetric else 'asym'}{tail}"


def _build_table() -> dict[str, Scheme]:
    table: dict[str, Scheme] = {}
    for bits in BIT_WIDTHS:
        for granularity in GRANULARITIES:
            sizes = GROUP_SIZES if granularity == "group" else (0,)
            for group_size in sizes:
                for symmetric in (True, False):
                    name = _scheme_name(bits, granularity, group_size, symmetric)
                    table[name] = Scheme(name, bits, symmetric, granularity, group_size)
    # The K-quant family after the plain rows, so lookups by (bits, group, symmetry)
    # that scan the table (diffusion.scheme_for) still find the plain scheme first.
    for bits in BIT_WIDTHS:
        for group_size in K_GROUP_SIZES:
            for symmetric in (True, False):
                for scale_bits in SCALE_BITS:
                    name = _scheme_name(bits, "group", group_size, symmetric, scale_bits)
                    table[name] = Scheme(name, bits, symmetric, "group", group_size, scale_bits)
    return table


SCHEMES: Final[dict[str, Scheme]] = _build_table()


def get_scheme(name: object) -> Scheme:
    """Look a scheme up by name; an unknown name says what is available.

    ``object``, not ``str``: compiled code would turn ``None`` (say, from a config file)
    into a bare TypeError at the call boundary instead of this ConfigurationError.

    >>> get_scheme("int8-channel-sym").bits
    8
    """
    if not isinstance(name, str):
        raise ConfigurationError(f"scheme {repr(name)[:80]} must be a scheme name (str); "
                                 f"available: {', '.join(SCHEMES)}")
    scheme = SCHEMES.get(name)
    if scheme is None:
        raise unknown_name("scheme", name, SCHEMES)
    return scheme
