"""Where the compiled proxy spends its CPU under load: perf samples of one `meshproxy run`
(the load harness's mesh, compiled hot path) while wrk drives it, top symbols printed.

    python -m benchmarks.profile [--seconds 10] [--connections 50] [--top 40]

mypyc compiles each function to a C symbol named after it (CPyDef_<module>___<function>),
so the report reads like a Python profile of the compiled modules; time in the interpreter
(_PyEval_EvalFrameDefault and friends) is what is still interpreted. Needs perf, wrk, nginx
and taskset; every process started here is stopped by its PID.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from http.server import ThreadingHTTPServer
from pathlib import Path

from benchmarks.load import MESH, Processes, compiled_copy, meshproxy_cmd, run_wrk, wait_port
from benchmarks.telemetry import METRICS_OFF, OtlpSink, telemetry_mesh
from meshproxy.bench import processes
from meshproxy.bench.processes import NGINX_UPSTREAM, free_port

PERF_RECORD = ["perf", "record", "--call-graph", "dwarf,16384"]  # Python has no frame pointers
_FRAME = re.compile(r"\s*[0-9a-f]+ (\S+?)(?:\+0x[0-9a-f]+)? \((.*)\)")
# Where a sample's time is charged: the innermost function of ours (mypyc's C function for a
# compiled one) or of uvloop/httptools, so that time in CPython's C API (allocation, attribute
# and method lookups) counts against the code that asked for it.
_OWNERS = ("CPyDef_", "CPyPy_", "__pyx_", "llhttp")


_HEADER = re.compile(r"\s*\S+\s+(?:\d+/)?(\d+)\s")  # "python 4711/4713 ..." or "python 4713 ..."


def parse_thread_samples(script: str) -> list[tuple[int, list[tuple[str, str]]]]:
    """Each sample's thread id and its (symbol, object) frames, innermost first."""
    samples = []
    for block in script.split("\n\n"):
        lines = block.strip("\n").splitlines()
        if not lines:
            continue
        header = _HEADER.match(lines[0])
        frames = [(m[1], m[2]) for m in map(_FRAME.match, lines[1:]) if m]
        if frames and header is not None:
            samples.append((int(header[1]), frames))
    return samples


def by_thread(samples: list[tuple[int, list[tuple[str, str]]]], main_tid: int) -> str:
    """Each thread's share of the samples: the event loop against the threads beside it
    (access-log writers, span exporters), which the loop's own profile does not show."""
    total = len(samples) or 1
    counts = Counter(tid for tid, _ in samples)
    lines = ["samples by thread:"]
    for tid, n in counts.most_common():
        name = "event loop" if tid == main_tid else f"thread {tid}"
        kernel = sum(1 for t, f in samples if t == tid and "kernel" in f[0][1])
        lines.append(
            f"  {100 * n / total:5.1f}%  {name} ({100 * kernel / n:.0f}% of it in the kernel)"
        )
    return "\n".join(lines)


def summarize(samples: list[list[tuple[str, str]]], top: int, us_per_sample: float = 0.0) -> str:
    """The top symbols by share of samples; with `us_per_sample` (a sample's CPU time over
    the requests served) also each one's CPU microseconds per request, which compare across
    runs of different configurations where shares do not."""
    total = len(samples) or 1

    def line(n: int, sym: str) -> str:
        cost = f"  {n * us_per_sample:6.2f} us/req" if us_per_sample else ""
        return f"  {100 * n / total:5.1f}%{cost}  {sym}"

    in_kernel = sum(1 for s in samples if "kernel" in s[0][1])
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames in samples:
        if "kernel" in frames[0][1]:
            continue
        owner = next((sym for sym, _ in frames if sym.startswith(_OWNERS)), "?" + frames[0][0])
        own[owner] += 1
        for sym in {sym for sym, _ in frames if sym.startswith("CPyDef_")}:
            inclusive[sym] += 1
    lines = [
        f"{len(samples)} samples: {100 * in_kernel / total:.1f}% in the kernel (sockets, "
        f"syscalls), {100 * (total - in_kernel) / total:.1f}% in user space"
        + (f"; {total * us_per_sample:.1f} us of CPU per request" if us_per_sample else ""),
        "",
        "user-space time charged to the innermost function of ours, uvloop or httptools:",
    ]
    lines += [line(n, sym) for sym, n in own.most_common(top)]
    lines += ["", "user-space time inclusive of callees, compiled functions:"]
    lines += [line(n, sym) for sym, n in inclusive.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--frequency", type=int, default=499, help="samples per second")
    ap.add_argument(
        "--telemetry",
        nargs="?",
        const="middle",
        choices=("middle", "log", "tracing", "full", "unsampled", "off"),
        help="profile the telemetry benchmark's middle case (1%% tracing + a JSON access "
        "log), `log` (metrics + the JSON access log, no tracing), `tracing` (metrics + 1 %% "
        "tracing, no log), `full` (100 %% tracing), `unsampled` (metrics + tracing at 0 %%: "
        "trace context only), or with `off` its baseline (every metric disabled): compare them",
    )
    args = ap.parse_args(argv)
    for tool in ("perf", "wrk", "nginx", "taskset"):
        if shutil.which(tool) is None:
            print(f"{tool} is required", file=sys.stderr)
            return 2
    tmp = Path(tempfile.mkdtemp(prefix="meshproxy-profile-"))
    procs = Processes()
    try:
        up_port = free_port()
        (tmp / "up.conf").write_text(NGINX_UPSTREAM.format(dir=tmp, port=up_port))
        processes.write_body_files(tmp)
        procs.start(["taskset", "-c", "0", "nginx", "-c", str(tmp / "up.conf"), "-p", str(tmp)])
        wait_port(up_port)
        cwd = compiled_copy(tmp / "compiled")
        if cwd is None:
            return 2
        port, admin = free_port(), free_port()
        cfg = tmp / "mesh"
        cfg.mkdir()
        text = MESH.format(admin=admin, codec="httptools", port=port, upstream=up_port, workers=1)
        if args.telemetry in ("middle", "tracing", "full"):
            collector = ThreadingHTTPServer(("127.0.0.1", 0), OtlpSink)
            threading.Thread(target=collector.serve_forever, daemon=True).start()
            text = telemetry_mesh(
                admin,
                port,
                up_port,
                collector.server_address[1],
                tmp,
                100 if args.telemetry == "full" else 1,
                args.telemetry == "middle",
            )
        elif args.telemetry == "log":
            text = telemetry_mesh(admin, port, up_port, 4318, tmp, None, True)  # no tracing
        elif args.telemetry == "unsampled":
            text = telemetry_mesh(admin, port, up_port, 4318, tmp, 0, False)
        elif args.telemetry == "off":
            text = telemetry_mesh(admin, port, up_port, 0, tmp, None, False, METRICS_OFF)
        (cfg / "mesh.yaml").write_text(text)
        proxy = procs.start(meshproxy_cmd(cfg), cwd)
        wait_port(port)
        run_wrk(port, 2, args.connections, "0")  # warm-up
        data = tmp / "perf.data"
        perf = subprocess.Popen(
            [*PERF_RECORD, "-F", str(args.frequency), "-o", str(data), "-p", str(proxy.pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        rps = run_wrk(port, args.seconds, args.connections, "0")[0]
        us_per_sample = 1e6 / args.frequency / max(rps * args.seconds, 1.0)
        perf.send_signal(2)
        perf.wait(timeout=60)
        script = subprocess.run(
            ["perf", "script", "-i", str(data)],
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        ).stdout
        samples = parse_thread_samples(script)
        print(f"{rps:,.0f} req/s through the compiled proxy")
        print(by_thread(samples, proxy.pid))
        print()
        print(summarize([frames for _, frames in samples], args.top, us_per_sample))
        variant = f" --telemetry {args.telemetry}" if args.telemetry else ""
        print(f"\nreproduce: python -m benchmarks.profile --seconds {args.seconds}{variant}")
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)  # perf.data runs to hundreds of megabytes
    return 0


if __name__ == "__main__":
    sys.exit(main())
