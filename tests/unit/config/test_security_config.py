"""PeerAuthentication precedence, DestinationRule tls, auto mTLS and ProxyConfig certificates."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshproxy.config.loader import load_snapshot
from tests.unit.config.test_loader import issues_of, write

PROXY = """
apiVersion: meshproxy.io/v1alpha1
kind: ProxyConfig
metadata: {name: p}
spec:
  namespace: shop
  labels: {app: reviews, version: v1}
  trustDomain: example.org
  certificates: {certChain: /c/chain.pem, privateKey: /c/key.pem, rootCert: /c/root.pem}
"""


def _pa(name: str, ns: str, body: str) -> str:
    return f"""---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: {name}, namespace: {ns}}}
spec: {body}
"""


def test_proxy_config_certificates_and_trust_domain(tmp_path: Path) -> None:
    s = load_snapshot(write(tmp_path, PROXY)).settings
    assert (s.cert_chain, s.private_key, s.root_cert) == (
        "/c/chain.pem",
        "/c/key.pem",
        "/c/root.pem",
    )
    assert s.trust_domain == "example.org"
    assert dict(s.labels) == {"app": "reviews", "version": "v1"}


def test_default_is_permissive(tmp_path: Path) -> None:
    assert load_snapshot(write(tmp_path, PROXY)).mtls.mode_for(9080) == "PERMISSIVE"


def test_precedence_workload_over_namespace_over_mesh(tmp_path: Path) -> None:
    text = (
        PROXY
        + _pa("mesh", "istio-system", "{mtls: {mode: STRICT}}")
        + _pa("ns", "shop", "{mtls: {mode: DISABLE}}")
        + _pa(
            "wl",
            "shop",
            "{selector: {matchLabels: {app: reviews}}, mtls: {mode: UNSET}, "
            "portLevelMtls: {9080: {mode: STRICT}}}",
        )
        + _pa("other", "shop", "{selector: {matchLabels: {app: ratings}}, mtls: {mode: STRICT}}")
        + _pa("elsewhere", "other-ns", "{mtls: {mode: STRICT}}")
    )
    mtls = load_snapshot(write(tmp_path, text)).mtls
    assert mtls.mode_for(9080) == "STRICT"  # port level of the workload policy
    assert mtls.mode_for(9090) == "DISABLE"  # workload UNSET inherits the namespace's


def test_mesh_wide_applies_when_nothing_closer(tmp_path: Path) -> None:
    text = PROXY + _pa("mesh", "istio-system", "{mtls: {mode: STRICT}}")
    assert load_snapshot(write(tmp_path, text)).mtls.mode_for(1) == "STRICT"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("{mtls: {mode: STRIKT}}", "spec.mtls.mode: must be one of"),
        ("{portLevelMtls: {8080: {mode: STRICT}}}", "portLevelMtls needs a workload selector"),
        (
            "{selector: {matchLabels: {a: b}}, portLevelMtls: {http: {mode: STRICT}}}",
            "expected a port number",
        ),
        ("{mtls: {mode: STRICT}, rules: []}", "spec.rules: unknown field"),
    ],
)
def test_peer_authentication_errors(tmp_path: Path, body: str, expected: str) -> None:
    issues = issues_of(write(tmp_path, PROXY + _pa("bad", "shop", body)))
    assert any(expected in i and "PeerAuthentication bad" in i for i in issues), issues


SE = """---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: r, namespace: shop}
spec:
  hosts: [r.shop.svc.cluster.local]
  ports: [{number: 80, name: http}]
  resolution: STATIC
  endpoints: [{address: 10.0.0.1, labels: {security.istio.io/tlsMode: istio}}]
"""


def _dr(tls: str) -> str:
    return f"""---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: r, namespace: shop}}
spec: {{host: r, trafficPolicy: {{tls: {tls}}}}}
"""


def test_auto_mtls_for_sidecar_endpoints_and_dr_override(tmp_path: Path) -> None:
    snap = load_snapshot(write(tmp_path, PROXY + SE))
    assert snap.clusters["outbound|80||r.shop.svc.cluster.local"].tls.mode == "ISTIO_MUTUAL"  # type: ignore[union-attr]
    snap = load_snapshot(write(tmp_path, PROXY + SE + _dr("{mode: DISABLE}")))
    assert snap.clusters["outbound|80||r.shop.svc.cluster.local"].tls is None


def test_dr_tls_fields(tmp_path: Path) -> None:
    tls = (
        "{mode: MUTUAL, clientCertificate: /a.pem, privateKey: /k.pem, sni: r.example, "
        "subjectAltNames: [r.example]}"
    )
    spec = load_snapshot(write(tmp_path, PROXY + SE + _dr(tls))).clusters[
        "outbound|80||r.shop.svc.cluster.local"
    ]
    assert spec.tls is not None and spec.tls.sni == "r.example"
    assert spec.tls.subject_alt_names == ("r.example",)


@pytest.mark.parametrize(
    ("tls", "expected"),
    [
        ("{mode: MUTUAL}", "mode MUTUAL needs clientCertificate and privateKey"),
        ("{mode: ISTIO_MUTUAL, privateKey: /k}", "uses the workload certificate"),
        ("{mode: SIMPLE, credentialName: x}", "give file paths"),
        ("{mode: SIMPEL}", "must be one of"),
    ],
)
def test_dr_tls_errors(tmp_path: Path, tls: str, expected: str) -> None:
    issues = issues_of(write(tmp_path, PROXY + SE + _dr(tls)))
    assert any(expected in i for i in issues), issues


def test_bad_trust_domain(tmp_path: Path) -> None:
    text = PROXY.replace("trustDomain: example.org", "trustDomain: Bad_Domain!")
    assert any("invalid trust domain" in i for i in issues_of(write(tmp_path, text)))
