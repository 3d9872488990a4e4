"""Inbound TLS termination on an already accepted connection (memory BIOs, not start_tls).

Why not loop.start_tls: on a PERMISSIVE port the first bytes have already been read to tell
TLS from plaintext, and start_tls cannot be given bytes already taken off the socket. With
memory BIOs the sniffed bytes go into the TLS engine like any others. The application protocol
(HTTP/1.1, HTTP/2, TCP relay) then runs on a `TlsTransport` that looks like any transport.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from meshproxy.security.spiffe import SpiffeId, spiffe_of

logger = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
READ_CHUNK = 256 * 1024


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """Who is on the other end of a mesh TLS connection."""

    spiffe_id: SpiffeId | None
    cert_der: bytes
    alpn: str | None

    @property
    def principal(self) -> str:
        return self.spiffe_id.principal if self.spiffe_id else ""


class TlsTransport(asyncio.Transport):
    """The decrypted side of a TlsServerProtocol, for the application protocol."""

    def __init__(self, tls: TlsServerProtocol) -> None:
        super().__init__()
        self._tls = tls

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._tls.app_write(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        self._tls.app_write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False  # TLS has close_notify, not a half-close

    def write_eof(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._tls.app_close()

    def abort(self) -> None:
        self._tls.raw_abort()

    def is_closing(self) -> bool:
        return self._tls.closing

    def pause_reading(self) -> None:
        self._tls.app_pause_reading()

    def resume_reading(self) -> None:
        self._tls.app_resume_reading()

    def is_reading(self) -> bool:
        return not self._tls.app_paused

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        raw = self._tls.raw
        if raw is not None:
            raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        raw = self._tls.raw
        return raw.get_write_buffer_size() if raw is not None else 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._tls.sslobj
        if name == "peercert":
            return self._tls.sslobj.getpeercert()
        if name == "peer":
            return self._tls.peer
        raw = self._tls.raw
        return raw.get_extra_info(name, default) if raw is not None else default

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._tls.app = cast(asyncio.Protocol, protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return cast(asyncio.BaseProtocol, self._tls.app)


class TlsServerProtocol(asyncio.Protocol):
    """Handshake (client cert required), then hand the connection to `make_app(peer)`."""

    def __init__(
        self,
        context: ssl.SSLContext,
        make_app: Callable[[PeerInfo], asyncio.Protocol],
        on_failure: Callable[[str], None],
        first_bytes: bytes = b"",
    ) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.sslobj = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._make_app = make_app
        self._on_failure = on_failure
        self._first = first_bytes
        self.raw: asyncio.Transport | None = None
        self.app: asyncio.Protocol | None = None
        self.peer: PeerInfo | None = None
        self.closing = False
        self.app_paused = False
        self._timer: asyncio.TimerHandle | None = None
        self._eof = False

    # -- raw side --------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = cast(asyncio.Transport, transport)
        self._timer = asyncio.get_running_loop().call_later(HANDSHAKE_TIMEOUT, self._too_slow)
        if self._first:
            first, self._first = self._first, b""
            self.data_received(first)

    def data_received(self, data: bytes) -> None:
        self._incoming.write(data)
        if self.app is None:
            self._handshake()
        else:
            self._deliver()

    def eof_received(self) -> bool | None:
        self._incoming.write_eof()
        self._eof = True
        if self.app is not None:
            self._deliver()
            return self.app.eof_received()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.app is not None:
            self.app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.app is not None:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        if self.app is not None:
            self.app.resume_writing()

    # -- handshake -------------------------------------------------------------------------
    def _handshake(self) -> None:
        try:
            self.sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, OSError) as exc:
            self._flush()
            reason = getattr(exc, "reason", None) or str(exc)
            self._on_failure(str(reason))
            self.raw_abort()
            return
        self._flush()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        der = self.sslobj.getpeercert(binary_form=True) or b""
        self.peer = PeerInfo(
            spiffe_of(self.sslobj.getpeercert()), der, self.sslobj.selected_alpn_protocol()
        )
        app = self._make_app(self.peer)
        self.app = app
        app.connection_made(TlsTransport(self))
        self._deliver()

    def _too_slow(self) -> None:
        self._timer = None
        if self.app is None:
            self._on_failure("handshake timeout")
            self.raw_abort()

    # -- application side ------------------------------------------------------------------
    def _deliver(self) -> None:
        app = self.app
        while app is not None and not self.app_paused and not self.closing:
            try:
                data = self.sslobj.read(READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                data = b""
            except ssl.SSLError as exc:
                logger.debug("TLS error from %s: %s", self.peer, exc)
                self.raw_abort()
                return
            if not data:
                # close_notify: the peer is done sending.
                self._flush()
                if not self._eof:
                    self._eof = True
                    if not app.eof_received():
                        self.app_close()
                return
            app.data_received(data)
            app = self.app
        self._flush()  # renegotiation/key update records, if any

    def app_write(self, data: bytes) -> None:
        if self.closing or not data:
            return
        try:
            self.sslobj.write(data)
        except ssl.SSLError:
            self.raw_abort()
            return
        self._flush()

    def _flush(self) -> None:
        out = self._outgoing.read()
        raw = self.raw
        if out and raw is not None and not raw.is_closing():
            raw.write(out)

    def app_close(self) -> None:
        if self.closing:
            return
        self.closing = True
        try:
            self.sslobj.unwrap()
        except (ssl.SSLError, OSError):
            pass  # close_notify queued (or not possible); the socket closes either way
        self._flush()
        if self.raw is not None:
            self.raw.close()

    def raw_abort(self) -> None:
        self.closing = True
        if self.raw is not None:
            self.raw.abort()

    def app_pause_reading(self) -> None:
        if not self.app_paused:
            self.app_paused = True
            if self.raw is not None:
                self.raw.pause_reading()

    def app_resume_reading(self) -> None:
        if self.app_paused:
            self.app_paused = False
            if self.raw is not None:
                self.raw.resume_reading()
            self._deliver()
