"""The source ports of this proxy's own upstream connections, known before they connect.

A captured connection that comes from one of them is the proxy's own traffic redirected back
to itself: a pod whose rules do not exempt the proxy's uid (catalog L05, Istio #14242).
Proxying it again would open another connection that loops the same way, without end; the
capture listener closes it instead, and the request that caused it fails once.

The port must be known before this proxy's event loop can accept the looped connection.
So upstream sockets are connected here without waiting: the kernel picks the port inside
connect(), as for any client socket (the same port reuse rules), and the port is registered
before the loop runs again; only then does the caller wait for the connection to complete.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
from typing import Final

_FIRST_SWEEP: Final = 1024


class OwnSources:
    """Ports with their socket; a port counts only while its socket is open (uvloop and
    asyncio close the socket object with its transport). Closed ones are swept when the
    table has doubled, so it stays near the number of live connections."""

    def __init__(self, first_sweep: int = _FIRST_SWEEP) -> None:
        self._live: dict[int, socket.socket] = {}
        self._first_sweep = self._sweep_at = first_sweep
        self.loops = 0

    def connecting_socket(
        self, address: str, port: int, bind_source: str | None
    ) -> socket.socket | None:
        """A non-blocking TCP socket whose connect to `address` (an IP literal) has begun,
        registered; None for a host name (then the caller connects as usual)."""
        try:
            version = ipaddress.ip_address(address).version
        except ValueError:
            return None
        sock = socket.socket(socket.AF_INET6 if version == 6 else socket.AF_INET)
        try:
            sock.setblocking(False)
            if bind_source:
                sock.bind((bind_source, 0))
            err = sock.connect_ex((address, port))
            if err not in (0, errno.EINPROGRESS):
                raise OSError(err, os.strerror(err))
            self._live[sock.getsockname()[1]] = sock
        except OSError:
            sock.close()
            raise
        if len(self._live) >= self._sweep_at:
            self._live = {p: s for p, s in self._live.items() if s.fileno() != -1}
            self._sweep_at = max(self._first_sweep, 2 * len(self._live))
        return sock

    def is_own(self, peer: object) -> bool:
        """Whether `peer` (a peername on this host) is one of our open upstream sockets."""
        if not isinstance(peer, tuple) or len(peer) < 2:
            return False
        sock = self._live.get(peer[1])
        return sock is not None and sock.fileno() != -1

    def loop_seen(self) -> bool:
        """Count a loop; True for the first and every 1000th (worth a log line)."""
        self.loops += 1
        return self.loops % 1000 == 1

    def __len__(self) -> int:
        return len(self._live)


async def connected(sock: socket.socket) -> None:
    """Wait until a connect begun by connecting_socket() completes (OSError if it failed)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def writable() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_writer(fd, writable)
    try:
        await done
    finally:
        loop.remove_writer(fd)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


OWN_SOURCES: Final = OwnSources()  # one per process: each worker has its own connections
