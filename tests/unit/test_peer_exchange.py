"""The TCP metadata-exchange frame read across any split of the stream, and its limits."""

from __future__ import annotations

import base64
import struct

import pytest
from google.protobuf import struct_pb2

from meshproxy.observe.workload import WorkloadInfo, decode, encode
from meshproxy.proxy.peer_exchange import MAGIC, MAX_FRAME, ExchangeError, FrameReader, frame

INFO = WorkloadInfo(namespace="shop", workload="cart-v2", app="cart", version="v2")
METADATA = encode(INFO, (("app", "cart"), ("version", "v2")))
FRAME = frame(METADATA, b"sidecar~10.0.0.1~cart-v2-x.shop~shop.svc.cluster.local")


@pytest.mark.parametrize("cut", [1, 3, 4, 7, 8, 9, len(FRAME) - 1, len(FRAME), len(FRAME) + 2])
def test_a_frame_split_anywhere_yields_the_facts_and_the_bytes_after_it(cut: int) -> None:
    stream = FRAME + b"app bytes"
    reader = FrameReader()
    first = reader.feed(stream[:cut])
    rest = reader.feed(stream[cut:]) if first is None else first + stream[cut:]
    assert reader.done and rest == b"app bytes"
    assert reader.metadata is not None
    decoded = decode(reader.metadata)
    assert decoded is not None and (decoded.workload, decoded.app) == ("cart-v2", "cart")


def test_byte_by_byte() -> None:
    reader = FrameReader()
    out = [reader.feed(FRAME[i : i + 1]) for i in range(len(FRAME))]
    assert out[:-1] == [None] * (len(FRAME) - 1) and out[-1] == b""
    assert reader.metadata == base64.b64encode(
        struct_pb2.Struct.FromString(base64.b64decode(METADATA)).SerializeToString(
            deterministic=True
        )
    )


@pytest.mark.parametrize("start", [b"GET / HTTP/1.1\r\n", b"\x3d\x23\x04\x68", b"\x3d", b""])
def test_no_magic_is_no_exchange_and_nothing_is_lost(start: bytes) -> None:
    reader = FrameReader()
    got = reader.feed(start)
    if got is None:  # a prefix of the magic: held until it is decided
        got = reader.abandon()
    assert got == start and reader.done and reader.metadata is None


def test_an_oversized_or_undecodable_frame_is_an_error() -> None:
    with pytest.raises(ExchangeError, match="limit"):
        FrameReader().feed(struct.pack("!II", MAGIC, MAX_FRAME + 1))
    with pytest.raises(ExchangeError, match="does not decode"):
        FrameReader().feed(struct.pack("!II", MAGIC, 2) + b"\xff\xff")
