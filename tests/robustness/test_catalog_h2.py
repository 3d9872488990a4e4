"""Robustness catalog, HTTP/2 cases not covered in tests/integration/test_http2.py: C06 cookie
crumbs against the header limits, D02 MadeYouReset (resets the server is made to send), D06
a reset/404 flood from a client that never reads, D07 PRIORITY and WINDOW_UPDATE floods. One
real proxy per module, raw frames where the h2 library would refuse to send them."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Iterator

import hpack
import pytest

from tests.integration.test_http2 import H2Mesh, running_h2_mesh
from tests.support.h2client import PREFACE, H2Client
from tests.support.metrics import scrape, value
from tests.support.proxy import wait_for

DATA, HEADERS, PRIORITY, SETTINGS, WINDOW_UPDATE = 0x0, 0x1, 0x2, 0x4, 0x8
END_STREAM, END_HEADERS = 0x1, 0x4


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream)
        + payload
    )


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[H2Mesh]:
    with running_h2_mesh(tmp_path_factory.mktemp("h2")) as m:
        yield m


def floods(mesh: H2Mesh, kind: str) -> float:
    return value(scrape(mesh.proxy.admin), "meshproxy_http2_flood_total", kind=kind) or 0.0


def send_raw(c: H2Client, data: bytes) -> None:
    try:
        c.sock.sendall(data)
    except OSError:
        pass  # the proxy may close while we still write


def drained_to_eof(sock: socket.socket, timeout: float = 20) -> bool:
    """Read (and drop) until the proxy closes; False if it is still open after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            if not sock.recv(1 << 20):
                return True
        except TimeoutError:
            return False
        except OSError:
            return True
    return False


def test_C06_cookie_crumbs_are_joined_and_counted(mesh: H2Mesh) -> None:
    """Under the limits the HTTP/1.1 upstream gets one cookie line joined with '; '; 2,000
    crumbs (tiny on the wire thanks to HPACK) count as the merged cookie: 431."""
    c = H2Client(mesh.h1_port)
    crumbs = [("cookie", f"a{i}=b") for i in range(3)]
    r = c.get("/cookies", headers=crumbs)
    assert r.status == 200
    seen = r.json()["headers"]
    assert seen["cookie"] == "a0=b; a1=b; a2=b"  # type: ignore[index]
    # One crumb, indexed by HPACK after its first use: 2,000 of them are ~2 KB on the wire,
    # 84 KB merged, past the 60 KiB header limit.
    many = [("cookie", "c=" + "b" * 40)] * 2000
    r = c.get("/cookies", headers=many)
    assert r.status == 431 or r.reset is not None, (r, c.goaway, c.closed)
    assert mesh.h1.state.requests[-1].path == "/cookies"
    assert len([s for s in mesh.h1.state.requests if s.path == "/cookies"]) == 1
    assert c.get("/after").status == 200  # the connection lives on
    c.close()


@pytest.mark.parametrize(
    ("provocation", "goaway"),
    [
        # DATA after END_STREAM: h2 resets the stream (STREAM_CLOSED) and reports it; counted
        # with the client's own resets, the connection ends as a premature-reset flood.
        (lambda sid: frame(DATA, END_STREAM, sid, b"x"), 11),
        # WINDOW_UPDATE with increment 0: h2 makes it a connection error at the first one.
        (lambda sid: frame(WINDOW_UPDATE, 0, sid, struct.pack(">I", 0)), 1),
    ],
    ids=["data-after-end", "window-update-zero"],
)
def test_D02_made_you_reset_is_cut_off(
    mesh: H2Mesh, provocation: Callable[[int], bytes], goaway: int
) -> None:
    """Streams the server is made to reset (MadeYouReset, CVE-2025-8671) cost the attacker
    its connection, and no upstream request outlives its stream."""
    resets_before = floods(mesh, "premature_reset")
    hangs_before = len([s for s in mesh.h1.state.requests if s.path == "/hang"])
    c = H2Client(mesh.h1_port)
    sent = 0
    try:
        for _ in range(400):
            sid = c.request("/hang")
            send_raw(c, provocation(sid))
            sent += 1
    except OSError:
        pass
    assert c.wait_closed()
    assert c.goaway is not None and c.goaway.error_code == goaway, (sent, c.goaway)
    assert floods(mesh, "premature_reset") == resets_before + (goaway == 11)
    hangs = [s for s in mesh.h1.state.requests if s.path == "/hang"][hangs_before:]
    assert len(hangs) <= 200, len(hangs)  # cut off after 100 streams, at most half reset
    # Every upstream request of a reset stream was cancelled: its connection closed.
    open_ids = {s.connection for s in hangs}
    assert wait_for(lambda: open_ids <= mesh.h1.state.closed_ids), open_ids
    assert H2Client(mesh.h1_port).get("/ok").status == 200


def flood_without_reading(mesh: H2Mesh, headers: list[tuple[str, str]], total: int) -> int:
    """`total` requests with `headers`, 20 per write (so one read of the proxy's rarely holds
    more than the 100 streams it allows), responses never read; the count sent before the
    proxy closed the connection."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    sock.connect(("127.0.0.1", mesh.h1_port))
    sock.sendall(PREFACE + frame(SETTINGS, 0, 0))
    block = hpack.Encoder().encode(headers)  # indexed after the first: a few bytes each
    sent = 0
    try:
        while sent < total:
            sock.sendall(
                b"".join(
                    frame(HEADERS, END_STREAM | END_HEADERS, 2 * (sent + i) + 1, block)
                    for i in range(20)
                )
            )
            sent += 20
            time.sleep(0.002)
    except OSError:
        pass
    assert drained_to_eof(sock), sent
    sock.close()
    return sent


def rejected(mesh: H2Mesh, reason: str) -> float:
    return (
        value(scrape(mesh.proxy.admin), "meshproxy_downstream_rq_rejected_total", reason=reason)
        or 0.0
    )


def test_D06_invalid_requests_never_read_end_the_connection(mesh: H2Mesh) -> None:
    """Requests with a malformed :authority, each answered with RST_STREAM, never read. The
    proxy stops reading a client whose socket is full; what it then reads at once opens more
    than the 100 streams it allows (a protocol error), or past 10,000 frames queued it closes
    an outbound flood. Either way: closed once, counted once, memory flat."""
    cut = floods(mesh, "outbound_flood") + rejected(mesh, "h2_protocol_error")
    rss_before = mesh.proxy.rss_kib()
    bad = [(":method", "GET"), (":scheme", "http"), (":authority", "a b"), (":path", "/")]
    sent = flood_without_reading(mesh, bad, 40_000)
    assert sent < 40_000
    assert floods(mesh, "outbound_flood") + rejected(mesh, "h2_protocol_error") == cut + 1
    assert mesh.proxy.rss_kib() - rss_before < 32 * 1024
    assert H2Client(mesh.h1_port).get("/ok").status == 200


def test_D06_404s_never_read_hold_the_client_at_its_stream_limit(mesh: H2Mesh) -> None:
    """404s for an unrouted authority, never read: the replies wait for the client, so its
    streams stay open and the 101st ends the connection; the upstream is never asked."""
    before = rejected(mesh, "h2_protocol_error")
    headers = [
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", "nowhere.test"),
        (":path", "/nowhere"),
    ]
    rss_before = mesh.proxy.rss_kib()
    sent = flood_without_reading(mesh, headers, 40_000)
    assert sent < 40_000
    assert rejected(mesh, "h2_protocol_error") == before + 1
    assert mesh.proxy.rss_kib() - rss_before < 32 * 1024
    assert not [s for s in mesh.h1.state.requests if s.path == "/nowhere"]


def test_D07_priority_flood_is_cut_off(mesh: H2Mesh) -> None:
    before = floods(mesh, "priority_flood")
    c = H2Client(mesh.h1_port)
    sid = c.request("/hang")
    priority = frame(PRIORITY, 0, sid, struct.pack(">IB", 0, 15))
    send_raw(c, priority * 10_000)
    assert c.wait_closed()
    assert c.goaway is not None and c.goaway.error_code == 11  # ENHANCE_YOUR_CALM
    assert floods(mesh, "priority_flood") == before + 1
    assert H2Client(mesh.h1_port).get("/ok").status == 200


def test_D07_window_update_flood_is_cut_off(mesh: H2Mesh) -> None:
    before = floods(mesh, "window_update_flood")
    c = H2Client(mesh.h1_port)
    assert c.get("/ok").status == 200  # one stream, one DATA frame sent: a budget of 27
    send_raw(c, frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1)) * 100_000)
    assert c.wait_closed()
    assert c.goaway is not None and c.goaway.error_code == 11
    assert floods(mesh, "window_update_flood") == before + 1


def test_D07_a_large_download_is_no_window_update_flood(mesh: H2Mesh) -> None:
    """The client acknowledges every DATA frame of 4 MB (stream and connection updates):
    well inside the budget, the download completes."""
    c = H2Client(mesh.h1_port, stream_window=16384)
    r = c.get("/big?n=4000000")
    assert r.status == 200 and len(r.body) == 4_000_000
    c.close()
