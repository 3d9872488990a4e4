"""CORS as Envoy's filter applies a route's corsPolicy (Istio VirtualService corsPolicy).

Only requests with an Origin are touched. A preflight (OPTIONS with Origin and
Access-Control-Request-Method) from an allowed origin is answered here with 200 and the
allow-* headers; from another origin it goes upstream (unmatchedPreflights FORWARD, the
default) or is answered 200 without CORS headers (IGNORE). Any other request from an allowed
origin gets access-control-allow-origin (the origin itself, as Envoy echoes it) and the
credentials and expose headers on its response.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshproxy.routing.match import StringMatcher

Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class Cors:
    origins: tuple[StringMatcher, ...]
    allow_methods: bytes = b""
    allow_headers: bytes = b""
    expose_headers: bytes = b""
    max_age: bytes = b""
    allow_credentials: bool = False
    forward_unmatched_preflights: bool = True

    def allows(self, origin: bytes) -> bool:
        text = origin.decode("latin-1")
        # Envoy: an allowed origin "*" matches any origin.
        return any(m(text) or (m.kind == "exact" and m.value == "*") for m in self.origins)

    def preflight(self, origin: bytes) -> Headers | None:
        """Headers of the 200 that answers a preflight; None: let it through upstream."""
        if not self.allows(origin):
            return None if self.forward_unmatched_preflights else []
        out: Headers = [(b"access-control-allow-origin", origin)]
        if self.allow_credentials:
            out.append((b"access-control-allow-credentials", b"true"))
        if self.allow_methods:
            out.append((b"access-control-allow-methods", self.allow_methods))
        if self.allow_headers:
            out.append((b"access-control-allow-headers", self.allow_headers))
        if self.max_age:
            out.append((b"access-control-max-age", self.max_age))
        return out

    def response_headers(self, origin: bytes) -> Headers:
        """What an allowed origin's actual response gets (replacing the upstream's own)."""
        if not self.allows(origin):
            return []
        out: Headers = [(b"access-control-allow-origin", origin)]
        if self.allow_credentials:
            out.append((b"access-control-allow-credentials", b"true"))
        if self.expose_headers:
            out.append((b"access-control-expose-headers", self.expose_headers))
        return out


def is_preflight(method: bytes, origin: bytes | None, request_method: bytes | None) -> bool:
    return method == b"OPTIONS" and bool(origin) and bool(request_method)
