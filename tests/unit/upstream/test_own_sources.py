"""The proxy's own source ports: known once a connect begins, forgotten once closed, swept in
bulk; and the wait for that connect, over real loopback sockets."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest

from meshproxy.upstream.own_sources import OwnSources, connected


@pytest.fixture
def listener() -> Iterator[tuple[str, int]]:
    server = socket.create_server(("127.0.0.1", 0), backlog=64)
    try:
        yield "127.0.0.1", server.getsockname()[1]
    finally:
        server.close()


def test_a_connecting_socket_is_own_until_closed(listener: tuple[str, int]) -> None:
    own = OwnSources()
    sock = own.connecting_socket(*listener, None)
    assert sock is not None and sock.family == socket.AF_INET
    port = sock.getsockname()[1]
    assert port != 0 and own.is_own(("127.0.0.1", port))
    sock.close()
    assert not own.is_own(("127.0.0.1", port))  # a closed socket's port may be anyone's now


def test_bind_source_host_names_and_odd_peers(listener: tuple[str, int]) -> None:
    own = OwnSources()
    src = own.connecting_socket(*listener, "127.0.0.1")
    assert src is not None and src.getsockname()[0] == "127.0.0.1"
    assert own.connecting_socket("example.test", 80, None) is None  # the loop resolves it
    assert not own.is_own(None) and not own.is_own(("127.0.0.1",))
    src.close()


def test_closed_sockets_are_swept_when_the_table_doubles(listener: tuple[str, int]) -> None:
    own = OwnSources(first_sweep=8)
    first = [own.connecting_socket(*listener, None) for _ in range(8)]  # open at the sweep
    assert len(own) == 8
    for s in first[1:]:
        assert s is not None
        s.close()
    held: list[socket.socket] = []
    # Closed entries stay until the table reaches 16 and is swept (or, rarely, a new socket
    # takes a closed one's port).
    while len(own) > len(held) + 1 and len(held) < 40:
        s = own.connecting_socket(*listener, None)
        assert s is not None
        held.append(s)
    assert len(own) == len(held) + 1 and len(held) <= 9  # only open sockets are left
    kept = first[0]
    assert kept is not None and own.is_own(("127.0.0.1", kept.getsockname()[1]))
    for s in [kept, *held]:
        s.close()


def test_connected_waits_for_the_handshake_or_raises(listener: tuple[str, int]) -> None:
    own = OwnSources()

    async def connect(port: int) -> None:
        sock = own.connecting_socket("127.0.0.1", port, None)
        assert sock is not None
        try:
            await connected(sock)
            assert sock.getpeername() == ("127.0.0.1", port)
        finally:
            sock.close()

    asyncio.run(connect(listener[1]))
    closed = socket.create_server(("127.0.0.1", 0))
    nobody = closed.getsockname()[1]
    closed.close()  # a port with nothing listening: refused
    with pytest.raises(ConnectionRefusedError):
        asyncio.run(connect(nobody))


def test_loops_are_logged_first_and_then_every_thousandth() -> None:
    own = OwnSources()
    logged = [n for n in range(1, 2002) if own.loop_seen()]
    assert logged == [1, 1001, 2001]
