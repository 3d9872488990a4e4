"""Compiled request matchers with Istio's StringMatch semantics (exact, prefix, regex, present)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl

from meshproxy.routing.regex import Regex


class RequestView:
    """What matching needs from a request: strings, headers lower-cased and joined by ','.

    A plain class, not a dataclass: one is made per request, and mypyc compiles only a
    written-out __init__."""

    __slots__ = ("authority", "headers", "method", "path", "port", "query", "scheme")

    def __init__(
        self,
        method: str,
        path: str,  # without the query string
        query: str,
        authority: str,
        scheme: str,
        headers: Mapping[str, str],
        port: int,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.authority = authority
        self.scheme = scheme
        self.headers = headers
        self.port = port


@dataclass(frozen=True, slots=True)
class StringMatcher:
    kind: str  # exact | prefix | regex | present
    value: str
    ignore_case: bool = False
    pattern: Regex | None = None

    @staticmethod
    def build(kind: str, value: str, ignore_case: bool = False) -> StringMatcher:
        pattern = Regex(value) if kind == "regex" else None
        if ignore_case and kind in ("exact", "prefix"):
            value = value.lower()
        return StringMatcher(kind, value, ignore_case, pattern)

    def __call__(self, text: str | None) -> bool:
        if text is None:
            return False
        kind = self.kind
        if self.ignore_case and kind != "regex":
            text = text.lower()
        if kind == "exact":
            return text == self.value
        if kind == "prefix":
            return text.startswith(self.value)
        if kind == "regex":
            assert self.pattern is not None
            return self.pattern.fullmatch(text)
        return True  # present


@dataclass(frozen=True, slots=True)
class RequestMatcher:
    """One entry of an Istio `match` list: every set field must match (AND)."""

    uri: StringMatcher | None = None
    method: StringMatcher | None = None
    authority: StringMatcher | None = None
    scheme: StringMatcher | None = None
    headers: tuple[tuple[str, StringMatcher], ...] = ()
    without_headers: tuple[tuple[str, StringMatcher], ...] = ()
    query_params: tuple[tuple[str, StringMatcher], ...] = ()
    port: int | None = None

    def matches(self, req: RequestView) -> bool:
        if self.port is not None and req.port != self.port:
            return False
        if self.uri is not None and not self.uri(req.path):
            return False
        if self.method is not None and not self.method(req.method):
            return False
        if self.authority is not None and not self.authority(req.authority):
            return False
        if self.scheme is not None and not self.scheme(req.scheme):
            return False
        headers = req.headers
        for name, matcher in self.headers:
            if not matcher(headers.get(name)):
                return False
        for name, matcher in self.without_headers:
            if matcher(headers.get(name)):
                return False
        if self.query_params:
            params = dict(parse_qsl(req.query, keep_blank_values=True))
            for name, matcher in self.query_params:
                if not matcher(params.get(name)):
                    return False
        return True

    def matched_prefix(self, path: str) -> str | None:
        """The prefix this matcher matched on, for Istio's prefix-only rewrite."""
        if self.uri is not None and self.uri.kind == "prefix":
            return path[: len(self.uri.value)]
        return None
