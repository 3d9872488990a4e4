"""SO_ORIGINAL_DST: where an iptables-REDIRECTed connection was going."""

from __future__ import annotations

import socket
import struct
from typing import Any

SO_ORIGINAL_DST = 80
SOL_IPV6 = 41


def original_destination(sock: Any) -> tuple[str, int] | None:
    """(ip, port) the client connected to before REDIRECT, or None when not redirected.

    The v4/v6 call is chosen from the local address, as mitmproxy does: the wrong one fails.
    """
    try:
        local = sock.getsockname()[0]
        if "." in local:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port = struct.unpack("!H", raw[2:4])[0]
            return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
        raw = sock.getsockopt(SOL_IPV6, SO_ORIGINAL_DST, 28)
        port = struct.unpack("!H", raw[2:4])[0]
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    except (OSError, struct.error, TypeError):
        return None
