"""Random ids from one pool of OS randomness: request ids as Envoy makes them (x-request-id,
UUIDv4s), and trace and span ids."""

from __future__ import annotations

import binascii
import os
from typing import Final

_POOL_BYTES: Final = 4096  # random bytes drawn at once: 128 ids per getrandom() call
_VARIANT: Final = b"89ab"  # RFC 9562 variant 10xx, as a hex digit


class _HexPool:
    """Random bytes from the OS, hex-encoded in bulk: an id is a few slices of it."""

    def __init__(self) -> None:
        self.hex = b""
        self.at = 0


_POOL: Final = _HexPool()


def _forget_pool() -> None:
    _POOL.hex = b""  # a forked worker must never hand out its parent's ids
    _POOL.at = 0


os.register_at_fork(after_in_child=_forget_pool)


def _draw(chars: int) -> tuple[bytes, int]:
    """The pool's hex and where `chars` unused digits start in it (refilled when short)."""
    pool = _POOL
    at = pool.at
    h = pool.hex
    if at + chars > len(h):
        h = pool.hex = binascii.hexlify(os.urandom(_POOL_BYTES))
        at = 0
    pool.at = at + chars
    return h, at


def random_hex(chars: int) -> bytes:
    """`chars` random lowercase hex digits (never all zeros: trace and span ids forbid it)."""
    h, at = _draw(chars)
    out = h[at : at + chars]
    if not out.strip(b"0"):
        return b"0" * (chars - 1) + b"1"
    return out


def new_request_id() -> bytes:
    """A random UUIDv4 (122 bits from the OS's CSPRNG), without uuid.UUID's overhead."""
    h, at = _draw(32)
    variant = h[at + 16] & 3  # a random hex digit's low two bits (near even) pick 8, 9, a or b
    return b"".join(
        (
            h[at : at + 8],
            b"-",
            h[at + 8 : at + 12],
            b"-4",
            h[at + 13 : at + 16],
            b"-",
            _VARIANT[variant : variant + 1],
            h[at + 17 : at + 20],
            b"-",
            h[at + 20 : at + 32],
        )
    )
