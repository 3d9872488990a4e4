"""Envoy's access-log command operators, compiled with the config (observe/logrender.py
renders them per stream).

`%START_TIME%`, `%REQ(X?Y):N%`, `%RESP(X)%`, `%RESPONSE_CODE%`, ... as Envoy spells them; a
text format renders to one line, a labels (JSON) format to one object whose single-operator
values keep their type (numbers stay numbers, an absent value is null). What an operator
cannot know renders as `-`, as in Envoy. A mistake is a FormatError naming the operator.
"""

from __future__ import annotations

import json
import re
from typing import Final

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


class FormatError(ValueError):
    """A format naming an operator this proxy does not know, or misusing one."""


# What a record carries only when some log reads it (report.py fills these on demand):
NEEDS_REQUEST_LINE: Final = 1  # method, path, authority, decoded from the request head
NEEDS_ADDRESSES: Final = 2  # the downstream connection's addresses
NEEDS_TRACE_ID: Final = 4  # the trace id in hex
NEEDS_REQUEST_ID: Final = 8  # x-request-id, drawn for a request answered before it had one
NEEDS_ALL: Final = 15

# Operator codes: value() is one branch per code, reading the record's fields directly.
OP_START_TIME: Final = 0
OP_PROTOCOL: Final = 1
OP_RESPONSE_CODE: Final = 2
OP_RESPONSE_FLAGS: Final = 3
OP_RESPONSE_CODE_DETAILS: Final = 4
OP_CONNECTION_TERMINATION_DETAILS: Final = 5
OP_UPSTREAM_TRANSPORT_FAILURE_REASON: Final = 6
OP_BYTES_RECEIVED: Final = 7
OP_BYTES_SENT: Final = 8
OP_DURATION: Final = 9
OP_UPSTREAM_HOST: Final = 10
OP_UPSTREAM_CLUSTER: Final = 11
OP_UPSTREAM_LOCAL_ADDRESS: Final = 12
OP_DOWNSTREAM_LOCAL_ADDRESS: Final = 13
OP_DOWNSTREAM_REMOTE_ADDRESS: Final = 14
OP_DOWNSTREAM_PEER_URI_SAN: Final = 15
OP_REQUESTED_SERVER_NAME: Final = 16
OP_ROUTE_NAME: Final = 17
OP_TRACE_ID: Final = 18
OP_HOSTNAME: Final = 19
OP_METHOD: Final = 20
OP_PATH: Final = 21
OP_AUTHORITY: Final = 22
OP_REQUEST_HEADER: Final = 23
OP_RESPONSE_HEADER: Final = 24
OP_REQUEST_ID: Final = 25  # REQ(X-REQUEST-ID): the header, else the id the proxy gave
OP_TEMPLATE: Final = 26  # a JSON label's text template with literals (always a string)

# Operators without an argument: (code, what the record must carry, safe). A safe value is
# one the proxy writes itself (numbers, flags, kernel addresses, hex): never escaped.
SIMPLE: Final[dict[str, tuple[int, int, bool]]] = {
    "START_TIME": (OP_START_TIME, 0, True),
    "PROTOCOL": (OP_PROTOCOL, 0, True),
    "RESPONSE_CODE": (OP_RESPONSE_CODE, 0, True),
    "RESPONSE_FLAGS": (OP_RESPONSE_FLAGS, 0, True),
    "RESPONSE_CODE_DETAILS": (OP_RESPONSE_CODE_DETAILS, 0, True),
    "CONNECTION_TERMINATION_DETAILS": (OP_CONNECTION_TERMINATION_DETAILS, 0, False),
    "UPSTREAM_TRANSPORT_FAILURE_REASON": (OP_UPSTREAM_TRANSPORT_FAILURE_REASON, 0, False),
    "BYTES_RECEIVED": (OP_BYTES_RECEIVED, 0, True),
    "BYTES_SENT": (OP_BYTES_SENT, 0, True),
    "DURATION": (OP_DURATION, 0, True),
    "UPSTREAM_HOST": (OP_UPSTREAM_HOST, 0, False),
    "UPSTREAM_CLUSTER": (OP_UPSTREAM_CLUSTER, 0, False),
    "UPSTREAM_CLUSTER_RAW": (OP_UPSTREAM_CLUSTER, 0, False),
    "UPSTREAM_LOCAL_ADDRESS": (OP_UPSTREAM_LOCAL_ADDRESS, 0, True),
    "DOWNSTREAM_LOCAL_ADDRESS": (OP_DOWNSTREAM_LOCAL_ADDRESS, NEEDS_ADDRESSES, True),
    "DOWNSTREAM_REMOTE_ADDRESS": (OP_DOWNSTREAM_REMOTE_ADDRESS, NEEDS_ADDRESSES, True),
    "DOWNSTREAM_PEER_URI_SAN": (OP_DOWNSTREAM_PEER_URI_SAN, 0, False),
    "REQUESTED_SERVER_NAME": (OP_REQUESTED_SERVER_NAME, 0, False),
    "ROUTE_NAME": (OP_ROUTE_NAME, 0, False),
    "TRACE_ID": (OP_TRACE_ID, NEEDS_TRACE_ID, True),
    "HOSTNAME": (OP_HOSTNAME, 0, False),
}
_PSEUDO: Final = {":method": OP_METHOD, ":path": OP_PATH, ":authority": OP_AUTHORITY}


class Operator:
    """One command operator, compiled: what it reads (a code, and a header name for REQ and
    RESP), its `?` fallback, its `:N` length limit, and whether its text can need escaping."""

    def __init__(
        self,
        code: int,
        needs: int = 0,
        safe: bool = False,
        header: bytes = b"",
        fallback: Operator | None = None,
        limit: int = 0,
        template: TextFormat | None = None,
    ) -> None:
        self.code = code
        self.needs: int = needs | (fallback.needs if fallback is not None else 0)
        self.safe = safe
        self.header = header
        self.fallback = fallback
        self.limit = limit
        self.template = template


def _header_operator(which: str, arg: str, limit: int) -> Operator:
    """REQ(X?Y) / RESP(X): a header (first match), with `?` naming a fallback."""
    names = [n.strip().lower() for n in arg.split("?")]
    if not 1 <= len(names) <= 2 or not all(names):
        raise FormatError(f"%{which}({arg})%: give a header name, or two joined by '?'")
    for name in names:
        if not re.fullmatch(r":?[!#$%&'*+\-.^_`|~0-9a-z]+", name):
            raise FormatError(f"%{which}({arg})%: {name!r} is no header name")
        if name.startswith(":") and name not in _PSEUDO:
            raise FormatError(f"%{which}({arg})%: unknown pseudo-header {name!r}")
    operator: Operator | None = None
    for name in reversed(names):  # the fallback is built first: the first name holds it
        if which == "RESP":
            code, needs = OP_RESPONSE_HEADER, 0
        elif name in _PSEUDO:
            code, needs = _PSEUDO[name], NEEDS_REQUEST_LINE
        elif name == "x-request-id":
            code, needs = OP_REQUEST_ID, NEEDS_REQUEST_ID
        else:
            code, needs = OP_REQUEST_HEADER, 0
        operator = Operator(code, needs, False, name.encode("latin-1"), operator, limit)
    assert operator is not None
    return operator


def _operator(match: re.Match[str]) -> tuple[str, Operator]:
    name, arg, limit_text = match.group(1), match.group(2), match.group(3)
    limit = int(limit_text) if limit_text else 0
    if name in ("REQ", "RESP"):
        if arg is None:
            raise FormatError(f"%{name}%: needs a header, as %{name}(X-HEADER)%")
        return name, _header_operator(name, arg, limit)
    if name in SIMPLE:
        if arg is not None:
            raise FormatError(f"%{name}%: takes no argument")
        code, needs, safe = SIMPLE[name]
        return name, Operator(code, needs, safe, limit=limit)
    known = ", ".join(sorted([*SIMPLE, "REQ(X)", "RESP(X)"]))
    raise FormatError(f"unknown command operator %{name}% (known: {known})")


class TextFormat:
    """Literal text around operators: a line is literals[0], then each operator's value
    followed by the next literal (the last ends the line)."""

    def __init__(self, literals: tuple[str, ...], operators: tuple[Operator, ...]) -> None:
        assert len(literals) == len(operators) + 1
        self.literals = literals
        self.operators = operators
        self.needs = 0
        for op in operators:
            self.needs |= op.needs


def compile_text(fmt: str) -> TextFormat:
    literals: list[str] = []
    operators: list[Operator] = []
    pos = 0
    for m in _OPERATOR.finditer(fmt):
        literals.append(fmt[pos : m.start()])
        operators.append(_operator(m)[1])
        pos = m.end()
    rest = fmt[pos:]
    if "%" in rest.replace("%%", ""):
        raise FormatError(f"unterminated or malformed command operator near {rest[:40]!r}")
    if not rest.endswith("\n"):
        rest += "\n"
    literals.append(rest)
    return TextFormat(tuple(literals), tuple(operators))


class JsonFormat:
    """Envoy's json_format: each label's value a template; one operator alone keeps its type.
    The object is written as its encoded keys (what json.dumps with compact separators writes)
    joined with the values, so a line costs its values' encoding, not a dict and an encoder."""

    def __init__(self, literals: tuple[str, ...], operators: tuple[Operator, ...]) -> None:
        assert len(literals) == len(operators) + 1
        self.literals = literals  # '{"key":', ',"key":', ..., '}\n'
        self.operators = operators
        self.needs = 0
        for op in operators:
            self.needs |= op.needs


def compile_labels(labels: tuple[tuple[str, str], ...]) -> JsonFormat:
    literals: list[str] = []
    operators: list[Operator] = []
    for key, template in labels:
        literals.append(("," if literals else "{") + json.dumps(key) + ":")
        whole = _OPERATOR.fullmatch(template)
        if whole is not None and not whole.group(3):  # one operator, no length limit
            operators.append(_operator(whole)[1])
            continue
        text = compile_text(template)
        operators.append(Operator(OP_TEMPLATE, text.needs, template=text))
    literals.append("}\n" if literals else "{}\n")
    return JsonFormat(tuple(literals), tuple(operators))


LogFormat = TextFormat | JsonFormat
