"""Differential fuzzing of the two HTTP/1.1 server codecs (httptools/llhttp and h11).

Hypothesis generates request streams from a grammar that favours what smuggling lives on
(framing headers with odd values, bare CR/LF, chunk sizes and extensions, pipelining), feeds
the same bytes to both codecs in randomly cut pieces, answers each request as the proxy does,
and requires the two to agree: the same requests with the same heads and bodies, up to the
point where both reject. A codec that accepts what the other refuses is exactly the gap a
request-smuggling attack needs. Feeding the bytes whole or in pieces must not matter either.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from meshproxy.codec.events import Data, EndOfMessage, ParseFailure, RequestHead, ResponseHead
from meshproxy.codec.h1 import server_codec
from meshproxy.codec.h1_limits import Limits

EOL = st.sampled_from([b"\r\n"] * 8 + [b"\n", b"\r", b"\r\r\n"])
METHOD = st.sampled_from(
    [
        b"GET",
        b"POST",
        b"PUT",
        b"HEAD",
        b"OPTIONS",
        b"DELETE",
        b"get",
        b"G ET",
        b"CONNECT",
        b"PRI",
        b"FOO",
        b"QUERY",
        b"PROPFIND",
        b"M-SEARCH",
    ]
)
TARGET = st.sampled_from(
    [b"/", b"/a?b=c", b"*", b"http://x/y", b"/%00", b"/a b", b"", b"/\x7f", b"//x", b"/a#f"]
)
VERSION = st.sampled_from(
    [b"HTTP/1.1"] * 6 + [b"HTTP/1.0", b"HTTP/2.0", b"http/1.1", b"HTTP/1.10", b"HTTP/1.1 "]
)
FIELD_VALUES = {
    b"Host": [b"a", b"a:80", b"", b"a b", b"a@b", b"[::1]:8080"],
    b"Content-Length": [
        b"0",
        b"5",
        b"+5",
        b"05",
        b"-1",
        b" 5",
        b"5 ",
        b"5,5",
        b"5, 5",
        b"1e3",
        b"99999999999999999999",
        b"0x5",
        b"",
    ],
    b"Transfer-Encoding": [
        b"chunked",
        b"Chunked",
        b"chunked, identity",
        b"identity",
        b"xchunked",
        b" chunked",
        b"chunked,",
        b"gzip, chunked",
    ],
    b"Connection": [b"close", b"keep-alive", b"upgrade", b"close, upgrade", b"Keep-Alive"],
    b"Expect": [b"100-continue", b"100-Continue", b"nothing"],
    b"Upgrade": [b"websocket", b"h2c"],
}
NAME = st.sampled_from(
    [
        *FIELD_VALUES,
        b"X-A",
        b"Content-Length ",
        b" Host",
        b"X_Under",
        b"Trailer",
        b"TE",
        b"Transfer_Encoding",
        b"X\x00Y",
        b"a b",
    ]
)
TEXT = st.binary(max_size=12).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@st.composite
def field(draw: st.DrawFn) -> bytes:
    name = draw(NAME)
    choices = FIELD_VALUES.get(name.strip())
    value = draw(st.sampled_from(choices)) if choices and draw(st.booleans()) else draw(TEXT)
    sep = draw(st.sampled_from([b": ", b":", b" : ", b":\t"]))
    return name + sep + value


@st.composite
def chunked_body(draw: st.DrawFn) -> bytes:
    out = b""
    for size in draw(st.lists(st.integers(0, 20), max_size=3)):
        ext = draw(st.sampled_from([b"", b";a=b", b";" + b"x" * 40, b" ", b";\x00"]))
        size_text = draw(st.sampled_from([b"%x", b"%X", b"0%x", b"0x%x"])) % size
        out += size_text + ext + draw(EOL) + b"d" * size + draw(EOL)
    trailers = draw(st.sampled_from([b"", b"X-T: 1\r\n", b"Host: evil\r\n"]))
    return out + b"0" + draw(EOL) + trailers + draw(EOL)


@st.composite
def request(draw: st.DrawFn) -> bytes:
    eol = draw(EOL)
    line = draw(METHOD) + b" " + draw(TARGET) + b" " + draw(VERSION) + eol
    fields = [b"Host: a", *draw(st.lists(field(), max_size=5))]
    if draw(st.booleans()):
        fields = fields[1:]  # no Host, sometimes
    head = line + b"".join(f + draw(EOL) for f in fields) + eol
    body = draw(st.one_of(chunked_body(), st.binary(max_size=12), st.just(b"")))
    return head + body


@st.composite
def stream(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    data = b"".join(draw(st.lists(request(), min_size=1, max_size=3)))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=4)))
    return data, cuts


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in pairwise(bounds) if b > a]


def _normal(headers: list[tuple[bytes, bytes]]) -> tuple[tuple[bytes, bytes], ...]:
    """h11 lower-cases Transfer-Encoding's value; it is hop-by-hop (never forwarded as sent)."""
    return tuple((k, v.lower() if k == b"transfer-encoding" else v) for k, v in headers)


def drive(name: str, chunks: list[bytes]) -> list[tuple[Any, ...]]:
    """What a codec made of the chunks, answered as the proxy answers (a 200 per request)."""
    codec = server_codec(name, Limits())
    trace: list[tuple[Any, ...]] = []
    body = b""
    method = b""
    done = False

    def handle(events: list[Any]) -> None:
        nonlocal body, method, done
        for ev in events:
            if done:
                return
            if isinstance(ev, RequestHead):
                method = ev.method
                trace.append(
                    (
                        "head",
                        ev.method,
                        ev.target,
                        _normal(ev.headers),
                        ev.has_body,
                        ev.content_length,
                        ev.keep_alive,
                        ev.upgrade,
                    )
                )
                if ev.upgrade:
                    done = True  # a tunnel from here on: not HTTP any more
            elif isinstance(ev, Data):
                body += ev.data
            elif isinstance(ev, EndOfMessage):
                trace.append(("body", body, tuple(ev.trailers)))
                body = b""
                keep = trace[-2][6] if len(trace) > 1 else True
                codec.send_head(
                    ResponseHead(200, [(b"content-length", b"0")], has_body=False), method, keep
                )
                codec.send_end([])
                codec.data_to_send()
                if not keep:
                    done = True
                    return
                handle(codec.start_next())
            elif isinstance(ev, ParseFailure):
                trace.append(("fail",))
                done = True

    for chunk in chunks:
        if done:
            break
        handle(codec.receive(chunk))
    return trace


def agree(a: list[tuple[Any, ...]], b: list[tuple[Any, ...]]) -> bool:
    """The same events; where one codec stops at a failure, the other fails there too (a
    codec may still be waiting for bytes the other already judged)."""
    if a == b:
        return True
    n = min(len(a), len(b))
    if a[:n] != b[:n]:
        return False
    longer = a if len(a) > len(b) else b
    return longer[n:] == [("fail",)]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream())
@example((b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello", []))
@example((b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n", [3]))
def test_both_codecs_agree_on_every_stream(case: tuple[bytes, list[int]]) -> None:
    data, cuts = case
    fast = drive("httptools", pieces(data, cuts))
    strict = drive("h11", pieces(data, cuts))
    assert agree(fast, strict), (data, fast, strict)
    # Where the bytes are cut does not change what either codec makes of them.
    assert drive("httptools", [data]) == fast
    assert drive("h11", [data]) == strict
