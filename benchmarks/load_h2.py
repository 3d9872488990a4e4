"""HTTP/2 load harness: h2load (h2c prior knowledge) direct vs nginx vs meshproxy, same run.

    python -m benchmarks.load_h2 [--requests 50000] [--runs 1] [--variants ...]

Upstream: nginx answering `return 200 "hello"` on an HTTP/1.1 port and on an h2c port.
Measured with `h2load -c10 -m10` (10 connections x 10 concurrent streams):
  direct            h2load → nginx h2c upstream
  nginx h2c → h1    nginx as an h2c reverse proxy (one worker, keep-alive upstream)
  nghttpx h2c → h1  when nghttpx is installed (apt-get install nghttp2-proxy)
  meshproxy ...     h2c → h1 (HTTP port) and h2c → h2 (HTTP2 port), interpreted and mypyc
Proxies pinned to CPU 1, h2load and the upstream to CPU 0. Prints req/s, mean latency, proxy
CPU per request and ratios against direct and nginx measured in this run.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from benchmarks.load import (
    Processes,
    by_config,
    compiled_copy,
    free_port,
    med,
    meshproxy_cmd,
    tree_cpu_seconds,
    wait_port,
)

NGINX_UPSTREAM = """
worker_processes 1; daemon off; pid {dir}/up.pid; error_log {dir}/up.err;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 1000000; http2_max_requests 1000000;
  server {{ listen 127.0.0.1:{h1}; location / {{ return 200 "hello"; }} }}
  server {{ listen 127.0.0.1:{h2} http2; location / {{ return 200 "hello"; }} }} }}
"""
NGINX_PROXY = """
worker_processes 1; daemon off; pid {dir}/px.pid; error_log {dir}/px.err;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 1000000; http2_max_requests 1000000;
  upstream up {{ server 127.0.0.1:{upstream}; keepalive 256; keepalive_requests 1000000; }}
  server {{ listen 127.0.0.1:{port} http2;
    location / {{ proxy_pass http://up; proxy_http_version 1.1;
      proxy_set_header Connection ""; }} }} }}
"""
MESH = """
apiVersion: meshproxy.io/v1alpha1
kind: ProxyConfig
metadata: {{name: bench}}
spec: {{interceptionMode: NONE, proxyAdminPort: {admin}, statusPort: 0, upstreamIdleTimeout: 60s}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: bench}}
spec:
  hosts: [bench.local]
  ports: [{{number: {port}, name: {proto_name}, protocol: {proto}}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{{proto_name}: {upstream}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: bench}}
spec:
  hosts: [bench.local]
  http:
  - match: [{{uri: {{prefix: /never}}}}]
    route: [{{destination: {{host: bench.local}}}}]
  - route: [{{destination: {{host: bench.local}}}}]
    headers: {{response: {{set: {{x-mesh: bench}}}}}}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: default}}
spec:
  egress:
  - port: {{number: {port}, protocol: {proto}, name: {proto_name}}}
    bind: 127.0.0.1
    hosts: ["*/bench.local"]
"""


@dataclass
class Result:
    name: str
    rps: float
    mean_ms: float
    cpu_us: float | None
    failed: int


def run_h2load(port: int, requests: int) -> tuple[float, float, int, int]:
    cmd = [
        "taskset",
        "-c",
        "0",
        "h2load",
        "-n",
        str(requests),
        "-c",
        "10",
        "-m",
        "10",
        "-H",
        ":authority: bench.local",
        f"http://127.0.0.1:{port}/",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True).stdout
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))  # type: ignore[union-attr]
    m = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded", out)
    assert m, out
    total, done, ok = (int(x) for x in m.groups())
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)", out)
    assert mean, out
    value, unit = float(mean.group(1)), mean.group(2)
    mean_ms = value / 1000 if unit == "us" else value * 1000 if unit == "s" else value
    return rps, mean_ms, done, total - ok


def measure(name: str, port: int, pid: int | None, requests: int) -> Result:
    run_h2load(port, max(requests // 10, 1000))  # warm-up, not recorded
    before = tree_cpu_seconds(pid) if pid else 0.0
    rps, mean_ms, done, failed = run_h2load(port, requests)
    cpu_us = (tree_cpu_seconds(pid) - before) / done * 1e6 if pid and done else None
    return Result(name, rps, mean_ms, cpu_us, failed)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=50_000)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument(
        "--variants",
        default="h1,h2,h1-mypyc",
        help="meshproxy upstream protocol (h1: HTTP port, h2: HTTP2 port); -mypyc compiles "
        "the hot path",
    )
    args = ap.parse_args(argv)
    for tool in ("h2load", "nginx", "taskset"):
        if shutil.which(tool) is None:
            print(
                f"{tool} is required (apt-get install nghttp2-client nginx-light)", file=sys.stderr
            )
            return 2
    tmp = Path(tempfile.mkdtemp(prefix="meshproxy-bench-h2-"))
    procs = Processes()
    results: list[list[Result]] = []
    try:
        up_h1, up_h2 = free_port(), free_port()
        (tmp / "up.conf").write_text(NGINX_UPSTREAM.format(dir=tmp, h1=up_h1, h2=up_h2))
        procs.start(["taskset", "-c", "0", "nginx", "-c", str(tmp / "up.conf"), "-p", str(tmp)])
        wait_port(up_h1)
        wait_port(up_h2)
        targets: list[tuple[str, list[str] | None, int, str | None]] = [
            ("direct (nginx h2c)", None, up_h2, None)
        ]
        ng = free_port()
        (tmp / "px.conf").write_text(NGINX_PROXY.format(dir=tmp, port=ng, upstream=up_h1))
        targets.append(
            (
                "nginx h2c->h1",
                ["taskset", "-c", "1", "nginx", "-c", str(tmp / "px.conf"), "-p", str(tmp)],
                ng,
                None,
            )
        )
        if shutil.which("nghttpx"):
            nx = free_port()
            targets.append(
                (
                    "nghttpx h2c->h1",
                    [
                        "taskset",
                        "-c",
                        "1",
                        "nghttpx",
                        "--conf=/dev/null",
                        "-n1",
                        f"--frontend=127.0.0.1,{nx};no-tls",
                        f"--backend=127.0.0.1,{up_h1}",
                        "--errorlog-file=/dev/null",
                        "--accesslog-file=/dev/null",
                    ],
                    nx,
                    None,
                )
            )
        for variant in args.variants.split(","):
            proto, _, build = variant.partition("-")
            cwd = None
            if build == "mypyc":
                cwd = compiled_copy(tmp / "compiled")
                if cwd is None:
                    continue
            port, admin = free_port(), free_port()
            cfg = tmp / f"mesh-{variant}"
            cfg.mkdir()
            h2 = proto == "h2"
            (cfg / "mesh.yaml").write_text(
                MESH.format(
                    admin=admin,
                    port=port,
                    upstream=up_h2 if h2 else up_h1,
                    proto="HTTP2" if h2 else "HTTP",
                    proto_name="http2" if h2 else "http",
                )
            )
            name = f"meshproxy h2c->{proto}{' (mypyc)' if build else ''}"
            targets.append((name, meshproxy_cmd(cfg), port, cwd))
        for _ in range(args.runs):
            run: list[Result] = []
            for name, cmd, port, cwd in targets:
                proc = procs.start(cmd, cwd) if cmd else None
                wait_port(port)
                run.append(measure(name, port, proc.pid if proc else None, args.requests))
                if proc:
                    procs.stop(proc)
            results.append(run)
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    report(results, args)
    return 0


def report(results: list[list[Result]], args: argparse.Namespace) -> None:
    by_name = by_config(results)
    direct = med([r.rps for r in by_name["direct (nginx h2c)"]])
    nginx = med([r.rps for r in by_name["nginx h2c->h1"]])
    print(
        f"\nh2load -n{args.requests} -c10 -m10 (h2c), median of {args.runs} run(s); "
        "proxies pinned to CPU 1, h2load and upstream nginx to CPU 0"
    )
    print(
        f"{'config':<30}{'req/s':>10}{'x direct':>10}{'x nginx':>9}{'mean ms':>9}"
        f"{'CPU us/req':>12}{'failed':>8}"
    )
    for name, rs in by_name.items():
        rps = med([r.rps for r in rs])
        cpu = [r.cpu_us for r in rs if r.cpu_us is not None]
        print(
            f"{name:<30}{rps:>10.0f}{rps / direct:>10.2f}{rps / nginx:>9.2f}"
            f"{med([r.mean_ms for r in rs]):>9.2f}"
            f"{(f'{med(cpu):.1f}' if cpu else '-'):>12}{sum(r.failed for r in rs):>8}"
        )
    print(
        f"\nreproduce: python -m benchmarks.load_h2 --requests {args.requests} "
        f"--runs {args.runs} --variants {args.variants}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
