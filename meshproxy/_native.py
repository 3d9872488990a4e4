"""Native (mypyc-compiled) classes used as asyncio protocols.

The per-connection HTTP/1.1 classes do not subclass asyncio.Protocol: mypyc compiles a
subclass of a Python class into a dict-backed Python class (every attribute a dict lookup,
every method call a generic one), and a plain class into a C struct with direct calls. The
event loop only calls a protocol's methods by name, so such an object is a protocol in all
but its type; this is the one place that tells the type checker so.
"""

from __future__ import annotations

import asyncio
from typing import cast


def as_protocol(obj: object) -> asyncio.Protocol:
    return cast(asyncio.Protocol, obj)
