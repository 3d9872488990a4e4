"""The soak, for 60 seconds (tests/soak/soak.py runs it for as long as asked; 10 minutes by
default). Marked `soak`: the default test run leaves it out, CI runs it on the compiled build."""

from __future__ import annotations

import json

import pytest

from tests.soak.soak import run

pytestmark = pytest.mark.soak


@pytest.mark.timeout(240)
def test_a_minute_of_mixed_mtls_traffic_through_swaps_and_rotations() -> None:
    report = run(duration=60, swap_every=5, rotate_every=30)
    print(json.dumps(report, indent=2))  # the figures, in the CI log
    assert report["errors"] == {}, report["first_errors"]
    assert set(report["requests_ok"]) == {"http1", "http2", "grpc", "websocket", "tcp"}
    assert report["config_versions_applied"] == report["config_swaps"] >= 10
    for side in ("client", "server"):
        facts = report[side]
        assert facts["rss_flat"] and facts["fds_flat"], (side, facts)
        assert facts["loop_stalls_over_100ms"] == 0, (side, facts)
        assert facts["cert_reloads_ok"] >= report["cert_rotations"] + 1, (side, facts)
    assert report["passed"]
