"""Large bodies stream both ways with bounded proxy memory; TCP relays with half-close."""

from __future__ import annotations

import hashlib
import http.client
import json
import shutil
import socket
import subprocess
import threading
import time

import pytest

from tests.integration.conftest import MeshFactory
from tests.support.metrics import scrape, value
from tests.support.proxy import env_without_proxy, wait_for

GIB = 1 << 30


class PeakRss:
    """Samples the proxy's RSS every 20 ms while a transfer runs."""

    def __init__(self, read: object) -> None:
        self.read = read
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.read())  # type: ignore[operator]
            time.sleep(0.02)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_one_gib_download_streams_with_bounded_memory(make_mesh: MeshFactory) -> None:
    mesh = make_mesh()
    baseline = mesh.proxy.rss_kib()
    with PeakRss(mesh.proxy.rss_kib) as rss:
        out = subprocess.run(
            [
                "curl",
                "-sS",
                "--max-time",
                "120",
                "-o",
                "/dev/null",
                "-w",
                "%{size_download}",
                "-H",
                "Host: hello.test",
                f"{mesh.url}/big?n={GIB}",
            ],
            capture_output=True,
            text=True,
            env=env_without_proxy(),
            timeout=150,
            check=False,
        )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == GIB
    assert rss.peak - baseline < 30 * 1024, f"proxy RSS grew by {rss.peak - baseline} KiB"


def test_large_chunked_upload_streams_intact(make_mesh: MeshFactory, codec: str) -> None:
    mesh = make_mesh(codec)
    size = 128 << 20
    block = bytes(range(256)) * 256  # 64 KiB
    digest = hashlib.sha256()

    def body():  # type: ignore[no-untyped-def]
        for _ in range(size // len(block)):
            digest.update(block)
            yield block

    baseline = mesh.proxy.rss_kib()
    with PeakRss(mesh.proxy.rss_kib) as rss:
        conn = http.client.HTTPConnection("127.0.0.1", mesh.http_port, timeout=60)
        conn.request(
            "POST", "/upload", body=body(), headers={"Host": "hello.test"}, encode_chunked=True
        )
        resp = conn.getresponse()
        result = json.loads(resp.read())
    assert resp.status == 200
    assert result == {"size": size, "sha256": digest.hexdigest()}
    assert rss.peak - baseline < 30 * 1024, f"proxy RSS grew by {rss.peak - baseline} KiB"


def test_content_length_upload(make_mesh: MeshFactory, codec: str) -> None:
    mesh = make_mesh(codec)
    data = b"q" * (3 << 20)
    conn = http.client.HTTPConnection("127.0.0.1", mesh.http_port, timeout=30)
    conn.request("POST", "/upload", body=data, headers={"Host": "hello.test"})
    resp = conn.getresponse()
    assert json.loads(resp.read()) == {
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    assert mesh.v1.state.requests[-1].headers["content-length"] == str(len(data))


def test_tcp_echo_with_half_close(make_mesh: MeshFactory) -> None:
    mesh = make_mesh()
    payload = bytes(range(256)) * 4096  # 1 MiB
    with socket.create_connection(("127.0.0.1", mesh.tcp_port), timeout=10) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)  # half-close: the echo server must still answer
        got = b""
        while True:
            data = s.recv(65536)
            if not data:
                break
            got += data
    assert got == payload + b"bye"

    def tcp(name: str) -> float | None:
        return value(
            scrape(mesh.proxy.admin), name, reporter="source", destination_service="echo.test"
        )

    assert wait_for(lambda: tcp("istio_tcp_connections_closed_total") == 1, 5)
    assert tcp("istio_tcp_sent_bytes_total") == len(payload) + 3
