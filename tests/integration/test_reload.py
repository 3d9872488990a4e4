"""Live reload under traffic: valid changes apply, invalid ones keep the last good config."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter

from tests.integration.conftest import MeshFactory, mesh_yaml, write_configmap
from tests.support.metrics import scrape, value
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


def test_valid_then_invalid_reload_under_traffic(make_mesh: MeshFactory) -> None:
    mesh = make_mesh()
    params = dict(mesh.params)  # type: ignore[attr-defined]
    config = mesh.config_dir / "mesh.yaml"
    with Traffic(mesh.http_port) as traffic:
        assert wait_for(lambda: len(traffic.names) > 20)
        params["split"] = (0, 100)
        config.write_text(mesh_yaml(**params))
        assert wait_for(lambda: traffic.names[-1:] == ["v2"]), mesh.proxy.log()
        version = dump(mesh.proxy.admin)["version"]
        config.write_text(
            mesh_yaml(**params).replace("kind: DestinationRule", "kind: DestinationRul")
        )
        assert wait_for(lambda: dump(mesh.proxy.admin)["last_failed_reload"] is not None)
        before = len(traffic.names)
        assert wait_for(lambda: len(traffic.names) > before + 20)
    d = dump(mesh.proxy.admin)
    assert d["version"] == version  # the last good config is still active
    assert any('did you mean "DestinationRule"' in e for e in d["last_failed_reload"]["errors"])
    assert traffic.names[-1] == "v2"
    assert not traffic.errors and set(traffic.statuses) == {200}, (traffic.statuses, traffic.errors)
    assert value(scrape(mesh.proxy.admin), "meshproxy_config_reload_total", result="error") == 1
    assert "config rejected" in mesh.proxy.log()


def test_configmap_symlink_swap_is_seen(make_mesh: MeshFactory) -> None:
    mesh = make_mesh(configmap=True)
    params = dict(mesh.params)  # type: ignore[attr-defined]
    with Traffic(mesh.http_port) as traffic:
        assert wait_for(lambda: len(traffic.names) > 10)
        params["split"] = (0, 100)
        write_configmap(mesh.config_dir, mesh_yaml(**params), "..2026_01_01_00_00_00.2")
        assert wait_for(lambda: traffic.names[-1:] == ["v2"]), mesh.proxy.log()
    assert not traffic.errors and set(traffic.statuses) == {200}


def test_listener_port_change_keeps_serving(make_mesh: MeshFactory) -> None:
    from tests.support.proxy import free_port

    mesh = make_mesh()
    params = dict(mesh.params)  # type: ignore[attr-defined]
    new_port = free_port()
    params["http_port"] = new_port
    (mesh.config_dir / "mesh.yaml").write_text(mesh_yaml(**params))

    def new_listener_up() -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", new_port, timeout=2)
            conn.request("GET", "/", headers={"Host": "hello.test"})
            return conn.getresponse().status == 200
        except OSError:
            return False

    assert wait_for(new_listener_up), mesh.proxy.log()
    assert wait_for(lambda: not _connectable(mesh.http_port))


def _connectable(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_sigterm_drains_in_flight_requests(make_mesh: MeshFactory) -> None:
    mesh = make_mesh()
    result: dict[str, object] = {}

    def slow() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", mesh.http_port, timeout=10)
        conn.request("GET", "/slow?ms=1000", headers={"Host": "hello.test"})
        resp = conn.getresponse()
        result["status"] = resp.status
        result["connection"] = resp.getheader("connection")
        resp.read()

    t = threading.Thread(target=slow)
    t.start()
    assert wait_for(lambda: bool(mesh.v1.state.requests))
    started = time.monotonic()
    code = mesh.proxy.terminate()
    t.join(timeout=10)
    assert code == 0
    assert result["status"] == 200 and result["connection"] == "close"
    assert time.monotonic() - started < 5


def _open_fds(pid: int) -> int:
    import os

    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_storm_of_swaps_and_partial_writes_settles_on_the_last(make_mesh: MeshFactory) -> None:
    """Catalog K05: 100 ConfigMap swaps in about a second, then a non-atomic writer (part of a
    file, a pause, the rest). The proxy keeps serving, never applies a partial file, ends on
    the last content, does not reload once per event, and leaks no descriptors."""
    mesh = make_mesh(configmap=True)
    params = dict(mesh.params)  # type: ignore[attr-defined]
    pid = mesh.proxy.proc.pid
    fds = _open_fds(pid)
    version = dump(mesh.proxy.admin)["version"]
    with Traffic(mesh.http_port) as traffic:
        assert wait_for(lambda: len(traffic.names) > 10)
        for i in range(100):
            params["split"] = (0, 100) if i % 2 else (100, 0)  # the last one: all to v2
            write_configmap(mesh.config_dir, mesh_yaml(**params), f"..2026_01_01_00_01_{i:02d}.1")
            time.sleep(0.01)
        assert wait_for(lambda: traffic.names[-5:] == ["v2"] * 5), mesh.proxy.log()
        applied = dump(mesh.proxy.admin)["version"] - version
        assert 1 <= applied < 50, f"{applied} reloads for 100 swaps"

        # A writer that is not atomic: part of the file, a pause, the rest, in place.
        params["split"] = (100, 0)
        text = mesh_yaml(**params)
        live = mesh.config_dir / "..data" / "mesh.yaml"
        before = dump(mesh.proxy.admin)["version"]
        cut = text.index("route:") + 3  # mid-key: what is written so far is not YAML
        with open(live, "w") as f:
            f.write(text[:cut])
            f.flush()
            time.sleep(1.0)  # longer than the debounce: the partial file is seen, and rejected
            f.write(text[cut:])
        assert wait_for(lambda: traffic.names[-5:] == ["v1"] * 5), mesh.proxy.log()
        after = dump(mesh.proxy.admin)
        assert after["version"] == before + 1  # only the whole file was applied
        assert "invalid YAML" in after["last_failed_reload"]["errors"][0]
    assert not traffic.errors and set(traffic.statuses) == {200}
    # No watcher or file left open per event (that would be ~100): a few more are the
    # client's and the upstream pools' keep-alive connections, still open.
    assert _open_fds(pid) < fds + 10


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
