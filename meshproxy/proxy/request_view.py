"""A request as routing and authorization read it: str fields, headers decoded only on demand."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from meshproxy.codec.events import Headers, RequestHead
from meshproxy.routing.match import RequestView


class LazyHeaders(Mapping[str, str]):
    """Request headers as str, decoded only if a route actually matches on headers."""

    __slots__ = ("_decoded", "_raw")

    def __init__(self, raw: Headers) -> None:
        self._raw = raw
        self._decoded: dict[str, str] | None = None

    def _get(self) -> dict[str, str]:
        decoded = self._decoded
        if decoded is None:
            decoded = {}
            for k, v in self._raw:
                name = k.decode("latin-1")
                value = v.decode("latin-1")
                decoded[name] = f"{decoded[name]},{value}" if name in decoded else value
            self._decoded = decoded
        return decoded

    def __getitem__(self, key: str) -> str:
        return self._get()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


def request_view(head: RequestHead, port: int, scheme: str) -> RequestView:
    """What a VirtualService's match conditions look at."""
    target = head.target.decode("latin-1")
    path, _, query = target.partition("?")
    host = head.authority or head.header(b"host") or b""
    return RequestView(
        head.method.decode("latin-1"),
        path,
        query,
        host.decode("latin-1"),
        scheme,
        LazyHeaders(head.headers),
        port,
    )


def header_lines(head: RequestHead, name: str) -> list[str]:
    """Every value of one header, as AuthorizationPolicy conditions read them."""
    key = name.encode("latin-1")
    return [v.decode("latin-1") for k, v in head.headers if k == key]
