"""Read a Prometheus scrape the way Prometheus does: prometheus-client's parser, one series
at a time, each with its exact value (never a substring of the text)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.support.proxy import http_get


def series(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape, keyed by (sample name, its labels)."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in out, f"duplicate series {key}"
            out[key] = sample.value
    return out


def scrape(admin_url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, body = http_get(admin_url + "/stats/prometheus")
    assert status == 200, status
    return series(body.decode())


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, /, **labels: str
) -> float | None:
    """The value of the one series `name` whose labels include `labels` (None: no such
    series); more than one match is an error, so a test names its series exactly."""
    found = [v for (n, have), v in samples.items() if n == name and set(labels.items()) <= have]
    assert len(found) <= 1, f"{len(found)} series match {name} {labels}"
    return found[0] if found else None
