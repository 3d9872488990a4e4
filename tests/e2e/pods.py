"""Pods for end-to-end tests: processes in network namespaces, and curl run inside them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def ns_exec(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.cfg = Path()  # the proxy's config directory (certificates live there too)

    def start(
        self, cmd: list[str], ready: str | None = None, **kw: object
    ) -> subprocess.Popen[bytes]:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        p = subprocess.Popen(
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
