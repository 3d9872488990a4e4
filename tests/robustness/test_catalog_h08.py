"""Catalog H08: regular expressions from config run on RE2, in linear time."""

from __future__ import annotations

import json
from pathlib import Path

from tests.integration.test_virtual_service import REDOS, call
from tests.support.proxy import egress_sidecar, free_port, running_proxy, service_entry
from tests.support.upstream import UpstreamServer


def test_H08_route_regexes_run_in_linear_time(tmp_path: Path) -> None:
    """Regexes are RE2, as Envoy runs them: inputs that make a backtracking engine take
    minutes on these patterns (catalog H08) are answered at once, and the proxy stays
    responsive. With Python's `re` each request below would stall the event loop."""
    app = UpstreamServer("app").start()
    admin, port = free_port(), free_port()
    resources = service_entry("svc.test", port, [app.port]) + REDOS + egress_sidecar(port)
    try:
        with running_proxy(tmp_path, admin, resources):
            hit = call(port, "GET", "/aaaa")
            assert hit[0] == 200 and hit[1].get("x-matched") == "regex", hit
            for path, header in (("/" + "a" * 64 + "!", ""), ("/h", "x" * 64)):
                status, headers, _ = call(port, "GET", path, {"x-id": header} if header else {})
                assert status == 200 and "x-matched" not in headers, (path, headers)
            status, _, body = call(port, "GET", "/" + "b" * 64 + "!")
            assert status == 200
            assert json.loads(body)["path"] == "/" + "b" * 64 + "!"  # no match: unchanged
            status, _, body = call(port, "GET", "/bbbc")
            assert json.loads(body)["path"] == "/bbb"  # the rewrite itself works
    finally:
        app.stop()
