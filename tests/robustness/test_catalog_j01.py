"""Client faults (robustness catalog J01, J02): a client that leaves while its request waits
upstream, or in the middle of its body, ends the upstream request too."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from tests.support.metrics import scrape, value
from tests.support.proxy import (
    egress_sidecar,
    free_port,
    running_proxy,
    service_entry,
    wait_for,
)
from tests.support.upstream import UpstreamServer


def test_J01_client_leaving_cancels_the_upstream_request(tmp_path: Path) -> None:
    app = UpstreamServer("app").start()
    admin, port = free_port(), free_port()
    resources = service_entry("svc.test", port, [app.port]) + egress_sidecar(port)
    try:
        with running_proxy(tmp_path, admin, resources) as proxy:
            # J01: waiting for an answer that never comes, the client goes away.
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET /hang HTTP/1.1\r\nHost: svc.test\r\n\r\n")
                assert wait_for(lambda: len(app.state.requests) == 1, 3.0)
                time.sleep(0.1)
            assert wait_for(lambda: app.state.closed == 1, 1.5), "upstream request not cancelled"
            assert wait_for(
                lambda: (
                    value(scrape(proxy.admin), "istio_requests_total", response_flags="DC") == 1
                ),
                3.0,
            )

            # J02: a body announced as 1 MB stops after 10 KiB and the client closes.
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(
                    b"POST /upload HTTP/1.1\r\nHost: svc.test\r\nContent-Length: 1000000\r\n\r\n"
                    + b"x" * 10240
                )
                assert wait_for(lambda: len(app.state.requests) == 2, 3.0)
            assert wait_for(lambda: app.state.closed == 2, 1.5), "upstream not aborted"
            assert "/upload" not in app.state.completed  # never a complete message upstream

            # And the proxy is fine: a new request goes through on a fresh connection.
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET /ok HTTP/1.1\r\nHost: svc.test\r\nConnection: close\r\n\r\n")
                reply = b""
                while chunk := s.recv(65536):
                    reply += chunk
            assert reply.startswith(b"HTTP/1.1 200")
    finally:
        app.stop()
