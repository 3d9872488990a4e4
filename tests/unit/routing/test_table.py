"""Route matching: Istio StringMatch semantics, first match wins, weights, rewrites, hosts."""

from __future__ import annotations

from collections import Counter
from types import MappingProxyType

import pytest

from meshproxy.routing.match import RequestMatcher, RequestView, StringMatcher
from meshproxy.routing.table import HeaderOps, Route, RouteTable, RouteTarget, VirtualHost


def view(
    path: str = "/",
    method: str = "GET",
    headers: dict[str, str] | None = None,
    authority: str = "svc",
    query: str = "",
    port: int = 80,
) -> RequestView:
    return RequestView(method, path, query, authority, "http", headers or {}, port)


def route(name: str, *matchers: RequestMatcher, cluster: str = "c") -> Route:
    return Route(name, matchers, (RouteTarget(cluster, 100),))


def table(*routes: Route, domains: tuple[str, ...] = ("svc", "svc:80")) -> RouteTable:
    vh = VirtualHost("svc", domains, routes, "svc")
    return RouteTable("80", MappingProxyType({d: vh for d in domains}), ())


@pytest.mark.parametrize(
    ("kind", "value", "text", "ok"),
    [
        ("exact", "/a", "/a", True),
        ("exact", "/a", "/a/", False),
        ("prefix", "/api", "/api/v1", True),
        ("prefix", "/api", "/ap", False),
        ("regex", "/v[0-9]+/.*", "/v12/x", True),
        ("regex", "/v[0-9]+", "/v1/x", False),
        ("present", "", "anything", True),
    ],
)
def test_string_matcher(kind: str, value: str, text: str, ok: bool) -> None:
    assert StringMatcher.build(kind, value)(text) is ok


def test_missing_header_never_matches_even_presence() -> None:
    assert StringMatcher.build("present", "")(None) is False


def test_ignore_uri_case_applies_to_prefix() -> None:
    m = StringMatcher.build("prefix", "/API", ignore_case=True)
    assert m("/api/x") and m("/Api/y")


def test_first_match_wins_and_fields_are_anded() -> None:
    t = table(
        route(
            "both",
            RequestMatcher(
                uri=StringMatcher.build("prefix", "/a"), method=StringMatcher.build("exact", "POST")
            ),
        ),
        route("header", RequestMatcher(headers=(("x-user", StringMatcher.build("exact", "j")),))),
        route("query", RequestMatcher(query_params=(("v", StringMatcher.build("exact", "2")),))),
        route("all"),
    )
    assert t.route(view("/a/b", "POST")).route.name == "both"  # type: ignore[union-attr]
    assert t.route(view("/a/b", "GET")).route.name == "all"  # type: ignore[union-attr]
    assert t.route(view(headers={"x-user": "j"})).route.name == "header"  # type: ignore[union-attr]
    assert t.route(view(query="a=1&v=2")).route.name == "query"  # type: ignore[union-attr]


def test_match_entries_are_ored() -> None:
    r = route(
        "r",
        RequestMatcher(uri=StringMatcher.build("exact", "/x")),
        RequestMatcher(uri=StringMatcher.build("exact", "/y")),
    )
    t = table(r)
    assert t.route(view("/x")) is not None and t.route(view("/y")) is not None
    assert t.route(view("/z")) is None


def test_without_headers_and_port() -> None:
    t = table(
        route(
            "r",
            RequestMatcher(
                without_headers=(("x-debug", StringMatcher.build("present", "")),), port=80
            ),
        )
    )
    assert t.route(view()) is not None
    assert t.route(view(headers={"x-debug": "1"})) is None
    assert t.route(view(port=81)) is None


def test_host_lookup_exact_port_and_wildcard() -> None:
    vh = VirtualHost("w", ("*.example.com",), (route("w"),), "*.example.com")
    exact = VirtualHost("e", ("svc",), (route("e"),), "svc")
    t = RouteTable("80", MappingProxyType({"svc": exact}), ((".example.com", vh),))
    assert t.find_host("SVC:80") is exact
    assert t.find_host("api.example.com:8080") is vh
    assert t.find_host("example.org") is None


def test_weighted_pick_follows_weights() -> None:
    r = Route("r", (), (RouteTarget("a", 90), RouteTarget("b", 10), RouteTarget("z", 0)))
    counts = Counter(r.pick(i / 1000).cluster for i in range(1000))  # type: ignore[union-attr]
    assert counts == {"a": 900, "b": 100}


def test_all_zero_weights_pick_nothing() -> None:
    assert Route("r", (), (RouteTarget("a", 0),)).pick(0.5) is None


def test_prefix_rewrite_replaces_only_the_matched_prefix() -> None:
    m = RequestMatcher(uri=StringMatcher.build("prefix", "/old"))
    r = Route("r", (m,), (RouteTarget("a", 1),), rewrite_uri="/new")
    assert r.rewrite_path(m, "/old/x") == "/new/x"
    exact = RequestMatcher(uri=StringMatcher.build("exact", "/old"))
    assert r.rewrite_path(exact, "/old") == "/new"


def test_header_ops_set_add_remove() -> None:
    ops = HeaderOps(set=((b"x-a", b"1"),), add=((b"x-b", b"2"),), remove=frozenset({b"x-c"}))
    out = ops.apply([(b"x-a", b"0"), (b"x-c", b"gone"), (b"x-b", b"1")])
    assert out == [(b"x-b", b"1"), (b"x-a", b"1"), (b"x-b", b"2")]
