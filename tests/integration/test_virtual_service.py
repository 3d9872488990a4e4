"""The rest of VirtualService through a real proxy: corsPolicy, uriRegexRewrite, delegate."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.proxy import (
    egress_sidecar,
    free_port,
    request,
    running_proxy,
    service_entry,
)
from tests.support.upstream import UpstreamServer

ROOT = r"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: svc, namespace: default}
spec:
  hosts: [svc.test]
  http:
  - match: [{uri: {prefix: /cors}}]
    corsPolicy:
      allowOrigins: [{exact: "https://a.example"}, {regex: "https://.*\\.b\\.example"}]
      allowMethods: [GET, POST]
      allowHeaders: [x-custom, content-type]
      exposeHeaders: [x-upstream]
      maxAge: 24h
      allowCredentials: true
    route: [{destination: {host: svc.test}}]
  - match: [{uri: {prefix: /ignore}}]
    corsPolicy:
      allowOrigins: [{exact: "https://a.example"}]
      unmatchedPreflights: IGNORE
    route: [{destination: {host: svc.test}}]
  - match: [{uri: {prefix: /service/}}]
    rewrite: {uriRegexRewrite: {match: "^/service/([^/]+)(/.*)$", rewrite: '\2/instance/\1'}}
    route: [{destination: {host: svc.test}}]
  - name: team
    match: [{uri: {prefix: /team}}]
    timeout: 5s
    delegate: {name: team-routes}
  - route: [{destination: {host: svc.test}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: team-routes, namespace: default}
spec:
  http:
  - match: [{uri: {prefix: /team/v2}}]
    headers: {request: {set: {x-delegated: "yes"}}}
    route: [{destination: {host: two.test}}]
  - match: [{uri: {prefix: /other}}]  # not under /team: Istio drops it
    route: [{destination: {host: two.test}}]
  - route: [{destination: {host: svc.test}}]
---
"""


def call(
    port: int, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    reply = request(port, path, method, headers=headers)
    return reply.status, reply.headers, reply.body


def test_cors_regex_rewrite_and_delegate(tmp_path: Path) -> None:
    app, two = UpstreamServer("app").start(), UpstreamServer("two").start()
    admin, port = free_port(), free_port()
    resources = (
        service_entry("svc.test", port, [app.port])
        + service_entry("two.test", port, [two.port])
        + ROOT
        + egress_sidecar(port)
    )
    try:
        with running_proxy(tmp_path, admin, resources) as proxy:
            # --- CORS -------------------------------------------------------------------
            preflight = {"Origin": "https://a.example", "Access-Control-Request-Method": "POST"}
            status, headers, _ = call(port, "OPTIONS", "/cors/x", preflight)
            assert status == 200
            assert headers["access-control-allow-origin"] == "https://a.example"
            assert headers["access-control-allow-methods"] == "GET,POST"
            assert headers["access-control-allow-headers"] == "x-custom,content-type"
            assert headers["access-control-max-age"] == "86400"
            assert headers["access-control-allow-credentials"] == "true"
            assert not app.state.requests  # answered by the proxy
            regex_origin = {**preflight, "Origin": "https://shop.b.example"}
            status, headers, _ = call(port, "OPTIONS", "/cors/x", regex_origin)
            assert headers["access-control-allow-origin"] == "https://shop.b.example"
            # Another origin's preflight goes upstream (FORWARD) and gets no CORS headers.
            other = {**preflight, "Origin": "https://evil.example"}
            status, headers, _ = call(port, "OPTIONS", "/cors/x", other)
            assert "access-control-allow-origin" not in headers
            assert [r.method for r in app.state.requests] == ["OPTIONS"]
            # IGNORE: answered here, without CORS headers, never forwarded.
            status, headers, _ = call(port, "OPTIONS", "/ignore", other)
            assert status == 200 and "access-control-allow-origin" not in headers
            assert len(app.state.requests) == 1
            # An actual request from an allowed origin: allow-origin, credentials, expose.
            status, headers, _ = call(port, "GET", "/cors/y", {"Origin": "https://a.example"})
            assert status == 200
            assert headers["access-control-allow-origin"] == "https://a.example"
            assert headers["access-control-expose-headers"] == "x-upstream"
            assert headers["access-control-allow-credentials"] == "true"
            status, headers, _ = call(port, "GET", "/cors/y", {"Origin": "https://evil.example"})
            assert status == 200 and "access-control-allow-origin" not in headers

            # --- uriRegexRewrite ----------------------------------------------------------
            status, _, body = call(port, "GET", "/service/alpha/x/y?q=1")
            assert status == 200
            assert json.loads(body)["path"] == "/x/y/instance/alpha?q=1"
            assert app.state.requests[-1].headers["x-envoy-original-path"] == (
                "/service/alpha/x/y?q=1"
            )

            # --- delegate -------------------------------------------------------------------
            status, headers, _ = call(port, "GET", "/team/v2/list")
            assert (status, headers["x-upstream"]) == (200, "two")
            assert two.state.requests[-1].headers["x-delegated"] == "yes"
            status, headers, _ = call(port, "GET", "/team/v1")
            assert (status, headers["x-upstream"]) == (200, "app")  # the delegate's default
            status, headers, _ = call(port, "GET", "/other")
            assert headers["x-upstream"] == "app"  # the root's default, not the dropped route
            assert "route 'route-1' has a match outside root route 'team' of svc" in proxy.log()
    finally:
        app.stop()
        two.stop()


REDOS = r"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: svc, namespace: default}
spec:
  hosts: [svc.test]
  http:
  - match: [{uri: {regex: "^/(a+)+$"}}, {headers: {x-id: {regex: "(x+x+)+y"}}}]
    headers: {response: {set: {x-matched: regex}}}
    route: [{destination: {host: svc.test}}]
  - rewrite: {uriRegexRewrite: {match: "(b+)+c", rewrite: '\1'}}
    route: [{destination: {host: svc.test}}]
---
"""


SOURCES = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: svc, namespace: default}
spec:
  hosts: [svc.test]
  http:
  - match: [{sourceLabels: {app: ratings}}]  # another workload's route: not this sidecar's
    headers: {response: {set: {x-route: ratings}}}
    route: [{destination: {host: svc.test}}]
  - match: [{headers: {end-user: {exact: jason}}, sourceLabels: {app: productpage}}]
    headers: {response: {set: {x-route: jason}}}
    route: [{destination: {host: svc.test}}]
  - headers: {response: {set: {x-route: default}}}
    route: [{destination: {host: svc.test}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: edge, namespace: default}
spec:
  hosts: ["*"]
  gateways: [istio-system/ingressgateway]  # the ingress gateway's, not a sidecar's
  http:
  - route: [{destination: {host: productpage.default.svc.cluster.local}}]
---
"""


def test_routes_for_other_callers_and_gateways_are_not_this_sidecars(tmp_path: Path) -> None:
    """Bookinfo's shape: a route keyed on the caller's labels, and a gateway's
    VirtualService in the same config. Through a real proxy labelled app=productpage."""
    app = UpstreamServer("app").start()
    admin, port = free_port(), free_port()
    resources = service_entry("svc.test", port, [app.port]) + SOURCES + egress_sidecar(port)
    try:
        with running_proxy(tmp_path, admin, resources, labels="{app: productpage}"):
            assert call(port, "GET", "/")[1]["x-route"] == "default"
            assert call(port, "GET", "/", {"end-user": "jason"})[1]["x-route"] == "jason"
    finally:
        app.stop()
