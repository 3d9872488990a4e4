"""Telemetry (telemetry.istio.io): which providers trace, sample and tag, per mesh, namespace
or workload. Provider names are checked against ProxyConfig's extensionProviders when the
config is compiled (config/telemetry_resolve.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from meshproxy.config.cel import CelError, compile_filter
from meshproxy.config.reader import Reader
from meshproxy.config.resources import Origin
from meshproxy.config.schema.common import workload_selector
from meshproxy.config.source import Path_
from meshproxy.config.telemetry import AccessLoggingRule, CustomTag, Telemetry, TracingRule

TRACING_FIELDS = (
    "providers",
    "randomSamplingPercentage",
    "disableSpanReporting",
    "customTags",
    "match",
    "useRequestIdForTraceSampling",
    "enableIstioTags",
)
NOT_YET = {
    "metrics": "Telemetry metrics overrides are not supported yet (Prometheus metrics are on)",
}
MODES = ("CLIENT_AND_SERVER", "CLIENT", "SERVER")


def parse_telemetry(r: Reader, origin: Origin, spec: Any) -> Telemetry | None:
    path: Path_ = ("spec",)
    m = r.mapping(
        spec, path, ("selector", "targetRef", "targetRefs", "tracing", "accessLogging", *NOT_YET)
    )
    if m is None:
        return None
    selector = workload_selector(r, m, path)
    for key, why in NOT_YET.items():
        if m.get(key):
            r.error((*path, key), why)
    rules = []
    for item_path, item in r.items(m, "tracing", path):
        rule = _tracing(r, item, item_path)
        if rule is not None:
            rules.append(rule)
    logs = []
    for item_path, item in r.items(m, "accessLogging", path):
        log = _access_logging(r, item, item_path)
        if log is not None:
            logs.append(log)
    return Telemetry(origin, selector, tuple(rules), tuple(logs))


def _access_logging(r: Reader, value: Any, path: Path_) -> AccessLoggingRule | None:
    lm = r.mapping(value, path, ("providers", "disabled", "filter", "match"))
    if lm is None:
        return None
    providers = _providers(r, lm, path) if lm.get("providers") is not None else None
    disabled = r.boolean(lm, "disabled", path) if lm.get("disabled") is not None else None
    expression = None
    if lm.get("filter") is not None:
        fm = r.mapping(lm["filter"], (*path, "filter"), ("expression",), required=("expression",))
        expression = r.string(fm, "expression", (*path, "filter")) if fm else None
        if expression is not None:
            try:
                compile_filter(expression)
            except CelError as exc:
                r.error((*path, "filter", "expression"), f"invalid CEL: {exc}")
                expression = None
    mode = None
    if lm.get("match") is not None:
        mm = r.mapping(lm["match"], (*path, "match"), ("mode",))
        mode = r.choice(mm or {}, "mode", (*path, "match"), MODES)
    return AccessLoggingRule(providers, disabled, expression, mode)


def _providers(r: Reader, m: Mapping[str, Any], path: Path_) -> tuple[str, ...]:
    names = []
    for pp, p in r.items(m, "providers", path):
        pm = r.mapping(p, pp, ("name",), required=("name",))
        name = r.string(pm, "name", pp) if pm else None
        if name:
            names.append(name)
    return tuple(names)


def _tracing(r: Reader, value: Any, path: Path_) -> TracingRule | None:
    tm = r.mapping(value, path, TRACING_FIELDS)
    if tm is None:
        return None
    providers = _providers(r, tm, path) if tm.get("providers") is not None else None
    percent = None
    if tm.get("randomSamplingPercentage") is not None:
        raw = tm["randomSamplingPercentage"]
        if isinstance(raw, bool) or not isinstance(raw, int | float) or not 0 <= raw <= 100:
            r.error((*path, "randomSamplingPercentage"), f"must be 0 to 100, got {raw!r}")
        else:
            percent = float(raw)
    disable = (
        r.boolean(tm, "disableSpanReporting", path)
        if tm.get("disableSpanReporting") is not None
        else None
    )
    if tm.get("match") is not None:
        mm = r.mapping(tm["match"], (*path, "match"), ("mode",))
        mode = r.choice(
            mm or {}, "mode", (*path, "match"), ("CLIENT_AND_SERVER", "CLIENT", "SERVER")
        )
        if mode not in (None, "CLIENT_AND_SERVER"):
            r.error((*path, "match", "mode"), "only CLIENT_AND_SERVER is supported")
    tags = _custom_tags(r, tm, path) if tm.get("customTags") is not None else None
    return TracingRule(providers, percent, disable, tags)


def _custom_tags(r: Reader, tm: Mapping[str, Any], path: Path_) -> tuple[CustomTag, ...]:
    cm = r.mapping(tm["customTags"], (*path, "customTags"), tuple(tm["customTags"] or ()))
    out: list[CustomTag] = []
    for name, spec in (cm or {}).items():
        tp: Path_ = (*path, "customTags", name)
        sm = r.mapping(spec, tp, ("literal", "environment", "header"))
        if sm is None:
            continue
        kinds = [k for k in ("literal", "environment", "header") if sm.get(k) is not None]
        if len(kinds) != 1:
            r.error(tp, "give exactly one of literal, environment, header")
            continue
        kind = kinds[0]
        if kind == "literal":
            lm = r.mapping(sm[kind], (*tp, kind), ("value",), required=("value",))
            value = r.string(lm, "value", (*tp, kind)) if lm else None
            if value is not None:
                out.append(CustomTag(name, kind, value))
            continue
        em = r.mapping(sm[kind], (*tp, kind), ("name", "defaultValue"), required=("name",))
        if em is None:
            continue
        source = r.string(em, "name", (*tp, kind))
        default = r.string(em, "defaultValue", (*tp, kind)) or ""
        if source:
            out.append(
                CustomTag(name, kind, source.lower() if kind == "header" else source, default)
            )
    return tuple(out)
