"""The config loader under generated YAML: it answers with a snapshot or with ConfigError
(file:line messages), never with any other exception, whatever the documents hold.

Documents are built from Istio's kinds and field names with values of every YAML type in every
place (strings where numbers belong, lists where maps do, huge and negative numbers, odd
durations and hosts), plus raw text that is barely YAML at all.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshproxy.config.loader import load_snapshot
from meshproxy.errors import ConfigError

KINDS = [
    ("networking.istio.io/v1", "ServiceEntry"),
    ("networking.istio.io/v1", "VirtualService"),
    ("networking.istio.io/v1", "DestinationRule"),
    ("networking.istio.io/v1", "Sidecar"),
    ("security.istio.io/v1", "PeerAuthentication"),
    ("security.istio.io/v1", "AuthorizationPolicy"),
    ("telemetry.istio.io/v1", "Telemetry"),
    ("meshproxy.io/v1alpha1", "ProxyConfig"),
    ("v1", "ConfigMap"),
]
FIELDS = [
    "hosts",
    "addresses",
    "ports",
    "number",
    "name",
    "protocol",
    "targetPort",
    "resolution",
    "endpoints",
    "address",
    "labels",
    "weight",
    "http",
    "tcp",
    "tls",
    "match",
    "uri",
    "prefix",
    "exact",
    "regex",
    "route",
    "destination",
    "host",
    "subset",
    "port",
    "timeout",
    "retries",
    "attempts",
    "perTryTimeout",
    "retryOn",
    "fault",
    "delay",
    "abort",
    "percentage",
    "value",
    "fixedDelay",
    "httpStatus",
    "mirror",
    "mirrorPercentage",
    "headers",
    "request",
    "response",
    "set",
    "add",
    "remove",
    "corsPolicy",
    "rewrite",
    "redirect",
    "trafficPolicy",
    "loadBalancer",
    "simple",
    "consistentHash",
    "connectionPool",
    "maxConnections",
    "outlierDetection",
    "consecutive5xxErrors",
    "interval",
    "baseEjectionTime",
    "subsets",
    "mode",
    "mtls",
    "portLevelMtls",
    "selector",
    "matchLabels",
    "action",
    "rules",
    "from",
    "to",
    "when",
    "source",
    "principals",
    "operation",
    "methods",
    "paths",
    "key",
    "values",
    "ingress",
    "egress",
    "bind",
    "captureMode",
    "defaultEndpoint",
    "outboundTrafficPolicy",
    "tracing",
    "providers",
    "randomSamplingPercentage",
    "accessLogging",
    "filter",
    "expression",
    "proxyAdminPort",
    "statusPort",
    "drainDuration",
    "certificates",
    "localRateLimits",
    "tokenBucket",
    "maxTokens",
    "fillInterval",
    "extensionProviders",
    "opentelemetry",
    "service",
    "envoyFileAccessLog",
    "path",
    "logFormat",
    "text",
    "defaultProviders",
    "protocolDetectionTimeout",
    "terminationDrainDuration",
    "workloadName",
    "concurrency",
]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        [
            "",
            "*",
            "1s",
            "-1s",
            "1.5ms",
            "99999h",
            "0s",
            "abc",
            "a.b.svc.cluster.local",
            "10.0.0.0/8",
            "::1",
            "HTTP",
            "TCP",
            "GRPC",
            "STRICT",
            "ISTIO_MUTUAL",
            "%REQ(:PATH)%",
            "request.path == '/x'",
            "(",
            "[a-",
            "v1",
            "/x",
            "0x10",
            "1e9",
            "spiffe://a/b",
        ]
    ),
    st.text(max_size=8),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(FIELDS), inner, max_size=5),
    ),
    max_leaves=25,
)


@st.composite
def document(draw: st.DrawFn) -> dict[str, Any]:
    api, kind = draw(st.sampled_from(KINDS))
    doc: dict[str, Any] = {"apiVersion": api, "kind": kind}
    if draw(st.booleans()):
        doc["metadata"] = {
            "name": draw(st.sampled_from(["a", "b", "", "A_B"])),
            "namespace": draw(st.sampled_from(["default", "istio-system", "x"])),
        }
    doc["spec"] = draw(st.one_of(VALUES, st.dictionaries(st.sampled_from(FIELDS), VALUES)))
    return doc


def load(text: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        Path(directory, "mesh.yaml").write_text(text)
        try:
            load_snapshot(directory)
        except ConfigError as exc:
            assert exc.issues, "a ConfigError names at least one problem"
            for issue in exc.issues:
                assert directory in str(issue), str(issue)  # says where (the file, or the dir)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(document(), min_size=1, max_size=4))
def test_generated_resources_give_a_snapshot_or_config_errors(docs: list[dict[str, Any]]) -> None:
    load(yaml.safe_dump_all(docs, allow_unicode=True))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.text(alphabet=st.sampled_from(list("ab: -[]{}&*!|>'\"#%@`,?\n\t0123456789.")), max_size=80)
)
def test_barely_yaml_text_gives_config_errors(text: str) -> None:
    load(text)
