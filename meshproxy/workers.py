"""Several worker processes (ProxyConfig concurrency), as Envoy runs several worker threads.

Python threads would share one interpreter lock, so a worker is a process: each binds the
listeners with SO_REUSEPORT (the kernel spreads connections across them), loads and watches
the config itself, and owns its pools. Worker 0 is the first process: it alone serves the
admin and status ports, and renders metrics as the sum of every worker's counters, which the
others send it each second over a socketpair. SIGTERM to worker 0 drains them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import pickle
import signal
import socket
import struct
from dataclasses import dataclass

from meshproxy.observe.metrics import MeshMetrics

logger = logging.getLogger(__name__)

REPORT_INTERVAL = 1.0
MAX_FRAME = 64 * 1024 * 1024
_LEN = struct.Struct(">I")


@dataclass
class Child:
    index: int
    pid: int
    sock: socket.socket


@dataclass
class WorkerRole:
    index: int  # 0: the first process (admin, metrics sum, signals)
    count: int
    children: list[Child]  # worker 0 only
    report_to: socket.socket | None  # the others: where to send counters

    @property
    def reuse_port(self) -> bool:
        return self.count > 1


def worker_count(concurrency: int) -> int:
    """Istio's meaning: 0 is one worker per CPU."""
    return (os.cpu_count() or 1) if concurrency == 0 else concurrency


def _die_with_parent() -> None:
    """A worker must not outlive worker 0 (Linux: SIGTERM when the parent exits)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def fork_workers(count: int) -> WorkerRole:
    """Fork count-1 workers; call before any event loop or thread exists."""
    children: list[Child] = []
    for index in range(1, count):
        parent_end, child_end = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            parent_end.close()
            for c in children:
                c.sock.close()
            _die_with_parent()
            return WorkerRole(index, count, [], child_end)
        child_end.close()
        children.append(Child(index, pid, parent_end))
    return WorkerRole(0, count, children, None)


async def report_counters(metrics: MeshMetrics, sock: socket.socket, stop: asyncio.Event) -> None:
    """Worker n > 0: send this worker's counters to worker 0, every second and at the end."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    while True:
        payload = pickle.dumps(metrics.export(), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            await loop.sock_sendall(sock, _LEN.pack(len(payload)) + payload)
        except OSError:
            return  # worker 0 is gone; PDEATHSIG ends us
        if stop.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), REPORT_INTERVAL)


async def collect_counters(metrics: MeshMetrics, child: Child) -> None:
    """Worker 0: keep the latest counters of one other worker."""
    loop = asyncio.get_running_loop()
    sock = child.sock
    sock.setblocking(False)
    buffer = b""
    try:
        while True:
            data = await loop.sock_recv(sock, 1 << 20)
            if not data:
                break
            buffer += data
            while len(buffer) >= _LEN.size:
                (size,) = _LEN.unpack_from(buffer)
                if size > MAX_FRAME:
                    raise ValueError(f"worker {child.index} sent a {size}-byte report")
                if len(buffer) < _LEN.size + size:
                    break
                frame = buffer[_LEN.size : _LEN.size + size]
                buffer = buffer[_LEN.size + size :]
                # Our own child, over a socketpair only it holds: trusted input.
                metrics.absorb(child.index, pickle.loads(frame))
    except (OSError, ValueError, pickle.UnpicklingError) as exc:
        logger.error("worker %d: counters unreadable: %s", child.index, exc)
    # The worker's final report stays counted: counters are cumulative.


def signal_children(children: list[Child], sig: int = signal.SIGTERM) -> None:
    for c in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(c.pid, sig)


async def wait_children(children: list[Child], timeout: float) -> None:
    """Reap the workers; any still running after `timeout` is killed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pending = {c.pid: c for c in children}
    while pending and loop.time() < deadline:
        for pid in list(pending):
            with contextlib.suppress(ChildProcessError):
                done, status = os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222 (never blocks)
                if not done:
                    continue
                if os.waitstatus_to_exitcode(status) != 0:
                    logger.warning(
                        "worker %d exited with %d",
                        pending[pid].index,
                        os.waitstatus_to_exitcode(status),
                    )
            pending.pop(pid, None)
        await asyncio.sleep(0.05)
    for pid in pending:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            await asyncio.to_thread(os.waitpid, pid, 0)
