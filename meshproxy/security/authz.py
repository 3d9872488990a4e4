"""AuthorizationPolicy evaluation with Istio's semantics.

Order: any matching DENY policy denies; otherwise, with no ALLOW policy the request is
allowed, else it must match some ALLOW policy. AUDIT policies never change the decision.
A policy matches when any of its rules does; a rule when any `from` source, any `to`
operation and every `when` condition match (an absent part matches everything); inside a
source or operation every given field must match one of its values and none of its not-values.
Strings match exactly, by prefix (`abc*`), by suffix (`*abc`) or by presence (`*`); paths
also by template (`/api/{*}/admin`, `/static/{**}`: security/path_template.py).

TCP connections have no host, method, path or headers. As Istio documents: an ALLOW rule
that needs one of those never matches a TCP connection, and a DENY rule is applied without
them (so it denies more, never less).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from meshproxy.config.resources import (
    AuthorizationPolicy,
    AuthzCondition,
    AuthzOperation,
    AuthzRule,
    AuthzSource,
    selects,
)
from meshproxy.security.path_template import compile_template, is_template

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(slots=True)
class AuthzRequest:
    """What a policy may look at. `method` is None for a TCP connection."""

    principal: str  # the mTLS peer's principal (trust-domain/ns/x/sa/y), "" when plaintext
    source_ip: str
    destination_port: int
    destination_ip: str = ""
    method: str | None = None
    host: str = ""
    path: str = ""  # normalized, without the query
    headers: Callable[[str], list[str]] = field(default=lambda name: [])  # every line's value
    sni: str = ""

    @property
    def http(self) -> bool:
        return self.method is not None

    @property
    def namespace(self) -> str:
        parts = self.principal.split("/")
        return parts[2] if len(parts) >= 5 and parts[1] == "ns" else ""


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    policy: str  # namespace/name of the policy that decided, "" for the default
    audited: bool = False


ALLOW_BY_DEFAULT = Decision(True, "")


def string_match(pattern: str, value: str) -> bool:
    if pattern == "*":
        return value != ""
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    return value == pattern


def _any(patterns: Sequence[str], value: str, *, fold: bool = False) -> bool:
    if fold:
        value = value.lower()
        return any(string_match(p.lower(), value) for p in patterns)
    return any(string_match(p, value) for p in patterns)


def _in_blocks(blocks: Sequence[IpNetwork], ip: str) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in net for net in blocks)


def _field(
    values: Sequence[str], not_values: Sequence[str], value: str, fold: bool = False
) -> bool:
    if values and not _any(values, value, fold=fold):
        return False
    return not (not_values and _any(not_values, value, fold=fold))


def _host(value: str) -> str:
    """Hosts match without the port and the root's trailing dot, case-insensitively: `APP.`,
    `app:80` and `app` are one host to a DENY on `app` (catalog E06)."""
    if value.startswith("["):
        return value.split("]")[0] + "]"
    host = value.rsplit(":", 1)[0] if value.count(":") == 1 else value
    return host[:-1] if host.endswith(".") else host


def without_parameters(path: str) -> str:
    """The path with each segment's `;parameters` left out, for matching only (the request
    goes upstream as sent): servlet containers drop them, so `/admin;jsessionid=1` and
    `/admin;/x` are `/admin` and `/admin/x` to the app, and must be to a DENY too (E05)."""
    return "/".join(segment.partition(";")[0] for segment in path.split("/"))


class _Source:
    def __init__(self, s: AuthzSource) -> None:
        self.s = s
        self.ip = [ipaddress.ip_network(b, strict=False) for b in s.ip_blocks]
        self.not_ip = [ipaddress.ip_network(b, strict=False) for b in s.not_ip_blocks]
        self.remote = [ipaddress.ip_network(b, strict=False) for b in s.remote_ip_blocks]
        self.not_remote = [ipaddress.ip_network(b, strict=False) for b in s.not_remote_ip_blocks]

    def match(self, req: AuthzRequest) -> bool:
        s = self.s
        if not _field(s.principals, s.not_principals, req.principal):
            return False
        if not _field(s.namespaces, s.not_namespaces, req.namespace):
            return False
        if self.ip and not _in_blocks(self.ip, req.source_ip):
            return False
        if self.not_ip and _in_blocks(self.not_ip, req.source_ip):
            return False
        # No trusted proxies in front of a sidecar: the remote IP is the peer's.
        if self.remote and not _in_blocks(self.remote, req.source_ip):
            return False
        return not (self.not_remote and _in_blocks(self.not_remote, req.source_ip))


def _glob(pattern: str) -> Callable[[str], bool]:
    return lambda value: string_match(pattern, value)


def _path_matchers(patterns: Sequence[str]) -> list[Callable[[str], bool]]:
    return [compile_template(p) if is_template(p) else _glob(p) for p in patterns]


def _path_field(
    values: Sequence[Callable[[str], bool]], not_values: Sequence[Callable[[str], bool]], path: str
) -> bool:
    if values and not any(match(path) for match in values):
        return False
    return not any(match(path) for match in not_values)


class _Operation:
    def __init__(self, o: AuthzOperation) -> None:
        self.o = o
        self.paths = _path_matchers(o.paths)
        self.not_paths = _path_matchers(o.not_paths)
        self.http_only = bool(
            o.hosts or o.not_hosts or o.methods or o.not_methods or o.paths or o.not_paths
        )

    def match(self, req: AuthzRequest, skip_http: bool) -> bool:
        o = self.o
        if not _field(o.ports, o.not_ports, str(req.destination_port)):
            return False
        if skip_http:
            return True
        return (
            _field(o.hosts, o.not_hosts, _host(req.host), fold=True)
            and _field(o.methods, o.not_methods, req.method or "")
            and _path_field(self.paths, self.not_paths, req.path)
        )


def _condition_value(c: AuthzCondition, req: AuthzRequest) -> str | None:
    return {
        "source.ip": req.source_ip,
        "remote.ip": req.source_ip,
        "source.namespace": req.namespace,
        "source.principal": req.principal,
        "destination.ip": req.destination_ip,
        "destination.port": str(req.destination_port),
        "connection.sni": req.sni,
    }.get(c.key)


def _list_elements(lines: list[str]) -> list[str]:
    return [e for line in lines for e in (part.strip(" \t") for part in line.split(",")) if e]


def _header_condition(c: AuthzCondition, lines: list[str], deny: bool) -> bool:
    """A header sent on several lines, or as a list on one, has several readings: Envoy's
    (the lines joined with ","), each line, each list element. A DENY rule matches when any
    reading does (CVE-2021-32777: `x-role: user` then `x-role: admin` must not slip past a
    deny on `admin`); an ALLOW rule needs Envoy's reading to match and no reading to be a
    not-value, so a repeated header never widens what it allows."""
    if not lines:
        return not c.values  # an absent header matches only a notValues-only condition
    joined = ",".join(lines)
    if deny:
        readings = [joined, *lines, *_list_elements(lines)]
        return any(_field(c.values, c.not_values, r) for r in readings)
    if not _field(c.values, c.not_values, joined):
        return False
    return not (c.not_values and any(_any(c.not_values, r) for r in _list_elements(lines)))


def _condition(c: AuthzCondition, req: AuthzRequest, deny: bool) -> bool:
    if c.key.startswith("request.headers["):
        return _header_condition(c, req.headers(c.key[len("request.headers[") : -1].lower()), deny)
    value = _condition_value(c, req)
    if c.key in ("source.ip", "remote.ip", "destination.ip"):
        blocks = [ipaddress.ip_network(v, strict=False) for v in c.values]
        not_blocks = [ipaddress.ip_network(v, strict=False) for v in c.not_values]
        ip = value or ""
        if blocks and not _in_blocks(blocks, ip):
            return False
        return not (not_blocks and _in_blocks(not_blocks, ip))
    if value is None:
        return not c.values
    return _field(c.values, c.not_values, value)


class _Rule:
    def __init__(self, rule: AuthzRule) -> None:
        self.sources = [_Source(s) for s in rule.sources]
        self.operations = [_Operation(o) for o in rule.operations]
        self.conditions = rule.conditions
        self.http_only_conditions = any(c.key.startswith("request.") for c in rule.conditions)
        self.http_only = self.http_only_conditions or any(o.http_only for o in self.operations)

    def match(self, req: AuthzRequest, deny: bool) -> bool:
        skip_http = not req.http
        if skip_http and self.http_only and not deny:
            return False  # an ALLOW rule that needs HTTP never admits a TCP connection
        if self.sources and not any(s.match(req) for s in self.sources):
            return False
        if self.operations and not any(o.match(req, skip_http) for o in self.operations):
            return False
        return all(
            _condition(c, req, deny)
            for c in self.conditions
            if not (skip_http and c.key.startswith("request."))
        )


class _Policy:
    def __init__(self, policy: AuthorizationPolicy) -> None:
        self.name = f"{policy.origin.namespace}/{policy.origin.name}"
        self.action = policy.action
        self.rules = [_Rule(r) for r in policy.rules]

    def match(self, req: AuthzRequest) -> bool:
        deny = self.action == "DENY"
        return any(r.match(req, deny) for r in self.rules)


class Authorizer:
    """The policies that apply to this workload, compiled once per config snapshot."""

    def __init__(self, policies: Sequence[AuthorizationPolicy]) -> None:
        compiled = [_Policy(p) for p in sorted(policies, key=lambda p: p.origin.name)]
        self.deny = [p for p in compiled if p.action == "DENY"]
        self.allow = [p for p in compiled if p.action == "ALLOW"]
        self.audit = [p for p in compiled if p.action == "AUDIT"]

    def __bool__(self) -> bool:
        return bool(self.deny or self.allow or self.audit)

    def check(self, req: AuthzRequest) -> Decision:
        if ";" in req.path:
            req.path = without_parameters(req.path)
        audited = any(p.match(req) for p in self.audit)
        for p in self.deny:
            if p.match(req):
                return Decision(False, p.name, audited)
        if not self.allow:
            return Decision(True, "", audited) if audited else ALLOW_BY_DEFAULT
        for p in self.allow:
            if p.match(req):
                return Decision(True, p.name, audited)
        return Decision(False, "", audited)


def applicable(
    policies: Sequence[AuthorizationPolicy],
    namespace: str,
    labels: dict[str, str],
    root_namespace: str,
) -> list[AuthorizationPolicy]:
    """Policies selecting this workload: those of its namespace and of the root namespace
    (mesh-wide), each either without a selector or with one its labels match."""
    return [
        p
        for p in policies
        if p.origin.namespace in (namespace, root_namespace)
        and (p.selector is None or selects(p.selector, labels))
    ]
