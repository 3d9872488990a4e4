"""The processes `meshproxy bench` starts: an upstream, nginx, the bare relay, meshproxy.

Every process is started here, pinned to a CPU where the box has two or more, and stopped by
its own id. CPU time is read from /proc, the process's and its children's (nginx's workers).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")

UPSTREAM_BODY = b"hello"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def pinning(cpu: int | None) -> Callable[[], None] | None:
    """A preexec_fn pinning a child to `cpu`; None on a one-core box or when not asked."""
    if cpu is None or (os.cpu_count() or 1) < 2:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its children (nginx's master and worker)."""
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    total = 0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def thread_cpu(pid: int) -> float:
    """Seconds on a CPU of all of one process's threads, from the scheduler's nanosecond
    counts: cpu_seconds' utime and stime tick at 10 ms, too coarse for a few seconds of an
    idle proxy (benchmarks.telemetry subtracts that idle rate)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that ended
    return total / 1e9


class Processes:
    """What the harness started, to stop each by its id however the run ends. Each one's
    output goes to a file in `workdir` (a pipe nobody reads would fill and stall it)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, cmd: list[str], cpu: int | None) -> subprocess.Popen[bytes]:
        with open(self.workdir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=pinning(cpu),
            )
        self.procs.append(proc)
        return proc

    def log_tail(self, name: str, lines: int = 20) -> str:
        try:
            text = (self.workdir / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop_all(self) -> None:
        for proc in self.procs:
            self.stop(proc)


def nginx_available() -> bool:
    return shutil.which("nginx") is not None


NGINX_UPSTREAM = """
worker_processes 1; daemon off; pid {dir}/up.pid; error_log {dir}/up.err;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{port}; location / {{ return 200 "hello"; }}
    location /bytes/ {{ root {dir}; }} }} }}
"""


def write_body_files(directory: Path, sizes: tuple[int, ...] = (16384, 1048576)) -> None:
    """The files NGINX_UPSTREAM serves at /bytes/<size>: responses of that many bytes."""
    directory.chmod(0o755)  # nginx's workers run as nobody when it is started as root
    (directory / "bytes").mkdir(exist_ok=True)
    for size in sizes:
        (directory / "bytes" / str(size)).write_bytes(b"x" * size)


NGINX_PROXY = """
worker_processes 1; daemon off; pid {dir}/px.pid; error_log {dir}/px.err;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 1000000;
  upstream up {{ server {upstream}; keepalive 256; keepalive_requests 1000000; }}
  server {{ listen 127.0.0.1:{port};
    location / {{ proxy_pass http://up; proxy_http_version 1.1;
      proxy_set_header Connection ""; proxy_max_temp_file_size 0; }} }} }}
"""


def nginx_cmd(workdir: Path, name: str, config: str) -> list[str]:
    path = workdir / f"{name}.conf"
    path.write_text(config)
    return ["nginx", "-c", str(path), "-p", str(workdir)]


def builtin_upstream_cmd(port: int) -> list[str]:
    return [sys.executable, "-m", "meshproxy.bench.processes", str(port)]


class _Upstream(asyncio.Protocol):
    """Answers every request with 200 "hello": the fixed-cost app nginx also plays."""

    def __init__(self) -> None:
        import httptools

        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except Exception:
            if self.transport is not None:
                self.transport.close()

    def on_message_complete(self) -> None:
        if self.transport is not None:
            self.transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%s"
                % (len(UPSTREAM_BODY), UPSTREAM_BODY)
            )


async def _serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Upstream, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    import uvloop

    uvloop.run(_serve(int(sys.argv[1])))
