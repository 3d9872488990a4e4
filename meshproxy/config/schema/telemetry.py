"""Telemetry (telemetry.istio.io): which providers trace, sample and tag, log and filter, and
how the standard metrics are shaped (disabled, labels removed or added), per mesh, namespace
or workload. Provider names are checked against ProxyConfig's extensionProviders when the
config is compiled (config/telemetry_resolve.py)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

from meshproxy.config.cel import CelError, compile_filter, compile_value
from meshproxy.config.reader import Reader
from meshproxy.config.resources import Origin
from meshproxy.config.schema.common import workload_selector
from meshproxy.config.source import Path_
from meshproxy.config.telemetry import (
    METRICS,
    AccessLoggingRule,
    CustomTag,
    MetricOverride,
    MetricsRule,
    TagOverride,
    Telemetry,
    TracingRule,
)

TRACING_FIELDS = (
    "providers",
    "randomSamplingPercentage",
    "disableSpanReporting",
    "customTags",
    "match",
    "useRequestIdForTraceSampling",
    "enableIstioTags",
)
MODES = ("CLIENT_AND_SERVER", "CLIENT", "SERVER")
# customMetric names: Istio's metric names without the istio_ prefix.
CUSTOM_METRICS: Final = {
    "requests_total": 0,
    "request_duration_milliseconds": 1,
    "request_bytes": 2,
    "response_bytes": 3,
    "tcp_connections_opened_total": 4,
    "tcp_connections_closed_total": 5,
    "tcp_sent_bytes_total": 6,
    "tcp_received_bytes_total": 7,
    "request_messages_total": 8,
    "response_messages_total": 9,
}
LABEL_NAME: Final = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")


def parse_telemetry(r: Reader, origin: Origin, spec: Any) -> Telemetry | None:
    path: Path_ = ("spec",)
    m = r.mapping(
        spec, path, ("selector", "targetRef", "targetRefs", "tracing", "accessLogging", "metrics")
    )
    if m is None:
        return None
    selector = workload_selector(r, m, path)
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
    metrics = []
    for item_path, item in r.items(m, "metrics", path):
        rule_ = _metrics(r, item, item_path)
        if rule_ is not None:
            metrics.append(rule_)
    return Telemetry(origin, selector, tuple(rules), tuple(logs), tuple(metrics))


def _metrics(r: Reader, value: Any, path: Path_) -> MetricsRule | None:
    mm = r.mapping(value, path, ("providers", "overrides", "reportingInterval"))
    if mm is None:
        return None
    providers = _providers(r, mm, path) if mm.get("providers") is not None else None
    interval = r.duration(mm, "reportingInterval", path)
    if interval is not None and interval <= 0:
        r.error((*path, "reportingInterval"), "must be more than 0s")
        interval = None
    overrides = []
    for op, o in r.items(mm, "overrides", path):
        override = _metric_override(r, o, op)
        if override is not None:
            overrides.append(override)
    return MetricsRule(providers, tuple(overrides), interval)


def _metric_override(r: Reader, value: Any, path: Path_) -> MetricOverride | None:
    om = r.mapping(value, path, ("match", "disabled", "tagOverrides"))
    if om is None:
        return None
    metrics: tuple[int, ...] = tuple(range(len(METRICS)))  # no match: ALL_METRICS
    mode = "CLIENT_AND_SERVER"
    if om.get("match") is not None:
        mp: Path_ = (*path, "match")
        mm = r.mapping(om["match"], mp, ("metric", "customMetric", "mode"))
        if mm is None:
            return None
        if mm.get("metric") is not None and mm.get("customMetric") is not None:
            r.error(mp, "give metric or customMetric, not both")
            return None
        metric = r.choice(mm, "metric", mp, ("ALL_METRICS", *METRICS))
        if metric is not None and metric != "ALL_METRICS":
            metrics = (METRICS.index(metric),)
        custom = r.string(mm, "customMetric", mp)
        if custom is not None:
            index = CUSTOM_METRICS.get(custom.removeprefix("istio_"))
            if index is None:
                known = ", ".join(CUSTOM_METRICS)
                r.error((*mp, "customMetric"), f"no metric {custom!r} here (known: {known})")
                return None
            metrics = (index,)
        mode = r.choice(mm, "mode", mp, MODES) or mode
    disabled = r.boolean(om, "disabled", path) if om.get("disabled") is not None else None
    tags: list[TagOverride] = []
    tp: Path_ = (*path, "tagOverrides")
    raw = om.get("tagOverrides")
    tm = r.mapping(raw, tp, tuple(raw) if isinstance(raw, dict) else ())
    for name, spec in (tm or {}).items():
        tag = _tag_override(r, str(name), spec, (*tp, name))
        if tag is not None:
            tags.append(tag)
    return MetricOverride(metrics, mode, disabled, tuple(tags))


def _tag_override(r: Reader, name: str, spec: Any, path: Path_) -> TagOverride | None:
    if not LABEL_NAME.match(name) or name.startswith("__"):
        r.error(path, f"{name!r} is not a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*)")
        return None
    sm = r.mapping(spec, path, ("operation", "value"))
    if sm is None:
        return None
    operation = r.choice(sm, "operation", path, ("UPSERT", "REMOVE"))
    if operation is None and sm.get("operation") is not None:
        return None  # reported
    value = r.string(sm, "value", path)
    if operation == "REMOVE":
        if value is not None:
            r.error((*path, "value"), "a REMOVE takes no value")
        return TagOverride(name, None)
    if value is None:
        r.error(path, "an UPSERT needs a value (a CEL expression, e.g. request.host)")
        return None
    try:
        compile_value(value)
    except CelError as exc:
        r.error((*path, "value"), f"invalid CEL: {exc}")
        return None
    return TagOverride(name, value)


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
