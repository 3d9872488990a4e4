"""Which tracing, access logs and metrics this sidecar has: Telemetry resources resolved as
Istio resolves them.

Levels, widest first: the root namespace's Telemetry without a selector (mesh-wide), this
workload's namespace's without one, then those whose selector matches its labels. Each
level's tracing entry overrides the fields it sets (providers, sampling, span reporting,
custom tags) of the levels before; without any, MeshConfig defaultProviders.tracing turns
tracing on at Istio's 1 % sampling.
"""

from __future__ import annotations

from meshproxy.config.reader import Reader
from meshproxy.config.resources import ProxySettings, selects
from meshproxy.config.telemetry import (
    DEFAULT_SAMPLING_PERCENT,
    METRICS,
    AccessLoggingRule,
    AccessLogSpec,
    DirectionMetrics,
    MetricOverride,
    MetricsPolicy,
    MetricsRule,
    MetricView,
    Telemetry,
    TracingConfig,
    TracingRule,
)
from meshproxy.errors import ConfigIssue


def resolve_tracing(
    settings: ProxySettings, telemetries: list[Telemetry], issues: list[ConfigIssue]
) -> TracingConfig | None:
    for t in telemetries:
        _check_providers(settings, t, issues)
    levels = _levels(settings, telemetries)
    merged = TracingRule(providers=settings.default_providers.tracing or None)
    for level in levels:
        for telemetry in level:
            for rule in telemetry.tracing:
                merged = _override(merged, rule)
    names = merged.providers or ()
    if not names:
        return None
    name = names[0]  # Istio uses the first provider of a tracing entry
    provider = settings.provider(name)
    if provider is None or provider.opentelemetry is None:
        return None  # reported by _check_providers
    return TracingConfig(
        name,
        provider.opentelemetry,
        merged.sampling_percent
        if merged.sampling_percent is not None
        else DEFAULT_SAMPLING_PERCENT,
        bool(merged.disable_span_reporting),
        merged.custom_tags or (),
    )


def _override(base: TracingRule, rule: TracingRule) -> TracingRule:
    return TracingRule(
        rule.providers if rule.providers is not None else base.providers,
        rule.sampling_percent if rule.sampling_percent is not None else base.sampling_percent,
        rule.disable_span_reporting
        if rule.disable_span_reporting is not None
        else base.disable_span_reporting,
        rule.custom_tags if rule.custom_tags is not None else base.custom_tags,
    )


def _check_providers(settings: ProxySettings, t: Telemetry, issues: list[ConfigIssue]) -> None:
    """Every provider a Telemetry names is declared, and of the kind its section needs."""
    from meshproxy.config.reader import did_you_mean

    r = Reader(t.origin.doc, t.origin.label, issues)
    declared = [p.name for p in settings.extension_providers]
    sections: list[tuple[str, str, tuple[TracingRule | AccessLoggingRule | MetricsRule, ...]]] = [
        ("tracing", "opentelemetry", t.tracing),
        ("accessLogging", "envoyFileAccessLog", t.access_logging),
        ("metrics", "prometheus", t.metrics),
    ]
    for section, kind, rules in sections:
        for i, rule in enumerate(rules):
            for j, name in enumerate(rule.providers or ()):
                path = ("spec", section, i, "providers", j, "name")
                provider = settings.provider(name)
                if provider is None:
                    r.error(path, f"no extension provider {name!r}{did_you_mean(name, declared)}")
                elif provider.kind != kind:
                    r.error(path, f"provider {name!r} is {provider.kind}, not {kind}")


def resolve_access_logs(
    settings: ProxySettings, telemetries: list[Telemetry], issues: list[ConfigIssue]
) -> tuple[AccessLogSpec, ...]:
    """ProxyConfig accessLogFile (Istio's default format), then the envoyFileAccessLog
    providers: those the most specific Telemetry accessLogging names (with its filter and
    mode; `disabled` turns them off), else MeshConfig defaultProviders.accessLogging."""
    out: list[AccessLogSpec] = []
    if settings.access_log_file:
        out.append(AccessLogSpec(settings.access_log_file))
    merged = AccessLoggingRule(providers=settings.default_providers.access_logging or None)
    for level in _levels(settings, telemetries):
        for telemetry in level:
            for rule in telemetry.access_logging:
                merged = AccessLoggingRule(
                    rule.providers if rule.providers is not None else merged.providers,
                    rule.disabled if rule.disabled is not None else merged.disabled,
                    rule.filter if rule.filter is not None else merged.filter,
                    rule.mode if rule.mode is not None else merged.mode,
                )
    if merged.disabled:
        return tuple(out)
    for name in merged.providers or ():
        provider = settings.provider(name)
        log = provider.file_access_log if provider is not None else None
        if log is not None:
            source = f"envoyFileAccessLog provider {name!r}:"
            mode = merged.mode or "CLIENT_AND_SERVER"
            spec = AccessLogSpec(log.path, log.text, log.labels, merged.filter, source, mode)
            out.append(spec)
    return tuple(out)


def resolve_metrics(settings: ProxySettings, telemetries: list[Telemetry]) -> MetricsPolicy:
    """Telemetry metrics as Istio merges them: the most specific level naming providers
    chooses them (MeshConfig defaultProviders.metrics before any); overrides apply in order,
    mesh-wide first, a later one changing what an earlier one set. Without a Prometheus
    provider every metric is off."""
    providers = settings.default_providers.metrics
    interval = None
    overrides: list[MetricOverride] = []
    for level in _levels(settings, telemetries):
        for telemetry in level:
            for rule in telemetry.metrics:
                if rule.providers is not None:
                    providers = rule.providers
                if rule.reporting_interval is not None:
                    interval = rule.reporting_interval
                overrides.extend(rule.overrides)
    exported = any(
        (p := settings.provider(name)) is not None and p.kind == "prometheus" for name in providers
    )
    if not exported:
        overrides = [MetricOverride(tuple(range(len(METRICS))), disabled=True)]
    return MetricsPolicy(_direction(overrides, "CLIENT"), _direction(overrides, "SERVER"), interval)


def _direction(overrides: list[MetricOverride], mode: str) -> DirectionMetrics | None:
    """One direction's views, or None when no override touches it (the standard series)."""
    applying = [o for o in overrides if o.mode in (mode, "CLIENT_AND_SERVER")]
    if not applying:
        return None
    disabled = [False] * len(METRICS)
    tags: list[dict[str, str | None]] = [{} for _ in METRICS]
    for override in applying:
        for i in override.metrics:
            if override.disabled is not None:
                disabled[i] = override.disabled
            for tag in override.tags:
                tags[i][tag.name] = tag.value
    expressions: list[str] = []
    views = []
    for i in range(len(METRICS)):
        upserts = []
        for name, value in tags[i].items():
            if value is not None:
                if value not in expressions:
                    expressions.append(value)
                upserts.append((name, expressions.index(value)))
        removed = frozenset(n for n, v in tags[i].items() if v is None)
        views.append(MetricView(disabled[i], removed, tuple(upserts)))
    if all(v == MetricView() for v in views):
        return None
    return DirectionMetrics(tuple(views), tuple(expressions))


def _levels(settings: ProxySettings, telemetries: list[Telemetry]) -> list[list[Telemetry]]:
    """Mesh-wide, namespace-wide, then workload-selecting Telemetry resources."""
    labels = dict(settings.labels)
    mesh = [t for t in telemetries if t.origin.namespace == settings.root_namespace]
    local = [t for t in telemetries if t.origin.namespace == settings.namespace]
    return [
        [t for t in mesh if t.selector is None],
        [t for t in local if t.selector is None and t not in mesh],
        [t for t in local if t.selector is not None and selects(t.selector, labels)],
    ]
