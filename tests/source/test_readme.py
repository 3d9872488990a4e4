"""The README holds: its quick start runs as written on a fresh clone, the standalone recipe
does what it says, and its admin and metrics tables match what the proxy serves."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshproxy.observe.admin import ROUTE_HELP
from tests.integration.conftest import MeshFactory
from tests.integration.test_admin import LOG_LINE
from tests.source.readme_blocks import code_blocks, quick_start_command, section
from tests.support.metrics import series
from tests.support.proxy import http_get, wait_for

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def table_first_column(text: str, marker: str) -> list[str]:
    rows = text[text.index(marker) :].split("\n\n", 1)[0].splitlines()
    return [row.split("|")[1].strip().strip("`") for row in rows[3:] if row.startswith("|")]


def test_admin_routes_table_is_the_admin_port() -> None:
    assert table_first_column(README, "<!-- admin-routes") == list(ROUTE_HELP)


def test_metrics_table_is_a_real_scrape(make_mesh: MeshFactory) -> None:
    import http.client
    import socket

    mesh = make_mesh()
    conn = http.client.HTTPConnection("127.0.0.1", mesh.http_port, timeout=5)
    conn.request("GET", "/", headers={"Host": "hello.test"})
    conn.getresponse().read()
    with socket.create_connection(("127.0.0.1", mesh.tcp_port), timeout=5) as s:
        s.sendall(b"x")
        s.recv(1)
    # The TCP connection's close is counted when the proxy sees it.
    wait_for(
        lambda: (
            b"istio_tcp_connections_closed_total{"
            in http_get(mesh.proxy.admin + "/stats/prometheus")[1]
        )
    )
    text = http_get(mesh.proxy.admin + "/stats/prometheus")[1].decode()
    from prometheus_client.parser import text_string_to_metric_families

    exported = set()
    for family in text_string_to_metric_families(text):
        exported.add(family.name + "_total" if family.type == "counter" else family.name)
    assert series(text)  # parses as Prometheus would
    documented = set(table_first_column(README, "<!-- metrics"))
    only_once_a_cert_loaded = {"meshproxy_workload_cert_expiry_timestamp_seconds"}
    assert exported <= documented, f"undocumented: {exported - documented}"
    assert documented - exported <= only_once_a_cert_loaded, documented - exported


@pytest.mark.timeout(900)
def test_quick_start_runs_as_written_on_a_fresh_clone(tmp_path: Path) -> None:
    """The first command of the quick start, verbatim, in a clone of this checkout.

    CI runs it itself, in the background beside this pass (its install is the compiled
    build the second pass tests), and names the directory holding its record in
    MESHPROXY_QUICK_START_RUN; this test then checks that record rather than building the
    wheel a second time. Elsewhere the test runs the command.
    """
    command = quick_start_command()
    assert command.startswith("python3 -m venv .venv") and "meshproxy demo" in command
    record = os.environ.get("MESHPROXY_QUICK_START_RUN")
    if record:
        clone, returncode, output = _quick_start_run_by_ci(Path(record))
        assert (Path(record) / "quick-start.command").read_text().strip() == command
    else:
        clone = tmp_path / "clone"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        out = subprocess.run(
            ["bash", "-c", command],
            cwd=clone,
            capture_output=True,
            text=True,
            timeout=840,
            stdin=subprocess.DEVNULL,
            env={k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"},
        )
        returncode, output = out.returncode, out.stdout + out.stderr
    assert returncode == 0, output[-5000:]
    assert "status codes: 200:" in output
    version = subprocess.run(
        [str(clone / ".venv/bin/meshproxy"), "version"], capture_output=True, text=True
    )
    assert "hot path compiled (mypyc)" in version.stdout  # gcc and headers are here


def _quick_start_run_by_ci(record: Path) -> tuple[Path, int, str]:
    """The clone, exit status and output of the run `.ci/run` started (waiting for its end).

    CI renames the status file into place, so it exists only once complete.
    """
    status = record / "quick-start.rc"
    assert wait_for(status.exists, timeout=840), "the quick start CI started never ended"
    output = (record / "quick-start.out").read_text(errors="replace")
    return record / "src", int(status.read_text()), output


@pytest.mark.usefixtures("demo_ports_free")
def test_standalone_recipe_does_what_it_says() -> None:
    block = code_blocks(section("### Standalone: a local proxy in front of your service"))[0]
    lines = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    serve, run, call = lines
    assert serve.endswith("&") and run == ".venv/bin/meshproxy run -c config/standalone"
    server = subprocess.Popen(
        shlex.split(serve.rstrip("&")),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    proxy = subprocess.Popen(
        [sys.executable, "-m", "meshproxy", *shlex.split(run)[1:]],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_for(lambda: _listening(15000) and _listening(8000), timeout=15)
        out = subprocess.run(
            [*shlex.split(call), "-s", "-o", "/dev/null", "-w", "%{http_code}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.stdout == "200"
        samples = series(http_get("http://127.0.0.1:15000/stats/prometheus")[1].decode())
        total = sum(v for (n, _), v in samples.items() if n == "istio_requests_total")
        assert total == 1
    finally:
        proxy.send_signal(signal.SIGTERM)
        stdout, stderr = proxy.communicate(timeout=15)
        server.terminate()
        server.wait(timeout=5)
    assert proxy.returncode == 0
    assert "listening on 127.0.0.1:8080" in stderr and "ready:" in stderr
    (line,) = stdout.splitlines()
    fields = LOG_LINE.match(line)
    assert fields and fields["code"] == "200" and fields["upstream"] == "127.0.0.1:8000"
    # The README's sample line has the same shape.
    sample = code_blocks(section("### Standalone: a local proxy in front of your service"), "")[
        0
    ].strip()
    assert LOG_LINE.match(sample), sample


def _listening(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        time.sleep(0.05)
        return False
