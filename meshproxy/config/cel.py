"""CEL over Istio's attributes, for Telemetry access-log filters and metric label values:
compiled (and type-checked against the declared attributes) with the config, evaluated only
where one is configured.

cel-expr-python is Google's own CEL runtime (C++) for Python: it implements the CEL spec
Istio's proxies evaluate, rejects unknown identifiers at compile time, and evaluates in a few
microseconds. An expression that fails at run time (a header that is not there) is false,
as Envoy's CEL filter treats an error.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import cache
from typing import Any, Final, Protocol

ATTRIBUTES: Final = ("request", "response", "source", "destination", "connection", "upstream")
MAX_EXPRESSION: Final = 4096


@cache
def _environment() -> Any:
    """CEL's environment, built on first use: most configs have no CEL, and importing the
    runtime (with protobuf) would add 17 ms to every proxy's start."""
    from cel_expr_python import cel

    return cel.NewEnv(variables={name: cel.Type.DYN for name in ATTRIBUTES})


class CelError(ValueError):
    pass


class Entry(Protocol):
    """What the attributes are made from (observe.recorder.StreamRecord provides it)."""

    method: str
    path: str
    authority: str
    request_protocol: str
    request_bytes: int
    response_bytes: int
    response_code: int
    response_flags: str
    response_code_details: str
    duration_ms: float
    downstream_remote_address: str
    downstream_local_address: str
    downstream_peer_uri_san: str
    requested_server_name: str
    upstream_host: str
    cluster: str
    request_headers: list[tuple[bytes, bytes]]
    response_headers: list[tuple[bytes, bytes]]
    request_id: bytes  # the x-request-id the proxy gave a request that came without one


def _headers(pairs: list[tuple[bytes, bytes]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in pairs:
        name = k.decode("latin-1")
        value = v.decode("latin-1")
        out[name] = f"{out[name]},{value}" if name in out else value
    return out


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    return (host, int(port)) if sep and port.isdigit() else (text, 0)


def attributes(e: Entry) -> dict[str, Any]:
    """Istio's (Envoy's) attribute vocabulary for one stream."""
    headers = _headers(e.request_headers)
    if e.request_id and "x-request-id" not in headers:
        headers["x-request-id"] = e.request_id.decode("latin-1")  # as Envoy adds it
    source, source_port = _address(e.downstream_remote_address)
    destination, destination_port = _address(e.downstream_local_address)
    return {
        "request": {
            "headers": headers,
            "path": e.path,
            "url_path": e.path.partition("?")[0],
            "host": e.authority,
            "method": e.method,
            "protocol": e.request_protocol,
            "id": headers.get("x-request-id", ""),
            "useragent": headers.get("user-agent", ""),
            "size": e.request_bytes,
            "duration": int(e.duration_ms),
        },
        "response": {
            "code": e.response_code,
            "code_details": e.response_code_details,
            "flags": e.response_flags,
            "size": e.response_bytes,
            "headers": _headers(e.response_headers),
        },
        "source": {"address": source, "port": source_port, "principal": e.downstream_peer_uri_san},
        "destination": {"address": destination, "port": destination_port},
        "connection": {
            "mtls": bool(e.downstream_peer_uri_san),
            "requested_server_name": e.requested_server_name,
        },
        "upstream": {"address": e.upstream_host, "cluster": e.cluster},
    }


def _first_problem(message: str) -> str:
    """CEL's report, one line: `at column C: <problem>` (its caret drawing left out)."""
    for line in message.replace("INVALID_ARGUMENT: ", "").splitlines():
        m = re.match(r"\s*ERROR: <input>:(\d+):(\d+): (.*?)(?: \[INVALID_ARGUMENT\])?$", line)
        if m:
            return f"at column {m.group(2)}: {m.group(3)}"
    return message.splitlines()[0] if message else "invalid expression"


def _compile(expression: str) -> Any:
    if len(expression) > MAX_EXPRESSION:
        raise CelError(f"expression longer than {MAX_EXPRESSION} characters")
    try:
        return _environment().compile(expression)
    except RuntimeError as exc:
        raise CelError(_first_problem(str(exc))) from None


def compile_filter(expression: str) -> Callable[[Entry], bool]:
    """A predicate over a stream; CelError (with CEL's own message) when it is not valid."""
    program = _compile(expression)

    def check(entry: Entry) -> bool:
        try:
            return program.eval(data=attributes(entry)).value() is True
        except RuntimeError:
            return False

    return check


def _label_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "unknown"
    return value if isinstance(value, str) else str(value)


def compile_value(expression: str) -> Callable[[dict[str, Any]], str]:
    """A metric label's value from attributes() (Telemetry tagOverrides UPSERT): the result
    as text, "unknown" when evaluating fails (a header that is not there), as Istio writes."""
    from cel_expr_python import cel

    program = _compile(expression)
    error = cel.Type.ERROR

    def value(data: dict[str, Any]) -> str:
        try:
            result = program.eval(data=data)
        except RuntimeError:
            return "unknown"
        if result.type() == error:  # CEL returns most failures as a value
            return "unknown"
        return _label_text(result.value())

    return value
