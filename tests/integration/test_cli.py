"""The CLI as a user runs it: demo, validate, iptables, bad flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.proxy import meshproxy_cli

REPO = Path(__file__).resolve().parents[2]


meshproxy = meshproxy_cli


@pytest.mark.usefixtures("demo_ports_free")
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


def test_validate_finds_every_config_below_a_directory() -> None:
    out = meshproxy("validate", str(REPO / "config"))
    assert out.returncode == 0, out.stdout
    oks = [line for line in out.stdout.splitlines() if ": OK (" in line]
    examples = sorted(
        p for p in (REPO / "config").iterdir() if p.is_dir() and p.name != "kubernetes"
    )
    assert [line.split(": OK")[0] for line in oks] == [str(p) for p in examples]


def test_validate_refuses_an_empty_file_or_directory(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing but a comment\n")
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    out = meshproxy("validate", str(empty), str(nothing))
    assert out.returncode == 1
    assert f"{empty}: empty: no YAML documents in it" in out.stdout
    assert f"{nothing}: no *.yaml files found" in out.stdout
    assert "OK" not in out.stdout


TYPOS = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews}
spec:
  hots: [reviews.test]
  ports: [{number: 80, name: http}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1}]
---
apiVersion: networking.istio.io/v1
kind: DestinatonRule
metadata: {name: reviews}
spec:
  host: reviews.test
  subsets: [{name: v1, labels: {version: v1}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews.test]
  http:
  - route: [{destination: {host: reviews.test, subset: v1}}]
"""


def test_two_typos_give_two_messages(tmp_path: Path) -> None:
    """A misspelt required field and a misspelt kind: no "required field is missing" for the
    field, no dangling host or subset for what the two resources would have declared."""
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(TYPOS)
    out = meshproxy("validate", str(mesh))
    assert out.returncode == 1
    problems = [line for line in out.stdout.splitlines() if line.startswith(str(mesh) + ":")]
    assert problems == [
        f"{mesh}:5 document 1: ServiceEntry reviews: spec.hots: unknown field"
        ' (did you mean "hosts"?)',
        f"{mesh}:11 document 2: kind: unknown kind 'DestinatonRule'"
        ' (did you mean "DestinationRule"?)',
        f"{mesh}: 2 problem(s) found",
    ]
    assert "cross-reference problem(s) not shown" in out.stdout
    # Fixed, the reference checks run again and find what is really left.
    mesh.write_text(TYPOS.replace("hots:", "hosts:").replace("Destinaton", "Destination"))
    assert meshproxy("validate", str(mesh)).returncode == 0


def test_version_and_help() -> None:
    out = meshproxy("--version")
    assert out.returncode == 0 and out.stdout.startswith("meshproxy 0.")
    out = meshproxy("--help")
    assert "exit codes:" in out.stdout and "3  run could not start" in out.stdout
    out = meshproxy("iptables", "--help")
    flat = " ".join(out.stdout.split())  # argparse wraps to the terminal's width
    assert "(default: 1337; env PROXY_UID)" in flat
    assert "(default: 15001; env ENVOY_PORT)" in flat
    out = meshproxy("demo", "--help")
    assert "--linger" in out.stdout and "(default: 20.0)" in out.stdout
    out = meshproxy("ca", "init", "--help")
    assert "(default: cluster.local)" in out.stdout
    out = meshproxy("demo", "--requests", "0")
    assert out.returncode == 2 and "must be at least 1" in out.stderr


def test_run_refuses_invalid_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: Nope\n")
    out = meshproxy("run", "-c", str(bad))
    assert out.returncode == 2 and "refusing to start" in out.stderr


def test_bad_flags_are_clear_errors() -> None:
    out = meshproxy("iptables", "--istio-local-exclude-ports", "15000,abc")
    assert out.returncode == 2
    assert "--istio-local-exclude-ports: 'abc' is not a port (1-65535)" in out.stderr
    out = meshproxy("frobnicate")
    assert out.returncode == 2 and "invalid choice" in out.stderr
