"""Istio's published benchmark point, for meshproxy: two sidecars with mTLS between them,
metrics on, 1 KiB payloads at a fixed 1000 requests/s over 16 connections.

    python -m benchmarks.istio_point [--duration 60] [--rps 1000] [--connections 16]
                                     [--payload 1024] [--mypyc]

fixed-rate client → client sidecar (egress) → ISTIO_MUTUAL / STRICT → server sidecar
(ingress) → nginx answering 1 KiB. Then the same client straight at nginx, for the latency
the sidecars add. Sidecars pinned to CPU 1; client and nginx to CPU 0. Reports each
sidecar's vCPU (CPU seconds / wall seconds over the measured window) and RSS at its end, and
p50/p90/p99 direct, through the mesh, and added. Istio publishes 0.20 vCPU and 60 MB per
Envoy sidecar at this point (1000 rps, 16 connections, 1 KiB); our targets are 0.10 vCPU
and 40 MiB. --mypyc runs the compiled hot path (what the image ships).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.load import (
    Processes,
    compiled_copy,
    free_port,
    tree_cpu_seconds,
    wait_port,
)
from benchmarks.load_mtls import ca, pair

NGINX_1K = """
worker_processes 1; daemon off; pid {dir}/up.pid; error_log {dir}/up.err;
events {{ worker_connections 1024; }}
http {{ access_log off; keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{port}; location / {{ return 200 "{body}"; }} }} }}
"""


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its children (a sidecar with workers is several)."""
    total = 0
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    for p in pids:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def load(port: int, host: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = ["taskset", "-c", "0", sys.executable, "-m", "benchmarks.fixed_rate", "127.0.0.1"]
    cmd += [str(port), host, str(args.connections), str(args.rps), str(args.duration)]
    cmd += [str(args.payload)]
    out = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=args.duration + 120,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration", type=int, default=60)
    ap.add_argument("--rps", type=float, default=1000)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--payload", type=int, default=1024)
    ap.add_argument("--mypyc", action="store_true", help="sidecars with the compiled hot path")
    args = ap.parse_args(argv)
    for tool in ("nginx", "taskset"):
        if shutil.which(tool) is None:
            print(f"{tool} is required", file=sys.stderr)
            return 2
    tmp = Path(tempfile.mkdtemp(prefix="meshproxy-istio-point-"))
    ca("init", "--dir", str(tmp / "ca"))
    for name in ("client", "server"):
        spiffe = f"spiffe://cluster.local/ns/default/sa/{name}"
        ca("issue", "--ca", str(tmp / "ca"), "--spiffe-id", spiffe, "--out", str(tmp / name))
    cwd = compiled_copy(tmp / "compiled") if args.mypyc else None
    if args.mypyc and cwd is None:
        return 2
    procs = Processes()
    try:
        up = free_port()
        (tmp / "up.conf").write_text(NGINX_1K.format(dir=tmp, port=up, body="x" * args.payload))
        procs.start(["taskset", "-c", "0", "nginx", "-c", str(tmp / "up.conf"), "-p", str(tmp)])
        wait_port(up)
        direct = load(up, "bench.local", args)
        port, (server_pid, client_pid) = pair(procs, tmp, up, True, cwd, sys.executable)
        time.sleep(1.0)  # settled: certificates loaded, listeners up
        before = {pid: tree_cpu_seconds(pid) for pid in (server_pid, client_pid)}
        started = time.monotonic()
        mesh = load(port, "bench.local", args)
        wall = time.monotonic() - started
        vcpu = {pid: (tree_cpu_seconds(pid) - before[pid]) / wall for pid in before}
        rss = {pid: rss_mib(pid) for pid in before}
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    build = "compiled (mypyc)" if cwd else "interpreted"
    print(
        f"\nIstio's point: {args.rps:.0f} req/s fixed, {args.connections} connections, "
        f"{args.payload} B payloads, {args.duration} s, mTLS between two sidecars, metrics on, "
        f"{build} build"
    )
    for label, result in (("direct", direct), ("through the mesh", mesh)):
        print(
            f"  {label:<17} {result['rps']:7.1f} req/s  p50 {result['p50_ms']:.3f} ms  "
            f"p90 {result['p90_ms']:.3f} ms  p99 {result['p99_ms']:.3f} ms  "
            f"errors {result['errors']:.0f} (statuses {result['statuses']})"
        )
    added = {q: mesh[f"{q}_ms"] - direct[f"{q}_ms"] for q in ("p50", "p90", "p99")}
    print(
        f"  added latency      p50 {added['p50']:.3f} ms  p90 {added['p90']:.3f} ms  "
        f"p99 {added['p99']:.3f} ms"
    )
    for label, pid in (("client sidecar", client_pid), ("server sidecar", server_pid)):
        print(f"  {label}: {vcpu[pid]:.3f} vCPU, {rss[pid]:.1f} MiB RSS")
    print("  (Istio publishes 0.20 vCPU and 60 MB per sidecar here; targets 0.10 and 40 MiB)")
    print(
        f"\nreproduce: python -m benchmarks.istio_point --duration {args.duration}"
        f"{' --mypyc' if cwd else ''}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
