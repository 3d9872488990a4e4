"""Telemetry metrics overrides at scrape time: which labels one stored series is exported
with for one metric (labels removed, added from CEL values), or none when it is disabled.

The hot path stores each series under Istio's standard labels plus, where overrides apply,
the direction's views and the values its CEL expressions gave; shaping happens here, when
Prometheus scrapes, so removing a label merges series then and costs requests nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client.core import Metric
from prometheus_client.samples import Sample

from meshproxy.config.cel import Entry, attributes, compile_value
from meshproxy.config.telemetry import DirectionMetrics

Pairs = tuple[tuple[str, str], ...]
# What a series overridden by Telemetry carries after its standard labels.
Extra = tuple[DirectionMetrics, tuple[str, ...]]


def shape(names: tuple[str, ...], labels: tuple[Any, ...], metric: int) -> Pairs | None:
    """The (name, value) labels of a stored series for metric `metric` (an index into
    config.telemetry.METRICS); None when that metric is disabled for its direction."""
    if len(labels) == len(names):
        return tuple(zip(names, labels, strict=True))
    direction, values = labels[-1]
    view = direction.views[metric]
    if view.disabled:
        return None
    out = dict(zip(names, labels[:-1], strict=True))
    for name in view.removed:
        out.pop(name, None)
    for name, index in view.upserts:
        out[name] = values[index]  # an existing label keeps its place
    return tuple(out.items())


def add_rows(a: list[Any], b: list[Any]) -> list[Any]:
    return [x + y for x, y in zip(a, b, strict=True)]


def accumulate(target: dict[Pairs, list[Any]], pairs: Pairs, row: list[Any]) -> None:
    """Sum series that one label set now names (a label removed)."""
    mine = target.get(pairs)
    target[pairs] = row if mine is None else add_rows(mine, row)


def add_counter(family: Metric, pairs: Pairs, value: float) -> None:
    family.samples.append(Sample(family.name + "_total", dict(pairs), value))


def add_histogram(
    family: Metric, pairs: Pairs, cumulative: list[tuple[str, float]], total: float
) -> None:
    """Bucket, count and sum samples, as HistogramMetricFamily.add_metric writes them."""
    labels = dict(pairs)
    for bound, n in cumulative:
        family.samples.append(Sample(family.name + "_bucket", {**labels, "le": bound}, n))
    family.samples.append(Sample(family.name + "_count", labels, cumulative[-1][1]))
    family.samples.append(Sample(family.name + "_sum", labels, total))


_programs: dict[str, Callable[[dict[str, Any]], str]] = {}


def tag_values(direction: DirectionMetrics, entry: Entry) -> tuple[str, ...]:
    """The values of a direction's UPSERT expressions for one stream or connection, each
    expression evaluated once however many metrics use it."""
    data = attributes(entry)
    out = []
    for expression in direction.expressions:
        program = _programs.get(expression)
        if program is None:
            program = _programs[expression] = compile_value(expression)  # checked at load
        out.append(program(data))
    return tuple(out)
