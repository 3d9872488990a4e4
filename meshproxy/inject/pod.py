"""The sidecar added to one pod template: init container, proxy container, volumes.

Names and shapes follow Istio's injection template so kubectl habits carry over
(`kubectl logs -c istio-proxy`, `sidecar.istio.io/status`), and the per-pod annotations Istio
users already write are honoured: `sidecar.istio.io/inject: "false"`,
`traffic.sidecar.istio.io/{include,exclude}{Outbound,Inbound}{IPRanges,Ports}` and
`proxy.istio.io/config` with `holdApplicationUntilProxyStarts`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import yaml

SIDECAR = "istio-proxy"
INIT = "istio-init"
CONFIG_VOLUME = "meshproxy-config"
CERTS_VOLUME = "istio-certs"
CONFIG_DIR = "/etc/meshproxy"  # the image's ENTRYPOINT reads this directory
CERTS_DIR = "/etc/certs"  # ProxyConfig's default certificate paths live here
STATUS_ANNOTATION = "sidecar.istio.io/status"
ALWAYS_EXCLUDED_INBOUND = "15090,15021,15020"  # Istio's injector always excludes these

# traffic.sidecar.istio.io annotation -> (meshproxy iptables flag, default)
TRAFFIC_ANNOTATIONS = {
    "includeOutboundIPRanges": ("-i", "*"),
    "excludeOutboundIPRanges": ("-x", ""),
    "includeInboundPorts": ("-b", "*"),
    "excludeInboundPorts": ("-d", ""),
    "includeOutboundPorts": ("-q", ""),
    "excludeOutboundPorts": ("-o", ""),
}


class InjectError(ValueError):
    """Input that cannot be injected, with where it is."""


@dataclass(frozen=True, slots=True)
class InjectOptions:
    image: str
    config_map: str = "meshproxy"
    certs_secret: str = "meshproxy-certs-{serviceAccount}"
    hold_application: bool = False  # mesh-wide holdApplicationUntilProxyStarts


def wants_injection(meta: dict[str, Any]) -> bool:
    for key in ("annotations", "labels"):
        value = (meta.get(key) or {}).get("sidecar.istio.io/inject")
        if value is not None and str(value).lower() == "false":
            return False
    return True


def already_injected(spec: dict[str, Any]) -> bool:
    names = {c.get("name") for c in spec.get("containers") or []}
    names |= {c.get("name") for c in spec.get("initContainers") or []}
    return SIDECAR in names or INIT in names


def inject_pod(meta: dict[str, Any], spec: dict[str, Any], opts: InjectOptions, where: str) -> bool:
    """Add the sidecar to a pod template in place; False when it was left alone."""
    if not wants_injection(meta) or already_injected(spec) or spec.get("hostNetwork"):
        return False
    if not isinstance(spec.get("containers"), list) or not spec["containers"]:
        raise InjectError(f"{where}: the pod has no containers")
    annotations = meta.setdefault("annotations", {}) or {}
    meta["annotations"] = annotations
    hold = _hold_application(annotations, opts, where)
    sidecar = _sidecar(opts, hold)
    spec.setdefault("initContainers", [])
    spec["initContainers"] = [*(spec["initContainers"] or []), _init(annotations, opts, where)]
    containers = spec["containers"]
    spec["containers"] = [sidecar, *containers] if hold else [*containers, sidecar]
    account = spec.get("serviceAccountName") or "default"
    volumes = [
        {"name": CONFIG_VOLUME, "configMap": {"name": opts.config_map}},
        {
            "name": CERTS_VOLUME,
            "secret": {
                "secretName": opts.certs_secret.format(serviceAccount=account),
                "defaultMode": 0o440,
            },
        },
    ]
    spec["volumes"] = [*(spec.get("volumes") or []), *volumes]
    if spec.get("securityContext") is None:
        spec["securityContext"] = {}
    # The proxy's group may read the certificate files the Secret volume mounts.
    spec["securityContext"].setdefault("fsGroup", 1337)
    annotations[STATUS_ANNOTATION] = json.dumps(
        {
            "initContainers": [INIT],
            "containers": [SIDECAR],
            "volumes": [CONFIG_VOLUME, CERTS_VOLUME],
            "imagePullSecrets": None,
        }
    )
    return True


def _hold_application(annotations: dict[str, Any], opts: InjectOptions, where: str) -> bool:
    raw = annotations.get("proxy.istio.io/config")
    if raw is None:
        return opts.hold_application
    try:
        config = yaml.safe_load(str(raw)) or {}
    except yaml.YAMLError as exc:
        raise InjectError(f"{where}: annotation proxy.istio.io/config is not YAML: {exc}") from None
    if not isinstance(config, dict):
        raise InjectError(f"{where}: annotation proxy.istio.io/config must be a mapping")
    hold = config.get("holdApplicationUntilProxyStarts", opts.hold_application)
    if not isinstance(hold, bool):
        raise InjectError(
            f"{where}: proxy.istio.io/config holdApplicationUntilProxyStarts must be true or false"
        )
    return hold


def iptables_args(annotations: dict[str, Any], where: str) -> list[str]:
    """`meshproxy iptables --apply` with Istio's injector flags and the pod's annotations."""
    args = ["iptables", "--apply", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT"]
    for name, (flag, default) in TRAFFIC_ANNOTATIONS.items():
        value = annotations.get(f"traffic.sidecar.istio.io/{name}")
        if value is None:
            value = default
        if not isinstance(value, str | int):
            raise InjectError(
                f"{where}: annotation traffic.sidecar.istio.io/{name} must be a string"
            )
        value = str(value).replace(" ", "")
        if name == "excludeInboundPorts":
            value = ",".join(p for p in (ALWAYS_EXCLUDED_INBOUND, value) if p)
        if value or flag in ("-i", "-b", "-x"):
            args += [flag, value]
    return args


def _init(annotations: dict[str, Any], opts: InjectOptions, where: str) -> dict[str, Any]:
    return {
        "name": INIT,
        "image": opts.image,
        "args": iptables_args(annotations, where),
        "securityContext": {
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": False,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
    }


def _sidecar(opts: InjectOptions, hold: bool) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": SIDECAR,
        "image": opts.image,
        "args": ["run", "-c", CONFIG_DIR],
        "ports": [
            {"containerPort": 15090, "protocol": "TCP", "name": "http-envoy-prom"},
            {"containerPort": 15021, "protocol": "TCP", "name": "health"},
        ],
        "readinessProbe": {
            "httpGet": {"path": "/healthz/ready", "port": 15021},
            "initialDelaySeconds": 1,
            "periodSeconds": 2,
            "timeoutSeconds": 3,
            "failureThreshold": 30,
        },
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
        "securityContext": {
            "runAsUser": 1337,
            "runAsGroup": 1337,
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": CERTS_VOLUME, "mountPath": CERTS_DIR, "readOnly": True},
        ],
    }
    if hold:
        # The kubelet starts the next container only when postStart returns: the app waits
        # for a proxy that can carry its traffic (Istio's holdApplicationUntilProxyStarts).
        container["lifecycle"] = {"postStart": {"exec": {"command": ["meshproxy", "wait"]}}}
    return container
