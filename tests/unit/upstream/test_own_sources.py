"""The proxy's own source ports: known once bound, forgotten once closed, swept in bulk."""

from __future__ import annotations

import socket

from meshproxy.upstream.own_sources import OwnSources


def test_a_bound_socket_is_own_until_closed() -> None:
    own = OwnSources()
    sock = own.bound_socket("127.0.0.1", None)
    assert sock is not None and sock.family == socket.AF_INET
    port = sock.getsockname()[1]
    assert port != 0 and own.is_own(("127.0.0.1", port))
    sock.close()
    assert not own.is_own(("127.0.0.1", port))  # a closed socket's port may be anyone's now


def test_ipv6_and_bind_source_and_host_names() -> None:
    own = OwnSources()
    v6 = own.bound_socket("::1", None)
    assert v6 is not None and v6.family == socket.AF_INET6
    src = own.bound_socket("127.0.0.1", "127.0.0.1")
    assert src is not None and src.getsockname()[0] == "127.0.0.1"
    assert own.bound_socket("example.test", None) is None  # left to the loop's resolver
    assert not own.is_own(None) and not own.is_own(("127.0.0.1",))
    v6.close()
    src.close()


def test_closed_sockets_are_swept_when_the_table_doubles() -> None:
    own = OwnSources(first_sweep=8)
    first = [own.bound_socket("127.0.0.1", None) for _ in range(8)]  # all open at the sweep
    assert len(own) == 8
    for s in first[1:]:
        assert s is not None
        s.close()
    held: list[socket.socket] = []
    # Closed entries stay until the table reaches 16 and is swept (or, rarely, a new socket
    # takes a closed one's port).
    while len(own) > len(held) + 1 and len(held) < 100:
        s = own.bound_socket("127.0.0.1", None)
        assert s is not None
        held.append(s)
    assert len(own) == len(held) + 1 and len(held) <= 9  # only open sockets are left
    kept = first[0]
    assert kept is not None and own.is_own(("127.0.0.1", kept.getsockname()[1]))
    for s in [kept, *held]:
        s.close()


def test_loops_are_logged_first_and_then_every_thousandth() -> None:
    own = OwnSources()
    logged = [n for n in range(1, 2002) if own.loop_seen()]
    assert logged == [1, 1001, 2001]
