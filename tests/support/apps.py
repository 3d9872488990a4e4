"""Small applications for pods in tests: `python -m tests.support.apps KIND HOST PORT`.

`banner`: a server-first protocol (like SMTP or MySQL): it greets first, then echoes lines.
`tls`: an application that terminates its own TLS (self-signed) and answers one line naming
the SNI and ALPN it saw, so a test can tell that its TLS came through untouched.
`client`: not a server: connects to HOST:PORT, sends one line, prints what comes back.
"""

from __future__ import annotations

import datetime as dt
import signal
import socket
import ssl
import sys
import tempfile
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "app.local")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("app.local")]), False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _serve(kind: str, host: str, port: int) -> None:
    listener = socket.create_server((host, port), reuse_port=False)
    context: ssl.SSLContext | None = None
    if kind == "tls":
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with tempfile.TemporaryDirectory() as directory:  # loaded: the files can go
            context.load_cert_chain(*_self_signed(Path(directory)))
        context.set_alpn_protocols(["app-proto", "http/1.1"])
        seen: dict[str, str] = {}

        def sni(sock: ssl.SSLObject | ssl.SSLSocket, name: str | None, _: object) -> None:
            seen["sni"] = name or ""

        context.sni_callback = sni  # type: ignore[assignment]

    def handle(conn: socket.socket, peer: tuple[str, int]) -> None:
        with conn:
            conn.settimeout(10)
            try:
                if context is not None:
                    tls = context.wrap_socket(conn, server_side=True)
                    line = tls.recv(1024)
                    tls.sendall(
                        f"tls-app sni={seen.get('sni', '')} alpn={tls.selected_alpn_protocol()} "
                        f"peer={peer[0]} got={line.decode().strip()}\n".encode()
                    )
                    tls.close()
                    return
                conn.sendall(f"220 banner-app ready peer={peer[0]}\n".encode())
                while data := conn.recv(1024):
                    conn.sendall(b"echo " + data)
            except (OSError, ssl.SSLError):
                return

    print(f"ready {port}", flush=True)
    while True:
        conn, peer = listener.accept()
        threading.Thread(target=handle, args=(conn, peer), daemon=True).start()


def _client(host: str, port: int) -> None:
    with socket.create_connection((host, port), timeout=15) as s:
        print(s.recv(1024).decode().strip(), flush=True)
        s.sendall(b"hello\n")
        print(s.recv(1024).decode().strip(), flush=True)


def main() -> None:
    kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if kind == "client":
        _client(host, port)
    else:
        _serve(kind, host, port)


if __name__ == "__main__":
    main()
