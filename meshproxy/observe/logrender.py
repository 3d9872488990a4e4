"""Access-log lines: a compiled format (config/logformat.py) rendered for one stream record.

Compiled with the hot path: every logged request renders here, so each operator is one
branch on its code reading the record's fields, not a call through a getter.
"""

from __future__ import annotations

import json.encoder
import os
import time
from typing import Final

from meshproxy.config.logformat import (
    OP_AUTHORITY,
    OP_BYTES_RECEIVED,
    OP_BYTES_SENT,
    OP_CONNECTION_TERMINATION_DETAILS,
    OP_DOWNSTREAM_LOCAL_ADDRESS,
    OP_DOWNSTREAM_PEER_URI_SAN,
    OP_DOWNSTREAM_REMOTE_ADDRESS,
    OP_DURATION,
    OP_HOSTNAME,
    OP_METHOD,
    OP_PATH,
    OP_PROTOCOL,
    OP_REQUEST_HEADER,
    OP_REQUEST_ID,
    OP_REQUESTED_SERVER_NAME,
    OP_RESPONSE_CODE,
    OP_RESPONSE_CODE_DETAILS,
    OP_RESPONSE_FLAGS,
    OP_RESPONSE_HEADER,
    OP_ROUTE_NAME,
    OP_START_TIME,
    OP_TEMPLATE,
    OP_TRACE_ID,
    OP_UPSTREAM_CLUSTER,
    OP_UPSTREAM_HOST,
    OP_UPSTREAM_LOCAL_ADDRESS,
    OP_UPSTREAM_TRANSPORT_FAILURE_REASON,
    JsonFormat,
    LogFormat,
    Operator,
    TextFormat,
)
from meshproxy.observe.recorder import StreamRecord

_HOSTNAME_VALUE: Final = os.uname().nodename
# What json.dumps(str) calls (ensure_ascii): C code that escapes and quotes in one pass.
_json_string: Final = json.encoder.encode_basestring_ascii

# START_TIME's date and time, formatted once per second rather than per line.
_CLOCK_SECOND: Final[list[int]] = [-1]
_CLOCK_PREFIX: Final[list[str]] = [""]
_MILLIS: Final = tuple(f"{ms:03d}Z" for ms in range(1000))


def _start_time(t: float) -> str:
    second = int(t)
    if second != _CLOCK_SECOND[0]:
        _CLOCK_PREFIX[0] = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
        _CLOCK_SECOND[0] = second
    return _CLOCK_PREFIX[0] + _MILLIS[min(int((t - second) * 1000), 999)]


def _find(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for k, v in headers:
        if k == name:
            return v
    return None


def _decoded(value: bytes | None) -> str | None:
    return value.decode("latin-1") if value else None


def _or_none(text: str) -> str | None:
    return text or None


def operator_value(op: Operator, e: StreamRecord) -> str | int | None:
    """The operator's value: an int for numbers, None when unknown or empty."""
    code = op.code
    if code == OP_REQUEST_HEADER:
        found = _decoded(_find(e.request_headers, op.header))
    elif code == OP_RESPONSE_HEADER:
        found = _decoded(_find(e.response_headers, op.header))
    elif code == OP_METHOD:
        found = _or_none(e.method)
    elif code == OP_PATH:
        found = _or_none(e.path)
    elif code == OP_AUTHORITY:
        found = _or_none(e.authority)
    elif code == OP_REQUEST_ID:
        found = _decoded(_find(e.request_headers, b"x-request-id") or e.request_id)
    elif code == OP_START_TIME:
        return _start_time(e.start_time)
    elif code == OP_RESPONSE_CODE:
        return e.response_code
    elif code == OP_BYTES_RECEIVED:
        return e.request_bytes
    elif code == OP_BYTES_SENT:
        return e.response_bytes
    elif code == OP_DURATION:
        return int(e.duration_ms)
    elif code == OP_RESPONSE_FLAGS:
        return e.response_flags if e.response_flags != "-" else None
    elif code == OP_UPSTREAM_HOST:
        return _or_none(e.upstream_host)
    elif code == OP_UPSTREAM_CLUSTER:
        return _or_none(e.cluster)
    elif code == OP_PROTOCOL:
        return _or_none(e.request_protocol)
    elif code == OP_RESPONSE_CODE_DETAILS:
        return _or_none(e.response_code_details)
    elif code == OP_CONNECTION_TERMINATION_DETAILS:
        return _or_none(e.connection_termination_details)
    elif code == OP_UPSTREAM_TRANSPORT_FAILURE_REASON:
        return _or_none(e.upstream_transport_failure_reason)
    elif code == OP_UPSTREAM_LOCAL_ADDRESS:
        return _or_none(e.upstream_local_address)
    elif code == OP_DOWNSTREAM_LOCAL_ADDRESS:
        return _or_none(e.downstream_local_address)
    elif code == OP_DOWNSTREAM_REMOTE_ADDRESS:
        return _or_none(e.downstream_remote_address)
    elif code == OP_DOWNSTREAM_PEER_URI_SAN:
        return _or_none(e.downstream_peer_uri_san)
    elif code == OP_REQUESTED_SERVER_NAME:
        return _or_none(e.requested_server_name)
    elif code == OP_ROUTE_NAME:
        return _or_none(e.route_name)
    elif code == OP_TRACE_ID:
        return _or_none(e.trace_id)
    elif code == OP_HOSTNAME:
        return _HOSTNAME_VALUE
    else:
        template = op.template
        assert template is not None
        return render_text(template, e)[:-1]
    if found is None and op.fallback is not None:
        return operator_value(op.fallback, e)
    return found


def operator_text(op: Operator, e: StreamRecord) -> str:
    """The value as log text: `-` when empty; control bytes and quotes escaped so one
    request is always one line (CVE-2024-45808 class)."""
    value = operator_value(op, e)
    if value is None:
        return "-"
    if isinstance(value, int):
        out = str(value)
    elif op.safe:
        out = value
    else:
        out = _escaped(value)
    limit = op.limit
    return out[:limit] if limit else out


def operator_json(op: Operator, e: StreamRecord) -> str:
    """The value as a JSON label's value: numbers stay numbers, nothing is null."""
    value = operator_value(op, e)
    if op.code == OP_TEMPLATE:
        return _json_string(value if isinstance(value, str) else "")
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(value)
    return _json_string(value)


def _escaped(text: str) -> str:
    if text.isprintable() and '"' not in text:
        return text
    return text.encode("unicode_escape").decode("ascii").replace('"', '\\"')


def render(fmt: LogFormat, e: StreamRecord) -> str:
    """One log line, newline included."""
    if isinstance(fmt, JsonFormat):
        return render_json(fmt, e)
    return render_text(fmt, e)


def render_text(fmt: TextFormat, e: StreamRecord) -> str:
    return _joined(fmt.literals, fmt.operators, e, False)


def render_json(fmt: JsonFormat, e: StreamRecord) -> str:
    return _joined(fmt.literals, fmt.operators, e, True)


def _joined(
    literals: tuple[str, ...], operators: tuple[Operator, ...], e: StreamRecord, as_json: bool
) -> str:
    """The literals with each operator's value between them (joined: no format parsing)."""
    parts = [literals[0]]
    i = 1
    for op in operators:
        parts.append(operator_json(op, e) if as_json else operator_text(op, e))
        parts.append(literals[i])
        i += 1
    return "".join(parts)
