"""What telemetry costs per request: the same mesh with more of it switched on, same run.

    python -m benchmarks.telemetry [--duration 5] [--runs 3] [--tree DIR] [--variants K,..]
                                   [--compare TREE]

Variants, each a `meshproxy run` of the tree given (default: this checkout; give a copy from
scripts/compiled-copy.sh for the compiled build): telemetry off (the baseline: a Telemetry
resource disables every metric); metrics only; + a JSON access log to a file; + 1 % tracing
(OTLP/HTTP to a local collector that answers at once); + both (the middle case); + 100 %
tracing; and, when asked for, `unsampled` (tracing at 0 %: trace context only). All run
at once, proxies on CPU 1, and are loaded in turn by wrk (-c50, small GETs to an nginx
upstream; load on CPU 0) in short bursts, round after round: a shared machine
drifts over minutes, so each round's ratio to its own baseline is what is compared. Each
variant's CPU (all its threads, from the scheduler's nanosecond counts) is counted from one
burst's start to its next, so that its background threads' work is in, less its own idle
rate (measured first, all idle) for the time it waited. Prints CPU per request and ratios.
`--compare TREE` runs the same variants from a second build in the same rounds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from meshproxy.bench.harness import BUILTIN_MESH, median
from meshproxy.bench.loadgen import Target, run_load
from meshproxy.bench.processes import (
    NGINX_UPSTREAM,
    Processes,
    free_port,
    nginx_cmd,
    pinning,
    thread_cpu,
    wait_port,
)

PROVIDERS = """  extensionProviders:
  - name: otel
    opentelemetry: {{service: 127.0.0.1, port: {collector}, http: {{}}}}
  - name: json
    envoyFileAccessLog:
      path: {log}
      logFormat:
        labels: {{start: "%START_TIME%", method: "%REQ(:METHOD)%", path: "%REQ(:PATH)%",
                 code: "%RESPONSE_CODE%", flags: "%RESPONSE_FLAGS%", bytes: "%BYTES_SENT%",
                 duration: "%DURATION%", upstream: "%UPSTREAM_HOST%", id: "%REQ(X-REQUEST-ID)%"}}
  defaultProviders: {{tracing: [{tracing}], accessLogging: [{logs}]}}
"""
SAMPLING = """---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {{name: mesh-default, namespace: istio-system}}
spec:
  tracing: [{{randomSamplingPercentage: {percent}}}]
"""


def telemetry_spec(collector: int, log: Path, percent: float | None, json_log: bool) -> str:
    """ProxyConfig lines (providers) and, for tracing, the Telemetry that samples it."""
    spec = PROVIDERS.format(
        collector=collector,
        log=log,
        tracing="otel" if percent is not None else "",
        logs="json" if json_log else "",
    )
    return spec + (SAMPLING.format(percent=percent) if percent is not None else "")


METRICS_OFF = """---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: metrics-off, namespace: istio-system}
spec:
  metrics: [{overrides: [{disabled: true}]}]
"""


class OtlpSink(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # an OTLP/HTTP collector that drops what it gets
        self.rfile.read(int(self.headers.get("content-length", "0")))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def telemetry_mesh(
    admin: int,
    port: int,
    upstream: int,
    collector: int,
    tmp: Path,
    percent: float | None = 1,
    json_log: bool = True,
    resources: str = "",
) -> str:
    """The benchmark's mesh with one variant's telemetry (default: the middle case)."""
    spec = ""
    if percent is not None or json_log:
        spec = telemetry_spec(collector, tmp / "access.log", percent, json_log)
    text = BUILTIN_MESH.format(
        admin=admin,
        host="bench.local",
        port=port,
        resolution="STATIC",
        upstream_host="127.0.0.1",
        upstream_port=upstream,
        access_log="",
    )
    # The provider lines belong in the ProxyConfig spec (the first document).
    head, sep, rest = text.partition("\n---\n")
    return head + "\n" + spec + sep + rest + resources


# The variants: a key for --variants, the label printed, and the Telemetry resources (a
# string) or (tracing percentage or None, JSON access log) for telemetry_mesh().
VARIANTS: dict[str, tuple[str, str | tuple[float | None, bool]]] = {
    "off": ("telemetry off", METRICS_OFF),
    "metrics": ("metrics only", ""),
    "log": ("+ JSON log", (None, True)),
    "unsampled": ("+ 0% tracing (context only)", (0, False)),
    "tracing": ("+ 1% tracing", (1, False)),
    "middle": ("+ 1% tracing + JSON log", (1, True)),
    "full": ("+ 100% tracing", (100, False)),
}
IDLE_SECONDS = 5.0


def _per_request(
    mark: tuple[float, float, int, float], cpu: float, now: float, idle_rate: float
) -> float:
    """CPU microseconds per request of one cycle (a burst and the wait for the next), less
    what the process spends idle for the part of the cycle it was not loaded."""
    start_cpu, start, requests, loaded = mark
    unloaded = max(0.0, now - start - loaded)
    return (cpu - start_cpu - idle_rate * unloaded) / max(requests, 1) * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tree", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument(
        "--variants",
        default="off,metrics,log,tracing,middle,full",
        help=f"which to run, comma-separated, from {', '.join(VARIANTS)} (off always runs)",
    )
    ap.add_argument(
        "--pause-ms",
        type=int,
        default=0,
        help="each wrk connection pauses this long before each request: the proxies run "
        "below capacity (5: about 8,000 req/s) rather than saturated",
    )
    ap.add_argument(
        "--compare",
        metavar="TREE",
        help="also run the chosen variants from this tree (another build), in the same "
        "interleaved rounds: their lines are marked [B]",
    )
    args = ap.parse_args(argv)
    chosen = {"off", *(v.strip() for v in args.variants.split(",") if v.strip())}
    unknown = chosen - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variant(s): {', '.join(sorted(unknown))}")
    tmp = Path(tempfile.mkdtemp(prefix="meshproxy-telemetry-"))
    collector = ThreadingHTTPServer(("127.0.0.1", 0), OtlpSink)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    procs = Processes(tmp)
    up = free_port()
    procs.start("up", nginx_cmd(tmp, "up", NGINX_UPSTREAM.format(dir=tmp, port=up)), 0)
    wait_port("127.0.0.1", up)
    builds = [("", args.tree)] + ([("[B] ", args.compare)] if args.compare else [])
    variants: dict[str, tuple[str, str | tuple[float | None, bool]]] = {
        tag + label: (tree, extra)
        for tag, tree in builds
        for key, (label, extra) in VARIANTS.items()
        if key in chosen
    }
    load_cpu = pinning(0)
    running: dict[str, tuple[subprocess.Popen[bytes], Target]] = {}
    # cycle[name]: CPU microseconds per request from the start of one of the variant's
    # bursts to the start of its next (its background work, the log writer's and the span
    # exporter's, is counted in its own process whenever it runs).
    cycle: dict[str, list[float]] = {name: [] for name in variants}
    rates: dict[str, list[float]] = {name: [] for name in variants}  # each burst's req/s
    try:
        for name, (tree, extra) in variants.items():
            port = free_port()
            log_dir = tmp / f"logs-{len(running)}"
            log_dir.mkdir()
            if isinstance(extra, tuple):
                text = telemetry_mesh(
                    free_port(), port, up, collector.server_address[1], log_dir, *extra
                )
            else:
                text = telemetry_mesh(free_port(), port, up, 0, log_dir, None, False, extra)
            cfg = tmp / f"mesh-{len(running)}"
            cfg.mkdir()
            (cfg / "mesh.yaml").write_text(text)
            proc = subprocess.Popen(
                [sys.executable, "-m", "meshproxy", "--log-level", "error", "run", "-c", str(cfg)],
                cwd=tree,
                env={**os.environ, "PYTHONPATH": tree},
                stdout=subprocess.DEVNULL,
                preexec_fn=pinning(1),
            )  # fmt: skip
            running[name] = (proc, Target("127.0.0.1", port, f"bench.local:{port}"))
        for _, target in running.values():
            wait_port("127.0.0.1", target.port)
            run_load("wrk", target, 50, 2, load_cpu, args.pause_ms)  # warm-up
        # What each costs idle (timers, a thread's wake-ups) is taken out of its cycles, which
        # are mostly other variants' bursts: the figure is the cost of load, per request.
        time.sleep(1.0)
        before = {name: thread_cpu(proc.pid) for name, (proc, _) in running.items()}
        time.sleep(IDLE_SECONDS)
        idle = {name: (thread_cpu(p.pid) - before[name]) / IDLE_SECONDS for name, (p, _) in
                running.items()}  # fmt: skip
        # At each burst's start: the CPU, the clock, the previous burst's requests and time.
        mark: dict[str, tuple[float, float, int, float]] = {}
        for _ in range(args.runs):
            for name, (proc, target) in running.items():
                cpu, now = thread_cpu(proc.pid), time.monotonic()
                if name in mark:
                    cycle[name].append(_per_request(mark[name], cpu, now, idle[name]))
                result = run_load("wrk", target, 50, args.duration, load_cpu, args.pause_ms)
                mark[name] = (cpu, now, result.requests, time.monotonic() - now)
                rates[name].append(result.rps)
        time.sleep(1.0)  # the last bursts' log lines; spans wait for the exporter's timer
        for name, (proc, _) in running.items():
            now = time.monotonic()
            cycle[name].append(_per_request(mark[name], thread_cpu(proc.pid), now, idle[name]))
        print("idle CPU, ms a second: " + ", ".join(f"{n} {v * 1e3:.2f}" for n, v in idle.items()))
    finally:
        for proc, _ in running.values():
            proc.terminate()
            proc.wait(timeout=15)
        procs.stop_all()
        collector.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)  # the access logs run to hundreds of MB
    base = cycle["telemetry off"]
    print(
        f"\nCPU per request, {args.runs} round(s) of wrk -c50 {args.duration} s bursts"
        + (f" (each request after a {args.pause_ms} ms pause)" if args.pause_ms else "")
        + ", the variants interleaved;"
    )
    print(
        "x: the median of each round's ratio to that round's baseline; min x: the ratio of "
        "the least"
    )
    for name, values in cycle.items():
        ratios = [v / b for v, b in zip(values, base, strict=True)]
        runs = ", ".join(f"{v:.1f}" for v in values)
        print(f"  {name:<26} {median(values):6.1f} us  x{median(ratios):.3f}  "
              f"min x{min(values) / min(base):.3f}  {median(rates[name]):7,.0f} req/s  "
              f"({runs})")  # fmt: skip
    compare = f" --compare {args.compare}" if args.compare else ""
    compare += f" --pause-ms {args.pause_ms}" if args.pause_ms else ""
    print(f"\nreproduce: python -m benchmarks.telemetry --duration {args.duration} "
          f"--runs {args.runs} --tree {args.tree} --variants {','.join(sorted(chosen))}"
          f"{compare}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
