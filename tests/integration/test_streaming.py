"""Large bodies stream both ways with bounded proxy memory; TCP relays with half-close."""

from __future__ import annotations

import hashlib
import http.client
import json
import threading
import time

from tests.integration.conftest import MeshFactory

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
