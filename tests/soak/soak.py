"""Soak: mixed traffic through two sidecars with mTLS while the config and the certificates
change underneath, for minutes; then a verdict.

    python -m tests.soak.soak [--duration 600] [--swap-every 5] [--rotate-every 30] [--json]

client threads ──► client sidecar (egress) ══ mTLS (ISTIO_MUTUAL / STRICT) ══► server sidecar
  HTTP/1.1, HTTP/2, gRPC, WebSocket, TCP        (ingress) ──► HTTP, gRPC, WebSocket, TCP apps

Every `--swap-every` seconds the client sidecar's config is rewritten (a VirtualService's
retries and an added header alternate); every `--rotate-every` seconds both sidecars get new
leaf certificates. Sampled each second: both proxies' RSS and open descriptors. The verdict:
zero failed requests of any kind, RSS and descriptors flat within 10 % (last third of the run
against the first third after warm-up, descriptors with a slack of 8), no event-loop stall over
100 ms (the worst is reported), every swap applied and every rotation loaded.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from websockets.sync.client import connect as ws_connect

from tests.support.grpc_echo import GrpcEchoServer
from tests.support.h2client import H2Client
from tests.support.metrics import scrape, value
from tests.support.proxy import ProxyProcess, free_port, http_get
from tests.support.upstream import UpstreamServer

PROTOCOLS = "http1 http2 grpc websocket tcp"


@dataclass
class Ports:
    admin_c: int = field(default_factory=free_port)
    admin_s: int = field(default_factory=free_port)
    http: int = field(default_factory=free_port)  # client egress, HTTP/1.1 and HTTP/2
    grpc: int = field(default_factory=free_port)
    ws: int = field(default_factory=free_port)
    tcp: int = field(default_factory=free_port)
    in_http: int = field(default_factory=free_port)  # server ingress ports
    in_grpc: int = field(default_factory=free_port)
    in_ws: int = field(default_factory=free_port)
    in_tcp: int = field(default_factory=free_port)


def _certs(work: Path) -> str:
    return (
        f"  certificates: {{certChain: {work}/cert-chain.pem, privateKey: {work}/key.pem, "
        f"rootCert: {work}/root-cert.pem}}\n"
    )


def server_yaml(p: Ports, work: Path, apps: dict[str, int]) -> str:
    ingress = "".join(
        f"  - {{port: {{number: {port}, protocol: {proto}, name: {name}}}, bind: 127.0.0.1, "
        f"captureMode: NONE, defaultEndpoint: '127.0.0.1:{apps[name]}'}}\n"
        for name, port, proto in (
            ("http", p.in_http, "HTTP"),
            ("grpc", p.in_grpc, "GRPC"),
            ("ws", p.in_ws, "HTTP"),
            ("tcp", p.in_tcp, "TCP"),
        )
    )
    return (
        "apiVersion: meshproxy.io/v1alpha1\nkind: ProxyConfig\nmetadata: {name: server}\nspec:\n"
        f"  interceptionMode: NONE\n  proxyAdminPort: {p.admin_s}\n  statusPort: 0\n"
        "  drainDuration: 1s\n" + _certs(work / "server") + "---\n"
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        "metadata: {name: default, namespace: default}\nspec: {mtls: {mode: STRICT}}\n---\n"
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: default}\n"
        "spec:\n  ingress:\n" + ingress
    )


def client_yaml(p: Ports, work: Path, generation: int) -> str:
    """The client sidecar's config; `generation` alternates a VirtualService's settings."""
    services = ""
    for host, out, target, proto in (
        ("web.soak", p.http, p.in_http, "HTTP"),
        ("rpc.soak", p.grpc, p.in_grpc, "GRPC"),
        ("ws.soak", p.ws, p.in_ws, "HTTP"),
        ("tcp.soak", p.tcp, p.in_tcp, "TCP"),
    ):
        services += (
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n"
            f"metadata: {{name: {host.split('.')[0]}}}\nspec:\n  hosts: [{host}]\n"
            f"  ports: [{{number: {out}, name: p, protocol: {proto}}}]\n  resolution: STATIC\n"
            f"  endpoints: [{{address: 127.0.0.1, ports: {{p: {target}}}}}]\n---\n"
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
            f"metadata: {{name: {host.split('.')[0]}}}\n"
            f"spec: {{host: {host}, trafficPolicy: {{tls: {{mode: ISTIO_MUTUAL}}}}}}\n---\n"
        )
    attempts = 2 + generation % 2
    egress = "".join(
        f"  - {{port: {{number: {port}, protocol: {proto}, name: e{port}}}, bind: 127.0.0.1, "
        "hosts: [./*]}\n"
        for port, proto in ((p.http, "HTTP"), (p.grpc, "GRPC"), (p.ws, "HTTP"), (p.tcp, "TCP"))
    )
    return (
        "apiVersion: meshproxy.io/v1alpha1\nkind: ProxyConfig\nmetadata: {name: client}\nspec:\n"
        f"  interceptionMode: NONE\n  proxyAdminPort: {p.admin_c}\n  statusPort: 0\n"
        "  drainDuration: 1s\n  upstreamIdleTimeout: 30s\n"
        + _certs(work / "client")
        + "---\n"
        + services
        + "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web}\n"
        f"spec:\n  hosts: [web.soak]\n  http:\n  - headers: {{request: {{set: "
        f"{{x-generation: '{generation}'}}}}}}\n    retries: {{attempts: {attempts}}}\n"
        "    route: [{destination: {host: web.soak}}]\n---\n"
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: default}\n"
        "spec:\n  egress:\n" + egress
    )


class Tally:
    def __init__(self) -> None:
        self.ok: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.examples: dict[str, str] = {}
        self.lock = threading.Lock()

    def result(self, proto: str, ok: bool, why: str = "") -> None:
        with self.lock:
            if ok:
                self.ok[proto] += 1
            else:
                self.errors[proto] += 1
                self.examples.setdefault(proto, why)


def _loop(proto: str, stop: threading.Event, tally: Tally, once: Any) -> None:
    while not stop.is_set():
        try:
            once()
            tally.result(proto, True)
        except Exception as exc:  # every failure is counted, with its first reason
            tally.result(proto, False, f"{type(exc).__name__}: {exc}")
            time.sleep(0.05)


def traffic(p: Ports, stop: threading.Event, tally: Tally) -> list[threading.Thread]:
    def http1() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", p.http, timeout=10)
        try:
            for i in range(20):
                body = b"x" * (i * 100)
                conn.request("POST", f"/soak/{i}", body=body, headers={"Host": "web.soak"})
                resp = conn.getresponse()
                data = resp.read()
                if resp.status != 200 or b"x-generation" not in data:
                    raise RuntimeError(f"http1 {resp.status} {data[:80]!r}")
        finally:
            conn.close()

    def http2() -> None:
        c = H2Client(p.http, authority="web.soak", timeout=10)
        try:
            sids = [c.request(f"/h2/{i}") for i in range(10)]
            for r in c.wait(*sids):
                if r.status != 200:
                    raise RuntimeError(f"http2 status {r.status} reset {r.reset}")
        finally:
            c.close()

    def grpc_calls() -> None:
        options = [("grpc.default_authority", "rpc.soak")]
        with grpc.insecure_channel(f"127.0.0.1:{p.grpc}", options=options) as ch:
            call = ch.unary_unary("/test.Echo/Unary")
            for i in range(10):
                got = call(b"m%d" % i, timeout=10)
                if got != b"echo:m%d" % i:
                    raise RuntimeError(f"grpc got {got!r}")

    def websocket() -> None:
        sock = socket.create_connection(("127.0.0.1", p.ws), timeout=10)
        with ws_connect(f"ws://ws.soak:{p.ws}/soak", sock=sock, open_timeout=10) as ws:
            for i in range(10):
                ws.send(f"m{i}")
                if ws.recv(timeout=10) != f"m{i}":
                    raise RuntimeError("websocket echo mismatch")

    def tcp() -> None:
        with socket.create_connection(("127.0.0.1", p.tcp), timeout=10) as s:
            payload = os.urandom(2048)
            s.sendall(payload)
            got = b""
            while len(got) < len(payload):
                chunk = s.recv(65536)
                if not chunk:
                    raise RuntimeError("tcp closed early")
                got += chunk
            if got != payload:
                raise RuntimeError("tcp echo mismatch")

    fns = {"http1": http1, "http2": http2, "grpc": grpc_calls, "websocket": websocket, "tcp": tcp}
    only = os.environ.get("SOAK_ONLY")  # one protocol, to find which one a problem follows
    if only:
        fns = {only: fns[only]}
    threads = [
        threading.Thread(target=_loop, args=(name, stop, tally, fn), daemon=True)
        for name, fn in fns.items()
    ]
    for t in threads:
        t.start()
    return threads


class TcpEcho:
    def __init__(self) -> None:
        self.port = free_port()
        self.sock = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def stop(self) -> None:
        self.sock.close()


class WsEcho:
    """A WebSocket echo app on its own loop (websockets' asyncio server)."""

    def __init__(self) -> None:
        from tests.support.ws_echo import WsEchoServer

        self.server = WsEchoServer().start()
        self.port = self.server.port

    def stop(self) -> None:
        self.server.stop()


def issue(work: Path, who: str) -> None:
    """New leaf files for `who`, each replaced atomically (as a Secret volume update)."""
    fresh = work / f"{who}.new"
    shutil.rmtree(fresh, ignore_errors=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "meshproxy",
            "ca",
            "issue",
            "--ca",
            str(work / "ca"),
            "--spiffe-id",
            f"spiffe://cluster.local/ns/default/sa/{who}",
            "--out",
            str(fresh),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    target = work / who
    target.mkdir(exist_ok=True)
    for name in ("root-cert.pem", "key.pem", "cert-chain.pem"):
        os.replace(fresh / name, target / name)


def proc_sample(pid: int) -> tuple[int, int]:
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def flat(series: list[int], slack: int = 0) -> tuple[bool, float, float]:
    third = max(1, len(series) // 3)
    early = statistics.median(series[:third])
    late = statistics.median(series[-third:])
    return late <= early * 1.10 + slack, early, late


def run(duration: float, swap_every: float, rotate_every: float) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="meshproxy-soak-"))
    p = Ports()
    subprocess.run(
        [sys.executable, "-m", "meshproxy", "ca", "init", "--dir", str(work / "ca")],
        check=True,
        capture_output=True,
        timeout=60,
    )
    for who in ("client", "server"):
        issue(work, who)
    app, rpc, ws, echo = (
        UpstreamServer("app").start(),
        GrpcEchoServer().start(),
        WsEcho(),
        TcpEcho(),
    )
    apps = {"http": app.port, "grpc": rpc.port, "ws": ws.port, "tcp": echo.port}
    (work / "s").mkdir()
    (work / "c").mkdir()
    (work / "s" / "mesh.yaml").write_text(server_yaml(p, work, apps))
    (work / "c" / "mesh.yaml").write_text(client_yaml(p, work, 0))
    server = ProxyProcess(work / "s", p.admin_s, work / "server.log")
    client = ProxyProcess(work / "c", p.admin_c, work / "client.log")
    stop = threading.Event()
    tally = Tally()
    samples: dict[str, list[tuple[int, int]]] = {"client": [], "server": []}
    swaps = rotations = 0
    try:
        server.wait_ready()
        client.wait_ready()
        threads = traffic(p, stop, tally)
        start = time.monotonic()
        next_swap, next_rotation = start + swap_every, start + rotate_every
        warm = start + min(10.0, duration / 6)
        while (now := time.monotonic()) < start + duration:
            if now >= next_swap:
                swaps += 1
                (work / "c" / "mesh.yaml").write_text(client_yaml(p, work, swaps))
                next_swap += swap_every
            if now >= next_rotation:
                rotations += 1
                issue(work, "client")
                issue(work, "server")
                next_rotation += rotate_every
            if now >= warm:
                for name, proc in (("client", client), ("server", server)):
                    samples[name].append(proc_sample(proc.proc.pid))
            time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(timeout=30)
        time.sleep(1.5)  # the last swap is applied (debounce) before it is checked
        report: dict[str, Any] = {
            "duration_s": duration,
            "requests_ok": dict(tally.ok),
            "errors": dict(tally.errors),
            "first_errors": tally.examples,
            "config_swaps": swaps,
            "cert_rotations": rotations,
        }
        applied = json.loads(http_get(client.admin + "/config_dump")[1])["version"]
        report["config_versions_applied"] = applied - 1
        for name, proc in (("client", client), ("server", server)):
            metrics = scrape(proc.admin)
            rss_ok, rss0, rss1 = flat([s[0] for s in samples[name]])
            fd_ok, fd0, fd1 = flat([s[1] for s in samples[name]], slack=8)
            reloads = value(metrics, "meshproxy_cert_reload_total", result="ok") or 0
            report[name] = {
                "rss_kib": [rss0, rss1],
                "fds": [fd0, fd1],
                "rss_flat": rss_ok,
                "fds_flat": fd_ok,
                "worst_loop_lag_ms": round(
                    1000 * (value(metrics, "meshproxy_event_loop_lag_seconds_max") or 0), 1
                ),
                "loop_stalls_over_100ms": value(metrics, "meshproxy_event_loop_stalls_total"),
                "cert_reloads_ok": reloads,
            }
        report["passed"] = (
            not tally.errors
            and all(tally.ok[p_] > 0 for p_ in (os.environ.get("SOAK_ONLY") or PROTOCOLS).split())
            and report["config_versions_applied"] == swaps
            and all(report[n]["rss_flat"] and report[n]["fds_flat"] for n in ("client", "server"))
            and all(report[n]["loop_stalls_over_100ms"] == 0 for n in ("client", "server"))
            and all(report[n]["cert_reloads_ok"] >= rotations + 1 for n in ("client", "server"))
        )
        return report
    finally:
        stop.set()
        client.terminate()
        server.terminate()
        app.stop()
        rpc.stop()
        ws.stop()
        echo.stop()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of traffic")
    parser.add_argument("--swap-every", type=float, default=5.0, help="seconds between configs")
    parser.add_argument("--rotate-every", type=float, default=30.0, help="seconds between certs")
    parser.add_argument("--json", action="store_true", help="print the report as JSON only")
    args = parser.parse_args(argv)
    report = run(args.duration, args.swap_every, args.rotate_every)
    print(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    raise SystemExit(main())
