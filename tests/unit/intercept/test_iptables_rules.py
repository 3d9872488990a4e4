"""The rendered capture rules, one golden file per istio-iptables flag.

The golden files were checked line by line against istio/istio's own
tools/istio-iptables/pkg/capture/testdata/*.golden for the same flags (REDIRECT mode, rules in
the same order, multiport for several ports). Regenerate with MESHPROXY_UPDATE_GOLDEN=1 and
review the diff.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from meshproxy.intercept.capture_config import CaptureConfigError, resolve
from meshproxy.intercept.iptables import render_text

GOLDEN = Path(__file__).parent / "golden"

CASES: dict[str, dict[str, str]] = {
    "injector-defaults": {},
    "capture-nothing": {"istio-service-cidr": "", "istio-inbound-ports": ""},
    "envoy-port": {"envoy-port": "15101"},
    "inbound-capture-port": {"inbound-capture-port": "15106"},
    "inbound-tunnel-port": {"inbound-tunnel-port": "15108"},
    "proxy-uid-gid": {"proxy-uid": "3,4", "proxy-gid": "1,2"},
    "proxy-uid-only": {"proxy-uid": "1001"},
    "inbound-ports": {"istio-inbound-ports": "4000,5000"},
    "inbound-wildcard-exclude": {"istio-local-exclude-ports": "22,80,443"},
    "inbound-wildcard-exclude-single": {"istio-local-exclude-ports": "22"},
    "inbound-exclude-many": {
        "istio-local-exclude-ports": ",".join(str(p) for p in range(9000, 9017))
    },
    "service-cidr": {"istio-service-cidr": "10.0.0.0/8,fd00::/16"},
    "service-exclude-cidr": {"istio-service-exclude-cidr": "1.1.0.0/16,fd01::/16"},
    "outbound-ports-include": {"istio-service-cidr": "", "istio-outbound-ports": "32000,31000"},
    "outbound-ports-exclude": {"istio-local-outbound-ports-exclude": "22,80,443"},
    "outbound-ports-exclude-single": {"istio-local-outbound-ports-exclude": "22"},
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_rules_match_golden(name: str) -> None:
    text = render_text(resolve(CASES[name], {}))
    path = GOLDEN / f"{name}.golden"
    if os.environ.get("MESHPROXY_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text()


def test_istio_rules_as_istio_writes_them() -> None:
    """The lines Istio's golden files hold for the injector's flags, verbatim."""
    rules = render_text(resolve({}, {})).split("# ip6tables")[0].splitlines()
    start = rules.index("-A OUTPUT -j ISTIO_OUTPUT")
    assert rules[start:] == [
        "-A OUTPUT -j ISTIO_OUTPUT",
        "-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN",
        "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner "
        "1337 -j ISTIO_IN_REDIRECT",
        "-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
        "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner "
        "1337 -j ISTIO_IN_REDIRECT",
        "-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN",
        "-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN",
        "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN",
        "-A ISTIO_OUTPUT -j ISTIO_REDIRECT",
        "COMMIT",
    ]


def test_environment_variables_and_flag_precedence() -> None:
    env = {"ISTIO_INBOUND_PORTS": "8080", "ENVOY_PORT": "16001", "PROXY_UID": "7"}
    cfg = resolve({}, env)
    assert cfg.inbound_ports == (8080,) and not cfg.capture_all_inbound
    assert cfg.envoy_port == 16001 and cfg.proxy_uids == ("7",) and cfg.proxy_gids == ("7",)
    cfg = resolve({"istio-inbound-ports": "*", "envoy-port": "15001"}, env)
    assert cfg.capture_all_inbound and cfg.envoy_port == 15001


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"istio-inbound-interception-mode": "TPROXY"}, "TPROXY is not supported"),
        ({"istio-inbound-interception-mode": "MAGIC"}, "is not REDIRECT or TPROXY"),
        ({"envoy-port": "70000"}, "--envoy-port: '70000' is not a port"),
        ({"istio-inbound-ports": "80,http"}, "--istio-inbound-ports: 'http' is not a port"),
        ({"istio-service-cidr": "10.0.0.0/33"}, "'10.0.0.0/33' is not a CIDR"),
        ({"istio-service-exclude-cidr": "*"}, "'*' is not allowed"),
        ({"proxy-uid": "istio-proxy"}, "'istio-proxy' is not a numeric id"),
    ],
)
def test_bad_values_are_refused_by_name(flags: dict[str, str], message: str) -> None:
    with pytest.raises(CaptureConfigError, match=message.replace("*", r"\*").replace("(", r"\(")):
        resolve(flags, {})


def test_cli_prints_rules_and_refuses_bad_flags() -> None:
    def meshproxy(
        *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "meshproxy", "iptables", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, **(env or {})},
        )

    out = meshproxy("-p", "15101", "--istio-inbound-ports", "4000,5000")
    assert out.returncode == 0
    assert "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15101" in out.stdout.splitlines()
    assert "-A ISTIO_INBOUND -p tcp --dport 5000 -j ISTIO_IN_REDIRECT" in out.stdout.splitlines()
    out = meshproxy(env={"ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE": "22"})
    assert "-A ISTIO_OUTPUT -p udp --dport 22 -j RETURN" in out.stdout.splitlines()
    out = meshproxy("-m", "TPROXY")
    assert out.returncode == 2 and "TPROXY is not supported" in out.stderr
    assert out.stdout == ""
