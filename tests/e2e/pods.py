"""Pods for end-to-end tests: network namespaces (root only; under CI=true a missing capability
fails the run), processes in them, and curl run inside them. Test modules outside tests/e2e
import the fixtures from here."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def ns_exec(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.cfg = Path()  # the proxy's config directory (certificates live there too)
        self.proxy: subprocess.Popen[bytes] | None = None  # the sidecar, when there is one

    def start(
        self, cmd: list[str], ready: str | None = None, **kw: object
    ) -> subprocess.Popen[bytes]:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        p: subprocess.Popen[bytes] = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=REPO,
            **kw,
        )  # type: ignore[call-overload]
        self.procs.append(p)
        if ready is not None:
            assert p.stdout is not None
            line = p.stdout.readline().decode()
            assert line.startswith(ready), line
        return p

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=5)


def curl_status(ns: str, url: str, max_time: float = 5) -> str:
    """The HTTP status curl got inside `ns` ("000": no response at all)."""
    out = subprocess.run(
        ns_exec(ns, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time",
                str(max_time), url),
        capture_output=True,
        text=True,
        timeout=max_time + 10,
        check=False,
    )  # fmt: skip
    return out.stdout


def curl(ns: str, *args: str) -> str:
    out = subprocess.run(
        ns_exec(ns, "curl", "-sS", "--max-time", "5", *args),
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"e2e prerequisite missing in CI: {reason}")
    pytest.skip(reason)


def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, timeout=30, capture_output=True)


@pytest.fixture
def netns() -> Iterator[str]:
    """One empty network namespace (loopback up)."""
    if os.geteuid() != 0:
        _skip_or_fail("needs root for ip netns and iptables")
    for tool in ("ip", "iptables-restore", "iptables-legacy-restore"):
        if shutil.which(tool) is None:
            _skip_or_fail(f"{tool} is not installed")
    name = f"mp-ns-{uuid.uuid4().hex[:6]}"
    try:
        run("ip", "netns", "add", name)
        run("ip", "-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


@pytest.fixture
def netns_pair() -> Iterator[tuple[str, str]]:
    """Two namespaces joined by a veth pair: 'pod' 10.78.0.1 and 'remote' 10.78.0.2."""
    if os.geteuid() != 0:
        _skip_or_fail("needs root for ip netns and iptables")
    for tool in ("ip", "iptables-restore", "setpriv"):
        if shutil.which(tool) is None:
            _skip_or_fail(f"{tool} is not installed")
    tag = uuid.uuid4().hex[:6]
    pod, remote = f"mp-pod-{tag}", f"mp-rem-{tag}"
    veth_pod, veth_remote = f"mpp{tag}", f"mpr{tag}"
    try:
        run("ip", "netns", "add", pod)
        run("ip", "netns", "add", remote)
        run("ip", "link", "add", veth_pod, "type", "veth", "peer", "name", veth_remote)
        run("ip", "link", "set", veth_pod, "netns", pod)
        run("ip", "link", "set", veth_remote, "netns", remote)
        run("ip", "-n", pod, "addr", "add", "10.78.0.1/24", "dev", veth_pod)
        run("ip", "-n", remote, "addr", "add", "10.78.0.2/24", "dev", veth_remote)
        # IPv6 too (nodad: usable at once), for ip6tables capture.
        run("ip", "-n", pod, "addr", "add", "fd00:78::1/64", "dev", veth_pod, "nodad")
        run("ip", "-n", remote, "addr", "add", "fd00:78::2/64", "dev", veth_remote, "nodad")
        for ns, dev in ((pod, veth_pod), (remote, veth_remote)):
            run("ip", "-n", ns, "link", "set", "lo", "up")
            run("ip", "-n", ns, "link", "set", dev, "up")
        # Service VIPs are routed out of the pod like in a cluster (kube-proxy's range).
        run("ip", "-n", pod, "route", "add", "10.96.0.0/16", "via", "10.78.0.2")
        yield pod, remote
    finally:
        subprocess.run(["ip", "netns", "del", pod], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", remote], capture_output=True, timeout=30)
