"""What a request hashes on under a DestinationRule consistentHash (Envoy's hash policies)."""

from __future__ import annotations

from meshproxy.codec.events import RequestHead
from meshproxy.config.resources import ConsistentHash
from meshproxy.upstream.hash_lb import hash64


def request_hash(
    policy: ConsistentHash, head: RequestHead, peer_ip: str, connection_key: str
) -> tuple[int | None, bytes | None]:
    """The hash key (None: nothing to hash on, so the pick is random, as in Envoy) and, for a
    cookie policy with a ttl whose cookie was missing, the Set-Cookie value to answer with."""
    kind = policy.key
    if kind == "header":
        name = policy.name.encode()
        value = head.authority if name in (b"host", b":authority") else head.header(name)
        return (hash64(value) if value is not None else None), None
    if kind == "source_ip":
        return hash64(peer_ip.encode()), None
    if kind == "query":
        value = query_parameter(head.target, policy.name.encode())
        return (hash64(value) if value is not None else None), None
    value = cookie(head, policy.name.encode())
    if value is not None:
        return hash64(value), None
    if policy.cookie_ttl is None:
        return None, None
    # Envoy's generated cookie: a hash of the connection's addresses, so concurrent requests
    # of one connection get the same value; the request is hashed on that value.
    value = b"%016x" % hash64(connection_key.encode())
    return hash64(value), set_cookie(policy, value)


def set_cookie(policy: ConsistentHash, value: bytes) -> bytes:
    """Envoy's makeSetCookieValue: quoted value, Max-Age when the ttl is not zero, HttpOnly."""
    out = policy.name.encode() + b'="' + value + b'"'
    ttl = policy.cookie_ttl or 0
    if ttl > 0:
        out += b"; Max-Age=%d" % int(ttl)
    if policy.cookie_path:
        out += b"; Path=" + policy.cookie_path.encode()
    return out + b"; HttpOnly"


def cookie(head: RequestHead, name: bytes) -> bytes | None:
    """The first cookie of that name across Cookie headers, surrounding quotes removed."""
    for key, header in head.headers:
        if key != b"cookie":
            continue
        for part in header.split(b";"):
            k, sep, v = part.strip().partition(b"=")
            if sep and k == name:
                if len(v) >= 2 and v[:1] == b'"' and v[-1:] == b'"':
                    v = v[1:-1]
                return v
    return None


def query_parameter(target: bytes, name: bytes) -> bytes | None:
    """The first value of a query parameter, undecoded (as Envoy hashes it)."""
    _, sep, query = target.partition(b"?")
    if not sep:
        return None
    for part in query.split(b"#", 1)[0].split(b"&"):
        k, _, v = part.partition(b"=")
        if k == name:
            return v
    return None
