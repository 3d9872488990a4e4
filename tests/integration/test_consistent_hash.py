"""DestinationRule consistentHash through a real proxy: a key's requests stay on one endpoint,
different keys spread, a missing cookie is generated, an ejected endpoint's keys move."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.proxy import (
    ProxyProcess,
    egress_sidecar,
    free_port,
    request,
    running_proxy,
    service_entry,
)
from tests.support.upstream import UpstreamServer


@contextmanager
def hashed_mesh(
    tmp_path: Path, load_balancer: str, extra_policy: str = ""
) -> Iterator[tuple[int, list[UpstreamServer], ProxyProcess]]:
    apps = [UpstreamServer(f"app{i}").start() for i in range(3)]
    admin, port = free_port(), free_port()
    resources = (
        service_entry("svc.test", port, [a.port for a in apps])
        + f"""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: svc}}
spec:
  host: svc.test
  trafficPolicy:
    loadBalancer: {load_balancer}
{extra_policy}
---
"""
        + egress_sidecar(port)
    )
    try:
        with running_proxy(tmp_path, admin, resources) as proxy:
            yield port, apps, proxy
    finally:
        for a in apps:
            a.stop()


def get(
    port: int, path: str = "/", headers: dict[str, str] | None = None
) -> tuple[int, str, dict[str, str]]:
    """Status, the endpoint that answered, and the response headers."""
    reply = request(port, path, headers=headers)
    return reply.status, reply.headers.get("x-upstream", ""), reply.headers


@pytest.mark.parametrize(
    "algorithm", ["", ", ringHash: {minimumRingSize: 2048}", ", maglev: {tableSize: 65537}"]
)
def test_header_keeps_a_user_on_one_endpoint(tmp_path: Path, algorithm: str) -> None:
    with hashed_mesh(tmp_path, f"{{consistentHash: {{httpHeaderName: x-user{algorithm}}}}}") as (
        port,
        _,
        _,
    ):
        homes = {}
        for user in range(30):
            seen = {get(port, headers={"x-user": f"u{user}"})[1] for _ in range(5)}
            assert len(seen) == 1, (user, seen)  # every request of a user on one endpoint
            homes[user] = seen.pop()
        assert len(set(homes.values())) == 3  # 30 users spread over all three endpoints
        # No header: nothing to hash on, so requests spread (Envoy picks a random point).
        assert len({get(port)[1] for _ in range(30)}) >= 2


def test_query_parameter_and_source_ip(tmp_path: Path) -> None:
    with hashed_mesh(tmp_path, "{consistentHash: {httpQueryParameterName: id}}") as (port, _, _):
        for n in range(10):
            assert len({get(port, f"/x?a=1&id={n}")[1] for _ in range(4)}) == 1
    (tmp_path / "ip").mkdir()
    with hashed_mesh(tmp_path / "ip", "{consistentHash: {useSourceIp: true}}") as (port, _, _):
        assert len({get(port)[1] for _ in range(20)}) == 1  # one client address


def test_cookie_is_generated_then_followed(tmp_path: Path) -> None:
    lb = "{consistentHash: {httpCookie: {name: sticky, path: /, ttl: 3600s}}}"
    with hashed_mesh(tmp_path, lb) as (port, _, _):
        status, first_home, resp = get(port)
        cookie = resp.get("set-cookie")
        assert status == 200 and cookie is not None
        assert cookie.startswith('sticky="') and "; Max-Age=3600; Path=/; HttpOnly" in cookie
        value = cookie.split(";")[0]
        followers = [get(port, headers={"Cookie": f"a=b; {value}"}) for _ in range(10)]
        assert {home for _, home, _ in followers} == {first_home}
        assert all("set-cookie" not in r for _, _, r in followers)  # had one
        homes = Counter(get(port, headers={"Cookie": f'sticky="user{n}"'})[1] for n in range(40))
        assert len(homes) >= 2


def test_ejected_endpoint_keys_move_and_others_stay(tmp_path: Path) -> None:
    outlier = (
        "    outlierDetection: {consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 30s,"
        " maxEjectionPercent: 100}"
    )
    with hashed_mesh(tmp_path, "{consistentHash: {httpHeaderName: x-user}}", outlier) as (
        port,
        apps,
        _,
    ):
        homes = {u: get(port, headers={"x-user": f"u{u}"})[1] for u in range(30)}
        victim_name = homes[0]
        victim = next(a for a in apps if a.state.name == victim_name)
        victim.state.always = 503
        status, _, _ = get(port, headers={"x-user": "u0"})
        assert status == 503  # the 5xx that ejects it (503 is not retried by default)
        for user, home in homes.items():
            status, now, _ = get(port, headers={"x-user": f"u{user}"})
            assert status == 200
            if home == victim_name:
                assert now != victim_name
            else:
                assert now == home, (user, home, now)
