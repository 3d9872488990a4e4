"""An upstream that answers before it has read the request body (an error, nginx's `return`):
the response reaches the client, the rest of a small body is read and dropped, and the
keep-alive connection goes on serving; a large remainder closes it. Found between two
sidecars at Istio's benchmark point: the server sidecar closed such connections after a
keep-alive response, and the client sidecar, already reusing them, answered 503 UC."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.proxy import egress_sidecar, free_port, running_proxy, service_entry


class EarlyAnswers:
    """Answers each request head at once with 200 'early', never waiting for a body; counts
    the request heads it saw."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.heads: list[bytes] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            while True:
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                buffer += chunk
                while (at := buffer.find(b"HTTP/1.1\r\n")) >= 0 and b"\r\n\r\n" in buffer[at:]:
                    line_start = buffer.rfind(b"\r\n", 0, at) + 2 if b"\r\n" in buffer[:at] else 0
                    end = buffer.index(b"\r\n\r\n", at) + 4
                    self.heads.append(buffer[line_start:at].strip())
                    buffer = buffer[end:]
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nearly")


@pytest.fixture
def early(tmp_path: Path, codec: str) -> Iterator[tuple[int, EarlyAnswers]]:
    upstream = EarlyAnswers()
    port, admin = free_port(), free_port()
    resources = service_entry("early.test", port, [upstream.port]) + egress_sidecar(port)
    with running_proxy(tmp_path, admin, resources, http1Codec=codec, requestHeadersTimeout="2s"):
        yield port, upstream
    upstream.sock.close()


def read_response(s: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"early"):
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk
    return data


def test_the_rest_of_a_small_body_is_dropped_and_the_connection_serves_on(
    early: tuple[int, EarlyAnswers],
) -> None:
    port, upstream = early
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: early.test\r\nContent-Length: 3000\r\n\r\n")
        first = read_response(s)
        assert first.startswith(b"HTTP/1.1 200 ") and b"connection: close" not in first.lower()
        s.sendall(b"x" * 3000)  # the body arrives after the answer
        s.sendall(b"GET /next HTTP/1.1\r\nHost: early.test\r\n\r\n")
        second = read_response(s)
        assert second.startswith(b"HTTP/1.1 200 ") and second.endswith(b"early"), second
    assert upstream.heads == [b"POST /upload", b"GET /next"]  # the body was never a request


def test_a_large_remainder_closes_the_connection(early: tuple[int, EarlyAnswers]) -> None:
    port, _ = early
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /big HTTP/1.1\r\nHost: early.test\r\nContent-Length: 10000000\r\n\r\n")
        first = read_response(s)
        assert first.startswith(b"HTTP/1.1 200 ")
        assert s.recv(16) == b""  # closed: 10 MB is not read just to be dropped


def test_a_remainder_that_never_comes_is_cut_at_the_headers_timeout(
    early: tuple[int, EarlyAnswers],
) -> None:
    port, _ = early
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /slow HTTP/1.1\r\nHost: early.test\r\nContent-Length: 100\r\n\r\nab")
        assert read_response(s).startswith(b"HTTP/1.1 200 ")
        try:
            assert s.recv(16) == b""  # requestHeadersTimeout (2 s), not forever
        except ConnectionResetError:
            pass
