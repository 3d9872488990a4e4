"""Route table: authority → virtual host → first matching route → weighted cluster pick."""

from __future__ import annotations

import bisect
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from meshproxy.routing.cors import Cors
from meshproxy.routing.match import RequestMatcher, RequestView
from meshproxy.routing.regex import Regex


@dataclass(frozen=True, slots=True)
class HeaderOps:
    """Istio `headers.request|response`: set replaces, add appends, remove deletes (lower-case)."""

    set: tuple[tuple[bytes, bytes], ...] = ()
    add: tuple[tuple[bytes, bytes], ...] = ()
    remove: frozenset[bytes] = frozenset()
    # Derived once here, not per request: the names a set or remove takes out.
    _drop: frozenset[bytes] = field(init=False, repr=False, compare=False)
    empty: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_drop", self.remove | {name for name, _ in self.set})
        object.__setattr__(self, "empty", not (self.set or self.add or self.remove))

    def apply(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        if self.empty:
            return headers
        drop = self._drop
        out = [h for h in headers if h[0] not in drop] if drop else list(headers)
        out.extend(self.set)
        out.extend(self.add)
        return out


NO_HEADER_OPS: Final = HeaderOps()


@dataclass(frozen=True, slots=True)
class RouteTarget:
    cluster: str
    weight: int
    request_headers: HeaderOps = NO_HEADER_OPS
    response_headers: HeaderOps = NO_HEADER_OPS


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """VirtualService retries, in Envoy's terms: how many more tries, on what, how long each."""

    attempts: int  # retries after the first try
    per_try_timeout: float | None = None
    on: frozenset[str] = frozenset()  # Envoy retry_on names: 5xx, connect-failure, ...
    status_codes: frozenset[int] = frozenset()  # retriable-status-codes
    grpc_codes: frozenset[int] = frozenset()  # cancelled, unavailable, ... as numbers
    ignore_previous_hosts: bool = True  # Istio's retryIgnorePreviousHosts default
    retriable_headers: frozenset[bytes] = frozenset()  # retriable-headers: response names

    def retries_response(self, status: int, headers: Sequence[tuple[bytes, bytes]] = ()) -> bool:
        """Envoy: a response carrying x-envoy-ratelimited is retried only on
        envoy-ratelimited; retriable-headers retries any status with a named header."""
        on = self.on
        if headers and any(k == b"x-envoy-ratelimited" for k, _ in headers):
            return "envoy-ratelimited" in on
        if "retriable-headers" in on and self.retriable_headers:
            names = self.retriable_headers
            if any(k in names for k, _ in headers):
                return True
        if status >= 500 and "5xx" in on:
            return True
        if status in (502, 503, 504) and "gateway-error" in on:
            return True
        if status == 409 and "retriable-4xx" in on:
            return True
        return status in self.status_codes and "retriable-status-codes" in on

    def retries_failure(self, connect_failed: bool, unprocessed: bool, request_sent: bool) -> bool:
        """Envoy's retry_on conditions for an attempt that got no response: a failed
        connect, a reset, or a stream the upstream refused (HTTP/2) unprocessed."""
        on = self.on
        return (
            "5xx" in on
            or "gateway-error" in on
            or "reset" in on
            or (connect_failed and "connect-failure" in on)
            or (unprocessed and "refused-stream" in on)
            or ((connect_failed or not request_sent) and "reset-before-request" in on)
        )


def retry_backoff(retry: int) -> float:
    """Envoy's fully jittered exponential backoff: 25 ms base, capped at 250 ms."""
    ceiling = min(0.025 * ((1 << max(retry, 1)) - 1), 0.25)
    return random.random() * ceiling


# Istio's policies when a route says nothing (istio/istio#50506 dropped 503 from the outbound
# one: it replayed POSTs that had reached the app). gRPC codes: 1 cancelled, 14 unavailable.
OUTBOUND_DEFAULT_RETRY: Final = RetryPolicy(
    2,
    None,
    frozenset(
        {"connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes"}
    ),
    frozenset(),
    frozenset({1, 14}),
)
INBOUND_DEFAULT_RETRY: Final = RetryPolicy(2, None, frozenset({"reset-before-request"}))
NO_RETRY: Final = RetryPolicy(0)


@dataclass(frozen=True, slots=True)
class Fault:
    """VirtualService http[].fault: delay and/or abort a share of the requests."""

    delay: float | None = None
    delay_percent: float = 100.0
    abort_status: int | None = None
    abort_grpc: int | None = None  # a gRPC status code (trailers-only answer)
    abort_percent: float = 100.0


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A local token bucket: starts full, gains tokens_per_fill every fill_interval up to
    max_tokens; a request takes one or is answered `status` (flag RL)."""

    name: str
    max_tokens: int
    tokens_per_fill: int
    fill_interval: float
    status: int = 429


@dataclass(frozen=True, slots=True)
class Mirror:
    """A shadow copy of the route's requests to another cluster, for `percent` % of them."""

    cluster: str
    percent: float = 100.0


@dataclass(frozen=True, slots=True)
class DirectReply:
    """VirtualService directResponse or redirect: answered by the proxy, no upstream."""

    status: int
    body: bytes = b""
    redirect_uri: str | None = None
    redirect_authority: str | None = None
    redirect_scheme: str | None = None
    redirect_port: int | None = None

    @property
    def is_redirect(self) -> bool:
        return self.status in (301, 302, 303, 307, 308) and self.body == b""

    def location(self, scheme: str, authority: str, target: str) -> str:
        """Istio's redirect: each given part replaces the request's (query kept)."""
        path, sep, query = target.partition("?")
        host = self.redirect_authority or authority
        if self.redirect_port is not None:
            host = (
                f"{host.rsplit(':', 1)[0] if host.count(':') == 1 else host}:{self.redirect_port}"
            )
        uri = self.redirect_uri if self.redirect_uri is not None else path
        if sep and "?" not in uri:
            uri += sep + query
        return f"{self.redirect_scheme or scheme}://{host}{uri}"


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    matchers: tuple[RequestMatcher, ...]  # empty: matches every request
    targets: tuple[RouteTarget, ...]
    timeout: float | None = None
    rewrite_uri: str | None = None
    rewrite_authority: str | None = None
    request_headers: HeaderOps = NO_HEADER_OPS
    response_headers: HeaderOps = NO_HEADER_OPS
    retry: RetryPolicy = OUTBOUND_DEFAULT_RETRY
    fault: Fault | None = None
    direct: DirectReply | None = None
    mirrors: tuple[Mirror, ...] = ()
    cors: Cors | None = None
    rate_limit: RateLimit | None = None  # replaces the port's bucket for this route (Envoy)
    rewrite_regex: tuple[Regex, str] | None = None  # uriRegexRewrite (all matches)
    _cumulative: tuple[int, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        total = 0
        cumulative = []
        for t in self.targets:
            total += t.weight
            cumulative.append(total)
        object.__setattr__(self, "_cumulative", tuple(cumulative))

    def match(self, req: RequestView) -> RequestMatcher | bool | None:
        """The matcher that matched (None when the route matches all), or False."""
        if not self.matchers:
            return None
        for m in self.matchers:
            if m.matches(req):
                return m
        return False

    def pick(self, rand: float | None = None) -> RouteTarget | None:
        """A target chosen by weight (share = weight / sum of weights); None if all weigh 0."""
        targets = self.targets
        if len(targets) == 1:
            return targets[0] if targets[0].weight > 0 else None
        total = self._cumulative[-1] if self._cumulative else 0
        if total <= 0:
            return None
        point = (random.random() if rand is None else rand) * total
        return targets[bisect.bisect_right(self._cumulative, point)]

    @property
    def rewrites_path(self) -> bool:
        return self.rewrite_uri is not None or self.rewrite_regex is not None

    def rewrite_path(self, matcher: RequestMatcher | None, path: str) -> str:
        """Istio rewrite.uri: replaces only the matched prefix on a prefix match, else all.
        uriRegexRewrite: every match in the path replaced (Envoy's regex_rewrite)."""
        if self.rewrite_regex is not None:
            pattern, replacement = self.rewrite_regex
            return pattern.sub(replacement, path)
        if self.rewrite_uri is None:
            return path
        prefix = matcher.matched_prefix(path) if matcher is not None else None
        if prefix is not None:
            return self.rewrite_uri + path[len(prefix) :]
        return self.rewrite_uri


class RouteMatch:
    """The route a request matched (a plain class: one per request, compiled __init__)."""

    __slots__ = ("matcher", "route", "virtual_host")

    def __init__(
        self, route: Route, matcher: RequestMatcher | None, virtual_host: VirtualHost
    ) -> None:
        self.route = route
        self.matcher = matcher
        self.virtual_host = virtual_host


@dataclass(frozen=True, slots=True)
class VirtualHost:
    name: str
    domains: tuple[str, ...]
    routes: tuple[Route, ...]
    service: str  # the destination_service the host names


@dataclass(frozen=True, slots=True)
class RouteTable:
    name: str
    exact: Mapping[str, VirtualHost]
    wildcard: tuple[tuple[str, VirtualHost], ...]  # ('.example.com', vh), longest first
    catch_all: VirtualHost | None = None

    def find_host(self, authority: str) -> VirtualHost | None:
        host = authority.lower()
        vh = self.exact.get(host)
        if vh is not None:
            return vh
        if host.endswith("]") or ":" not in host:
            bare = host
        else:
            bare = host.rsplit(":", 1)[0]
            vh = self.exact.get(bare)
            if vh is not None:
                return vh
        for suffix, vh in self.wildcard:
            if bare.endswith(suffix):
                return vh
        return self.catch_all

    def route(self, req: RequestView) -> RouteMatch | None:
        vh = self.find_host(req.authority)
        if vh is None:
            return None
        return self.route_in(vh, req)

    @staticmethod
    def route_in(vh: VirtualHost, req: RequestView) -> RouteMatch | None:
        """The first route of `vh` that matches `req` (Istio: first match wins)."""
        for route in vh.routes:
            m = route.match(req)
            if m is not False:
                return RouteMatch(route, m if isinstance(m, RequestMatcher) else None, vh)
        return None
