"""Live reload under traffic: valid changes apply, invalid ones keep the last good config."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter

from tests.integration.conftest import MeshFactory, mesh_yaml
from tests.support.proxy import http_get, wait_for


class Traffic:
    """Keep-alive requests in a loop until stopped; counts statuses and upstream names."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.statuses: Counter[int] = Counter()
        self.names: list[str] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        while not self._stop.is_set():
            try:
                conn.request("GET", "/", headers={"Host": "hello.test"})
                resp = conn.getresponse()
                resp.read()
                self.statuses[resp.status] += 1
                self.names.append(resp.getheader("x-upstream") or "?")
            except (OSError, http.client.HTTPException) as exc:
                self.errors.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def dump(admin: str) -> dict:  # type: ignore[type-arg]
    return json.loads(http_get(admin + "/config_dump")[1])


def _connectable(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _open_fds(pid: int) -> int:
    import os

    return len(os.listdir(f"/proc/{pid}/fd"))


def test_an_edit_that_raises_no_inotify_event_is_still_applied(make_mesh: MeshFactory) -> None:
    """The config file is a symlink to a file in another directory, edited in place there: the
    watched directory sees no event at all (as with a change made while a watch is being set
    up, or a lost event), so only the periodic look at the files finds it."""
    mesh = make_mesh()
    params = dict(mesh.params)  # type: ignore[attr-defined]
    elsewhere = mesh.config_dir.parent / "elsewhere"
    elsewhere.mkdir()
    real = elsewhere / "real.yaml"
    live = mesh.config_dir / "mesh.yaml"
    real.write_text(live.read_text())
    live.unlink()
    live.symlink_to(real)  # an event: the reload that follows changes nothing
    time.sleep(1.0)
    version = dump(mesh.proxy.admin)["version"]
    params["split"] = (0, 100)
    real.write_text(mesh_yaml(**params))
    assert wait_for(lambda: dump(mesh.proxy.admin)["version"] == version + 1), mesh.proxy.log()
    assert "config files changed without an inotify event" in mesh.proxy.log()
    with Traffic(mesh.http_port) as traffic:
        assert wait_for(lambda: len(traffic.names) > 5)
    assert set(traffic.names) == {"v2"}
