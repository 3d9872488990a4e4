"""`meshproxy bench`: meshproxy against direct calls, nginx and a bare relay, in one run.

Each contender serves the same upstream and gets the same closed-loop load (wrk, or the
built-in client); proxies are pinned to CPU 1 and the load and upstream to CPU 0 where there
are two cores. The table gives req/s, p50/p99, the proxy's CPU per request, and every figure
as a ratio to the baselines measured in the same run: on a shared machine absolute figures
drift from minute to minute, ratios of one run much less.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from meshproxy.bench.loadgen import LoadResult, Target, available_generator, run_load
from meshproxy.bench.processes import (
    NGINX_PROXY,
    NGINX_UPSTREAM,
    Processes,
    builtin_upstream_cmd,
    cpu_seconds,
    free_port,
    nginx_available,
    nginx_cmd,
    pinning,
    wait_port,
)

LOAD_CPU, PROXY_CPU = 0, 1
WARMUP_SECONDS = 2
DIRECT, NGINX, RELAY, MESHPROXY = "direct", "nginx", "bare relay", "meshproxy"

BUILTIN_MESH = """\
apiVersion: meshproxy.io/v1alpha1
kind: ProxyConfig
metadata: {{name: bench}}
spec:
  interceptionMode: NONE
  proxyAdminPort: {admin}
  statusPort: 0
  upstreamIdleTimeout: 60s{access_log}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: bench}}
spec:
  hosts: [{host}]
  ports: [{{number: {port}, name: http, protocol: HTTP}}]
  resolution: {resolution}
  endpoints: [{{address: {upstream_host}, ports: {{http: {upstream_port}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: bench}}
spec:
  hosts: [{host}]
  http:
  - match: [{{uri: {{prefix: /never}}}}]
    route: [{{destination: {{host: {host}}}}}]
  - route: [{{destination: {{host: {host}}}}}]
    headers: {{response: {{set: {{x-mesh: bench}}}}}}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: default}}
spec:
  egress:
  - port: {{number: {port}, protocol: HTTP, name: http}}
    bind: 127.0.0.1
    hosts: ["*/{host}"]
"""


class BenchError(Exception):
    """Something the harness cannot do as asked; its message says what and why."""


@dataclass
class Contender:
    name: str
    host: str
    port: int
    cmd: list[str] | None = None  # None: already running (the upstream itself)


@dataclass
class Row:
    name: str
    runs: list[LoadResult] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)  # proxy CPU per request, per run

    @property
    def rps(self) -> float:
        return median([r.rps for r in self.runs])

    @property
    def cpu(self) -> float | None:
        return median(self.cpu_us) if self.cpu_us else None


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else 0.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", type=_seconds, default=10, help="seconds of load per contender")
    p.add_argument("--connections", type=_count, default=50, help="concurrent connections")
    p.add_argument("--runs", type=_count, default=1, help="runs; each figure is their median")
    p.add_argument(
        "--generator",
        choices=["auto", "wrk", "builtin"],
        default="auto",
        help="the load generator: wrk when installed (auto), or the built-in uvloop client",
    )
    p.add_argument(
        "--upstream",
        metavar="URL",
        help="benchmark against your own service (http://host:port) instead of a built-in one",
    )
    p.add_argument(
        "-c",
        "--config",
        metavar="PATH",
        help="run meshproxy with your config instead of a built-in one (set --target, --host)",
    )
    p.add_argument(
        "--target",
        metavar="HOST:PORT",
        help="with --config: the meshproxy listener to load (default: its first explicit one)",
    )
    p.add_argument("--host", help="the Host header (default: bench.local, or --upstream's)")
    p.add_argument("--path", default="/", help="the request path")
    p.add_argument("--access-log", action="store_true", help="built-in config: access log on")
    p.add_argument("--no-nginx", action="store_true", help="leave out nginx even if installed")
    p.add_argument("--no-relay", action="store_true", help="leave out the bare relay baseline")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    p.add_argument("--json", action="store_true", help="print the results as JSON only")


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def _seconds(text: str) -> int:
    value = _count(text)
    if value > 3600:
        raise argparse.ArgumentTypeError("at most 3600 seconds")
    return value


def _split_url(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise BenchError(f"--upstream must be http://host[:port], got {url!r}")
    try:
        port = parts.port or 80
    except ValueError:
        raise BenchError(f"--upstream has an invalid port: {url!r}") from None
    return parts.hostname, port


def _split_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise BenchError(f"--target must be HOST:PORT, got {text!r}")
    return host or "127.0.0.1", int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.procs = Processes(workdir)
        self.pin = not args.no_pin and (os.cpu_count() or 1) >= 2
        self.generator = available_generator(args.generator)
        self.host_header = args.host or "bench.local"

    def cpu(self, which: int) -> int | None:
        return which if self.pin else None

    # -- setting up ------------------------------------------------------------------------
    def upstream(self) -> tuple[str, int]:
        if self.args.upstream:
            host, port = _split_url(self.args.upstream)
            if not self.args.host:
                self.host_header = f"{host}:{port}" if port != 80 else host
            try:
                wait_port(host, port, timeout=5)
            except TimeoutError:
                raise BenchError(
                    f"--upstream {self.args.upstream}: nothing answers there"
                ) from None
            return host, port
        port = free_port()
        if nginx_available():
            cmd = nginx_cmd(
                self.workdir, "upstream", NGINX_UPSTREAM.format(dir=self.workdir, port=port)
            )
        else:
            cmd = builtin_upstream_cmd(port)
        self.procs.start("upstream", cmd, self.cpu(LOAD_CPU))
        wait_port("127.0.0.1", port)
        return "127.0.0.1", port

    def contenders(self, up_host: str, up_port: int) -> list[Contender]:
        found = [Contender(DIRECT, up_host, up_port)]
        if not self.args.no_nginx and nginx_available():
            port = free_port()
            config = NGINX_PROXY.format(
                dir=self.workdir, port=port, upstream=f"{up_host}:{up_port}"
            )
            found.append(
                Contender(NGINX, "127.0.0.1", port, nginx_cmd(self.workdir, "nginx", config))
            )
        if not self.args.no_relay:
            port = free_port()
            relay = [sys.executable, "-m", "meshproxy.bench.relay", str(port), str(up_port)]
            found.append(Contender(RELAY, "127.0.0.1", port, [*relay, up_host]))
        found.append(self.meshproxy(up_host, up_port))
        return found

    def meshproxy(self, up_host: str, up_port: int) -> Contender:
        run = [sys.executable, "-m", "meshproxy", "--log-level", "warning", "run", "-c"]
        if self.args.config:
            config = Path(self.args.config)
            host, port = self._user_target(config)
            return Contender(MESHPROXY, host, port, [*run, str(config)])
        port = free_port()
        config_dir = self.workdir / "mesh"
        config_dir.mkdir()
        (config_dir / "mesh.yaml").write_text(
            BUILTIN_MESH.format(
                admin=free_port(),
                host=self.host_header.split(":")[0],
                port=port,
                resolution="STATIC" if _is_ip(up_host) else "DNS",
                upstream_host=up_host,
                upstream_port=up_port,
                access_log=f"\n  accessLogFile: {self.workdir / 'access.log'}"
                if self.args.access_log
                else "",
            )
        )
        self.host_header = f"{self.host_header.split(':')[0]}:{port}"
        return Contender(MESHPROXY, "127.0.0.1", port, [*run, str(config_dir)])

    def _user_target(self, config: Path) -> tuple[str, int]:
        from meshproxy.config.loader import load_snapshot
        from meshproxy.config.snapshot import ListenerKind
        from meshproxy.errors import ConfigError

        if self.args.target:
            return _split_hostport(self.args.target)
        try:
            snapshot = load_snapshot(config)
        except ConfigError as exc:
            raise BenchError(f"--config {config} is invalid:\n{exc}") from None
        explicit = [
            spec
            for spec in snapshot.listeners
            if spec.kind not in (ListenerKind.OUTBOUND_CAPTURE, ListenerKind.INBOUND_CAPTURE)
        ]
        if not explicit:
            raise BenchError(f"--config {config} has no explicit listener: give --target")
        host = explicit[0].address
        return ("127.0.0.1" if host in ("0.0.0.0", "::") else host), explicit[0].port

    # -- measuring -------------------------------------------------------------------------
    def run(self) -> list[Row]:
        up_host, up_port = self.upstream()
        contenders = self.contenders(up_host, up_port)
        rows = {c.name: Row(c.name) for c in contenders}
        steps = len(contenders) * self.args.runs
        step = 0
        for run in range(1, self.args.runs + 1):
            for contender in contenders:
                step += 1
                self.progress(f"[{step}/{steps}] {contender.name}, run {run}/{self.args.runs}")
                self.measure(contender, rows[contender.name])
        return list(rows.values())

    def measure(self, contender: Contender, row: Row) -> None:
        proc = None
        if contender.cmd is not None:
            proc = self.procs.start(contender.name, contender.cmd, self.cpu(PROXY_CPU))
        try:
            try:
                wait_port(contender.host, contender.port)
            except TimeoutError:
                tail = self.procs.log_tail(contender.name)
                raise BenchError(f"{contender.name} did not start:\n{tail}") from None
            target = Target(contender.host, contender.port, self.host_header, self.args.path)
            load_cpu = pinning(self.cpu(LOAD_CPU))
            try:
                run_load(self.generator, target, self.args.connections, WARMUP_SECONDS, load_cpu)
                before = cpu_seconds(proc.pid) if proc else 0.0
                result = run_load(
                    self.generator, target, self.args.connections, self.args.duration, load_cpu
                )
            except (subprocess.SubprocessError, ValueError) as exc:
                detail = getattr(exc, "stderr", "") or ""
                raise BenchError(f"load on {contender.name} failed: {exc}\n{detail}") from None
            if proc is not None and result.requests:
                row.cpu_us.append((cpu_seconds(proc.pid) - before) / result.requests * 1e6)
            row.runs.append(result)
        finally:
            if proc is not None:
                self.procs.stop(proc)

    def progress(self, text: str) -> None:
        print(f"meshproxy bench: {text} ({self.args.duration} s)", file=sys.stderr, flush=True)


def ratios(rows: list[Row]) -> list[dict[str, object]]:
    """Each row's figures and its ratios to the baselines of the same run."""
    by = {r.name: r for r in rows}

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a and b else None

    out = []
    for row in rows:
        nginx, relay = by.get(NGINX), by.get(RELAY)
        out.append(
            {
                "name": row.name,
                "rps": round(row.rps, 1),
                "x_direct": ratio(row.rps, by[DIRECT].rps),
                "x_nginx": ratio(row.rps, nginx.rps if nginx else None),
                "p50_ms": round(median([r.p50_ms for r in row.runs]), 3),
                "p99_ms": round(median([r.p99_ms for r in row.runs]), 3),
                "cpu_us_per_request": round(row.cpu, 2) if row.cpu is not None else None,
                "cpu_x_nginx": ratio(row.cpu, nginx.cpu if nginx else None),
                "cpu_x_relay": ratio(row.cpu, relay.cpu if relay else None),
                "errors": sum(r.errors for r in row.runs),
                "runs": [asdict(r) for r in row.runs],
            }
        )
    return out


def table(rows: list[dict[str, object]]) -> str:
    def cell(value: object, digits: int = 2) -> str:
        if value is None:
            return "-"
        return f"{value:,.{digits}f}" if isinstance(value, float) else str(value)

    head = (
        f"{'contender':<12}{'req/s':>10}{'x direct':>10}{'x nginx':>9}{'p50 ms':>9}"
        f"{'p99 ms':>9}{'CPU us/req':>12}{'CPU x nginx':>13}{'CPU x relay':>13}{'errors':>8}"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['name']!s:<12}{cell(r['rps'], 0):>10}{cell(r['x_direct']):>10}"
            f"{cell(r['x_nginx']):>9}{cell(r['p50_ms'], 3):>9}{cell(r['p99_ms'], 3):>9}"
            f"{cell(r['cpu_us_per_request'], 1):>12}{cell(r['cpu_x_nginx']):>13}"
            f"{cell(r['cpu_x_relay']):>13}{r['errors']!s:>8}"
        )
    return "\n".join(lines)


def reproduce(args: argparse.Namespace) -> str:
    parts = ["meshproxy bench", f"--duration {args.duration}", f"--connections {args.connections}"]
    parts.append(f"--runs {args.runs} --generator {args.generator}")
    for flag in ("upstream", "config", "target", "host"):
        if getattr(args, flag):
            parts.append(f"--{flag} {getattr(args, flag)}")
    return " ".join(parts)


def main(args: argparse.Namespace) -> int:
    from meshproxy import __version__
    from meshproxy.buildinfo import describe

    with tempfile.TemporaryDirectory(prefix="meshproxy-bench-") as tmp:
        try:
            bench = Bench(args, Path(tmp))
        except ValueError as exc:
            print(f"meshproxy bench: {exc}", file=sys.stderr)
            return 2
        try:
            rows = ratios(bench.run())
        except BenchError as exc:
            print(f"meshproxy bench: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("meshproxy bench: interrupted", file=sys.stderr)
            return 130
        finally:
            bench.procs.stop_all()
    meta = {
        "meshproxy": __version__,
        "hot_path": describe(),
        "generator": bench.generator,
        "connections": args.connections,
        "duration_s": args.duration,
        "runs": args.runs,
        "pinned": bench.pin,
        "reproduce": reproduce(args),
    }
    if args.json:
        print(json.dumps({**meta, "rows": rows}, indent=2))
        return 0
    print(
        f"\nmeshproxy {__version__} (hot path {describe()}); load: {bench.generator}, "
        f"{args.connections} connections, {args.duration} s, median of {args.runs} run(s)"
        + ("; proxies on CPU 1, load and upstream on CPU 0" if bench.pin else "")
    )
    print(table(rows))
    print(f"\nreproduce: {meta['reproduce']}")
    return 0
