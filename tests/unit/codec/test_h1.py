"""Both HTTP/1.1 codecs pass the same suite: framing, smuggling, limits, serialization."""

from __future__ import annotations

import pytest

from meshproxy.codec.events import Data, EndOfMessage, ParseFailure, RequestHead, ResponseHead
from meshproxy.codec.h1 import client_codec, server_codec
from meshproxy.codec.h1_limits import Limits
from meshproxy.errors import ProtocolError

CODECS = ["httptools", "h11"]


def parse(codec: str, data: bytes, limits: Limits | None = None) -> list[object]:
    return list(server_codec(codec, limits or Limits()).receive(data))


def failure_status(events: list[object]) -> int | None:
    for e in events:
        if isinstance(e, ParseFailure):
            assert isinstance(e.error, ProtocolError)
            return e.error.status
    return None


SMUGGLING = {
    "cl-te": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked"
    b"\r\n\r\n0\r\n\r\nG",
    "te-cl": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3"
    b"\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n",
    "dup-cl": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 10\r\n\r\n"
    b"helloworld",
    "cl-plus": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello",
    "cl-underscore": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1_0\r\n\r\n0123456789",
    "te-xchunked": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n",
    "te-list": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
    "bare-lf": b"GET / HTTP/1.1\nHost: a\n\n",
    "bare-cr": b"GET / HTTP/1.1\r\nHost: a\r\nVisible: x\rSmuggled: y\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\r\n b\r\n\r\n",
    "space-before-colon": b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length : 0\r\n\r\n",
    "nul-in-value": b"GET / HTTP/1.1\r\nHost: a\r\nV: x\x00y\r\n\r\n",
    "ctl-in-value": b"GET / HTTP/1.1\r\nHost: a\r\nV: x\x01y\r\n\r\n",
    "bad-name": b"GET / HTTP/1.1\r\nHost: a\r\na b: c\r\n\r\n",
    "lower-method": b"get / HTTP/1.1\r\nHost: a\r\n\r\n",
    "no-host": b"GET / HTTP/1.1\r\n\r\n",
    "two-hosts": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "absolute-form": b"GET http://admin/x HTTP/1.1\r\nHost: a\r\n\r\n",
    "host-userinfo": b"GET / HTTP/1.1\r\nHost: a@evil\r\n\r\n",
}


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("case", sorted(SMUGGLING))
def test_ambiguous_or_invalid_requests_are_rejected_before_any_head(codec: str, case: str) -> None:
    events = parse(codec, SMUGGLING[case])
    assert failure_status(events) in (400, 501)
    assert not any(isinstance(e, RequestHead) for e in events), "nothing may be forwarded"


CHUNK_ERRORS = {
    "hex-prefix": b"0x5\r\nhello\r\n0\r\n\r\n",
    "bare-lf-size": b"5\nhello\r\n0\r\n\r\n",
    "garbage-after-data": b"5\r\nhelloXX0\r\n\r\n",
    "negative": b"-1\r\n",
}


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("case", sorted(CHUNK_ERRORS))
def test_malformed_chunks_fail_without_completing_the_message(codec: str, case: str) -> None:
    head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    events = parse(codec, head + CHUNK_ERRORS[case])
    assert failure_status(events) == 400
    assert not any(isinstance(e, EndOfMessage) for e in events)


@pytest.mark.parametrize("codec", CODECS)
def test_http10_is_refused_like_envoy(codec: str) -> None:
    assert failure_status(parse(codec, b"GET / HTTP/1.0\r\nHost: a\r\n\r\n")) == 426


@pytest.mark.parametrize("codec", CODECS)
def test_header_limits_give_431(codec: str) -> None:
    many = b"".join(b"x-%d: v\r\n" % i for i in range(101))
    assert failure_status(parse(codec, b"GET / HTTP/1.1\r\nHost: a\r\n" + many + b"\r\n")) == 431
    big = b"GET / HTTP/1.1\r\nHost: a\r\nx-big: " + b"a" * (61 * 1024) + b"\r\n\r\n"
    assert failure_status(parse(codec, big)) == 431


@pytest.mark.parametrize("codec", CODECS)
def test_unterminated_huge_header_is_cut_off(codec: str) -> None:
    c = server_codec(codec, Limits(max_header_bytes=4096))
    events = []
    events += c.receive(b"GET / HTTP/1.1\r\nHost: a\r\nx-endless: ")
    for _ in range(10):
        events += c.receive(b"a" * 1024)
    assert failure_status(events) == 431


@pytest.mark.parametrize("codec", CODECS)
def test_chunked_body_and_pipelining(codec: str) -> None:
    c = server_codec(codec, Limits())
    data = (
        b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    events = c.receive(data)
    head = events[0]
    assert isinstance(head, RequestHead)
    assert head.has_body and head.content_length is None and head.target == b"/up"
    body = b"".join(e.data for e in events if isinstance(e, Data))
    assert body == b"hello world"
    c.send_head(
        ResponseHead(200, [(b"content-length", b"0")], content_length=0, has_body=False),
        b"POST",
        True,
    )
    c.send_end([])
    assert c.data_to_send().startswith(b"HTTP/1.1 200 OK\r\n")
    events += c.start_next()
    heads = [e.target for e in events if isinstance(e, RequestHead)]
    assert heads == [b"/up", b"/next"]


@pytest.mark.parametrize("codec", CODECS)
def test_expect_continue_is_flagged(codec: str) -> None:
    events = parse(
        codec, b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
    )
    head = events[0]
    assert isinstance(head, RequestHead) and head.expect_continue


@pytest.mark.parametrize("codec", CODECS)
def test_response_serialization_chunked_and_close(codec: str) -> None:
    c = server_codec(codec, Limits())
    c.receive(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    c.send_head(ResponseHead(200, [(b"x-a", b"1")], has_body=True), b"GET", keep_alive=False)
    c.send_data(b"abc")
    c.send_end([])
    out = c.data_to_send().lower()
    assert b"transfer-encoding: chunked\r\n" in out and b"connection: close\r\n" in out
    assert out.endswith(b"3\r\nabc\r\n0\r\n\r\n")


@pytest.mark.parametrize("codec", CODECS)
def test_client_parses_responses_head_and_close_delimited(codec: str) -> None:
    c = client_codec(codec, Limits())
    c.send_head(RequestHead(b"HEAD", b"/", [(b"host", b"a")]))
    c.send_end([])
    assert c.data_to_send().startswith(b"HEAD / HTTP/1.1\r\n")
    events = c.receive(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    assert isinstance(events[0], ResponseHead) and not events[0].has_body
    assert isinstance(events[-1], EndOfMessage)

    c = client_codec(codec, Limits())
    c.send_head(RequestHead(b"GET", b"/", [(b"host", b"a")]))
    c.send_end([])
    c.data_to_send()
    events = c.receive(b"HTTP/1.1 200 OK\r\n\r\npart1")
    assert isinstance(events[0], ResponseHead) and not events[0].keep_alive
    events += c.receive(b"part2")
    events += c.receive_eof()
    assert b"".join(e.data for e in events if isinstance(e, Data)) == b"part1part2"
    assert isinstance(events[-1], EndOfMessage)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"\x00\x01garbage\r\n\r\n",
    ],
)
def test_client_rejects_malformed_responses(codec: str, response: bytes) -> None:
    c = client_codec(codec, Limits())
    c.send_head(RequestHead(b"GET", b"/", [(b"host", b"a")]))
    c.send_end([])
    events = c.receive(response)
    assert any(isinstance(e, ParseFailure) for e in events)
    assert not any(isinstance(e, ResponseHead) for e in events)


@pytest.mark.parametrize("codec", CODECS)
def test_client_request_framing(codec: str) -> None:
    c = client_codec(codec, Limits())
    c.send_head(RequestHead(b"POST", b"/x", [(b"host", b"a")], has_body=True))
    c.send_data(b"abc")
    c.send_end([])
    out = c.data_to_send().lower()
    assert b"transfer-encoding: chunked" in out and out.endswith(b"3\r\nabc\r\n0\r\n\r\n")


@pytest.mark.parametrize("codec", CODECS)
def test_h2c_upgrade_request_is_served_as_plain_http(codec: str) -> None:
    """Only WebSocket tunnels: other Upgrades are hop-by-hop, the request is ordinary."""
    c = server_codec(codec, Limits())
    events = c.receive(
        b"GET /h HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
        b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    assert not any(isinstance(e, ParseFailure) for e in events)
    assert not any(e.upgrade for e in events if isinstance(e, RequestHead))
    c.send_head(
        ResponseHead(200, [(b"content-length", b"0")], content_length=0, has_body=False),
        b"GET",
        True,
    )
    c.send_end([])
    assert c.data_to_send().startswith(b"HTTP/1.1 200")
    events += c.start_next()
    assert [e.target for e in events if isinstance(e, RequestHead)] == [b"/h", b"/next"]


@pytest.mark.parametrize("codec", CODECS)
def test_websocket_upgrade_stops_parsing_and_keeps_the_rest_as_tunnel_bytes(codec: str) -> None:
    """What follows a WebSocket upgrade's head is never parsed as a request (smuggling)."""
    c = server_codec(codec, Limits())
    events = c.receive(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\n\r\nGET /blockedz HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    assert len(events) == 1  # the head only: no EndOfMessage, no second request
    head = events[0]
    assert isinstance(head, RequestHead) and head.upgrade and head.target == b"/ws"
    assert c.take_upgrade_bytes() == b"GET /blockedz HTTP/1.1\r\nHost: a\r\n\r\n"
    assert c.receive(b"more") == []


def receive_all(codec: str, reads: list[bytes]) -> list[object]:
    c = server_codec(codec, Limits())
    out: list[object] = []
    for data in reads:
        out += c.receive(data)
    return out


CHUNKED_HEAD = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("split", [False, True], ids=["one-read", "8k-reads"])
def test_chunk_extensions_are_capped_per_message(codec: str, split: bool) -> None:
    body = b"5;" + b"a" * (256 * 1024) + b"\r\nhello\r\n0\r\n\r\n"
    data = CHUNKED_HEAD + body
    reads = [data[i : i + 8192] for i in range(0, len(data), 8192)] if split else [data]
    events = receive_all(codec, reads)
    assert failure_status(events) == 400
    # Nothing of the offending message beyond (at most) its head goes onward.
    assert not [e for e in events if isinstance(e, Data | EndOfMessage)]


@pytest.mark.parametrize("codec", CODECS)
def test_many_small_chunk_extensions_add_up_to_the_cap(codec: str) -> None:
    chunk = b"1;" + b"e" * 100 + b"\r\nx\r\n"
    events = receive_all(codec, [CHUNKED_HEAD + chunk * 300 + b"0\r\n\r\n"])
    assert failure_status(events) == 400


@pytest.mark.parametrize("codec", CODECS)
def test_modest_chunk_extensions_and_tiny_chunks_pass(codec: str) -> None:
    body = b"5;" + b"a" * 8192 + b"\r\nhello\r\n"
    body += b"".join(b"1;a=b\r\nx\r\n" for _ in range(20_000)) + b"0\r\nx-t: 1\r\n\r\n"
    events = receive_all(codec, [CHUNKED_HEAD + body])
    assert failure_status(events) is None
    assert b"".join(e.data for e in events if isinstance(e, Data)) == b"hello" + b"x" * 20_000
    assert isinstance(events[-1], EndOfMessage)


@pytest.mark.parametrize("codec", CODECS)
def test_trailers_never_join_the_request_head(codec: str) -> None:
    """Catalog B08: head and trailers in one read; the trailers must not become headers."""
    events = receive_all(codec, [CHUNKED_HEAD + b"5\r\nhello\r\n0\r\nHost: evil\r\nX-T: 1\r\n\r\n"])
    (head,) = [e for e in events if isinstance(e, RequestHead)]
    assert head.headers == [(b"host", b"a"), (b"transfer-encoding", b"chunked")]
    assert isinstance(events[-1], EndOfMessage) and events[-1].trailers == []


def test_pipelined_requests_ending_in_a_partial_head_are_not_too_large() -> None:
    """A read of many pipelined requests whose last head is cut off: only that head's own
    bytes count against the header limit (they were once charged the whole read: 431)."""
    request = b"GET /p HTTP/1.1\r\nHost: a\r\n\r\n"
    c = server_codec("httptools", Limits())
    events = c.receive(request * 3000 + b"GET /p HTTP/1.1\r\nHo")
    assert failure_status(events) is None
    assert sum(isinstance(e, RequestHead) for e in events) == 3000
    events = c.receive(b"st: a\r\n\r\n")
    assert [type(e) for e in events] == [RequestHead, EndOfMessage]


@pytest.mark.parametrize("split", [1024, 32 * 1024])
def test_a_too_large_head_split_over_reads_is_refused(split: int) -> None:
    """A 61 KiB head whose first part came with the end of a pipelined request: still 431
    (the head's first read must count towards when it is measured exactly)."""
    head = b"GET /b HTTP/1.1\r\nHost: a\r\nx-big: " + b"a" * (61 * 1024) + b"\r\n\r\n"
    data = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n" + head
    c = server_codec("httptools", Limits())
    events = c.receive(data[:split]) + c.receive(data[split:])
    assert failure_status(events) == 431
