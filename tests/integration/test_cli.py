"""The CLI as a user runs it: demo, validate, iptables, bad flags."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def meshproxy(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshproxy", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def test_demo_runs_and_reports() -> None:
    out = meshproxy("demo", "--linger", "0", "--requests", "100")
    assert out.returncode == 0, out.stderr
    assert "hello-v1" in out.stdout and "hello-v2" in out.stdout
    assert "status codes: 200: 110, 503: 5" in out.stdout
    assert "http://127.0.0.1:15000/stats/prometheus" in out.stdout


def test_validate_ok_and_errors(tmp_path: Path) -> None:
    ok = meshproxy("validate", str(REPO / "config" / "sidecar"))
    assert ok.returncode == 0 and "OK" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n"
        "metadata: {name: x}\nspec: {hosts: [a.b], ports: [{number: 0, name: h}]}\n"
    )
    out = meshproxy("validate", str(bad))
    assert out.returncode == 1
    assert f"{bad}:4 document 1: ServiceEntry x: spec.ports[0].number: must be at least 1" in (
        out.stdout
    )


def test_run_refuses_invalid_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: Nope\n")
    out = meshproxy("run", "-c", str(bad))
    assert out.returncode == 2 and "refusing to start" in out.stderr


def test_bad_flags_are_clear_errors() -> None:
    out = meshproxy("iptables", "--exclude-inbound-ports", "15000,abc")
    assert out.returncode == 2 and "expected comma-separated ports" in out.stderr
    out = meshproxy("frobnicate")
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_iptables_rules_follow_istio() -> None:
    out = meshproxy("iptables", "--exclude-inbound-ports", "15090")
    assert out.returncode == 0
    rules = out.stdout.splitlines()
    assert "-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN" in rules
    assert "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001" in rules
    assert "-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN" in rules
    assert rules[-1] == "COMMIT"
