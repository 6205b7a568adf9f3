"""The error tree of arrowquant_core.

    ArrowQuantError (Exception)
    ├── ConfigurationError (ValueError)   a scheme, profile, plan or option is invalid
    ├── QuantizationError (ValueError)    a tensor cannot be quantized (NaN, empty, ...)
    ├── ValidationError (ValueError)      a quality or integrity check failed
    └── FormatError (ValueError)          a file is truncated, corrupted or of an unknown format

Every message names the tensor or file, the offending value and the rule it broke,
so the user can act without a traceback. Subclassing ``ValueError`` lets callers that
expect the built-in catch these too.
"""

from __future__ import annotations

from collections.abc import Iterable
import difflib


class ArrowQuantError(Exception):
    """Base of every error raised by arrowquant_core."""


class ConfigurationError(ArrowQuantError, ValueError):
    """An option, scheme name, profile or plan is invalid."""


class QuantizationError(ArrowQuantError, ValueError):
    """A tensor cannot be quantized as asked (NaN/Inf, empty, already quantized...)."""


class ValidationError(ArrowQuantError, ValueError):
    """A quality or integrity check failed."""


class FormatError(ArrowQuantError, ValueError):
    """A file is truncated, corrupted, hostile or of an unknown format version."""


def unknown_name(kind: str, name: str, available: Iterable[str]) -> ConfigurationError:
    """Build the error for a lookup that failed, with a "did you mean" hint.

    >>> str(unknown_name("scheme", "int4-g65-asym", ["int4-g64-asym", "int8-channel-sym"]))
    "unknown scheme 'int4-g65-asym'; did you mean 'int4-g64-asym'? available: int4-g64-asym, int8-channel-sym"
    """
    names = sorted(available)
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ";"
    return ConfigurationError(f"unknown {kind} {name!r}{hint} available: {', '.join(names)}")
