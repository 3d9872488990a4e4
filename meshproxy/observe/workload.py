"""Workload facts for Istio's metric labels, and Istio's HTTP metadata exchange between sidecars.

A sidecar knows its own workload (ProxyConfig namespace, labels, workloadName, clusterId, its
SPIFFE identity); the peer's facts arrive in `x-envoy-peer-metadata` (base64 of a serialized
google.protobuf.Struct, the keys Istio's proxies write: NAME, NAMESPACE, WORKLOAD_NAME,
CLUSTER_ID, LABELS, OWNER) and `x-envoy-peer-metadata-id`, on requests to a mesh upstream and
on the responses back. meshproxy writes and reads exactly that, so it and Istio's Envoy
sidecars label each other's series. The headers are trusted only over mesh mTLS and never
reach an application or an outside client.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Final

from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError

from meshproxy.config.resources import ProxySettings

MAX_PEER_METADATA: Final = 8 * 1024  # bytes of header value decoded at most
CANONICAL_NAME: Final = "service.istio.io/canonical-name"
CANONICAL_REVISION: Final = "service.istio.io/canonical-revision"
UNKNOWN: Final = "unknown"


@dataclass(frozen=True, slots=True, eq=False)
class WorkloadInfo:
    """One workload's facts as Istio's labels read them ("unknown" where not known). Compared
    and hashed by identity: instances are interned (per config, per decoded header), which
    keeps the per-request metric key cheap."""

    namespace: str = UNKNOWN
    workload: str = UNKNOWN
    app: str = UNKNOWN
    version: str = UNKNOWN
    canonical_service: str = UNKNOWN
    canonical_revision: str = "latest"
    cluster: str = UNKNOWN
    principal: str = UNKNOWN  # spiffe://..., from the verified certificate, never a header
    instance: str = ""  # NAME: the pod

    @property
    def service_name(self) -> str:
        """The OpenTelemetry service.name Istio gives this workload's spans."""
        return f"{self.canonical_service}.{self.namespace}"

    def with_principal(self, principal: str) -> WorkloadInfo:
        return WorkloadInfo(
            self.namespace,
            self.workload,
            self.app,
            self.version,
            self.canonical_service,
            self.canonical_revision,
            self.cluster,
            principal or UNKNOWN,
            self.instance,
        )


NO_PEER: Final = WorkloadInfo()


def local_workload(settings: ProxySettings, principal: str = "") -> WorkloadInfo:
    """This sidecar's workload, from ProxyConfig (Istio's rules for canonical names)."""
    labels = dict(settings.labels)
    app = labels.get("app") or labels.get("app.kubernetes.io/name") or ""
    version = labels.get("version") or labels.get("app.kubernetes.io/version") or ""
    canonical = labels.get(CANONICAL_NAME) or app or settings.workload_name or UNKNOWN
    revision = labels.get(CANONICAL_REVISION) or version or "latest"
    return WorkloadInfo(
        namespace=settings.namespace,
        workload=settings.workload_name or canonical,
        app=app or UNKNOWN,
        version=version or UNKNOWN,
        canonical_service=canonical,
        canonical_revision=revision,
        cluster=settings.cluster_id,
        principal=principal or UNKNOWN,
        instance=labels.get("pod-name", ""),
    )


def encode(info: WorkloadInfo, labels: tuple[tuple[str, str], ...]) -> bytes:
    """The `x-envoy-peer-metadata` value Istio's proxies send: base64 of a Struct."""
    struct = struct_pb2.Struct()
    if info.instance:
        struct.fields["NAME"].string_value = info.instance
    struct.fields["NAMESPACE"].string_value = info.namespace
    struct.fields["WORKLOAD_NAME"].string_value = info.workload
    struct.fields["CLUSTER_ID"].string_value = info.cluster
    label_struct = struct.fields["LABELS"].struct_value
    for key, value in labels:
        label_struct.fields[key].string_value = value
    label_struct.fields[CANONICAL_NAME].string_value = info.canonical_service
    label_struct.fields[CANONICAL_REVISION].string_value = info.canonical_revision
    if info.namespace != UNKNOWN and info.workload != UNKNOWN:
        struct.fields[
            "OWNER"
        ].string_value = (
            f"kubernetes://apis/apps/v1/namespaces/{info.namespace}/deployments/{info.workload}"
        )
    return base64.b64encode(struct.SerializeToString(deterministic=True))


def encode_id(info: WorkloadInfo) -> bytes:
    """`x-envoy-peer-metadata-id`: Istio's node id shape, sidecar~IP~POD.NAMESPACE~DOMAIN."""
    pod = info.instance or info.workload
    return f"sidecar~0.0.0.0~{pod}.{info.namespace}~{info.namespace}.svc.cluster.local".encode()


def decode(value: bytes) -> WorkloadInfo | None:
    """A peer's facts from its header value; None for anything malformed or oversized."""
    if len(value) > MAX_PEER_METADATA:
        return None
    try:
        raw = base64.b64decode(value + b"=" * (-len(value) % 4), validate=True)
        struct = struct_pb2.Struct.FromString(raw)
    except (binascii.Error, ValueError, DecodeError):
        return None

    def text(fields: struct_pb2.Struct, key: str) -> str:
        item = fields.fields.get(key)
        if item is None or item.WhichOneof("kind") != "string_value":
            return ""
        return str(item.string_value)[:253]  # label values stay bounded

    labels = struct.fields.get("LABELS")
    label_struct = (
        labels.struct_value
        if labels is not None and labels.WhichOneof("kind") == "struct_value"
        else struct_pb2.Struct()
    )
    app = text(label_struct, "app") or text(label_struct, "app.kubernetes.io/name")
    version = text(label_struct, "version") or text(label_struct, "app.kubernetes.io/version")
    workload = text(struct, "WORKLOAD_NAME")
    canonical = text(label_struct, CANONICAL_NAME) or app or workload
    return WorkloadInfo(
        namespace=text(struct, "NAMESPACE") or UNKNOWN,
        workload=workload or UNKNOWN,
        app=app or UNKNOWN,
        version=version or UNKNOWN,
        canonical_service=canonical or UNKNOWN,
        canonical_revision=text(label_struct, CANONICAL_REVISION) or version or "latest",
        cluster=text(struct, "CLUSTER_ID") or UNKNOWN,
        instance=text(struct, "NAME"),
    )


class PeerCache:
    """Decoded peer metadata by (header value, principal): a peer sends the same bytes on
    every request, so decoding happens once per peer and the interned object keys metrics."""

    def __init__(self, limit: int = 1024) -> None:
        self._limit = limit
        self._cache: dict[tuple[bytes, str], WorkloadInfo] = {}

    def get(self, value: bytes | None, principal: str) -> WorkloadInfo:
        key = (value or b"", principal)
        info = self._cache.get(key)
        if info is not None:
            return info
        decoded = decode(value) if value else None
        info = (decoded or NO_PEER).with_principal(principal)
        if len(self._cache) >= self._limit:
            self._cache.clear()  # a flood of distinct peers must not grow memory
        self._cache[key] = info
        return info
