"""mTLS cost: two sidecars with mTLS between them vs the same two in plaintext, same run;
and full TLS handshakes per second on one worker.

    python -m benchmarks.load_mtls [--duration 8] [--runs 1] [--handshake-seconds 8] [--mypyc]
                                   [--python PATH]

wrk (keep-alive, -c50) → client sidecar (egress) → server sidecar (ingress) → nginx. With
mTLS the hop between the sidecars is ISTIO_MUTUAL / PeerAuthentication STRICT, certificates
from meshproxy's CA (ECDSA P-256). Both sidecars are pinned to CPU 1, wrk and nginx to CPU 0.
Handshakes: benchmarks.handshake_client processes (CPU 0, 8 connections each, presenting a
client certificate, no session reuse) against the server sidecar alone (CPU 1); its CPU time
per handshake is reported too.
--mypyc runs the sidecars with the hot path compiled (what the container image ships).
--python runs the sidecars with another interpreter: scripts/openssl-python.sh writes one that
links OpenSSL 3.5, as the container image does, on a machine whose own OpenSSL is 3.0 (whose
record layer and handshakes cost markedly more).
Each run measures plaintext then mTLS back to back; the ratio reported is the median of the
per-run ratios, which the VM's drift between runs disturbs least.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.load import (
    NGINX_UPSTREAM,
    Processes,
    compiled_copy,
    free_port,
    med,
    meshproxy_cmd,
    run_wrk,
    tree_cpu_seconds,
    wait_port,
)

SERVER = """
apiVersion: meshproxy.io/v1alpha1
kind: ProxyConfig
metadata: {{name: server}}
spec:
  interceptionMode: NONE
  proxyAdminPort: {admin}
  statusPort: 0
  upstreamIdleTimeout: 60s
  certificates: {{certChain: {certs}/cert-chain.pem, privateKey: {certs}/key.pem,
                 rootCert: {certs}/root-cert.pem}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: default}}
spec: {{mtls: {{mode: {mode}}}}}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: default}}
spec:
  ingress:
  - port: {{number: {port}, protocol: HTTP, name: http}}
    bind: 127.0.0.1
    captureMode: NONE
    defaultEndpoint: 127.0.0.1:{upstream}
"""
CLIENT = """
apiVersion: meshproxy.io/v1alpha1
kind: ProxyConfig
metadata: {{name: client}}
spec:
  interceptionMode: NONE
  proxyAdminPort: {admin}
  statusPort: 0
  upstreamIdleTimeout: 60s
  certificates: {{certChain: {certs}/cert-chain.pem, privateKey: {certs}/key.pem,
                 rootCert: {certs}/root-cert.pem}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: bench}}
spec:
  hosts: [bench.local]
  ports: [{{number: {port}, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {server}}}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: bench}}
spec: {{host: bench.local, trafficPolicy: {{tls: {{mode: {tls}}}}}}}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: default}}
spec:
  egress:
  - {{port: {{number: {port}, protocol: HTTP, name: http}}, bind: 127.0.0.1, hosts: [./*]}}
"""


def ca(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "meshproxy", "ca", *args],
        check=True,
        capture_output=True,
        timeout=60,
    )


def pair(
    procs: Processes, tmp: Path, up: int, mtls: bool, cwd: str | None, python: str
) -> tuple[int, list[int]]:
    name = "mtls" if mtls else "plain"
    s_port, c_port = free_port(), free_port()
    (tmp / f"s-{name}").mkdir(exist_ok=True)
    (tmp / f"s-{name}" / "mesh.yaml").write_text(
        SERVER.format(
            admin=free_port(),
            certs=tmp / "server",
            mode="STRICT" if mtls else "DISABLE",
            port=s_port,
            upstream=up,
        )
    )
    (tmp / f"c-{name}").mkdir(exist_ok=True)
    (tmp / f"c-{name}" / "mesh.yaml").write_text(
        CLIENT.format(
            admin=free_port(),
            certs=tmp / "client",
            port=c_port,
            server=s_port,
            tls="ISTIO_MUTUAL" if mtls else "DISABLE",
        )
    )
    server = procs.start(meshproxy_cmd(tmp / f"s-{name}", python), cwd)
    client = procs.start(meshproxy_cmd(tmp / f"c-{name}", python), cwd)
    wait_port(s_port)
    wait_port(c_port)
    return c_port, [server.pid, client.pid]


def handshakes(
    tmp: Path, port: int, pid: int, seconds: int, clients: int, python: str
) -> tuple[float, float, int]:
    """Handshakes per second measured, proxy CPU per handshake, and failed handshakes."""
    before = tree_cpu_seconds(pid)
    cmd = ["taskset", "-c", "0", python, "-m", "benchmarks.handshake_client", str(port)]
    cmd += [str(seconds), "8", str(tmp / "client")]
    runs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
        for _ in range(clients)
    ]
    total = errors = 0
    for r in runs:
        out, _ = r.communicate(timeout=seconds + 60)
        done, failed = (int(x) for x in out.split())
        total += done
        errors += failed
    cpu = tree_cpu_seconds(pid) - before
    return total / seconds, (cpu / total * 1e6 if total else 0.0), errors


def openssl_version(python: str) -> str:
    """The OpenSSL the sidecars' interpreter is linked against (it sets their TLS costs)."""
    out = subprocess.run(
        [python, "-c", "import ssl; print(ssl.OPENSSL_VERSION)"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return " ".join(out.stdout.split()[:2])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--handshake-seconds", type=int, default=8)
    ap.add_argument("--handshake-clients", type=int, default=2, help="client processes")
    ap.add_argument("--mypyc", action="store_true", help="sidecars with the compiled hot path")
    ap.add_argument(
        "--python",
        default=sys.executable,
        help="the interpreter that runs the sidecars (one linked against another OpenSSL: "
        "scripts/openssl-python.sh); default: this one",
    )
    args = ap.parse_args(argv)
    for tool in ("wrk", "nginx", "taskset"):
        if shutil.which(tool) is None:
            print(f"{tool} is required", file=sys.stderr)
            return 2
    tmp = Path(tempfile.mkdtemp(prefix="meshproxy-bench-mtls-"))
    ca("init", "--dir", str(tmp / "ca"))
    ca(
        "issue",
        "--ca",
        str(tmp / "ca"),
        "--spiffe-id",
        "spiffe://cluster.local/ns/default/sa/client",
        "--out",
        str(tmp / "client"),
    )
    ca(
        "issue",
        "--ca",
        str(tmp / "ca"),
        "--spiffe-id",
        "spiffe://cluster.local/ns/default/sa/server",
        "--out",
        str(tmp / "server"),
    )
    cwd = compiled_copy(tmp / "compiled") if args.mypyc else None
    if args.mypyc and cwd is None:
        return 2
    procs = Processes()
    rows: dict[str, list[tuple[float, float, float]]] = {"plaintext": [], "mTLS": []}
    try:
        up = free_port()
        (tmp / "up.conf").write_text(NGINX_UPSTREAM.format(dir=tmp, port=up))
        procs.start(["taskset", "-c", "0", "nginx", "-c", str(tmp / "up.conf"), "-p", str(tmp)])
        wait_port(up)
        for _ in range(args.runs):
            for label, mtls in (("plaintext", False), ("mTLS", True)):
                port, pids = pair(procs, tmp, up, mtls, cwd, args.python)
                run_wrk(port, 2, 50, "0")
                before = sum(tree_cpu_seconds(p) for p in pids)
                rps, _p50, p99, total, errors = run_wrk(port, args.duration, 50, "0")
                cpu = (sum(tree_cpu_seconds(p) for p in pids) - before) / max(total, 1) * 1e6
                rows[label].append((rps, p99, cpu))
                if errors:
                    print(f"{label}: {errors} errors", file=sys.stderr)
                for p in list(procs.procs):
                    if p.pid in pids:
                        procs.stop(p)
        s_port = free_port()
        (tmp / "s-hs").mkdir()
        (tmp / "s-hs" / "mesh.yaml").write_text(
            SERVER.format(
                admin=free_port(), certs=tmp / "server", mode="STRICT", port=s_port, upstream=up
            )
        )
        server = procs.start(meshproxy_cmd(tmp / "s-hs", args.python), cwd)
        wait_port(s_port)
        time.sleep(0.5)
        hs, hs_cpu, hs_errors = handshakes(
            tmp, s_port, server.pid, args.handshake_seconds, args.handshake_clients, args.python
        )
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)

    ratios = [m[0] / p[0] for p, m in zip(rows["plaintext"], rows["mTLS"], strict=True)]
    print(
        f"\nwrk -c50 -d{args.duration}s through two sidecars ({'mypyc' if cwd else 'interpreted'}"
        f" build, {openssl_version(args.python)}), median of {args.runs} run(s); sidecars pinned"
        " to CPU 1, wrk and nginx to CPU 0"
    )
    print(
        f"{'hop between sidecars':<24}{'req/s':>10}{'x plain':>9}{'p99 ms':>9}"
        f"{'CPU us/req (both)':>20}"
    )
    for label, rs in rows.items():
        ratio = med(ratios) if label == "mTLS" else 1.0
        print(
            f"{label:<24}{med([r[0] for r in rs]):>10.0f}{ratio:>9.2f}"
            f"{med([r[1] for r in rs]):>9.2f}{med([r[2] for r in rs]):>20.1f}"
        )
    print("mTLS/plaintext per run: " + ", ".join(f"{x:.2f}" for x in ratios))
    print(
        f"\nfull mTLS handshakes (ECDSA P-256, client cert), one worker: {hs:.0f}/s measured "
        f"({args.handshake_clients}x8 clients on the other CPU, {hs_errors} failed); "
        f"{hs_cpu:.0f} us of proxy CPU each, so one saturated worker does "
        f"{1e6 / hs_cpu if hs_cpu else 0:.0f}/s"
    )
    print(
        f"\nreproduce: python -m benchmarks.load_mtls --duration {args.duration} --runs {args.runs}"
        + (" --mypyc" if cwd else "")
        + (f" --python {args.python}" if args.python != sys.executable else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
