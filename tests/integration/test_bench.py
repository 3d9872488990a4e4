"""`meshproxy bench`, the installed harness, run as a user runs it: real processes, real load.

Figures are never asserted (this machine is shared); what is checked is that every
contender was really loaded and measured, and that the ratios are the run's own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from meshproxy.bench.loadgen import Target, parse_wrk, run_load
from tests.support.proxy import free_port
from tests.support.upstream import UpstreamServer


def bench(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshproxy", "bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def require(tool: str) -> None:
    """CI installs the tool (.ci/run); elsewhere its absence skips, loudly."""
    if shutil.which(tool) is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{tool} is missing although CI installs it")
        pytest.skip(f"{tool} is not installed")


def check_rows(report: dict[str, object], names: list[str]) -> dict[str, dict[str, float]]:
    rows = {r["name"]: r for r in report["rows"]}  # type: ignore[attr-defined]
    assert list(rows) == names
    direct = rows["direct"]
    assert direct["x_direct"] == 1.0
    for name, row in rows.items():
        assert row["errors"] == 0, row
        assert row["rps"] > 0 and row["runs"][0]["requests"] > 0, row
        assert row["p50_ms"] <= row["p99_ms"]
        assert row["x_direct"] == pytest.approx(row["rps"] / direct["rps"], abs=0.002)
        if name != "direct":
            assert row["cpu_us_per_request"] > 0, row  # the proxy's CPU was read
    return rows


@pytest.mark.timeout(300)
def test_builtin_generator_json_and_progress() -> None:
    out = bench("--duration", "1", "--generator", "builtin", "--no-nginx", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["generator"] == "builtin" and report["duration_s"] == 1
    rows = check_rows(report, ["direct", "bare relay", "meshproxy"])
    mesh = rows["meshproxy"]
    assert mesh["cpu_x_relay"] == pytest.approx(
        mesh["cpu_us_per_request"] / rows["bare relay"]["cpu_us_per_request"], abs=0.01
    )
    progress = [line for line in out.stderr.splitlines() if line.startswith("meshproxy bench: [")]
    assert len(progress) == 3 and "[3/3] meshproxy, run 1/1" in progress[-1]
    assert "meshproxy bench --duration 1" in report["reproduce"]


@pytest.mark.timeout(300)
def test_wrk_and_nginx_table() -> None:
    require("wrk")
    require("nginx")
    out = bench("--duration", "1")
    assert out.returncode == 0, out.stderr
    assert "load: wrk, 50 connections" in out.stdout, out.stdout
    lines = out.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("contender"))
    names = [line.split("  ")[0].strip() for line in lines[header + 1 : header + 5]]
    assert names == ["direct", "nginx", "bare relay", "meshproxy"], out.stdout
    nginx_row = lines[header + 2].split()
    assert nginx_row[3] == "1.00", out.stdout  # nginx is its own x-nginx baseline


@pytest.mark.timeout(300)
def test_your_own_upstream_and_config(tmp_path: Path) -> None:
    upstream = UpstreamServer("app").start()
    port = free_port()
    config = tmp_path / "mine.yaml"
    config.write_text(
        f"""\
apiVersion: meshproxy.io/v1alpha1
kind: ProxyConfig
metadata: {{name: mine}}
spec: {{interceptionMode: NONE, proxyAdminPort: {free_port()}, statusPort: 0}}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: mine}}
spec:
  ingress:
  - port: {{number: {port}, protocol: HTTP, name: http}}
    bind: 127.0.0.1
    captureMode: NONE
    defaultEndpoint: 127.0.0.1:{upstream.port}
"""
    )
    try:
        out = bench(
            "--duration", "1", "--generator", "builtin", "--connections", "4", "--no-nginx",
            "--no-relay", "--json", "--upstream", f"http://127.0.0.1:{upstream.port}",
            "-c", str(config), "--host", "app.local", "--path", "/probe",
        )  # fmt: skip
    finally:
        upstream.stop()
    assert out.returncode == 0, out.stderr
    check_rows(json.loads(out.stdout), ["direct", "meshproxy"])
    seen = upstream.state.requests
    # Direct load and load through the config's own listener both reached the app.
    assert {r.path for r in seen} == {"/probe"}
    assert {r.headers["host"] for r in seen} == {"app.local"}
    assert any("x-request-id" in r.headers for r in seen)  # some came through meshproxy


def test_bad_input_is_a_clear_error(tmp_path: Path) -> None:
    out = bench("--upstream", "ftp://example", "--duration", "1")
    assert out.returncode == 1 and "--upstream must be http://host[:port]" in out.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: Nope\n")
    out = bench("-c", str(bad), "--duration", "1", "--no-nginx", "--no-relay")
    assert out.returncode == 1 and "is invalid" in out.stderr and "unknown kind" in out.stderr
    out = bench("--connections", "0")
    assert out.returncode == 2 and "at least 1" in out.stderr
    assert "Traceback" not in out.stderr


WRK_OUTPUT = """\
Running 6s test @ http://127.0.0.1:8080/
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.52ms  310.05us  12.20ms   91.06%
    Req/Sec    33.10k     1.20k   35.02k    72.00%
  Latency Distribution
     50%    1.48ms
     75%    1.60ms
     90%    1.79ms
     99%    2.26ms
  197601 requests in 6.00s, 28.46MB read
  Non-2xx or 3xx responses: 3
Requests/sec:  32932.48
Transfer/sec:      4.74MB
"""


def test_parse_wrk() -> None:
    result = parse_wrk(WRK_OUTPUT, 6)
    assert (result.requests, result.rps, result.errors) == (197601, 32932.48, 3)
    assert (result.p50_ms, result.p99_ms) == (1.48, 2.26)
    with pytest.raises(ValueError, match="unexpected wrk output"):
        parse_wrk("wrk: connection refused", 6)


def test_wrk_pausing_between_requests_runs_below_capacity() -> None:
    """--pause-ms of benchmarks.telemetry: each of wrk's connections waits before each
    request, so two connections pausing 100 ms send about 20 requests a second, where
    unpaced they send thousands."""
    require("wrk")
    upstream = UpstreamServer("app").start()
    try:
        target = Target("127.0.0.1", upstream.port, f"127.0.0.1:{upstream.port}")
        paced = run_load("wrk", target, 2, 1, pause_ms=100)
        unpaced = run_load("wrk", target, 2, 1)
    finally:
        upstream.stop()
    assert 4 <= paced.requests <= 30 and paced.errors == 0, paced
    assert unpaced.requests > 200, unpaced
    with pytest.raises(ValueError, match="needs wrk"):
        run_load("builtin", target, 2, 1, pause_ms=100)
