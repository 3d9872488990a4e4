"""Generated HTTP/2 frame sequences against a real proxy: no crash, no leak.

Each example opens a connection to a proxy listener (HTTP/1.1 and HTTP/2 upstreams behind it),
sends the preface and a generated run of frames — HEADERS with odd header lists and flags,
CONTINUATION, DATA, RST_STREAM, WINDOW_UPDATE (0 and 2^31-1 included), SETTINGS, PING,
PRIORITY, GOAWAY and unknown frame types on a handful of stream ids — reads what comes back,
and closes. Then the proxy must still serve a well-behaved client, and once the connection is
gone no downstream connection and no upstream request may be left behind.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hpack
import pytest
from hyperframe import frame as hf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.h2client import PREFACE, H2Client
from tests.support.h2server import H2Server
from tests.support.metrics import scrape, value
from tests.support.proxy import (
    ProxyProcess,
    egress_sidecar,
    free_port,
    http_get,
    proxy_config_yaml,
    service_entry,
    wait_for,
)
from tests.support.upstream import UpstreamServer


class Target:
    def __init__(self, proxy: ProxyProcess, port: int, h2_port: int) -> None:
        self.proxy, self.port, self.h2_port = proxy, port, h2_port


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    tmp: Path = tmp_path_factory.mktemp("h2fuzz")
    h1, h2s = UpstreamServer("h1").start(), H2Server("h2").start()
    admin, port, h2_port = free_port(), free_port(), free_port()
    (tmp / "mesh.yaml").write_text(
        proxy_config_yaml(admin, drainDuration="1s", idleTimeout="5s")
        + service_entry("hello.test", port, [h1.port])
        + service_entry("h2.test", h2_port, [h2s.port], protocol="HTTP2")
        + egress_sidecar(port, h2_port)
    )
    proxy = ProxyProcess(tmp, admin, tmp / "proxy.log")
    try:
        proxy.wait_ready()
        yield Target(proxy, port, h2_port)
    finally:
        proxy.terminate()
        h1.stop()
        h2s.stop()


STREAM = st.sampled_from([1, 1, 3, 5, 2, 0, 2**31 - 1])
NAMES = st.sampled_from(
    [
        b":method",
        b":path",
        b":scheme",
        b":authority",
        b":status",
        b":protocol",
        b"host",
        b"content-length",
        b"te",
        b"connection",
        b"transfer-encoding",
        b"cookie",
        b"x-a",
        b"X-Up",
        b"",
        b"x\x00y",
        b"grpc-timeout",
        b"upgrade",
    ]
)
FIELD_VALUE = st.one_of(
    st.sampled_from(
        [
            b"GET",
            b"POST",
            b"CONNECT",
            b"/",
            b"/x",
            b"http",
            b"https",
            b"hello.test",
            b"h2.test",
            b"0",
            b"5",
            b"-1",
            b"trailers",
            b"chunked",
            b"a\r\nb",
            b"",
            b"websocket",
            b"1S",
        ]
    ),
    st.binary(max_size=10),
)
VALID_HEAD = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/fuzz")]


@st.composite
def header_block(draw: st.DrawFn) -> bytes:
    fields = list(VALID_HEAD) if draw(st.booleans()) else []
    fields += draw(st.lists(st.tuples(NAMES, FIELD_VALUE), max_size=5))
    if draw(st.booleans()):
        fields.append((b":authority", draw(st.sampled_from([b"hello.test", b"h2.test", b"x"]))))
    return bytes(hpack.Encoder().encode(fields))


@st.composite
def frame(draw: st.DrawFn) -> bytes:
    kind = draw(
        st.sampled_from(
            [
                "headers",
                "headers",
                "data",
                "continuation",
                "rst",
                "window",
                "settings",
                "ping",
                "priority",
                "goaway",
                "unknown",
            ]
        )
    )
    sid = draw(STREAM)
    f: Any
    if kind == "headers":
        f = hf.HeadersFrame(sid or 1, data=draw(header_block()))
        f.flags = set(draw(st.sets(st.sampled_from(["END_STREAM", "END_HEADERS"]))))
    elif kind == "continuation":
        f = hf.ContinuationFrame(sid or 1, data=draw(header_block()))
        f.flags = set(draw(st.sets(st.sampled_from(["END_HEADERS"]))))
    elif kind == "data":
        f = hf.DataFrame(sid or 1, data=draw(st.binary(max_size=64)))
        f.flags = set(draw(st.sets(st.sampled_from(["END_STREAM"]))))
    elif kind == "rst":
        f = hf.RstStreamFrame(sid or 1, error_code=draw(st.integers(0, 13)))
    elif kind == "window":
        f = hf.WindowUpdateFrame(sid, window_increment=draw(st.sampled_from([0, 1, 2**31 - 1])))
    elif kind == "settings":
        f = hf.SettingsFrame(
            0,
            settings=draw(
                st.dictionaries(
                    st.integers(1, 9), st.sampled_from([0, 1, 100, 2**24, 2**31 - 1]), max_size=3
                )
            ),
        )
    elif kind == "ping":
        f = hf.PingFrame(0, opaque_data=b"12345678")
    elif kind == "priority":
        f = hf.PriorityFrame(
            sid or 1, depends_on=draw(STREAM), stream_weight=draw(st.integers(0, 255))
        )
    elif kind == "goaway":
        f = hf.GoAwayFrame(0, last_stream_id=draw(STREAM), error_code=draw(st.integers(0, 13)))
    else:  # an unknown frame type: must be ignored (RFC 9113 §4.1)
        payload = draw(st.binary(max_size=16))
        return len(payload).to_bytes(3, "big") + bytes([0xFA, 0]) + sid.to_bytes(4, "big") + payload
    return bytes(f.serialize())


def send_and_read(port: int, frames: list[bytes]) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        try:
            s.sendall(PREFACE + hf.SettingsFrame(0).serialize() + b"".join(frames))
            s.settimeout(0.15)
            while s.recv(65536):
                pass
        except (TimeoutError, OSError):
            pass


def nothing_left(t: Target) -> bool:
    samples = scrape(t.proxy.admin)
    if value(samples, "meshproxy_downstream_cx_active") != 0:
        return False
    clusters = json.loads(http_get(t.proxy.admin + "/clusters?format=json")[1])
    return all(
        h["rq_active"] == 0 for c in clusters["cluster_statuses"] for h in c["host_statuses"]
    )


@settings(
    max_examples=int(os.environ.get("MESHPROXY_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
@given(st.lists(frame(), min_size=1, max_size=8), st.booleans())
def test_generated_frames_never_crash_or_leak(
    target: Target, frames: list[bytes], to_h2: bool
) -> None:
    send_and_read(target.h2_port if to_h2 else target.port, frames)
    assert target.proxy.proc.poll() is None, target.proxy.log()[-2000:]
    ok = H2Client(target.port, authority="hello.test", timeout=5)
    try:
        assert ok.get("/after").status == 200
    finally:
        ok.close()
    # Streams still open end at the idle timeout at the latest; usually at once.
    assert wait_for(lambda: nothing_left(target), timeout=8), target.proxy.metrics()
    assert "Traceback" not in target.proxy.log()
