"""Envoy's access-log command operators: a format compiled with the config, rendered per stream.

`%START_TIME%`, `%REQ(X?Y):N%`, `%RESP(X)%`, `%RESPONSE_CODE%`, ... as Envoy spells them; a
text format renders to one line, a labels (JSON) format to one object whose single-operator
values keep their type (numbers stay numbers, an absent value is null). What an operator
cannot know renders as `-`, as in Envoy. Values are escaped so one stream is one line.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol


class LogEntry(Protocol):
    """What a format reads (observe.recorder.StreamRecord provides it)."""

    start_time: float
    request_protocol: str
    response_code: int
    response_flags: str
    response_code_details: str
    connection_termination_details: str
    upstream_transport_failure_reason: str
    request_bytes: int
    response_bytes: int
    duration_ms: float
    upstream_host: str
    cluster: str
    upstream_local_address: str
    downstream_local_address: str
    downstream_remote_address: str
    downstream_peer_uri_san: str
    requested_server_name: str
    route_name: str
    trace_id: str
    method: str
    path: str
    authority: str
    request_headers: list[tuple[bytes, bytes]]
    response_headers: list[tuple[bytes, bytes]]


# Istio's default (meshConfig.accessLogEncoding TEXT without a format).
ISTIO_TEXT_FORMAT: Final = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
    "%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% "
    '"%UPSTREAM_TRANSPORT_FAILURE_REASON%" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% '
    '%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" '
    '"%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%" %UPSTREAM_CLUSTER_RAW% '
    "%UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% "
    "%REQUESTED_SERVER_NAME% %ROUTE_NAME%\n"
)

_OPERATOR: Final = re.compile(r"%([A-Z_]+)(?:\(([^)]*)\))?(?::(\d+))?%")
Getter = Callable[[LogEntry], Any]


class FormatError(ValueError):
    """A format naming an operator this proxy does not know, or misusing one."""


_HOSTNAME: Final = os.uname().nodename


# START_TIME's date and time, formatted once per second rather than per line.
_CLOCK_SECOND: Final[list[int]] = [-1]
_CLOCK_PREFIX: Final[list[str]] = [""]
_MILLIS: Final = tuple(f"{ms:03d}Z" for ms in range(1000))


def _start_time(e: LogEntry) -> str:
    t = e.start_time
    second = int(t)
    if second != _CLOCK_SECOND[0]:
        _CLOCK_PREFIX[0] = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
        _CLOCK_SECOND[0] = second
    return _CLOCK_PREFIX[0] + _MILLIS[min(int((t - second) * 1000), 999)]


def _protocol(e: LogEntry) -> str | None:
    return e.request_protocol or None


def _simple(name: str) -> Getter:
    return lambda e: getattr(e, name) or None


SIMPLE: Final[dict[str, Getter]] = {
    "START_TIME": _start_time,
    "PROTOCOL": _protocol,
    "RESPONSE_CODE": lambda e: e.response_code,
    "RESPONSE_FLAGS": lambda e: e.response_flags if e.response_flags != "-" else None,
    "RESPONSE_CODE_DETAILS": _simple("response_code_details"),
    "CONNECTION_TERMINATION_DETAILS": _simple("connection_termination_details"),
    "UPSTREAM_TRANSPORT_FAILURE_REASON": _simple("upstream_transport_failure_reason"),
    "BYTES_RECEIVED": lambda e: e.request_bytes,
    "BYTES_SENT": lambda e: e.response_bytes,
    "DURATION": lambda e: int(e.duration_ms),
    "UPSTREAM_HOST": _simple("upstream_host"),
    "UPSTREAM_CLUSTER": _simple("cluster"),
    "UPSTREAM_CLUSTER_RAW": _simple("cluster"),
    "UPSTREAM_LOCAL_ADDRESS": _simple("upstream_local_address"),
    "DOWNSTREAM_LOCAL_ADDRESS": _simple("downstream_local_address"),
    "DOWNSTREAM_REMOTE_ADDRESS": _simple("downstream_remote_address"),
    "DOWNSTREAM_PEER_URI_SAN": _simple("downstream_peer_uri_san"),
    "REQUESTED_SERVER_NAME": _simple("requested_server_name"),
    "ROUTE_NAME": _simple("route_name"),
    "TRACE_ID": _simple("trace_id"),
    "HOSTNAME": lambda e: _HOSTNAME,
}
NUMERIC: Final = frozenset({"RESPONSE_CODE", "BYTES_RECEIVED", "BYTES_SENT", "DURATION"})


def _header_getter(which: str, arg: str) -> Getter:
    """REQ(X?Y) / RESP(X): a header (first match), with `?` naming a fallback."""
    names = [n.strip().lower() for n in arg.split("?")]
    if not 1 <= len(names) <= 2 or not all(names):
        raise FormatError(f"%{which}({arg})%: give a header name, or two joined by '?'")
    for name in names:
        if not re.fullmatch(r":?[!#$%&'*+\-.^_`|~0-9a-z]+", name):
            raise FormatError(f"%{which}({arg})%: {name!r} is no header name")
        if name.startswith(":") and name not in _PSEUDO_GETTERS:
            raise FormatError(f"%{which}({arg})%: unknown pseudo-header {name!r}")
    response = which == "RESP"
    steps = [
        _PSEUDO_GETTERS[name]
        if not response and name in _PSEUDO_GETTERS
        else _header_value(name.encode("latin-1"), response)
        for name in names
    ]
    if len(steps) == 1:
        return steps[0]
    first, fallback = steps
    return lambda e: first(e) or fallback(e)


_PSEUDO_GETTERS: Final[dict[str, Getter]] = {
    ":method": lambda e: e.method or None,
    ":path": lambda e: e.path or None,
    ":authority": lambda e: e.authority or None,
}


def _header_value(name: bytes, response: bool) -> Getter:
    """A request or response header's first value, decoded (None when absent or empty)."""
    if response:
        return lambda e: _decoded(_find(e.response_headers, name))
    return lambda e: _decoded(_find(e.request_headers, name))


def _decoded(value: bytes | None) -> str | None:
    return value.decode("latin-1") if value else None


def _find(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for k, v in headers:
        if k == name:
            return v
    return None


def _operator(match: re.Match[str]) -> tuple[str, Getter, int | None]:
    name, arg, limit = match.group(1), match.group(2), match.group(3)
    if name in ("REQ", "RESP"):
        if arg is None:
            raise FormatError(f"%{name}%: needs a header, as %{name}(X-HEADER)%")
        getter = _header_getter(name, arg)
    elif name in SIMPLE:
        if arg is not None:
            raise FormatError(f"%{name}%: takes no argument")
        getter = SIMPLE[name]
    else:
        known = ", ".join(sorted([*SIMPLE, "REQ(X)", "RESP(X)"]))
        raise FormatError(f"unknown command operator %{name}% (known: {known})")
    return name, getter, int(limit) if limit else None


def _text(value: Any) -> str:
    """An operator's value as log text: `-` when empty; control bytes and quotes escaped so
    one request is always one line (CVE-2024-45808 class)."""
    if value is None or value == "":
        return "-"
    text = value if type(value) is str else str(value)
    if text.isprintable() and '"' not in text:
        return text
    return text.encode("unicode_escape").decode("ascii").replace('"', '\\"')


@dataclass(frozen=True, slots=True)
class TextFormat:
    """The literals and operators as one %-template: a line is one `template % values`."""

    template: str
    getters: tuple[Getter, ...]
    limits: tuple[int | None, ...]

    def render(self, entry: LogEntry) -> str:
        if not any(self.limits):
            return self.template % tuple([_text(g(entry)) for g in self.getters])
        values = []
        for getter, limit in zip(self.getters, self.limits, strict=True):
            text = _text(getter(entry))
            values.append(text[:limit] if limit else text)
        return self.template % tuple(values)


def compile_text(fmt: str) -> TextFormat:
    pieces: list[str] = []
    getters: list[Getter] = []
    limits: list[int | None] = []
    pos = 0
    for m in _OPERATOR.finditer(fmt):
        pieces.append(fmt[pos : m.start()].replace("%", "%%"))
        _, getter, limit = _operator(m)
        pieces.append("%s")
        getters.append(getter)
        limits.append(limit)
        pos = m.end()
    rest = fmt[pos:]
    if "%" in rest.replace("%%", ""):
        raise FormatError(f"unterminated or malformed command operator near {rest[:40]!r}")
    pieces.append(rest.replace("%", "%%"))
    template = "".join(pieces)
    if not template.endswith("\n"):
        template += "\n"
    return TextFormat(template, tuple(getters), tuple(limits))


def _json_string(text: str) -> str:
    """`text` as a JSON string, as json.dumps(ensure_ascii=True) writes it; plain printable
    ASCII (nearly every value) without a call into the json module."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return '"' + text + '"'
    return json.dumps(text)


def _json_value(value: Any) -> str:
    if value is None:
        return "null"
    if type(value) is int:
        return str(value)
    return _json_string(value if type(value) is str else str(value))


@dataclass(frozen=True, slots=True)
class JsonFormat:
    """Envoy's json_format: each label's value a template; one operator alone keeps its type.
    The object is written as a %-template of its encoded keys (what json.dumps with compact
    separators writes), so a line costs its values' encoding, not a dict and an encoder."""

    template: str  # '{"key":%s,...}\n'
    values: tuple[tuple[bool, TextFormat | Getter], ...]  # (a text template?, what renders)

    def render(self, entry: LogEntry) -> str:
        parts: list[str] = []
        for is_text, value in self.values:
            if is_text:
                parts.append(_json_string(value.render(entry)[:-1]))  # type: ignore[union-attr]
            else:
                parts.append(_json_value(value(entry)))  # type: ignore[operator]
        return self.template % tuple(parts)


def compile_labels(labels: tuple[tuple[str, str], ...]) -> JsonFormat:
    keys: list[str] = []
    values: list[tuple[bool, TextFormat | Getter]] = []
    for key, template in labels:
        keys.append(json.dumps(key).replace("%", "%%") + ":%s")
        whole = _OPERATOR.fullmatch(template)
        if whole is not None:
            name, getter, limit = _operator(whole)
            if limit is None:
                values.append((False, _typed(name, getter)))
                continue
        values.append((True, compile_text(template)))
    return JsonFormat("{" + ",".join(keys) + "}\n", tuple(values))


def _typed(name: str, getter: Getter) -> Getter:
    if name in NUMERIC:
        return getter
    return lambda e: None if (v := getter(e)) in (None, "") else str(v)


LogFormat = TextFormat | JsonFormat
