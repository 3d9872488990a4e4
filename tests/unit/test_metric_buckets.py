"""Istio's histograms bucket by bucket: a value equal to a bound counts in that bound's
bucket (Prometheus `le`), one just above it in the next, past the last only in +Inf.
Read back through prometheus-client's parser, one series at a time."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from meshproxy.observe.metrics import BYTES_BUCKETS, DURATION_BUCKETS, MeshMetrics


def _buckets(metrics: MeshMetrics, family: str) -> dict[str, float]:
    """le -> cumulative count of the one series `family` has."""
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(metrics.render().decode()):
        for sample in fam.samples:
            if sample.name == family + "_bucket":
                assert sample.labels["le"] not in out, "more than one series"
                out[sample.labels["le"]] = sample.value
    return out


def _record(metrics: MeshMetrics, duration_ms: float, request: int, response: int) -> None:
    metrics.record_http("destination", "reviews.default.svc.cluster.local", 200, "-",
                        duration_ms, request, response)  # fmt: skip


def test_duration_and_byte_buckets_count_values_at_their_bound() -> None:
    metrics = MeshMetrics()
    durations = [0.2, 0.5, 0.51, 1.0, 4.9, 3_600_000.0, 3_600_000.5]
    sizes = [0, 1, 2, 100, 101, 100_000_000, 100_000_001]
    for duration, size in zip(durations, sizes, strict=True):
        _record(metrics, duration, size, size)

    duration = _buckets(metrics, "istio_request_duration_milliseconds")
    assert duration["0.5"] == 2  # 0.2 and 0.5 itself
    assert duration["1.0"] == 4  # + 0.51 and 1.0
    assert duration["5.0"] == 5  # + 4.9
    assert duration["1800000.0"] == 5
    assert duration["3600000.0"] == 6  # the last bound, inclusive
    assert duration["+Inf"] == 7
    assert len(duration) == len(DURATION_BUCKETS) + 1

    for family in ("istio_request_bytes", "istio_response_bytes"):
        size = _buckets(metrics, family)
        assert size["1.0"] == 2  # 0 and 1
        assert size["10.0"] == 3  # + 2
        assert size["100.0"] == 4  # + 100
        assert size["1000.0"] == 5  # + 101
        assert size["100000000.0"] == 6
        assert size["+Inf"] == 7
        assert len(size) == len(BYTES_BUCKETS) + 1
