"""Validate YAML documents into typed resources: Istio's kinds and field names, exactly.

One module per API group's kind; this one dispatches a document to its kind's parser.
"""

from __future__ import annotations

from typing import Any

from meshproxy.config.reader import Reader, did_you_mean
from meshproxy.config.resources import Origin, Resource
from meshproxy.config.schema.common import DNS_LABEL
from meshproxy.config.schema.destination_rule import parse_destination_rule
from meshproxy.config.schema.proxy_config import parse_proxy_config
from meshproxy.config.schema.security import parse_authorization_policy, parse_peer_authentication
from meshproxy.config.schema.service_entry import parse_service_entry
from meshproxy.config.schema.sidecar import parse_sidecar
from meshproxy.config.schema.telemetry import parse_telemetry
from meshproxy.config.schema.virtual_service import parse_virtual_service
from meshproxy.config.source import Document
from meshproxy.errors import ConfigIssue

ISTIO_NETWORKING_VERSIONS = (
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
)
ISTIO_SECURITY_VERSIONS = ("security.istio.io/v1", "security.istio.io/v1beta1")
MESHPROXY_VERSIONS = ("meshproxy.io/v1alpha1",)
TELEMETRY_VERSIONS = ("telemetry.istio.io/v1", "telemetry.istio.io/v1alpha1")


KINDS = (
    "ServiceEntry",
    "VirtualService",
    "DestinationRule",
    "Sidecar",
    "ProxyConfig",
    "PeerAuthentication",
    "AuthorizationPolicy",
    "Telemetry",
)
_VERSIONS = {
    "ServiceEntry": ISTIO_NETWORKING_VERSIONS,
    "VirtualService": ISTIO_NETWORKING_VERSIONS,
    "DestinationRule": ISTIO_NETWORKING_VERSIONS,
    "Sidecar": ISTIO_NETWORKING_VERSIONS,
    "PeerAuthentication": ISTIO_SECURITY_VERSIONS,
    "AuthorizationPolicy": ISTIO_SECURITY_VERSIONS,
    "ProxyConfig": MESHPROXY_VERSIONS,
    "Telemetry": TELEMETRY_VERSIONS,
}


_PARSERS: dict[str, Any] = {
    "ServiceEntry": parse_service_entry,
    "VirtualService": parse_virtual_service,
    "DestinationRule": parse_destination_rule,
    "Sidecar": parse_sidecar,
    "ProxyConfig": parse_proxy_config,
    "PeerAuthentication": parse_peer_authentication,
    "AuthorizationPolicy": parse_authorization_policy,
    "Telemetry": parse_telemetry,
}


def parse_resource(doc: Document, issues: list[ConfigIssue]) -> Resource | None:
    """Validate one document into a resource; every problem is appended to `issues`."""
    top = doc.value
    bare = Reader(doc, "", issues)
    if not isinstance(top, dict):
        bare.error((), "a resource must be a mapping with apiVersion, kind, metadata and spec")
        return None
    kind = top.get("kind")
    if not isinstance(kind, str) or not kind:
        bare.error(("kind",), "required field is missing")
        return None
    if kind not in _VERSIONS:
        bare.error(("kind",), f"unknown kind {kind!r}{did_you_mean(kind, KINDS)}")
        return None
    meta = top.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    r = Reader(doc, f"{kind} {name if isinstance(name, str) and name else '<unnamed>'}", issues)
    top_map = r.mapping(top, (), ("apiVersion", "kind", "metadata", "spec", "status"))
    if top_map is None:
        return None
    api = top.get("apiVersion")
    if api not in _VERSIONS[kind]:
        r.error(
            ("apiVersion",), f"{kind} needs apiVersion {' or '.join(_VERSIONS[kind])}, got {api!r}"
        )
    meta_map = r.mapping(
        meta,
        ("metadata",),
        (
            "name",
            "namespace",
            "labels",
            "annotations",
            "uid",
            "resourceVersion",
            "generation",
            "creationTimestamp",
            "managedFields",
        ),
        required=("name",),
    )
    if meta_map is None or not isinstance(name, str) or not name:
        return None
    if not DNS_LABEL.match(name) or len(name) > 253:
        r.error(("metadata", "name"), f"{name!r} is not a valid Kubernetes name")
    namespace = r.string(meta_map, "namespace", ("metadata",), "default") or "default"
    origin = Origin(doc, kind, name, namespace)
    spec = top.get("spec")
    parse = _PARSERS[kind]
    resource: Resource | None = parse(r, origin, spec)
    return resource
