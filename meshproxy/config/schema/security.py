"""PeerAuthentication and AuthorizationPolicy (security.istio.io)."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from meshproxy.config.reader import Reader, did_you_mean
from meshproxy.config.resources import (
    AuthorizationPolicy,
    AuthzCondition,
    AuthzOperation,
    AuthzRule,
    AuthzSource,
    Origin,
    PeerAuthentication,
)
from meshproxy.config.schema.common import workload_selector
from meshproxy.config.source import Path_
from meshproxy.security.path_template import is_template, template_problem

MTLS_MODES = ("UNSET", "STRICT", "PERMISSIVE", "DISABLE")


def _mtls_mode(r: Reader, m: Mapping[str, Any] | None, path: Path_) -> str | None:
    if m is None:
        return None
    mm = r.mapping(m, path, ("mode",))
    mode = r.choice(mm, "mode", path, MTLS_MODES) if mm else None
    return None if mode in (None, "UNSET") else mode


def parse_peer_authentication(r: Reader, origin: Origin, spec: Any) -> PeerAuthentication | None:
    path: Path_ = ("spec",)
    m = r.mapping(spec, path, ("selector", "mtls", "portLevelMtls"))
    if m is None:
        return None
    selector = workload_selector(r, m, path, target_refs=False)
    mode = _mtls_mode(r, m.get("mtls"), (*path, "mtls"))
    ports: list[tuple[int, str]] = []
    plm = m.get("portLevelMtls")
    if plm is not None:
        pl_path = (*path, "portLevelMtls")
        if selector is None:
            r.error(pl_path, "portLevelMtls needs a workload selector (as Istio requires)")
        if not isinstance(plm, dict):
            r.error(pl_path, "expected a mapping of port number to {mode}")
        else:
            for key, value in plm.items():
                if not str(key).isdigit() or not 0 < int(key) < 65536:
                    r.error((*pl_path, str(key)), "expected a port number")
                    continue
                pmode = _mtls_mode(r, value, (*pl_path, str(key)))
                if pmode is not None:
                    ports.append((int(key), pmode))
    return PeerAuthentication(origin, selector, mode, tuple(ports))


_SOURCE_FIELDS = {
    "principals": "principals",
    "notPrincipals": "not_principals",
    "namespaces": "namespaces",
    "notNamespaces": "not_namespaces",
    "ipBlocks": "ip_blocks",
    "notIpBlocks": "not_ip_blocks",
    "remoteIpBlocks": "remote_ip_blocks",
    "notRemoteIpBlocks": "not_remote_ip_blocks",
}
_OPERATION_FIELDS = {
    "hosts": "hosts",
    "notHosts": "not_hosts",
    "ports": "ports",
    "notPorts": "not_ports",
    "methods": "methods",
    "notMethods": "not_methods",
    "paths": "paths",
    "notPaths": "not_paths",
}
# Fail closed: a policy that names what meshproxy cannot check (JWT, external authz) is an
# error, never silently ignored — ignoring part of a DENY would open what it meant to close.
_UNSUPPORTED_SOURCE = ("requestPrincipals", "notRequestPrincipals")
WHEN_KEYS = (
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
    "connection.sni",
)


def _ip_list(r: Reader, m: Mapping[str, Any], key: str, path: Path_) -> tuple[str, ...]:
    valid = []
    for i, v in enumerate(r.strings(m, key, path)):
        try:
            ipaddress.ip_network(v, strict=False)
        except ValueError:
            r.error((*path, key, i), f"{v!r} is not an IP address or CIDR block")
            continue
        valid.append(v)
    return tuple(valid)


def _authz_rule(r: Reader, item: Any, path: Path_) -> AuthzRule | None:
    m = r.mapping(item, path, ("from", "to", "when"))
    if m is None:
        return None
    sources = []
    for fpath, f in r.items(m, "from", path):
        fm = r.mapping(f, fpath, ("source",), required=("source",))
        sm = r.mapping(
            fm.get("source") if fm else None,
            (*fpath, "source"),
            (*_SOURCE_FIELDS, *_UNSUPPORTED_SOURCE),
        )
        if sm is None:
            continue
        for key in _UNSUPPORTED_SOURCE:
            if sm.get(key) is not None:
                r.error(
                    (*fpath, "source", key),
                    "request principals need RequestAuthentication (JWT), which meshproxy "
                    "does not support; refusing the policy rather than ignoring part of it",
                )
        values = {}
        for key, attr in _SOURCE_FIELDS.items():
            if key.lower().endswith("ipblocks"):
                values[attr] = _ip_list(r, sm, key, (*fpath, "source"))
            else:
                values[attr] = r.strings(sm, key, (*fpath, "source"))
        sources.append(AuthzSource(**values))
    operations = []
    for tpath, t in r.items(m, "to", path):
        tm = r.mapping(t, tpath, ("operation",), required=("operation",))
        om = r.mapping(
            tm.get("operation") if tm else None, (*tpath, "operation"), tuple(_OPERATION_FIELDS)
        )
        if om is None:
            continue
        values = {}
        for key, attr in _OPERATION_FIELDS.items():
            values[attr] = r.strings(om, key, (*tpath, "operation"))
            if "ort" in key:
                for i, p in enumerate(values[attr]):
                    if not p.isdigit() or not 0 < int(p) < 65536:
                        r.error((*tpath, "operation", key, i), f"{p!r} is not a port number")
            if key in ("paths", "notPaths"):
                for i, p in enumerate(values[attr]):
                    problem = template_problem(p) if is_template(p) else None
                    if problem:
                        r.error((*tpath, "operation", key, i), f"{p!r}: {problem}")
        operations.append(AuthzOperation(**values))
    conditions = []
    for wpath, w in r.items(m, "when", path):
        wm = r.mapping(w, wpath, ("key", "values", "notValues"), required=("key",))
        if wm is None:
            continue
        key = r.string(wm, "key", wpath) or ""
        if not (key in WHEN_KEYS or (key.startswith("request.headers[") and key.endswith("]"))):
            hint = did_you_mean(key, (*WHEN_KEYS, "request.headers[<name>]"))
            if key.startswith("request.auth."):
                hint = " (JWT claims need RequestAuthentication, which meshproxy does not support)"
            r.error((*wpath, "key"), f"unsupported condition key {key!r}{hint}")
            continue
        if key in ("source.ip", "remote.ip", "destination.ip"):
            values_ = _ip_list(r, wm, "values", wpath)
            not_values = _ip_list(r, wm, "notValues", wpath)
        else:
            values_ = r.strings(wm, "values", wpath)
            not_values = r.strings(wm, "notValues", wpath)
        if not values_ and not not_values:
            r.error(wpath, "a condition needs values or notValues")
        conditions.append(AuthzCondition(key, values_, not_values))
    return AuthzRule(tuple(sources), tuple(operations), tuple(conditions))


def parse_authorization_policy(r: Reader, origin: Origin, spec: Any) -> AuthorizationPolicy | None:
    path: Path_ = ("spec",)
    m = r.mapping(
        spec, path, ("selector", "targetRef", "targetRefs", "action", "provider", "rules")
    )
    if m is None:
        return None
    selector = workload_selector(r, m, path)
    action = r.choice(m, "action", path, ("ALLOW", "DENY", "AUDIT", "CUSTOM"), "ALLOW")
    if action == "CUSTOM":
        r.error((*path, "action"), "CUSTOM (external authorization) is not supported")
    rules = []
    for rpath, item in r.items(m, "rules", path):
        rule = _authz_rule(r, item, rpath)
        if rule is not None:
            rules.append(rule)
    return AuthorizationPolicy(origin, selector, action or "ALLOW", tuple(rules))
