"""A small mesh CA for development and tests: a root, and SPIFFE workload certificates.

The files it writes are Istio's file-mounted layout (cert-chain.pem, key.pem, root-cert.pem),
so a workload issued here is read exactly like one written by istiod, cert-manager or SPIRE.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshproxy.errors import MeshproxyError
from meshproxy.security.spiffe import SpiffeId

ROOT_CERT = "root-cert.pem"
ROOT_KEY = "root-key.pem"
CERT_CHAIN = "cert-chain.pem"
KEY = "key.pem"

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class CaError(MeshproxyError):
    """The CA directory is missing, unreadable or inconsistent."""


def new_key(algorithm: str = "ecdsa") -> PrivateKey:
    if algorithm == "ecdsa":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise CaError(f"unknown key algorithm {algorithm!r} (ecdsa or rsa)")


def _pem_key(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, private: bool = False) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    if private:
        os.chmod(tmp, 0o600)
    os.replace(tmp, path)  # readers never see half a file


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Root:
    cert: x509.Certificate
    key: PrivateKey


def make_root(trust_domain: str, ttl: dt.timedelta, algorithm: str = "ecdsa") -> Root:
    key = new_key(algorithm)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, f"meshproxy root CA ({trust_domain})"),
        ]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + ttl)
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Root(cert, key)


def issue_workload(
    root: Root,
    spiffe_id: SpiffeId,
    ttl: dt.timedelta,
    *,
    dns_names: tuple[str, ...] = (),
    ip_addresses: tuple[str, ...] = (),
    algorithm: str = "ecdsa",
    not_before: dt.datetime | None = None,
) -> tuple[x509.Certificate, PrivateKey]:
    """A leaf for `spiffe_id`: URI SAN, client and server auth, signed by `root`."""
    key = new_key(algorithm)
    start = not_before or _now() - dt.timedelta(minutes=1)
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
    sans += [x509.DNSName(d) for d in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, spiffe_id.trust_domain)])
        )
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + ttl)
        .add_extension(x509.SubjectAlternativeName(sans), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root.key.public_key()),
            critical=False,
        )
        .sign(root.key, hashes.SHA256())
    )
    return cert, key


def init_ca(
    directory: Path, trust_domain: str, ttl: dt.timedelta, algorithm: str = "ecdsa"
) -> Root:
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / ROOT_KEY).exists():
        raise CaError(f"{directory / ROOT_KEY} exists: refusing to replace a CA's key")
    root = make_root(trust_domain, ttl, algorithm)
    _write(directory / ROOT_KEY, _pem_key(root.key), private=True)
    _write(directory / ROOT_CERT, root.cert.public_bytes(serialization.Encoding.PEM))
    return root


def load_root(directory: Path) -> Root:
    try:
        cert = x509.load_pem_x509_certificate((directory / ROOT_CERT).read_bytes())
        key = serialization.load_pem_private_key((directory / ROOT_KEY).read_bytes(), None)
    except FileNotFoundError as exc:
        raise CaError(
            f"no CA in {directory} ({exc.filename} missing; run `meshproxy ca init`)"
        ) from None
    except ValueError as exc:
        raise CaError(f"CA in {directory} is unreadable: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CaError(f"CA key in {directory} is neither ECDSA nor RSA")
    return Root(cert, key)


def write_workload(
    out: Path,
    cert: x509.Certificate,
    key: PrivateKey,
    roots: list[x509.Certificate],
) -> None:
    """Istio's layout; the key first so a watcher never pairs a new cert with an old key."""
    out.mkdir(parents=True, exist_ok=True)
    _write(out / KEY, _pem_key(key), private=True)
    _write(out / CERT_CHAIN, cert.public_bytes(serialization.Encoding.PEM))
    _write(out / ROOT_CERT, b"".join(r.public_bytes(serialization.Encoding.PEM) for r in roots))
