"""The JSON access-log format writes what json.dumps would write for the same object, for any
value (differential, with hypothesis), and text formats escape so one stream is one line."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from meshproxy.config.logformat import (
    NEEDS_ADDRESSES,
    NEEDS_REQUEST_ID,
    NEEDS_REQUEST_LINE,
    NEEDS_TRACE_ID,
    compile_labels,
    compile_text,
)
from meshproxy.observe.logrender import render
from meshproxy.observe.recorder import StreamRecord

LABELS = (
    ("method", "%REQ(:METHOD)%"),
    ("path", "%REQ(:PATH)%"),
    ("code", "%RESPONSE_CODE%"),
    ("bytes", "%BYTES_SENT%"),
    ("flags", "%RESPONSE_FLAGS%"),
    ("agent", "%REQ(USER-AGENT)%"),
    ("summary", "%REQ(:METHOD)% %REQ(:PATH)% -> %UPSTREAM_HOST%"),
    ('we"ird%key', "%UPSTREAM_HOST%"),
)
FORMAT = compile_labels(LABELS)
TEXT = {key: compile_text(template) for key, template in LABELS}


def record(path: str, agent: bytes, host: str, code: int, flags: str) -> StreamRecord:
    r = StreamRecord("source", "svc", code, flags, 1.0, 0, code * 3)
    r.method, r.path, r.upstream_host = "GET", path, host
    r.request_headers = [(b"user-agent", agent)] if agent else []
    return r


def expected(r: StreamRecord) -> str:
    """The object built field by field and encoded by json.dumps, as Envoy's json_format."""
    obj = {
        "method": r.method,
        "path": r.path or None,
        "code": r.response_code,
        "bytes": r.response_bytes,
        "flags": None if r.response_flags == "-" else r.response_flags,
        "agent": dict(r.request_headers).get(b"user-agent", b"").decode("latin-1") or None,
        "summary": render(TEXT["summary"], r)[:-1],
        'we"ird%key': r.upstream_host or None,
    }
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True) + "\n"


@settings(max_examples=400, deadline=None)
@given(
    path=st.text(max_size=40),
    agent=st.binary(max_size=20),
    host=st.text(max_size=20),
    code=st.integers(0, 599),
    flags=st.sampled_from(["-", "UF,URX", "NR"]),
)
def test_json_lines_equal_json_dumps(
    path: str, agent: bytes, host: str, code: int, flags: str
) -> None:
    r = record(path, agent, host, code, flags)
    line = render(FORMAT, r)
    assert line == expected(r)
    assert line.count("\n") == 1 and json.loads(line)["code"] == code


def test_a_plain_line() -> None:
    r = record("/a?b=1", b"curl/8", "10.0.0.1:80", 200, "-")
    assert render(FORMAT, r) == (
        '{"method":"GET","path":"/a?b=1","code":200,"bytes":600,"flags":null,'
        '"agent":"curl/8","summary":"GET /a?b=1 -> 10.0.0.1:80","we\\"ird%key":"10.0.0.1:80"}\n'
    )


def test_the_request_id_the_proxy_gave_when_the_client_sent_none() -> None:
    fmt = compile_text("%REQ(X-REQUEST-ID)%")
    r = record("/", b"", "", 200, "-")
    r.request_id = b"given-by-the-proxy"
    assert render(fmt, r) == "given-by-the-proxy\n"
    r.request_headers = [(b"x-request-id", b"the-clients")]
    assert render(fmt, r) == "the-clients\n"


def test_a_format_names_the_costly_fields_it_reads() -> None:
    """report.py fills the request line, addresses and trace id only for formats that read
    them: a format must name each one it reads, fallbacks and JSON templates included."""
    assert compile_text("%RESPONSE_CODE% %REQ(USER-AGENT)% %UPSTREAM_HOST%").needs == 0
    assert compile_text("%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%").needs == NEEDS_REQUEST_LINE
    labels = compile_labels(
        (("a", "%REQ(:METHOD)%"), ("b", "%TRACE_ID% %DOWNSTREAM_LOCAL_ADDRESS%"))
    )
    assert labels.needs == NEEDS_REQUEST_LINE | NEEDS_TRACE_ID | NEEDS_ADDRESSES
    # x-request-id, by name or as a fallback: a request answered before it was forwarded
    # has none yet, and one is drawn only for a format that logs it
    assert compile_text("%REQ(X-REQUEST-ID)%").needs == NEEDS_REQUEST_ID
    assert compile_text("%REQ(X-B3-TRACEID?X-REQUEST-ID)%").needs == NEEDS_REQUEST_ID
