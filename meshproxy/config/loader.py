"""Path → validated resources → compiled Snapshot, or a ConfigError listing every problem."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from meshproxy.config.compile import compile_snapshot
from meshproxy.config.resources import ProxyConfigResource, ProxySettings, Resource, Sidecar
from meshproxy.config.schema import parse_resource
from meshproxy.config.snapshot import Snapshot
from meshproxy.config.source import Digest, Document, read_sources
from meshproxy.errors import ConfigError, ConfigIssue

_versions = itertools.count(1)


def load_snapshot(path: Path | str, digest: Digest | None = None) -> Snapshot:
    """Load, validate and compile the config at `path`; raise ConfigError with every issue.
    `digest` notes the bytes read (source.fingerprint's formula): what was loaded, even if
    the files changed while it was read."""
    docs, issues = read_sources(Path(path), digest)
    try:
        return build_snapshot(docs, issues)
    finally:
        release(docs)


def release(items: list[Any]) -> None:
    """Drop a large list's items one by one. Freed at once, a big config's parsed documents
    are one deallocation cascade that holds the GIL for a tenth of a second while the event
    loop waits (this runs in the reload thread); item by item, the loop gets its turns."""
    while items:
        items.pop()


def _as_json(source: dict[str, list[Any]]) -> dict[str, str]:
    """Each kind's documents as one JSON text, for /config_dump. Kept as parsed YAML they
    are most of a big config's objects (70,000 lists and 60,000 dicts for 10,000 services),
    all walked by every full cycle collection while the event loop waits (catalog L08); a
    string is not walked. Encoded one document at a time, so the loop gets its turns."""
    return {
        kind: "[" + ",".join(json.dumps(d, default=str) for d in docs) + "]"
        for kind, docs in source.items()
    }


def build_snapshot(docs: list[Document], issues: list[ConfigIssue]) -> Snapshot:
    resources: list[Resource] = []
    source: dict[str, list[Any]] = {}
    seen: dict[tuple[str, str, str], Document] = {}
    misread = bool(issues)  # a file or document that did not read as written
    for doc in docs:
        before = len(issues)
        res = parse_resource(doc, issues)
        misread = misread or len(issues) > before
        if res is None:
            continue
        o = res.origin
        key = (o.kind, o.namespace, o.name)
        if key in seen:
            first = seen[key]
            issues.append(
                ConfigIssue(
                    doc.file,
                    doc.line_of(()),
                    doc.index,
                    o.label,
                    None,
                    f"duplicate {o.kind} {o.namespace}/{o.name} (first in "
                    f"{first.file}, document {first.index})",
                )
            )
            continue
        seen[key] = doc
        resources.append(res)
        source.setdefault(o.kind, []).append(doc.value)
    settings = ProxySettings()
    proxy_configs = [r for r in resources if isinstance(r, ProxyConfigResource)]
    for extra_pc in proxy_configs[1:]:
        o = extra_pc.origin
        issues.append(
            ConfigIssue(
                o.doc.file,
                o.doc.line_of(()),
                o.doc.index,
                o.label,
                None,
                "only one ProxyConfig is allowed",
            )
        )
    if proxy_configs:
        settings = proxy_configs[0].settings
    sidecars = [r for r in resources if isinstance(r, Sidecar)]
    for extra in sidecars[1:]:
        o = extra.origin
        issues.append(
            ConfigIssue(
                o.doc.file,
                o.doc.line_of(()),
                o.doc.index,
                o.label,
                None,
                "only one Sidecar is allowed (this proxy is one workload)",
            )
        )
    # Resources that did not read as written leave references to them dangling: when there
    # are such, what the compiler finds is withheld as likely knock-on (ConfigError.withheld).
    reference_issues: list[ConfigIssue] = [] if misread else issues
    snapshot = compile_snapshot(resources, settings, 0, _as_json(source), reference_issues)
    seen.clear()
    release(resources)
    if issues or snapshot is None:
        unique = list(dict.fromkeys(issues))
        withheld = len(dict.fromkeys(reference_issues)) if reference_issues is not issues else 0
        raise ConfigError(
            unique or [ConfigIssue("<config>", None, None, None, None, "invalid configuration")],
            withheld,
        )
    return _with_version(snapshot)


def _with_version(snapshot: Snapshot) -> Snapshot:
    from dataclasses import replace

    return replace(
        snapshot, version=next(_versions), warnings=tuple(dict.fromkeys(snapshot.warnings))
    )
