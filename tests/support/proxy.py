"""Start `meshproxy run` as a real subprocess on free ports and wait until it is ready."""

from __future__ import annotations

import contextlib
import http.client
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

_handed_out: set[int] = set()


def meshproxy_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`meshproxy ARGS...` as a user runs it: no stdin, output captured, exit code kept."""
    return subprocess.run(
        [sys.executable, "-m", "meshproxy", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def _port_range() -> tuple[int, int]:
    """20000-32000, or this pytest-xdist worker's share of it: workers are processes that
    cannot see each other's handed-out ports, so each picks from its own slice."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if not worker.startswith("gw") or count <= 1:
        return 20000, 32000
    span = 12000 // count
    low = 20000 + int(worker[2:]) * span
    return low, low + span


def free_port() -> int:
    """A free port below the kernel's ephemeral range (32768+ on Linux): bind(0) would pick
    from that range, where any outgoing connection of a running test may take the port
    between our check and the proxy's bind ("address already in use", now and then)."""
    low, high = _port_range()
    for _ in range(200):
        port = random.randrange(low, high)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port found")


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # names lower-cased; a repeated header keeps its last value
    body: bytes
    elapsed: float  # seconds from sending the request to the end of the response


def request(
    port: int,
    path: str = "/",
    method: str = "GET",
    host: str = "svc.test",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> Reply:
    """One HTTP/1.1 request to a proxy listener on 127.0.0.1, on its own connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    start = time.monotonic()
    try:
        conn.request(method, path, body=body, headers={"Host": host, **(headers or {})})
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    return Reply(
        resp.status,
        {k.lower(): v for k, v in resp.getheaders()},
        data,
        time.monotonic() - start,
    )


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll `predicate` until it holds or `timeout` seconds have passed; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _limit_open_files(n: int) -> Callable[[], None]:
    """For Popen's preexec_fn: the child's RLIMIT_NOFILE, as `prlimit --nofile=n`."""
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))


class ProxyProcess:
    def __init__(
        self,
        config: Path,
        admin_port: int,
        log: Path,
        max_open_files: int | None = None,
        cgroup: Path | None = None,
    ) -> None:
        """`max_open_files`: its RLIMIT_NOFILE; `cgroup`: a cgroup directory it starts in."""
        self.config = config
        self.admin_port = admin_port
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115
        setup: list[Callable[[], object]] = []
        if max_open_files is not None:
            setup.append(_limit_open_files(max_open_files))
        if cgroup is not None:
            setup.append(lambda: (cgroup / "cgroup.procs").write_text(str(os.getpid())))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshproxy", "run", "-c", str(config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=(lambda: [step() for step in setup]) if setup else None,
        )

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"meshproxy exited {self.proc.returncode}:\n{self.log()}")
            try:
                status, _ = http_get(self.admin + "/ready", timeout=1)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.01)  # a proxy is ready in about 0.3 s; the suite starts hundreds
        raise TimeoutError(f"meshproxy not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def metrics(self) -> str:
        return http_get(self.admin + "/stats/prometheus")[1].decode()

    def terminate(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()
        return self.proc.returncode


def env_without_proxy() -> dict[str, str]:
    env = dict(os.environ)
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy"):
        env.pop(k, None)
    return env


def proxy_config_yaml(admin: int, **spec: object) -> str:
    """A ProxyConfig document for a test proxy: explicit listeners only, quick drain."""
    fields = {
        "interceptionMode": "NONE",
        "proxyAdminPort": admin,
        "statusPort": 0,
        "drainDuration": "2s",
        **spec,
    }
    body = ", ".join(f"{k}: {v}" for k, v in fields.items())
    return (
        "apiVersion: meshproxy.io/v1alpha1\nkind: ProxyConfig\n"
        f"metadata: {{name: test}}\nspec: {{{body}}}\n---\n"
    )


@contextlib.contextmanager
def running_proxy(
    directory: Path, admin: int, resources: str, **spec: object
) -> Iterator[ProxyProcess]:
    """`meshproxy run` on `resources` (with a ProxyConfig in front) until the block ends."""
    (directory / "mesh.yaml").write_text(proxy_config_yaml(admin, **spec) + resources)
    proxy = ProxyProcess(directory, admin, directory / "proxy.log")
    try:
        proxy.wait_ready()
        yield proxy
    finally:
        proxy.terminate()


def service_entry(host: str, port: int, endpoints: list[int], protocol: str = "HTTP") -> str:
    """A STATIC ServiceEntry for `host` on `port` with loopback endpoints."""
    name = host.split(".")[0]
    proto = protocol.lower()
    eps = "\n".join(f"  - {{address: 127.0.0.1, ports: {{{proto}: {p}}}}}" for p in endpoints)
    return (
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n"
        f"metadata: {{name: {name}}}\nspec:\n  hosts: [{host}]\n"
        f"  ports: [{{number: {port}, name: {proto}, protocol: {protocol}}}]\n"
        f"  resolution: STATIC\n  endpoints:\n{eps}\n---\n"
    )


def egress_sidecar(*ports: int, protocol: str = "HTTP") -> str:
    """A Sidecar with an explicit egress listener on 127.0.0.1 for each port."""
    listeners = "\n".join(
        f"  - {{port: {{number: {p}, protocol: {protocol}, name: p{p}}}, bind: 127.0.0.1, "
        "hosts: [./*]}"
        for p in ports
    )
    return (
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\n"
        f"metadata: {{name: default}}\nspec:\n  egress:\n{listeners}\n"
    )
