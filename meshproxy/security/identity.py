"""This workload's identity: its certificate files, loaded into TLS contexts, kept current.

Files are read in Istio's layout (cert chain, key, root bundle). A load that fails (missing
file, key that does not match the cert, unreadable PEM) is reported with the file and the
reason and leaves the previous identity in use, so a rotation caught half-written simply
waits for the next file event. Connections take the context current at their handshake:
a rotation affects new handshakes only and drops nothing.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from meshproxy.errors import MeshproxyError
from meshproxy.security.spiffe import SpiffeError, SpiffeId

logger = logging.getLogger(__name__)

# What inbound mesh TLS accepts, as Istio's inbound chains match them (h2 first: preferred).
SERVER_ALPN = ["h2", "istio-h2", "http/1.1", "istio-http/1.1", "istio-peer-exchange", "istio"]
H2_ALPN = ("h2", "istio-h2")
HTTP_ALPN = ("h2", "istio-h2", "http/1.1", "istio-http/1.1")


class CertError(MeshproxyError):
    """Certificate material that cannot be used, with the file and the reason."""


@dataclass(frozen=True)
class CertFiles:
    cert_chain: Path
    private_key: Path
    root_cert: Path

    @property
    def directories(self) -> set[Path]:
        return {p.parent for p in (self.cert_chain, self.private_key, self.root_cert)}


@dataclass
class WorkloadIdentity:
    """One consistent load of the files; immutable in use (a reload makes a new one)."""

    files: CertFiles
    spiffe_id: SpiffeId | None
    not_before: dt.datetime
    not_after: dt.datetime
    roots: int
    server_context: ssl.SSLContext
    leaf_der: bytes
    _client_contexts: dict[tuple[str, ...], ssl.SSLContext] = field(default_factory=dict)

    @property
    def expired(self) -> bool:
        return dt.datetime.now(dt.UTC) >= self.not_after

    @property
    def leaf_sha256(self) -> str:
        return hashlib.sha256(self.leaf_der).hexdigest()

    def client_context(self, alpn: tuple[str, ...]) -> ssl.SSLContext:
        """ISTIO_MUTUAL origination: present our cert, verify the peer against our roots.

        The peer's SPIFFE ID is checked after the handshake (SPIFFE certs carry no DNS name,
        so hostname checking is off and the URI SAN is compared instead)."""
        ctx = self._client_contexts.get(alpn)
        if ctx is None:
            ctx = _context(ssl.PROTOCOL_TLS_CLIENT, self.files)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_REQUIRED
            if alpn:
                ctx.set_alpn_protocols(list(alpn))
            self._client_contexts[alpn] = ctx
        return ctx

    def describe(self) -> dict[str, object]:
        return {
            "spiffe_id": str(self.spiffe_id) if self.spiffe_id else None,
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "expired": self.expired,
            "root_certificates": self.roots,
            "sha256": self.leaf_sha256,
            "files": {
                "certChain": str(self.files.cert_chain),
                "privateKey": str(self.files.private_key),
                "rootCert": str(self.files.root_cert),
            },
        }


def _context(protocol: int, files: CertFiles) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # A TLS 1.2 peer could otherwise make us redo a full handshake on demand (a CPU DoS);
    # Envoy refuses renegotiation too.
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    try:
        ctx.load_cert_chain(str(files.cert_chain), str(files.private_key))
    except FileNotFoundError as exc:
        raise CertError(f"{exc.filename}: no such file") from None
    except ssl.SSLError as exc:
        reason = (
            "private key does not match the certificate"
            if "KEY_VALUES_MISMATCH" in str(exc)
            else str(exc)
        )
        raise CertError(f"{files.cert_chain} / {files.private_key}: {reason}") from None
    try:
        ctx.load_verify_locations(cafile=str(files.root_cert))
    except FileNotFoundError:
        raise CertError(f"{files.root_cert}: no such file") from None
    except ssl.SSLError as exc:
        raise CertError(f"{files.root_cert}: unusable root bundle: {exc}") from None
    return ctx


def load_identity(files: CertFiles) -> WorkloadIdentity:
    """Read and check the files; CertError says which file and why."""
    # Imported here: a proxy without certificates (most of the tests', a plaintext local
    # proxy) starts 25 ms sooner.
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        chain_pem = files.cert_chain.read_bytes()
    except OSError as exc:
        raise CertError(f"{files.cert_chain}: {exc.strerror or exc}") from None
    try:
        leaf = x509.load_pem_x509_certificates(chain_pem)[0]
    except ValueError as exc:
        raise CertError(f"{files.cert_chain}: not a PEM certificate chain ({exc})") from None
    try:
        roots = x509.load_pem_x509_certificates(files.root_cert.read_bytes())
    except OSError as exc:
        raise CertError(f"{files.root_cert}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise CertError(f"{files.root_cert}: not a PEM bundle ({exc})") from None
    server = _context(ssl.PROTOCOL_TLS_SERVER, files)
    server.verify_mode = ssl.CERT_REQUIRED  # mesh TLS is mutual
    server.set_alpn_protocols(SERVER_ALPN)
    # OpenSSL's TLS 1.3 default is two session tickets, ~170 us of CPU each on every full
    # handshake (OpenSSL 3.0). Sidecars pool their connections, so resumption saves little
    # between them and the tickets would cost every handshake: none are issued.
    server.num_tickets = 0
    spiffe: SpiffeId | None = None
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        if uris:
            spiffe = SpiffeId.parse(uris[0])
    except (x509.ExtensionNotFound, SpiffeError) as exc:
        logger.warning("%s: no usable SPIFFE ID in the certificate (%s)", files.cert_chain, exc)
    identity = WorkloadIdentity(
        files,
        spiffe,
        leaf.not_valid_before_utc,
        leaf.not_valid_after_utc,
        len(roots),
        server,
        leaf.public_bytes(serialization.Encoding.DER),
    )
    if identity.expired:
        logger.error(
            "%s: the workload certificate expired at %s; peers will refuse it until it is renewed",
            files.cert_chain,
            identity.not_after.isoformat(),
        )
    return identity
