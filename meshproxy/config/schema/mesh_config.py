"""MeshConfig's telemetry fields in ProxyConfig: extensionProviders[] and defaultProviders."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from meshproxy.config.logformat import (
    ISTIO_TEXT_FORMAT,
    FormatError,
    compile_labels,
    compile_text,
)
from meshproxy.config.reader import Reader
from meshproxy.config.source import Path_
from meshproxy.config.telemetry import (
    PROMETHEUS_PROVIDER,
    DefaultProviders,
    ExtensionProvider,
    FileAccessLogProvider,
    OtelProvider,
)

PROVIDER_KINDS = ("opentelemetry", "envoyFileAccessLog", "prometheus")
# Istio's other provider kinds: named so an Istio user's YAML gets a precise answer.
UNSUPPORTED_PROVIDERS = (
    "zipkin",
    "datadog",
    "stackdriver",
    "skywalking",
    "envoyOtelAls",
    "envoyHttpAls",
    "envoyTcpAls",
    "envoyExtAuthzHttp",
    "envoyExtAuthzGrpc",
    "lightstep",
    "sds",
)
_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


def parse_extension_providers(
    r: Reader, m: Mapping[str, Any], path: Path_
) -> tuple[ExtensionProvider, ...]:
    out: list[ExtensionProvider] = []
    seen: set[str] = set()
    for item_path, item in r.items(m, "extensionProviders", path):
        pm = r.mapping(item, item_path, ("name", *PROVIDER_KINDS, *UNSUPPORTED_PROVIDERS))
        if pm is None:
            continue
        name = r.string(pm, "name", item_path)
        if not name:
            r.error((*item_path, "name"), "required field is missing")
            continue
        if not _NAME.match(name):
            r.error((*item_path, "name"), f"{name!r} is not a valid provider name")
            continue
        if name in seen:
            r.error((*item_path, "name"), f"duplicate provider {name!r}")
            continue
        seen.add(name)
        kinds = [k for k in (*PROVIDER_KINDS, *UNSUPPORTED_PROVIDERS) if pm.get(k) is not None]
        if len(kinds) != 1:
            r.error(item_path, f"give exactly one of {', '.join(PROVIDER_KINDS)}")
            continue
        kind = kinds[0]
        if kind in UNSUPPORTED_PROVIDERS:
            r.error((*item_path, kind), f"not supported (use one of {', '.join(PROVIDER_KINDS)})")
            continue
        provider = _provider(r, name, kind, pm[kind], (*item_path, kind))
        if provider is not None:
            out.append(provider)
    return tuple(out)


def _provider(r: Reader, name: str, kind: str, value: Any, path: Path_) -> ExtensionProvider | None:
    if kind == "prometheus":
        r.mapping(value, path, ())
        return ExtensionProvider(name, kind)
    if kind == "opentelemetry":
        fields = ("service", "port", "http", "maxTagLength", "resourceDetectors")
        om = r.mapping(value, path, fields, required=("service", "port"))
        if om is None:
            return None
        service = r.string(om, "service", path)
        port = r.port(om, "port", path)
        if not service or port is None:
            return None
        http = om.get("http")
        if http is None:
            return ExtensionProvider(name, kind, opentelemetry=OtelProvider(service, port))
        hm = r.mapping(http, (*path, "http"), ("path", "timeout", "headers"))
        if hm is None:
            return None
        hpath = r.string(hm, "path", (*path, "http")) or "/v1/traces"
        if not hpath.startswith("/"):
            r.error((*path, "http", "path"), f"must start with '/', got {hpath!r}")
            return None
        timeout = r.duration(hm, "timeout", (*path, "http")) or 10.0
        headers: list[tuple[str, str]] = []
        for hp, h in r.items(hm, "headers", (*path, "http")):
            hm2 = r.mapping(h, hp, ("name", "value", "envName"), required=("name",))
            if hm2 is None:
                continue
            hname, hvalue = r.string(hm2, "name", hp), r.string(hm2, "value", hp)
            if hm2.get("envName") is not None:
                r.error((*hp, "envName"), "not supported: give value")
            if hname:
                headers.append((hname.lower(), hvalue or ""))
        otel = OtelProvider(service, port, hpath, timeout, tuple(headers))
        return ExtensionProvider(name, kind, opentelemetry=otel)
    fm = r.mapping(value, path, ("path", "logFormat"), required=("path",))
    if fm is None:
        return None
    log_path = r.string(fm, "path", path)
    if not log_path:
        return None
    text: str | None = None
    labels: tuple[tuple[str, str], ...] | None = None
    if fm.get("logFormat") is not None:
        lm = r.mapping(fm["logFormat"], (*path, "logFormat"), ("text", "labels"))
        if lm is not None:
            if lm.get("text") is not None and lm.get("labels") is not None:
                r.error((*path, "logFormat"), "give text or labels, not both")
            text = r.string(lm, "text", (*path, "logFormat"))
            if lm.get("labels") is not None:
                labels = tuple(r.string_map(lm, "labels", (*path, "logFormat")).items())
    try:  # the format is compiled now so that a mistake is a config error with its place
        compile_labels(labels) if labels is not None else compile_text(text or ISTIO_TEXT_FORMAT)
    except FormatError as exc:
        r.error((*path, "logFormat"), str(exc))
        return None
    log = FileAccessLogProvider(log_path, text, labels)
    return ExtensionProvider(name, kind, file_access_log=log)


def parse_default_providers(
    r: Reader,
    m: Mapping[str, Any],
    path: Path_,
    providers: tuple[ExtensionProvider, ...],
) -> DefaultProviders:
    dm = r.mapping(m.get("defaultProviders"), (*path, "defaultProviders"),
                   ("tracing", "metrics", "accessLogging"))  # fmt: skip
    if dm is None:
        return DefaultProviders()
    known = {p.name: p.kind for p in providers} | {PROMETHEUS_PROVIDER.name: "prometheus"}
    wanted = {"tracing": "opentelemetry", "metrics": "prometheus",
              "accessLogging": "envoyFileAccessLog"}  # fmt: skip
    chosen: dict[str, tuple[str, ...]] = {}
    for key, kind in wanted.items():
        names = r.strings(dm, key, (*path, "defaultProviders"))
        for i, name in enumerate(names):
            check_provider(r, name, kind, known, (*path, "defaultProviders", key, i))
        chosen[key] = names
    return DefaultProviders(
        chosen["tracing"],
        chosen["metrics"] if dm.get("metrics") is not None else ("prometheus",),
        chosen["accessLogging"],
    )


def check_provider(r: Reader, name: str, kind: str, known: Mapping[str, str], path: Path_) -> bool:
    """Whether `name` is a declared provider of `kind` (an issue at `path` otherwise)."""
    if name not in known:
        from meshproxy.config.reader import did_you_mean

        r.error(path, f"no extension provider {name!r}{did_you_mean(name, known)}")
        return False
    if known[name] != kind:
        r.error(path, f"provider {name!r} is {known[name]}, not {kind}")
        return False
    return True
