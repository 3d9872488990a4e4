"""Run a test upstream as its own process: `python -m tests.support.serve NAME HOST PORT`.

Used where the server must live in another network namespace (`ip netns exec`).
"""

from __future__ import annotations

import signal
import sys
import threading

from tests.support.upstream import UpstreamServer


def main() -> None:
    name, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    server = UpstreamServer(name, port, host).start()
    print(f"ready {server.port}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    server.stop()


if __name__ == "__main__":
    main()
