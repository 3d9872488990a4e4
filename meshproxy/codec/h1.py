"""Choose an HTTP/1.1 codec pair by name: httptools (fast) or h11 (strict reference)."""

from __future__ import annotations

from typing import Protocol

from meshproxy.codec.events import Headers, ReceivedEvent, RequestHead, ResponseHead
from meshproxy.codec.h1_h11 import H11ClientCodec, H11ServerCodec
from meshproxy.codec.h1_limits import Limits

# Both codecs are imported here, at start-up, not on a connection's first request: at the
# process's file-descriptor limit an import cannot open its module file and would kill the
# connection that needed it (catalog H04).
try:
    from meshproxy.codec.h1_httptools import HttptoolsClientCodec, HttptoolsServerCodec

    _HTTPTOOLS = True
except ImportError:  # httptools is not installed: `auto` means h11
    _HTTPTOOLS = False


class ServerCodec(Protocol):
    failed: bool

    @property
    def head_pending(self) -> bool: ...
    def receive(self, data: bytes) -> list[ReceivedEvent]: ...
    def start_next(self) -> list[ReceivedEvent]: ...
    def take_upgrade_bytes(self) -> bytes: ...  # what followed a WebSocket upgrade's head
    def send_head(self, head: ResponseHead, request_method: bytes, keep_alive: bool) -> None: ...
    def send_data(self, data: bytes) -> None: ...
    def send_end(self, trailers: Headers) -> None: ...
    def data_to_send(self) -> bytes: ...


class ClientCodec(Protocol):
    failed: bool

    def receive(self, data: bytes) -> list[ReceivedEvent]: ...
    def receive_eof(self) -> list[ReceivedEvent]: ...
    def start_next(self) -> list[ReceivedEvent]: ...
    def take_upgrade_bytes(self) -> bytes: ...  # what followed a 101's head
    def send_head(self, head: RequestHead) -> None: ...
    def send_data(self, data: bytes) -> None: ...
    def send_end(self, trailers: Headers) -> None: ...
    def data_to_send(self) -> bytes: ...


def httptools_available() -> bool:
    return _HTTPTOOLS


def resolve_codec_name(name: str) -> str:
    if name == "auto":
        return "httptools" if httptools_available() else "h11"
    return name


def server_codec(name: str, limits: Limits) -> ServerCodec:
    if resolve_codec_name(name) == "httptools" and _HTTPTOOLS:
        return HttptoolsServerCodec(limits)
    return H11ServerCodec(limits)


def client_codec(name: str, limits: Limits) -> ClientCodec:
    if resolve_codec_name(name) == "httptools" and _HTTPTOOLS:
        return HttptoolsClientCodec(limits)
    return H11ClientCodec(limits)
