"""VirtualService route features in the config: mirrors, corsPolicy, uriRegexRewrite and
delegate — accepted forms compile as Istio translates them; wrong ones name their field."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshproxy.config.delegate import has_conflict
from meshproxy.config.loader import load_snapshot
from meshproxy.config.resources import HTTPMatch, StringMatch
from meshproxy.routing.table import Route
from tests.unit.config.test_loader import SE, issues_of, write


def vs(http: str, extra: str = "") -> str:
    return (
        SE
        + f"""
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: shop}}
spec:
  hosts: [reviews]
  http:
{http}
{extra}"""
    )


def routes(path: Path) -> dict[str, Route]:
    snap = load_snapshot(path)
    binding = snap.outbound_binding("10.0.0.5", 9080)
    assert binding is not None and binding.route_table is not None
    vh = binding.route_table.find_host("reviews.shop.svc.cluster.local")
    assert vh is not None
    return {r.name: r for r in vh.routes}


def test_mirrors_cors_and_regex_rewrite_compile(tmp_path: Path) -> None:
    got = routes(
        write(
            tmp_path,
            vs(
                """
  - name: a
    match: [{uri: {prefix: /a}}]
    mirror: {host: reviews, subset: v2}
    mirrorPercentage: {value: 12.5}
    corsPolicy: {allowOrigin: ["https://x.example"], maxAge: 90s, allowMethods: [GET]}
    rewrite: {uriRegexRewrite: {match: "^/a/(.*)$", rewrite: '/b/\\1/\\0'}}
    route: [{destination: {host: reviews, subset: v1}}]
  - name: b
    mirrors: [{destination: {host: reviews, subset: v1}}, {destination: {host: reviews},
              percentage: {value: 5}}]
    route: [{destination: {host: reviews}}]
"""
            ),
        )
    )
    a, b = got["a"], got["b"]
    assert [(m.cluster, m.percent) for m in a.mirrors] == [
        ("outbound|9080|v2|reviews.shop.svc.cluster.local", 12.5)
    ]
    assert [m.percent for m in b.mirrors] == [100.0, 5.0]  # absent percentage: all
    assert a.cors is not None and a.cors.allows(b"https://x.example")
    assert not a.cors.allows(b"https://y.example")
    assert (a.cors.max_age, a.cors.allow_methods) == (b"90", b"GET")
    assert a.rewrite_path(None, "/a/q/r") == "/b/q/r//a/q/r"  # \0: the whole match


@pytest.mark.parametrize(
    ("http", "expected"),
    [
        (
            "  - {mirror: {host: reviews}, mirrors: [{destination: {host: reviews}}],"
            " route: [{destination: {host: reviews}}]}",
            "spec.http[0].mirrors: mirror and mirrors are exclusive",
        ),
        (
            "  - {mirror: {host: reviews}, mirrorPercentage: {value: 150},"
            " route: [{destination: {host: reviews}}]}",
            "spec.http[0].mirrorPercentage.value: expected a number from 0 to 100",
        ),
        (
            "  - {mirrorPercentage: {value: 5}, route: [{destination: {host: reviews}}]}",
            "a mirror percentage needs `mirror`",
        ),
        (
            "  - {mirror: {host: nowhere.test}, route: [{destination: {host: reviews}}]}",
            "spec.http[0].mirror.host",
        ),
        (
            "  - {rewrite: {uri: /x, uriRegexRewrite: {match: a, rewrite: b}},"
            " route: [{destination: {host: reviews}}]}",
            "uri and uriRegexRewrite are exclusive",
        ),
        (
            "  - {rewrite: {uriRegexRewrite: {match: '^/(a)$', rewrite: '/\\2'}},"
            " route: [{destination: {host: reviews}}]}",
            "names no group of the match expression",
        ),
        (
            "  - {rewrite: {uriRegexRewrite: {match: '(', rewrite: x}},"
            " route: [{destination: {host: reviews}}]}",
            "uriRegexRewrite.match: invalid regular expression",
        ),
        (
            "  - {corsPolicy: {allowMethods: ['GE T']}, route: [{destination: {host: reviews}}]}",
            "spec.http[0].corsPolicy.allowMethods[0]: not a valid token",
        ),
        (
            "  - {corsPolicy: {unmatchedPreflights: DROP},"
            " route: [{destination: {host: reviews}}]}",
            "unmatchedPreflights: must be one of",
        ),
        ("  - {delegate: {name: missing}}", 'no VirtualService "missing" without hosts'),
        (
            "  - {delegate: {name: d}, route: [{destination: {host: reviews}}]}",
            "a route with delegate cannot also have route",
        ),
    ],
)
def test_route_feature_errors(tmp_path: Path, http: str, expected: str) -> None:
    text = "\n".join(issues_of(write(tmp_path, vs(http))))
    assert expected in text, text


DELEGATE = """
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: d, namespace: shop}
spec:
  http:
  - name: leaf
    match: [{uri: {prefix: /api/v2}, headers: {x-team: {exact: blue}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - name: nested
    delegate: {name: other}
"""


def test_delegate_cannot_delegate_again(tmp_path: Path) -> None:
    text = "\n".join(issues_of(write(tmp_path, vs("  - {delegate: {name: d}}", DELEGATE))))
    assert "VirtualService d" in text and "a delegate cannot delegate again" in text


def test_delegated_route_inherits_from_the_root_route(tmp_path: Path) -> None:
    ok = DELEGATE.split("  - name: nested")[0]
    root = """
  - name: root
    match: [{uri: {prefix: /api}, method: {exact: GET}}]
    timeout: 3s
    retries: {attempts: 4}
    delegate: {name: d}
"""
    got = routes(write(tmp_path, vs(root, ok)))
    merged = got["root-leaf"]
    assert merged.timeout == 3.0 and merged.retry.attempts == 4
    (matcher,) = merged.matchers
    assert matcher.uri is not None and matcher.uri.value == "/api/v2"  # the narrower one
    assert matcher.method is not None and matcher.method.value == "GET"  # from the root
    assert [name for name, _ in matcher.headers] == ["x-team"]


def m(uri: StringMatch | None = None, method: StringMatch | None = None) -> HTTPMatch:
    return HTTPMatch((), uri, method, None, None, (), (), (), None, False)


@pytest.mark.parametrize(
    ("root", "leaf", "conflict"),
    [
        (m(StringMatch("prefix", "/a")), m(StringMatch("prefix", "/a/b")), False),
        (m(StringMatch("prefix", "/a/b")), m(StringMatch("prefix", "/a")), True),
        (m(StringMatch("prefix", "/a")), m(StringMatch("exact", "/a/x")), False),
        (m(StringMatch("exact", "/a")), m(StringMatch("exact", "/a")), False),
        (m(StringMatch("exact", "/a")), m(StringMatch("prefix", "/a")), True),
        (m(StringMatch("regex", "/a.*")), m(StringMatch("exact", "/ab")), True),
        (m(StringMatch("prefix", "/a")), m(method=StringMatch("exact", "GET")), False),
        (m(), m(StringMatch("regex", ".*")), False),
    ],
)
def test_istio_conflict_rules(root: HTTPMatch, leaf: HTTPMatch, conflict: bool) -> None:
    assert has_conflict(root, leaf) is conflict


PC = """
---
apiVersion: meshproxy.io/v1alpha1
kind: ProxyConfig
metadata: {name: p, namespace: shop}
spec:
  namespace: shop
  localRateLimits:
%s
"""


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        (
            "  - {name: a, port: 9080, tokenBucket: {maxTokens: 1, fillInterval: 10ms}}",
            "spec.localRateLimits[0].tokenBucket.fillInterval: must be at least 50ms",
        ),
        (
            "  - {name: a, tokenBucket: {maxTokens: 1, fillInterval: 1s}}",
            "set port (every HTTP request for it) or route",
        ),
        (
            "  - {name: a, port: 1, route: {virtualService: reviews, name: r},"
            " tokenBucket: {maxTokens: 1, fillInterval: 1s}}",
            "set either port (with direction) or route, not both",
        ),
        (
            "  - {name: a, route: {virtualService: reviews, name: nope},"
            " tokenBucket: {maxTokens: 1, fillInterval: 1s}}",
            "spec.localRateLimits[0].route: no route 'nope' in VirtualService 'reviews'"
            " (its routes: main)",
        ),
        (
            "  - {name: a, port: 1, tokenBucket: {maxTokens: 0, fillInterval: 1s}}\n"
            "  - {name: a, port: 2, tokenBucket: {maxTokens: 1, fillInterval: 1s}}",
            "spec.localRateLimits[1].name: duplicate name 'a'",
        ),
    ],
)
def test_local_rate_limit_errors(tmp_path: Path, limits: str, expected: str) -> None:
    http = "  - {name: main, route: [{destination: {host: reviews}}]}"
    text = "\n".join(issues_of(write(tmp_path, vs(http, PC % limits))))
    assert expected in text, text


def test_local_rate_limits_compile_to_port_and_route_buckets(tmp_path: Path) -> None:
    limits = (
        "  - {name: in, port: 9080, tokenBucket: {maxTokens: 10, fillInterval: 1s}}\n"
        "  - {name: out, port: 9080, direction: OUTBOUND,"
        " tokenBucket: {maxTokens: 5, tokensPerFill: 5, fillInterval: 500ms}}\n"
        "  - {name: r, route: {virtualService: reviews, name: main}, statusCode: 503,"
        " tokenBucket: {maxTokens: 2, fillInterval: 1s}}"
    )
    http = "  - {name: main, route: [{destination: {host: reviews}}]}"
    path = write(tmp_path, vs(http, PC % limits))
    snap = load_snapshot(path)
    assert snap.port_rate_limits[(True, 9080)].max_tokens == 10
    out = snap.port_rate_limits[(False, 9080)]
    assert (out.tokens_per_fill, out.fill_interval) == (5, 0.5)
    route_limit = routes(path)["main"].rate_limit
    assert route_limit is not None and (route_limit.max_tokens, route_limit.status) == (2, 503)
    assert len(snap.rate_limits) == 3


PRODUCTPAGE = """
---
apiVersion: meshproxy.io/v1alpha1
kind: ProxyConfig
metadata: {name: p}
spec: {namespace: shop, labels: {app: productpage, version: v1}}
"""


def test_source_conditions_are_decided_for_this_workload(tmp_path: Path) -> None:
    """sourceLabels, sourceNamespace and gateways name the caller; for a sidecar that is its
    own workload (ProxyConfig labels and namespace), so a match naming another caller is
    left out, as Istio leaves it out of this sidecar's routes, instead of matching anyone."""
    text = vs(
        """
  - name: mine
    match: [{headers: {end-user: {exact: jason}}, sourceLabels: {app: productpage}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - name: theirs
    match: [{sourceLabels: {app: ratings}}, {sourceNamespace: other}, {gateways: [edge]}]
    route: [{destination: {host: reviews, subset: v2}}]
  - name: mixed
    match:
    - {sourceLabels: {app: ratings}, uri: {prefix: /r}}
    - {uri: {prefix: /m}, gateways: [mesh, edge]}
    route: [{destination: {host: reviews, subset: v1}}]
  - name: rest
    route: [{destination: {host: reviews, subset: v1}}]
"""
    )
    got = routes(write(tmp_path, text + PRODUCTPAGE))
    assert list(got) == ["mine", "mixed", "rest"]
    assert len(got["mine"].matchers) == 1 and len(got["mixed"].matchers) == 1
    # The same config on another workload: "mine" is not its route.
    other = text + PRODUCTPAGE.replace("app: productpage", "app: details")
    assert list(routes(write(tmp_path, other))) == ["mixed", "rest"]


def test_a_gateway_only_virtual_service_is_not_a_sidecar_route(tmp_path: Path) -> None:
    """gateways without "mesh": the VirtualService configures those gateways; sidecars leave
    it out, dangling hosts included (they are the gateway's business)."""
    gateway_vs = """
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bookinfo, namespace: shop}
spec:
  hosts: ["*"]
  gateways: [bookinfo-gateway]
  http:
  - match: [{uri: {exact: /productpage}}]
    route: [{destination: {host: productpage, port: {number: 9080}}}]
"""
    both = (
        gateway_vs.replace("[bookinfo-gateway]", "[bookinfo-gateway, mesh]")
        .replace("name: bookinfo", "name: both")
        .replace('hosts: ["*"]', "hosts: [reviews]")
        .replace("host: productpage", "host: reviews")
    )
    snap = load_snapshot(write(tmp_path, SE + gateway_vs + both))
    binding = snap.outbound_binding("10.0.0.5", 9080)
    assert binding is not None and binding.route_table is not None
    vh = binding.route_table.find_host("reviews.shop.svc.cluster.local")
    assert vh is not None and len(vh.routes) == 1 and vh.routes[0].matchers
    assert binding.route_table.find_host("anything.example.com") is None


def test_tcp_source_conditions_pick_the_route_for_this_workload(tmp_path: Path) -> None:
    text = (
        SE
        + """
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db, namespace: shop}
spec:
  hosts: [reviews]
  tcp:
  - match: [{port: 9090, sourceLabels: {app: ratings}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - match: [{port: 9090, sourceNamespace: shop}]
    route: [{destination: {host: reviews, subset: v1}}]
"""
        + PRODUCTPAGE
    )
    snap = load_snapshot(write(tmp_path, text))
    binding = snap.outbound_binding("10.0.0.5", 9090)
    assert (
        binding is not None
        and binding.tcp_cluster == "outbound|9090|v1|reviews.shop.svc.cluster.local"
    )
