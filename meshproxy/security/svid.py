"""Is a peer's leaf certificate a well-formed X.509-SVID (SPIFFE X509-SVID spec, §2, §4)?

OpenSSL checks the chain, the validity period and the purpose (extended key usage); it does
not know SPIFFE. A certificate the mesh CA signed can still be no workload identity: a leaf
marked as a CA or allowed to sign certificates, one carrying two URI SANs (which one is the
caller?), or one naming only a trust domain. Such a peer is refused, as the spec requires of
a verifier, rather than served without an identity or with a guessed one (catalog G04).
"""

from __future__ import annotations

from meshproxy.security.spiffe import SpiffeError, SpiffeId


def svid_violation(der: bytes) -> str | None:
    """Why the DER leaf certificate is not a valid X.509-SVID, or None when it is."""
    from cryptography import x509  # on first use: plaintext proxies start without it

    try:
        cert = x509.load_der_x509_certificate(der)
        extensions = cert.extensions
    except ValueError as exc:
        return f"unreadable certificate ({exc})"
    try:
        san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if len(uris) != 1:
        return f"an SVID has exactly one URI SAN, this one has {len(uris)}"
    try:
        spiffe = SpiffeId.parse(uris[0])
    except SpiffeError as exc:
        return str(exc)
    if not spiffe.path:
        return f"{uris[0]} names a trust domain, not a workload"
    try:
        if extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return "a leaf SVID must not be a CA certificate"
    except x509.ExtensionNotFound:
        pass
    try:
        usage = extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None
    if usage.key_cert_sign or usage.crl_sign:
        return "a leaf SVID must not sign certificates or CRLs (keyCertSign, cRLSign)"
    if not usage.digital_signature:
        return "a leaf SVID must allow digitalSignature"
    return None
