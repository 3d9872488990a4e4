"""HTTP/2 head mapping and the flood budgets, without sockets."""

from __future__ import annotations

import pytest

from meshproxy.codec.events import RequestHead, ResponseHead
from meshproxy.codec.h2 import (
    FloodGuard,
    count_frames,
    new_connection,
    request_block,
    request_head,
    response_block,
    response_head,
)
from meshproxy.errors import ProtocolError

BASE = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a.test"), (b":path", b"/p")]


def test_request_head_puts_authority_in_host_first() -> None:
    head = request_head([*BASE, (b"x", b"1")], 1, end_stream=True)
    assert head.method == b"GET" and head.target == b"/p"
    assert head.headers[0] == (b"host", b"a.test") and head.authority == b"a.test"
    assert not head.has_body and head.http_version == b"2"


def test_host_only_request_uses_host() -> None:
    fields = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"host", b"h.test")]
    assert request_head(fields, 1, True).authority == b"h.test"


@pytest.mark.parametrize(
    "extra",
    [
        [(b"host", b"other.test")],
        [(b"content-length", b"+5")],
        [(b"content-length", b"1"), (b"content-length", b"1")],
    ],
)
def test_conflicts_are_refused(extra: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(ProtocolError):
        request_head([*BASE, *extra], 1, end_stream=False)


def test_too_many_headers_is_431() -> None:
    fields = BASE + [(b"x-%d" % i, b"v") for i in range(101)]
    with pytest.raises(ProtocolError) as err:
        request_head(fields, 1, True)
    assert err.value.status == 431


def test_fragment_in_path_is_refused() -> None:
    fields = [*BASE[:3], (b":path", b"/admin#frag")]
    with pytest.raises(ProtocolError):
        request_head(fields, 1, True)


def test_extended_connect_becomes_an_upgrade_request() -> None:
    fields = [
        (b":method", b"CONNECT"),
        (b":protocol", b"websocket"),
        (b":scheme", b"http"),
        (b":authority", b"ws.test"),
        (b":path", b"/chat"),
    ]
    head = request_head(fields, 1, end_stream=False)
    assert head.method == b"GET" and head.target == b"/chat"
    assert head.upgrade and head.has_body  # the stream's DATA is the tunnel


def test_request_block_drops_connection_fields_and_keeps_te_for_grpc() -> None:
    head = RequestHead(
        b"POST",
        b"/s/M",
        [
            (b"host", b"g.test"),
            (b"connection", b"x"),
            (b"keep-alive", b"5"),
            (b"te", b"gzip"),
            (b"a", b"1"),
        ],
    )
    block = request_block(head, b"http", grpc=True)
    assert block[:4] == [
        (b":method", b"POST"),
        (b":authority", b"g.test"),
        (b":scheme", b"http"),
        (b":path", b"/s/M"),
    ]
    assert block[4:] == [(b"a", b"1"), (b"te", b"trailers")]
    assert (b"te", b"trailers") not in request_block(head, b"http", grpc=False)


def test_response_mapping_both_ways() -> None:
    head = response_head([(b":status", b"204"), (b"x", b"y")], 3, end_stream=True)
    assert head.status == 204 and head.headers == [(b"x", b"y")] and not head.has_body
    block = response_block(ResponseHead(200, [(b"transfer-encoding", b"chunked"), (b"a", b"b")]))
    assert block == [(b":status", b"200"), (b"a", b"b")]


def test_flood_guard_budgets() -> None:
    g = FloodGuard()
    assert all(g.note_ping() is None for _ in range(FloodGuard.MAX_PINGS))
    assert g.note_ping() == "ping_flood"
    assert g.note_data(0, end_stream=False) is None
    assert g.note_data(0, end_stream=False) == "empty_frame_flood"
    assert g.note_data(10, end_stream=False) is None  # a real frame resets the run
    g2 = FloodGuard()
    for _ in range(100):
        g2.note_stream()
    verdicts = [g2.note_premature_reset() for _ in range(51)]
    assert verdicts[-1] == "premature_reset" and verdicts[49] is None


def test_priority_and_window_update_budgets_grow_with_streams_and_data_sent() -> None:
    g = FloodGuard()
    assert all(g.note_priority() is None for _ in range(100))  # 100 * (1 + 0 streams)
    assert g.note_priority() == "priority_flood"
    g.note_stream()
    assert all(g.note_priority() is None for _ in range(99))  # now 100 * (1 + 1)
    w = FloodGuard()
    assert all(w.note_window_update() is None for _ in range(5))
    assert w.note_window_update() == "window_update_flood"
    w.data_frames_sent = 3  # 5 + 2 * 10 * 3 = 65
    assert all(w.note_window_update() is None for _ in range(59))
    assert w.note_window_update() == "window_update_flood"


def test_count_frames_counts_what_h2_serialized() -> None:
    conn = new_connection(client_side=False)
    preface = conn.data_to_send()  # SETTINGS, then the connection's WINDOW_UPDATE
    assert count_frames(preface) == 2
    conn.ping(b"12345678")
    conn.ping(b"abcdefgh")
    assert count_frames(preface + conn.data_to_send()) == 4
    assert count_frames(b"") == 0


def test_a_long_lived_connection_remembers_a_bounded_number_of_closed_streams() -> None:
    """h2 keeps how each closed stream ended (65,536 of them by default): megabytes on a
    connection that lives for hundreds of thousands of streams. Ours keep the last 4,096."""
    from meshproxy.codec.h2 import CLOSED_STREAMS_KEPT, new_connection

    client, server = new_connection(True), new_connection(False)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    request = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/")]
    for _ in range(CLOSED_STREAMS_KEPT + 1000):
        sid = client.get_next_available_stream_id()
        client.send_headers(sid, request, end_stream=True)
        server.receive_data(client.data_to_send())
        server.send_headers(sid, [(b":status", b"200")], end_stream=True)
        client.receive_data(server.data_to_send())
    closed = server._closed_streams  # h2's record, the one this bounds
    assert 0 < len(closed) <= CLOSED_STREAMS_KEPT
    assert CLOSED_STREAMS_KEPT < 2**16
