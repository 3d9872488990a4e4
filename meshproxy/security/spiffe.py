"""SPIFFE IDs (spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>) and cert SANs."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from meshproxy.errors import MeshproxyError

_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
_PATH_SEGMENT = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:@%-]+")


class SpiffeError(MeshproxyError):
    pass


@dataclass(frozen=True, slots=True)
class SpiffeId:
    trust_domain: str
    path: str  # "/ns/default/sa/reviews"

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Strict parsing (the SPIFFE ID spec): lower-case trust domain, no query/fragment."""
        if not text.startswith("spiffe://"):
            raise SpiffeError(f"not a SPIFFE ID (must start with spiffe://): {text!r}")
        rest = text[len("spiffe://") :]
        domain, slash, path = rest.partition("/")
        if not _TRUST_DOMAIN.fullmatch(domain):
            raise SpiffeError(f"invalid trust domain in {text!r}")
        if slash and (not path or any(not _PATH_SEGMENT.fullmatch(s) for s in path.split("/"))):
            raise SpiffeError(f"invalid path in {text!r}")
        if any(s in (".", "..") for s in path.split("/")):
            raise SpiffeError(f"dot segments are not allowed in {text!r}")
        return cls(domain, "/" + path if slash else "")

    @classmethod
    def workload(cls, trust_domain: str, namespace: str, service_account: str) -> SpiffeId:
        return cls.parse(f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")

    @property
    def namespace(self) -> str | None:
        parts = self.path.split("/")
        return parts[2] if len(parts) >= 5 and parts[1] == "ns" and parts[3] == "sa" else None

    @property
    def service_account(self) -> str | None:
        parts = self.path.split("/")
        return parts[4] if len(parts) >= 5 and parts[1] == "ns" and parts[3] == "sa" else None

    @property
    def principal(self) -> str:
        """Istio's principal form (AuthorizationPolicy, metrics): the ID without spiffe://."""
        return self.trust_domain + self.path

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}{self.path}"


def uri_sans(peercert: Mapping[str, object] | None) -> list[str]:
    """URI SANs from ssl's getpeercert() dict."""
    if not peercert:
        return []
    sans = peercert.get("subjectAltName", ())
    return [v for k, v in sans if k == "URI"] if isinstance(sans, tuple) else []  # type: ignore[misc]


def spiffe_of(peercert: Mapping[str, object] | None) -> SpiffeId | None:
    """The one SPIFFE ID of a certificate (the spec allows exactly one URI SAN), if any."""
    ids = [u for u in uri_sans(peercert) if u.startswith("spiffe://")]
    if len(ids) != 1:
        return None
    try:
        return SpiffeId.parse(ids[0])
    except SpiffeError:
        return None
