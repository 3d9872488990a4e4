"""Istio's TCP metadata exchange: workload facts in-band at the start of a mesh TCP connection.

HTTP carries them in `x-envoy-peer-metadata` headers; raw TCP has no headers, so Istio's
proxies negotiate the ALPN `istio-peer-exchange` on the mTLS handshake and then each side
writes, before any application byte, one frame: a 4-byte magic (0x3D230467), a 4-byte length
(both big-endian) and a serialized google.protobuf.Any holding a Struct whose
`x-envoy-peer-metadata` field is the same Struct the HTTP header carries (base64 there) and
whose `x-envoy-peer-metadata-id` is the node id. Each side strips the other's frame from the
start of what it reads. meshproxy writes and reads exactly that, as soon as the connection is
up (Envoy writes its frame with its first byte in either direction; the order does not
matter), so it and Istio's Envoy sidecars name each other's TCP series.

What arrives is only believed because the handshake verified the peer's certificate. A
stream that does not start with the magic is passed on untouched (Envoy does the same: the
peer has no exchange filter); a frame longer than MAX_FRAME or one that does not decode is
an error that closes the connection.
"""

from __future__ import annotations

import base64
import struct
from typing import Final

from google.protobuf import any_pb2, struct_pb2
from google.protobuf.message import DecodeError

PEER_EXCHANGE_ALPN: Final = "istio-peer-exchange"
MAGIC: Final = 0x3D230467
MAX_FRAME: Final = 16 * 1024  # a workload's metadata is a few hundred bytes
_HEADER: Final = struct.Struct("!II")
_STRUCT_TYPE_URL: Final = "type.googleapis.com/google.protobuf.Struct"
_METADATA: Final = "x-envoy-peer-metadata"
_METADATA_ID: Final = "x-envoy-peer-metadata-id"

_frames: dict[tuple[bytes, bytes], bytes] = {}


class ExchangeError(ValueError):
    """The peer's frame is oversized or does not decode."""


def frame(metadata: bytes, metadata_id: bytes) -> bytes:
    """This sidecar's frame, from the base64 Struct and id the HTTP exchange sends (built
    once per value: they change only with the config or the certificate)."""
    key = (metadata, metadata_id)
    out = _frames.get(key)
    if out is None:
        data = struct_pb2.Struct()
        if metadata:
            inner = struct_pb2.Struct.FromString(base64.b64decode(metadata))
            data.fields[_METADATA].struct_value.CopyFrom(inner)
        if metadata_id:
            data.fields[_METADATA_ID].string_value = metadata_id.decode("latin-1")
        payload = any_pb2.Any(
            type_url=_STRUCT_TYPE_URL, value=data.SerializeToString(deterministic=True)
        ).SerializeToString()
        out = _HEADER.pack(MAGIC, len(payload)) + payload
        if len(_frames) > 16:
            _frames.clear()
        _frames[key] = out
    return out


class FrameReader:
    """Takes the peer's frame off the start of one direction of a connection."""

    __slots__ = ("_buffer", "done", "metadata")

    def __init__(self) -> None:
        self._buffer = b""
        self.done = False
        # The peer's Struct as base64 (what observe.workload decodes), None when it sent none.
        self.metadata: bytes | None = None

    def feed(self, data: bytes) -> bytes | None:
        """The application bytes in `data` once the frame is read (None: more is needed)."""
        buffer = self._buffer + data if self._buffer else data
        if len(buffer) < _HEADER.size:
            if MAGIC.to_bytes(4, "big").startswith(buffer[:4]):
                self._buffer = buffer
                return None
            return self._finish(buffer)  # not the magic: no exchange on the other side
        magic, length = _HEADER.unpack_from(buffer)
        if magic != MAGIC:
            return self._finish(buffer)
        if length > MAX_FRAME:
            raise ExchangeError(f"peer exchange frame of {length} bytes (limit {MAX_FRAME})")
        end = _HEADER.size + length
        if len(buffer) < end:
            self._buffer = buffer
            return None
        self.metadata = _metadata(buffer[_HEADER.size : end])
        return self._finish(buffer[end:])

    def abandon(self) -> bytes:
        """The stream ended inside the frame: what was held back, passed on as it came."""
        return self._finish(self._buffer)

    def _finish(self, rest: bytes) -> bytes:
        self.done = True
        self._buffer = b""
        return rest


def _metadata(payload: bytes) -> bytes | None:
    try:
        wrapped = any_pb2.Any.FromString(payload)
        if wrapped.type_url != _STRUCT_TYPE_URL:
            raise ExchangeError(f"peer exchange frame holds {wrapped.type_url[:80]!r}")
        data = struct_pb2.Struct.FromString(wrapped.value)
    except (DecodeError, ValueError) as exc:
        if isinstance(exc, ExchangeError):
            raise
        raise ExchangeError(f"peer exchange frame does not decode: {exc}") from None
    item = data.fields.get(_METADATA)
    if item is None or item.WhichOneof("kind") != "struct_value":
        return None
    return base64.b64encode(item.struct_value.SerializeToString(deterministic=True))
