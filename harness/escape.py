"""Escaping for every place the harness writes text that came from outside.

Tensor names, file paths, criteria ``why`` texts, failure messages and every string of a
results.json (which anyone can edit) reach the Markdown report and the GitHub job
summary built from it. Written raw, a tensor named ``"x\\n# Heading ![](http://evil)"``
injected a heading and an external image (issue 10). The rules, one function each:

- ``md_text``: plain text in a paragraph or a table cell. Newlines and other control
  characters become visible escapes (``\\n``), the punctuation that starts inline
  markup anywhere (emphasis, code, links, images, headings, tables, strikethrough) is
  backslash-escaped (CommonMark spec, "Backslash escapes": any ASCII punctuation may be
  escaped), as are block markers at the start (``-``, ``+``, ``1.``) and the ``://`` and
  ``www.`` of GFM's extended autolinks; ``<``/``>``/``&`` become HTML entities so no raw
  HTML survives. Tables split on ``|`` before inline parsing, and a
  backslash-escaped pipe is literal there too (GFM spec, "Tables").
- ``md_code``: text shown as inline code. Inside a code span nothing is markup except
  the closing backtick run, so the fence is one backtick longer than the longest run
  inside; pipes are still escaped (GFM splits table rows first); control characters are
  made visible, so the span stays on one line.
- ``svg_text``: the chart is rendered by Jinja2 with ``autoescape=True`` (XML entities);
  this helper is for text built outside a template.

Every function is total (any ``object`` in, ``str`` out) and cuts its input to
``LIMIT`` characters, so a megabyte-long name cannot bloat the report.
"""

from __future__ import annotations

import html
import re
from typing import Final

LIMIT: Final = 300
"""Most characters of one outside value shown in the report."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f\u0085\u2028\u2029]")
_MD_PUNCT = re.compile(r"([\\`*_{}\[\]()#!|~])")
_AUTOLINK = re.compile(r"(?i)(:)(?=//)|(?<=www)(\.)")  # GFM extended autolinks: http://, www.
_LEADING = re.compile(r"^(\s*)(\d*)([-+=.)])")  # list / setext markers at the start: "- ", "1. "


def _visible(text: str) -> str:
    """Control characters as visible escapes (``\\n``, ``\\x1b``), one line."""
    return _CONTROL.sub(lambda m: m.group(0).encode("unicode_escape").decode("ascii"), text)


def _cut(value: object) -> str:
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= LIMIT else text[:LIMIT] + f"… ({len(text)} characters)"


def md_text(value: object) -> str:
    """Inert Markdown for plain text (paragraphs, table cells).

    >>> print(md_text("x\\n# Heading ![](http://evil)"))
    x\\\\n\\# Heading \\!\\[\\]\\(http\\://evil\\)
    """
    text = _visible(_cut(value)).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = _MD_PUNCT.sub(r"\\\1", text)
    text = _AUTOLINK.sub(lambda m: "\\" + m.group(0), text)
    return _LEADING.sub(lambda m: m.group(1) + m.group(2) + "\\" + m.group(3), text)


def md_code(value: object) -> str:
    """Inert inline code: the fence outgrows any backtick run inside.

    >>> md_code("model.layers.0.weight")
    '`model.layers.0.weight`'
    >>> print(md_code("a`b|c"))
    `` a`b\\|c ``
    """
    text = _visible(_cut(value)).replace("|", "\\|")
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if longest or text.startswith(" ") or text.endswith(" ") or not text else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def svg_text(value: object) -> str:
    """XML-escaped, one-line text for an SVG ``<text>`` element.

    >>> svg_text("<script>")
    '&lt;script&gt;'
    """
    return html.escape(_visible(_cut(value)), quote=True)
