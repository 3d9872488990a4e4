"""TLS origination to a cluster's endpoints: ISTIO_MUTUAL, MUTUAL, SIMPLE (DestinationRule tls)."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from meshproxy.config.resources import ClientTls
from meshproxy.errors import FailureKind, UpstreamError
from meshproxy.security.identity import WorkloadIdentity
from meshproxy.security.spiffe import spiffe_of, uri_sans
from meshproxy.security.svid import svid_violation

IdentitySource = Callable[[], WorkloadIdentity | None]


@dataclass(frozen=True)
class UpstreamTls:
    """What one connect needs: the context, the SNI, and the check of the peer's certificate."""

    context: ssl.SSLContext
    server_hostname: str
    tls: ClientTls
    trust_domain: str

    def peer_identity(self, peercert: Mapping[str, object] | None) -> str:
        """The verified mesh peer's SPIFFE ID (ISTIO_MUTUAL only), or ""."""
        if self.tls.mode != "ISTIO_MUTUAL":
            return ""
        peer = spiffe_of(peercert)
        return str(peer) if peer is not None else ""

    def check_peer(self, peercert: Mapping[str, object] | None, der: bytes) -> str | None:
        """Why the server's certificate is not the one expected, or None when it is."""
        if self.tls.insecure_skip_verify:
            return None
        wanted = self.tls.subject_alt_names
        if self.tls.mode == "ISTIO_MUTUAL":
            problem = svid_violation(der)
            if problem is not None:
                return f"server certificate is no valid SVID: {problem}"
            peer = spiffe_of(peercert)
            if peer is None:
                return "server certificate has no SPIFFE ID"
            if wanted:
                return None if str(peer) in wanted else f"SAN {peer} is not in subjectAltNames"
            if peer.trust_domain != self.trust_domain:
                return f"SAN {peer} is outside trust domain {self.trust_domain}"
            return None
        if wanted:
            names = set(uri_sans(peercert))
            sans = peercert.get("subjectAltName", ()) if peercert else ()
            names.update(v for k, v in sans if k == "DNS")  # type: ignore[misc, union-attr, attr-defined]
            if not names & set(wanted):
                return f"certificate names {sorted(names)} match none of {list(wanted)}"
        return None


# What a mesh client offers, as Istio's sidecars do: a PERMISSIVE server terminates TLS only
# when it sees one of these, and passes any other TLS (the app's own) through untouched.
MESH_ALPN: dict[tuple[str, ...], tuple[str, ...]] = {
    ("http/1.1",): ("istio-http/1.1", "http/1.1"),
    ("h2",): ("istio-h2", "h2"),
    (): ("istio-peer-exchange", "istio"),
}


class TlsContexts:
    """Contexts for SIMPLE and MUTUAL (built from files once per cluster spec)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[ClientTls, tuple[str, ...]], ssl.SSLContext] = {}

    def for_files(self, tls: ClientTls, alpn: tuple[str, ...]) -> ssl.SSLContext:
        key = (tls, alpn)
        ctx = self._cache.get(key)
        if ctx is None:
            ctx = ssl.create_default_context(cafile=tls.ca_certificates)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.options |= ssl.OP_NO_RENEGOTIATION
            if tls.insecure_skip_verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            if tls.mode == "MUTUAL":
                assert tls.client_certificate and tls.private_key
                ctx.load_cert_chain(tls.client_certificate, tls.private_key)
            if alpn:
                ctx.set_alpn_protocols(list(alpn))
            if len(self._cache) > 256:
                self._cache.clear()
            self._cache[key] = ctx
        return ctx


def upstream_tls(
    tls: ClientTls,
    host: str,
    alpn: tuple[str, ...],
    identity: WorkloadIdentity | None,
    contexts: TlsContexts,
    trust_domain: str,
) -> UpstreamTls:
    if tls.mode == "ISTIO_MUTUAL":
        if identity is None:
            raise UpstreamError(
                FailureKind.TLS,
                "TLS error: ISTIO_MUTUAL needs a workload certificate and none is loaded",
                flag="UF",
                request_bytes_sent=False,
            )
        mesh_alpn = MESH_ALPN.get(alpn, alpn)
        return UpstreamTls(identity.client_context(mesh_alpn), tls.sni or host, tls, trust_domain)
    try:
        context = contexts.for_files(tls, alpn)
    except (OSError, ssl.SSLError) as exc:
        raise UpstreamError(
            FailureKind.TLS,
            f"TLS error: cannot load the DestinationRule's certificates: {exc}",
            flag="UF",
            request_bytes_sent=False,
        ) from None
    return UpstreamTls(context, tls.sni or host, tls, trust_domain)
