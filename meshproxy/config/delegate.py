"""VirtualService delegation, expanded as Istio does (pilot's mergeVirtualServicesIfNeeded).

A root VirtualService (one with hosts) may hand a route to a delegate: a VirtualService
without hosts, named by `delegate {name, namespace}`. Each of the delegate's routes takes the
root route's place, its matches ANDed with the root's (a pair that cannot both hold is
dropped, by Istio's conflict rules), and every field it leaves unset taken from the root
route. Delegation is one level deep.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from meshproxy.config.reader import Reader
from meshproxy.config.resources import HTTPMatch, HTTPRoute, Origin, StringMatch, VirtualService

MatchPair = tuple[StringMatch | None, StringMatch | None]


def expand_delegates(
    services: Sequence[VirtualService],
    reader: Callable[[Origin], Reader],
    warnings: list[str],
) -> list[VirtualService]:
    """The root VirtualServices with delegated routes expanded in place; delegates vanish."""
    delegates = {(vs.origin.namespace, vs.origin.name): vs for vs in services if not vs.hosts}
    used: set[tuple[str, str]] = set()
    roots = []
    for vs in services:
        if not vs.hosts:
            r = reader(vs.origin)
            for route in vs.http:
                if route.delegate is not None:
                    r.error((*route.path, "delegate"), "a delegate cannot delegate again")
            if vs.tcp:
                r.error(
                    ("spec", "tcp"),
                    "a VirtualService without hosts (a delegate) has only http routes",
                )
            continue
        if not any(route.delegate is not None for route in vs.http):
            roots.append(vs)
            continue
        http: list[HTTPRoute] = []
        for route in vs.http:
            if route.delegate is None:
                http.append(route)
                continue
            key = (route.delegate.namespace or vs.origin.namespace, route.delegate.name)
            target = delegates.get(key)
            if target is None:
                reader(vs.origin).error(
                    (*route.path, "delegate"),
                    f'no VirtualService "{key[1]}" without hosts in namespace "{key[0]}"',
                )
                continue
            used.add(key)
            for leaf in target.http:
                merged = merge_route(route, leaf)
                if merged is None:
                    warnings.append(
                        f"VirtualService {key[0]}/{key[1]}: route {leaf.name!r} has a match "
                        f"outside root route {route.name!r} of {vs.origin.name}: dropped, "
                        "as Istio drops it"
                    )
                else:
                    http.append(merged)
        roots.append(dataclasses.replace(vs, http=tuple(http)))
    for key in delegates.keys() - used:
        warnings.append(
            f"VirtualService {key[0]}/{key[1]} has no hosts and no root delegates "
            "to it: it routes nothing"
        )
    return roots


def merge_route(root: HTTPRoute, leaf: HTTPRoute) -> HTTPRoute | None:
    """The delegate's route under the root's: None when no match pair can hold together."""
    matches = merge_matches(root.matches, leaf.matches)
    if matches is None:
        return None
    return dataclasses.replace(
        leaf,
        matches=matches,
        name=f"{root.name}-{leaf.name}",
        timeout=leaf.timeout if leaf.timeout is not None else root.timeout,
        rewrite_uri=leaf.rewrite_uri if _rewrites(leaf) else root.rewrite_uri,
        rewrite_authority=(leaf.rewrite_authority if _rewrites(leaf) else root.rewrite_authority),
        rewrite_regex=leaf.rewrite_regex if _rewrites(leaf) else root.rewrite_regex,
        headers=leaf.headers if _has_headers(leaf) else root.headers,
        retries=leaf.retries if leaf.retries is not None else root.retries,
        fault=leaf.fault if leaf.fault is not None else root.fault,
        mirrors=leaf.mirrors or root.mirrors,
        cors=leaf.cors if leaf.cors is not None else root.cors,
    )


def _rewrites(route: HTTPRoute) -> bool:
    return any(
        x is not None for x in (route.rewrite_uri, route.rewrite_authority, route.rewrite_regex)
    )


def _has_headers(route: HTTPRoute) -> bool:
    h = route.headers
    return any((ops.set or ops.add or ops.remove) for ops in (h.request, h.response))


def merge_matches(
    roots: tuple[HTTPMatch, ...], leaves: tuple[HTTPMatch, ...]
) -> tuple[HTTPMatch, ...] | None:
    """Istio's mergeHTTPMatchRequests: every delegate match must fit under some root match
    (else the delegate route is dropped); each fitting pair becomes one merged match."""
    if not roots:
        return leaves
    if not leaves:
        return roots
    out = []
    for leaf in leaves:
        fits = [_merge_match(root, leaf) for root in roots if not has_conflict(root, leaf)]
        if not fits:
            return None
        out.extend(fits)
    return tuple(out)


def _merge_match(root: HTTPMatch, leaf: HTTPMatch) -> HTTPMatch:
    return dataclasses.replace(
        leaf,
        uri=leaf.uri or root.uri,
        method=leaf.method or root.method,
        authority=leaf.authority or root.authority,
        scheme=leaf.scheme or root.scheme,
        headers=_merge_map(root.headers, leaf.headers),
        without_headers=_merge_map(root.without_headers, leaf.without_headers),
        query_params=_merge_map(root.query_params, leaf.query_params),
        port=leaf.port or root.port,
    )


def _merge_map(
    root: tuple[tuple[str, StringMatch], ...], leaf: tuple[tuple[str, StringMatch], ...]
) -> tuple[tuple[str, StringMatch], ...]:
    names = {k for k, _ in leaf}
    return leaf + tuple((k, v) for k, v in root if k not in names)


def has_conflict(root: HTTPMatch, leaf: HTTPMatch) -> bool:
    """Istio's hasConflict: the leaf must narrow the root, never contradict it."""
    pairs: list[MatchPair] = [
        (root.uri, leaf.uri),
        (root.scheme, leaf.scheme),
        (root.method, leaf.method),
        (root.authority, leaf.authority),
    ]
    for mine, theirs in (
        (root.headers, leaf.headers),
        (root.without_headers, leaf.without_headers),
        (root.query_params, leaf.query_params),
    ):
        root_map = dict(mine)
        pairs.extend((root_map.get(k), v) for k, v in theirs)
    if any(_string_conflict(a, b) for a, b in pairs):
        return True
    if root.ignore_uri_case != leaf.ignore_uri_case:
        return True
    return bool(root.port and leaf.port and root.port != leaf.port)


def _string_conflict(root: StringMatch | None, leaf: StringMatch | None) -> bool:
    if root is None or leaf is None:
        return False
    if root.kind == "regex" or leaf.kind == "regex":
        return True  # a regex on one side cannot be compared with anything on the other
    if root.kind == "exact":
        return leaf.kind != "exact" or leaf.value != root.value
    if root.kind == "prefix":
        return leaf.kind == "present" or not leaf.value.startswith(root.value)
    return True  # root tests presence only; Istio counts any leaf matcher as a conflict
