"""DestinationRule loadBalancer: consistentHash forms and errors; subset policies merge as in
Istio."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshproxy.config.loader import load_snapshot
from meshproxy.config.snapshot import LbPolicy
from tests.unit.config.test_loader import SE, issues_of, write

DR = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  trafficPolicy:
%s
  subsets:
  - {name: v1, labels: {version: v1}}
  - name: v2
    labels: {version: v2}
    trafficPolicy: {connectionPool: {http: {http2MaxRequests: 7}}}
"""
V1 = "outbound|9080|v1|reviews.shop.svc.cluster.local"
V2 = "outbound|9080|v2|reviews.shop.svc.cluster.local"


def with_policy(tmp_path: Path, policy: str) -> Path:
    se = SE.split("---\napiVersion: networking.istio.io/v1beta1\nkind: DestinationRule")[0]
    indented = "\n".join("    " + line for line in policy.strip().splitlines())
    return write(tmp_path, se + "---" + DR % indented)


@pytest.mark.parametrize(
    ("policy", "key", "name", "maglev", "size"),
    [
        ("consistentHash: {httpHeaderName: X-User}", "header", "x-user", False, 1024),
        (
            "consistentHash: {useSourceIp: true, minimumRingSize: 4096}",
            "source_ip",
            "",
            False,
            4096,
        ),
        (
            "consistentHash: {httpQueryParameterName: id, ringHash: {minimumRingSize: 2048}}",
            "query",
            "id",
            False,
            2048,
        ),
        (
            "consistentHash: {httpCookie: {name: sid, ttl: 60s, path: /},"
            " maglev: {tableSize: 251}}",
            "cookie",
            "sid",
            True,
            251,
        ),
    ],
)
def test_consistent_hash_forms(
    tmp_path: Path, policy: str, key: str, name: str, maglev: bool, size: int
) -> None:
    snap = load_snapshot(with_policy(tmp_path, "loadBalancer:\n  " + policy))
    for cluster in (V1, V2):  # the subset without its own loadBalancer inherits it
        chash = snap.clusters[cluster].consistent_hash
        assert chash is not None
        assert (chash.key, chash.name, chash.maglev, chash.size) == (key, name, maglev, size)
    if key == "cookie":
        assert chash.cookie_ttl == 60 and chash.cookie_path == "/"


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("consistentHash: {}", "set exactly one of httpHeaderName"),
        (
            "consistentHash: {httpHeaderName: a, useSourceIp: true}",
            "(got httpHeaderName, useSourceIp)",
        ),
        ("consistentHash: {httpCookie: {name: sid}}", "httpCookie.ttl: required field"),
        ("consistentHash: {httpHeaderName: a, maglev: {tableSize: 1000}}", "must be a prime"),
        (
            "consistentHash: {httpHeaderName: a, maglev: {tableSize: 11}, ringHash: {}}",
            "ringHash and maglev are exclusive",
        ),
        ("{simple: RANDOM, consistentHash: {httpHeaderName: a}}", "simple and consistentHash"),
        ("consistentHash: {httpHeaderName: 'a b'}", "not a header name"),
        ("consistentHash: {useSorceIp: true}", 'did you mean "useSourceIp"'),
    ],
)
def test_consistent_hash_errors(tmp_path: Path, policy: str, expected: str) -> None:
    body = policy if policy.startswith("{") else "{" + policy + "}"
    text = "\n".join(issues_of(with_policy(tmp_path, "loadBalancer: " + body)))
    assert expected in text
    assert "spec.trafficPolicy.loadBalancer" in text


def test_subset_policy_overrides_field_by_field(tmp_path: Path) -> None:
    snap = load_snapshot(
        with_policy(
            tmp_path,
            "loadBalancer: {simple: ROUND_ROBIN}\nconnectionPool: {http: {maxRetries: 3}}",
        )
    )
    v1, v2 = snap.clusters[V1], snap.clusters[V2]
    assert v1.lb is LbPolicy.ROUND_ROBIN and v1.max_retries == 3 and v1.max_requests is None
    # v2's own connectionPool replaces the DR's; its load balancer is still inherited.
    assert v2.lb is LbPolicy.ROUND_ROBIN and v2.max_requests == 7 and v2.max_retries is None


def test_warmup_forms_and_errors(tmp_path: Path) -> None:
    snap = load_snapshot(
        with_policy(
            tmp_path,
            "loadBalancer: {simple: ROUND_ROBIN, warmup: {duration: 60s,"
            " minimumPercent: {value: 20}, aggression: {value: 2}}}",
        )
    )
    w = snap.clusters[V1].warmup
    assert w is not None and (w.duration, w.minimum_percent, w.aggression) == (60, 20, 2)
    snap = load_snapshot(with_policy(tmp_path, "loadBalancer: {warmupDurationSecs: 30s}"))
    assert snap.clusters[V1].warmup is not None and snap.clusters[V1].warmup.duration == 30
    text = "\n".join(
        issues_of(with_policy(tmp_path, "loadBalancer: {simple: RANDOM, warmupDurationSecs: 5s}"))
    )
    assert "warmup applies to ROUND_ROBIN and LEAST_REQUEST only" in text


def test_locality_setting_is_reported_as_not_applied(tmp_path: Path) -> None:
    snap = load_snapshot(
        with_policy(tmp_path, "loadBalancer: {localityLbSetting: {enabled: true}}")
    )
    assert any("localityLbSetting is not applied" in w for w in snap.warnings)


def test_retry_budget_forms_defaults_and_errors(tmp_path: Path) -> None:
    snap = load_snapshot(
        with_policy(tmp_path, "retryBudget: {percent: 25, minRetryConcurrency: 5}")
    )
    assert snap.clusters[V1].retry_budget == (25.0, 5)
    assert snap.clusters[V2].retry_budget == (25.0, 5)  # the subset's own policy inherits it
    snap = load_snapshot(with_policy(tmp_path, "retryBudget: {percent: {value: 7.5}}"))
    assert snap.clusters[V1].retry_budget == (7.5, 3)  # Envoy's minimum concurrency: 3
    snap = load_snapshot(with_policy(tmp_path, "retryBudget: {}"))
    assert snap.clusters[V1].retry_budget == (20.0, 3)
    text = "\n".join(issues_of(with_policy(tmp_path, "retryBudget: {percent: 150}")))
    assert "retryBudget.percent" in text and "from 0 to 100" in text


@pytest.mark.parametrize("key", ["tunnel", "proxyProtocol"])
def test_unsupported_policies_are_refused_not_ignored(tmp_path: Path, key: str) -> None:
    value = "{protocol: CONNECT, targetHost: x, targetPort: 8080}" if key == "tunnel" else "{}"
    text = "\n".join(issues_of(with_policy(tmp_path, f"{key}: {value}")))
    assert f"trafficPolicy.{key}" in text and "not supported" in text
