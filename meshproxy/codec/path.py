"""Request path normalization, as Envoy's normalize_path + merge_slashes (Istio's
pathNormalization), so that what authorization matches is what the application receives.

An encoded or dotted path must not slip past a DENY on its plain form: `/admin/../x`,
`/%61dmin`, `//admin` and `/public/%2e%2e/admin` all become what they mean. Escaped slashes
(%2F, %5C) are ambiguous (the app may or may not decode them): rejected unless the mode
decodes them.
"""

from __future__ import annotations

import enum
import re
from typing import Final

from meshproxy.errors import ProtocolError, ProtocolSide


class PathNormalization(enum.Enum):
    NONE = "NONE"
    BASE = "BASE"  # RFC 3986 dot segments, percent-decoding of unreserved characters
    MERGE_SLASHES = "MERGE_SLASHES"  # BASE, and // → /
    DECODE_AND_MERGE_SLASHES = "DECODE_AND_MERGE_SLASHES"  # and %2F %5C decoded to / \


_PERCENT: Final = ord("%")
_BACKSLASH: Final = ord("\\")
_HASH: Final = ord("#")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PCT = re.compile(rb"%([0-9A-Fa-f]{2})")
_ESCAPED_SLASH = re.compile(rb"%(2[Ff]|5[Cc])")


def _decode_unreserved(m: re.Match[bytes]) -> bytes:
    value = int(m.group(1), 16)
    if value in _UNRESERVED:
        return bytes([value])
    return b"%" + m.group(1).upper()  # canonical form of what stays encoded


def _remove_dot_segments(path: bytes) -> bytes:
    out: list[bytes] = []
    segments = path.split(b"/")
    for i, seg in enumerate(segments[1:], 1):
        last = i == len(segments) - 1
        if seg == b".":
            if last:
                out.append(b"")
            continue
        if seg == b"..":
            if out:
                out.pop()
            if last:
                out.append(b"")
            continue
        out.append(seg)
    return b"/" + b"/".join(out)


def normalize_target(target: bytes, mode: PathNormalization) -> bytes:
    """The request target with its path normalized (the query is left as it is).

    A fragment ('#...': clients must not send one, some do) is stripped first, in every
    mode, as Envoy does: otherwise `/admin#x` would miss a rule on `/admin` and still reach
    the app as `/admin` (CVE-2021-32779).
    Raises ProtocolError (400) for escaped slashes when the mode does not decode them.
    Fast path: a target with no '%', '\\', '/.' or '//' (anywhere: one in the query only
    costs the exact check below) is returned as given.
    """
    if _HASH in target:
        target = target[: target.index(_HASH)]
    if mode is PathNormalization.NONE:
        return target
    if (
        _PERCENT not in target  # an int: `b"%" in` costs ~10x more (a buffer per check)
        and _BACKSLASH not in target
        and target.find(b"/.") < 0
        and target.find(b"//") < 0
    ):
        return target
    path, sep, query = target.partition(b"?")
    if _ESCAPED_SLASH.search(path):
        if mode is not PathNormalization.DECODE_AND_MERGE_SLASHES:
            raise ProtocolError("escaped slash in path", ProtocolSide.DOWNSTREAM, 400)
        path = _ESCAPED_SLASH.sub(lambda m: b"/" if m.group(1) in (b"2F", b"2f") else b"\\", path)
    path = path.replace(b"\\", b"/")  # Envoy treats backslash as a separator too
    path = _PCT.sub(_decode_unreserved, path)
    if mode is not PathNormalization.BASE:
        while b"//" in path:
            path = path.replace(b"//", b"/")
    path = _remove_dot_segments(path)
    return path + sep + query
