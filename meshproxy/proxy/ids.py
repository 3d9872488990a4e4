"""Request ids as Envoy makes them (x-request-id): random UUIDv4s."""

from __future__ import annotations

import binascii
from random import getrandbits
from typing import Final


def new_request_id() -> bytes:
    """A random UUIDv4 as Envoy generates, without uuid.UUID's object overhead."""
    h = binascii.hexlify(((getrandbits(128) & _UUID4_CLEAR) | _UUID4_SET).to_bytes(16, "big"))
    return b"-".join((h[:8], h[8:12], h[12:16], h[16:20], h[20:]))


_UUID4_CLEAR: Final = ~((0xF000 << 64) | (0xC000 << 48)) & ((1 << 128) - 1)
_UUID4_SET: Final = (0x4000 << 64) | (0x8000 << 48)
