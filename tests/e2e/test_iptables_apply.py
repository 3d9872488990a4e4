"""`meshproxy iptables --apply/--cleanup` against real iptables in a namespace of its own."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def meshproxy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshproxy", "iptables", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def saved(ns: str, tool: str) -> list[str]:
    out = subprocess.run(
        ["ip", "netns", "exec", ns, tool, "-t", "nat"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return [line for line in out.stdout.splitlines() if line.startswith(("-A", ":ISTIO"))]


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_apply_twice_leaves_one_set_and_cleanup_removes_exactly_it(
    netns: str, backend: str
) -> None:
    v4, v6 = f"iptables-{backend}-save", f"ip6tables-{backend}-save"
    # Someone else's rule in OUTPUT: cleanup must leave it where it is.
    subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            netns,
            f"iptables-{backend}",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "--dport",
            "9999",
            "-j",
            "RETURN",
        ],
        check=True,
        timeout=30,
    )
    flags = ("--netns", netns, "--iptables-backend", backend, "--ipv6", "on")
    first = meshproxy("--apply", *flags)
    assert first.returncode == 0, first.stderr
    once = saved(netns, v4)
    expected = [
        line
        for line in meshproxy().stdout.split("# ip6tables")[0].splitlines()
        if line.startswith("-A")
    ]
    # iptables-save reorders match options, so compare what can be compared exactly.
    assert len([line for line in once if line.startswith("-A")]) == len(expected) + 1
    assert sorted(line for line in once if line.startswith(":")) == [
        f":{c} - [0:0]"
        for c in ("ISTIO_INBOUND", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT", "ISTIO_REDIRECT")
    ]
    for rule in (
        "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
        "-A PREROUTING -p tcp -j ISTIO_INBOUND",
        "-A OUTPUT -j ISTIO_OUTPUT",
        "-A ISTIO_OUTPUT -j ISTIO_REDIRECT",
    ):
        assert once.count(rule) == 1, rule
    second = meshproxy("--apply", *flags)
    assert second.returncode == 0 and "replacing the rules installed before" in second.stdout
    assert saved(netns, v4) == once  # idempotent: not one rule more
    assert any("-s ::6/128" in line for line in saved(netns, v6))

    for _ in range(2):  # idempotent, and safe when nothing is there
        out = meshproxy("--cleanup", *flags)
        assert out.returncode == 0, out.stderr
    assert saved(netns, v4) == ["-A OUTPUT -p tcp -m tcp --dport 9999 -j RETURN"]
    assert saved(netns, v6) == []
    assert "nothing to remove" in out.stdout
