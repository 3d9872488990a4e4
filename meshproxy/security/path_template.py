"""AuthorizationPolicy path templates (Istio 1.22+): `{*}` is one path segment, `{**}` any
number of them (the last operator only), as Envoy's URI template matcher reads them.

A segment is any run of characters but '/': `*` included, so `/api/*/admin` is matched by a
DENY on `/api/{*}/admin` (CVE-2025-46821: Envoy's matcher left `*` out, and the deny missed).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final

_SEGMENT: Final = "[^/]+"
_SEGMENTS: Final = ".*"


def is_template(pattern: str) -> bool:
    return "{" in pattern or "}" in pattern


def template_problem(pattern: str) -> str | None:
    """Why `pattern` is not a valid path template, or None (Istio's rules)."""
    if not pattern.startswith("/"):
        return "a path template starts with '/'"
    segments = pattern.split("/")[1:]
    for i, segment in enumerate(segments):
        if segment in ("{*}", "{**}"):
            if segment == "{**}" and i != len(segments) - 1:
                return "{**} must be the last operator"
        elif "{" in segment or "}" in segment:
            return f"{segment!r}: an operator is a whole segment, {{*}} or {{**}}"
        elif "*" in segment:
            return "a path template cannot also use the '*' prefix or suffix wildcard"
    return None


def compile_template(pattern: str) -> Callable[[str], bool]:
    """A matcher for a valid template (template_problem(pattern) is None)."""
    parts = []
    for segment in pattern.split("/")[1:]:
        if segment == "{*}":
            parts.append(_SEGMENT)
        elif segment == "{**}":
            parts.append(_SEGMENTS)
        else:
            parts.append(re.escape(segment))
    regex = re.compile("/" + "/".join(parts))
    return lambda path: regex.fullmatch(path) is not None
