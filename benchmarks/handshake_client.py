"""Full mTLS handshakes against one port for a while, from several concurrent connections.

    python -m benchmarks.handshake_client PORT SECONDS CONCURRENCY CERT_DIR

Each connection offers X25519 for the key exchange, presents the client certificate in
CERT_DIR (cert-chain.pem, key.pem, root-cert.pem), completes a full handshake (no session
reuse), then closes with close_notify and waits for the server's, so the server has verified
the certificate and read the client's Finished before the connection counts. Prints
"HANDSHAKES ERRORS". benchmarks.load_mtls runs two of these processes: `openssl s_time` makes
one connection at a time and saturates its CPU well below what one proxy worker can take.
"""

from __future__ import annotations

import asyncio
import ssl
import sys
import time

import uvloop


def client_context(cert_dir: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(f"{cert_dir}/cert-chain.pem", f"{cert_dir}/key.pem")
    ctx.load_verify_locations(f"{cert_dir}/root-cert.pem")
    ctx.check_hostname = False  # mesh peers are checked by SPIFFE ID, not by host name
    ctx.set_alpn_protocols(["istio-http/1.1", "istio", "http/1.1"])
    # Key exchange as Envoy's default (X25519 first) rather than OpenSSL 3.5's hybrid
    # post-quantum group, which Envoy and Istio offer only when configured to.
    ctx.set_ecdh_curve("X25519")
    return ctx


async def handshakes(port: int, seconds: float, concurrency: int, ctx: ssl.SSLContext) -> list[int]:
    counts = [0, 0]  # done, errors
    end = time.monotonic() + seconds

    async def connect_repeatedly() -> None:
        while time.monotonic() < end:
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port, ssl=ctx), 10
                )
                writer.close()
                await asyncio.wait_for(writer.wait_closed(), 10)
                counts[0] += 1
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                counts[1] += 1
                if counts[1] <= 3:
                    print(f"handshake failed: {exc!r}", file=sys.stderr)

    await asyncio.gather(*(connect_repeatedly() for _ in range(concurrency)))
    return counts


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    port, seconds, concurrency, cert_dir = int(args[0]), float(args[1]), int(args[2]), args[3]
    done, errors = uvloop.run(handshakes(port, seconds, concurrency, client_context(cert_dir)))
    print(done, errors)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
