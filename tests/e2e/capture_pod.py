"""A pod with Istio's interception rules (the injector's defaults) around a proxy running as
the image's uid 1337, its apps, and a remote namespace: the capture tests' fixture, shared with
tests/robustness (catalog L04, L05).

Parameters (indirect): ALLOW_ANY (default), REGISTRY_ONLY, STRICT_MTLS (the pod's inbound
needs mTLS), UNEXEMPT (the proxy runs as root, so the rules capture its own traffic too)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshproxy.intercept.apply import apply
from meshproxy.intercept.capture_config import resolve
from tests.e2e.pods import REPO, Procs, curl_status, ns_exec

CONFIG = """
apiVersion: meshproxy.io/v1alpha1
kind: ProxyConfig
metadata: {name: pod}
spec:
  proxyAdminPort: 15000
  statusPort: 15021
  drainDuration: 1s
  terminationDrainDuration: 0s  # the inbound-only drain is tested in test_two_pods.py
  protocolDetectionTimeout: 1s
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: hello}
spec:
  hosts: [hello.e2e]
  addresses: [10.96.7.7]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1, ports: {http: 18090}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: other}
spec:
  hosts: [other.e2e]
  addresses: [10.96.7.9]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1, ports: {http: 18092}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db}
spec:
  hosts: [db.e2e]
  addresses: [10.96.7.8]
  ports: [{number: 5432, name: tcp, protocol: TCP}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1, ports: {tcp: 18091}}]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default}
spec:
  ingress:
  - port: {number: 9080, protocol: HTTP, name: http}
    defaultEndpoint: 127.0.0.1:18093
"""


@pytest.fixture
def pod(
    netns_pair: tuple[str, str], request: pytest.FixtureRequest
) -> Iterator[tuple[str, str, Procs]]:
    pod_ns, remote_ns = netns_pair
    policy = getattr(request, "param", "ALLOW_ANY")
    procs = Procs()
    serve = [sys.executable, "-m", "tests.support.serve"]
    cfg: Path | None = None
    try:
        procs.start(ns_exec(pod_ns, *serve, "hello", "127.0.0.1", "18090"), ready="ready")
        procs.start(ns_exec(pod_ns, *serve, "other", "127.0.0.1", "18092"), ready="ready")
        procs.start(ns_exec(pod_ns, *serve, "app", "127.0.0.1", "18093"), ready="ready")
        procs.start(ns_exec(pod_ns, *serve, "tcp-db", "127.0.0.1", "18091"), ready="ready")
        # An app port no Sidecar declares, listening on all addresses as apps do.
        procs.start(ns_exec(pod_ns, *serve, "undeclared", "0.0.0.0", "18094"), ready="ready")
        apps = [sys.executable, "-m", "tests.support.apps"]
        procs.start(ns_exec(pod_ns, *apps, "banner", "0.0.0.0", "18095"), ready="ready")
        procs.start(ns_exec(pod_ns, *apps, "tls", "0.0.0.0", "18096"), ready="ready")
        procs.start(ns_exec(remote_ns, *serve, "outside", "10.78.0.2", "8080"), ready="ready")
        procs.start(ns_exec(pod_ns, *serve, "app-v6", "::", "18097"), ready="ready")
        procs.start(ns_exec(remote_ns, *serve, "outside-v6", "::", "8081"), ready="ready")
        cfg = Path(tempfile.mkdtemp(prefix="meshproxy-e2e-"))
        procs.cfg = cfg
        text = CONFIG
        as_user = ["setpriv", "--reuid", "1337", "--regid", "1337", "--clear-groups"]
        if policy == "STRICT_MTLS":
            text = _with_strict_mtls(cfg)
            policy = "ALLOW_ANY"
        elif policy == "UNEXEMPT":
            as_user = []  # root: not the uid the rules exempt, so its own traffic is captured
            policy = "ALLOW_ANY"
        (cfg / "mesh.yaml").write_text(text + f"  outboundTrafficPolicy:\n    mode: {policy}\n")
        apply(resolve({}, {}), netns=pod_ns)  # the injector's defaults
        # The image's user, uid and gid 1337: Istio's rules exempt the proxy's traffic by owner.
        for path in (cfg, *cfg.rglob("*")):
            os.chown(path, 1337, 1337)
        proxy = procs.start(
            ns_exec(pod_ns, *as_user, sys.executable, "-m", "meshproxy", "run", "-c", str(cfg))
        )
        procs.proxy = proxy
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if curl_status(pod_ns, "http://127.0.0.1:15000/ready") == "200":
                break
            assert proxy.poll() is None, proxy.stdout.read().decode() if proxy.stdout else ""
            time.sleep(0.1)
        else:
            pytest.fail("proxy in the namespace never became ready")
        yield pod_ns, remote_ns, procs
    finally:
        procs.stop()
        if cfg is not None:
            shutil.rmtree(cfg, ignore_errors=True)


def _with_strict_mtls(cfg: Path) -> str:
    """CONFIG plus a workload certificate and STRICT mTLS for the pod's inbound traffic."""

    def ca(*args: str) -> None:
        subprocess.run(
            [sys.executable, "-m", "meshproxy", "ca", *args],
            check=True,
            capture_output=True,
            timeout=30,
            cwd=REPO,
        )

    ca("init", "--dir", str(cfg / "ca"))
    ca(
        "issue",
        "--ca",
        str(cfg / "ca"),
        "--spiffe-id",
        "spiffe://cluster.local/ns/default/sa/app",
        "--out",
        str(cfg / "pod"),
    )
    ca(
        "issue",
        "--ca",
        str(cfg / "ca"),
        "--spiffe-id",
        "spiffe://cluster.local/ns/default/sa/caller",
        "--out",
        str(cfg / "caller"),
    )
    certs = (
        f"  certificates: {{certChain: {cfg}/pod/cert-chain.pem, "
        f"privateKey: {cfg}/pod/key.pem, rootCert: {cfg}/pod/root-cert.pem}}\n"
    )
    text = CONFIG.replace("  drainDuration: 1s\n", "  drainDuration: 1s\n" + certs, 1)
    sidecar_at = text.index("---\napiVersion: networking.istio.io/v1\nkind: Sidecar")
    return (
        text[:sidecar_at] + "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        "metadata: {name: default, namespace: default}\nspec: {mtls: {mode: STRICT}}\n"
        + text[sidecar_at:]
    )
