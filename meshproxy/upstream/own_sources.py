"""The source ports of this proxy's own upstream connections, known before they connect.

A captured connection that comes from one of them is the proxy's own traffic redirected back
to itself: a pod whose rules do not exempt the proxy's uid (catalog L05, Istio #14242).
Proxying it again would open another connection that loops the same way, without end; the
capture listener closes it instead, and the request that caused it fails once.

The port must be known before the SYN leaves: the looped connection is accepted, often
before the connect that caused it returns. So upstream sockets are bound first (port 0,
SO_REUSEADDR so ports in TIME_WAIT stay usable) and registered, then connected.
"""

from __future__ import annotations

import ipaddress
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

    def bound_socket(self, address: str, bind_source: str | None) -> socket.socket | None:
        """A non-blocking TCP socket bound for connecting to `address` (an IP literal) and
        registered; None for a host name (then the caller connects as usual)."""
        try:
            family = (
                socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
            )
        except ValueError:
            return None
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((bind_source or ("::" if family == socket.AF_INET6 else "0.0.0.0"), 0))
        except OSError:
            sock.close()
            raise
        self._live[sock.getsockname()[1]] = sock
        if len(self._live) >= self._sweep_at:
            self._live = {port: s for port, s in self._live.items() if s.fileno() != -1}
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


OWN_SOURCES: Final = OwnSources()  # one per process: each worker has its own connections
