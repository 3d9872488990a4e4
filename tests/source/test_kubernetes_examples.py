"""config/kubernetes: the manifests agree with each other, with the image and with the tools
that make them (the ConfigMap is config/sidecar/mesh.yaml; the injected workload is what
`meshproxy inject` prints today)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from meshproxy.config.loader import load_snapshot

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "config" / "kubernetes"


def docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def injected_pod() -> dict[str, Any]:
    (deployment,) = [d for d in docs("reviews-injected.yaml") if d["kind"] == "Deployment"]
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def test_configmap_is_the_sidecar_example_and_it_validates(tmp_path: Path) -> None:
    (cm,) = docs("meshproxy-configmap.yaml")
    mesh = cm["data"]["mesh.yaml"]
    assert mesh == (REPO / "config" / "sidecar" / "mesh.yaml").read_text()
    (tmp_path / "mesh.yaml").write_text(mesh)
    snapshot = load_snapshot(tmp_path)  # raises ConfigError with file:line if it is wrong
    assert snapshot.settings.namespace == "bookinfo"


def test_injected_manifest_is_what_inject_prints() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "meshproxy",
            "inject",
            "-f",
            str(K8S / "reviews.yaml"),
            "--image",
            "meshproxy:0.1.0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout == (K8S / "reviews-injected.yaml").read_text()


def test_mounts_match_the_configmap_the_secret_and_the_image(tmp_path: Path) -> None:
    pod = injected_pod()
    (proxy,) = [c for c in pod["containers"] if c["name"] == "istio-proxy"]
    mounts = {m["name"]: m["mountPath"] for m in proxy["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    (cm,) = docs("meshproxy-configmap.yaml")
    (secret,) = docs("certs-secret.yaml")
    assert volumes["meshproxy-config"]["configMap"]["name"] == cm["metadata"]["name"]
    assert volumes["istio-certs"]["secret"]["secretName"] == secret["metadata"]["name"]
    assert cm["metadata"]["namespace"] == secret["metadata"]["namespace"] == "bookinfo"
    # The certificate paths the mounted config reads are the Secret's keys under the mount.
    (tmp_path / "mesh.yaml").write_text(cm["data"]["mesh.yaml"])
    settings = load_snapshot(tmp_path).settings
    paths = {Path(p) for p in (settings.cert_chain, settings.private_key, settings.root_cert)}
    assert {p.parent for p in paths} == {Path(mounts["istio-certs"])}
    assert {p.name for p in paths} == set(secret["stringData"])
    # The config directory is where the image's CMD (and the sidecar's args) read it.
    dockerfile = (REPO / "Dockerfile").read_text()
    cmd = re.search(r'^CMD \["run", "-c", "([^"]+)"\]', dockerfile, re.M)
    assert cmd is not None and cmd.group(1) == mounts["meshproxy-config"]
    assert proxy["args"] == ["run", "-c", mounts["meshproxy-config"]]


def test_validate_config_skips_the_kubernetes_manifests() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "meshproxy", "validate", str(REPO / "config")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "kubernetes" not in out.stdout and out.stdout.count(": OK") == 3
