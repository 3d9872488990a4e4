"""What to capture, read as istio-iptables reads it: its flags, its environment variables, and
the values Istio's sidecar injector passes by default.

Each setting has istio-iptables' long flag, short flag and environment variable (viper's
AutomaticEnv: the long flag upper-cased with '-' as '_'); a flag beats the variable, the
variable beats the default. The defaults are what Istio's injector passes to its init container
(`-p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x '' -b '*' -d 15090,15021,15020`), so a bare
`meshproxy iptables --apply` sets up a standard pod; istio-iptables itself defaults -i and -b to
empty (capture nothing), which `-i '' -b ''` still gives.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from meshproxy.errors import MeshproxyError

WILDCARD = "*"


class CaptureConfigError(MeshproxyError):
    """A flag or environment value istio-iptables would refuse, with its name."""


@dataclass(frozen=True, slots=True)
class Setting:
    long: str  # istio-iptables' long flag, without dashes
    short: str | None
    default: str
    help: str

    @property
    def env(self) -> str:
        return self.long.upper().replace("-", "_")


SETTINGS: tuple[Setting, ...] = (
    Setting("envoy-port", "p", "15001", "port outbound TCP is redirected to"),
    Setting("inbound-capture-port", "z", "15006", "port inbound TCP is redirected to"),
    Setting("inbound-tunnel-port", "e", "15008", "tunnel port, never redirected"),
    Setting("proxy-uid", "u", "1337", "comma-separated UIDs whose traffic is not captured"),
    Setting("proxy-gid", "g", "", "comma-separated GIDs whose traffic is not captured"),
    Setting("istio-inbound-interception-mode", "m", "REDIRECT", "inbound mode (REDIRECT only)"),
    Setting("istio-service-cidr", "i", WILDCARD, "outbound CIDRs to capture ('*': all, '': none)"),
    Setting("istio-service-exclude-cidr", "x", "", "outbound CIDRs never captured"),
    Setting("istio-inbound-ports", "b", WILDCARD, "inbound ports to capture ('*': all, '': none)"),
    Setting(
        "istio-local-exclude-ports",
        "d",
        "15090,15021,15020",
        "inbound ports not captured when -b is '*'",
    ),
    Setting("istio-outbound-ports", "q", "", "outbound ports always captured"),
    Setting(
        "istio-local-outbound-ports-exclude", "o", "", "outbound destination ports not captured"
    ),
)
SETTING_BY_NAME = {s.long: s for s in SETTINGS}


@dataclass(frozen=True, slots=True)
class CaptureConfig:
    """A validated capture configuration (istio-iptables' Config, REDIRECT mode)."""

    envoy_port: int = 15001
    inbound_capture_port: int = 15006
    inbound_tunnel_port: int = 15008
    proxy_uids: tuple[str, ...] = ("1337",)
    proxy_gids: tuple[str, ...] = ("1337",)
    capture_all_inbound: bool = True
    inbound_ports: tuple[int, ...] = ()  # when not all
    local_exclude_ports: tuple[int, ...] = (15090, 15021, 15020)
    capture_all_outbound: bool = True
    service_cidrs: tuple[str, ...] = ()  # when not all
    service_exclude_cidrs: tuple[str, ...] = ()
    outbound_ports: tuple[int, ...] = ()
    outbound_exclude_ports: tuple[int, ...] = ()
    values: Mapping[str, str] = field(default_factory=dict, compare=False)

    @property
    def captures_inbound(self) -> bool:
        return self.capture_all_inbound or bool(self.inbound_ports)


def resolve(flags: Mapping[str, str | None], environ: Mapping[str, str]) -> CaptureConfig:
    """Flag, else environment variable, else default; then validated."""
    values: dict[str, str] = {}
    for s in SETTINGS:
        flag = flags.get(s.long)
        if flag is not None:
            values[s.long] = flag
        elif s.env in environ:
            values[s.long] = environ[s.env]
        else:
            values[s.long] = s.default
    return _validate(values)


def _validate(v: dict[str, str]) -> CaptureConfig:
    mode = v["istio-inbound-interception-mode"].strip() or "REDIRECT"
    if mode.upper() == "TPROXY":
        raise CaptureConfigError(
            "--istio-inbound-interception-mode TPROXY is not supported; meshproxy captures "
            "inbound traffic with REDIRECT"
        )
    if mode.upper() != "REDIRECT":
        raise CaptureConfigError(
            f"--istio-inbound-interception-mode: {mode!r} is not REDIRECT or TPROXY"
        )
    uids = _ids(v, "proxy-uid")
    if not uids:
        raise CaptureConfigError("--proxy-uid: at least one UID is needed")
    gids = _ids(v, "proxy-gid") or uids
    inbound = v["istio-inbound-ports"].strip()
    cidrs = v["istio-service-cidr"].strip()
    excluded = _cidrs(v, "istio-service-exclude-cidr")
    if WILDCARD in excluded:
        raise CaptureConfigError("--istio-service-exclude-cidr: '*' is not allowed")
    return CaptureConfig(
        envoy_port=_port(v, "envoy-port", v["envoy-port"]),
        inbound_capture_port=_port(v, "inbound-capture-port", v["inbound-capture-port"]),
        inbound_tunnel_port=_port(v, "inbound-tunnel-port", v["inbound-tunnel-port"]),
        proxy_uids=uids,
        proxy_gids=gids,
        capture_all_inbound=inbound == WILDCARD,
        inbound_ports=() if inbound == WILDCARD else _ports(v, "istio-inbound-ports"),
        local_exclude_ports=_ports(v, "istio-local-exclude-ports"),
        capture_all_outbound=cidrs == WILDCARD,
        service_cidrs=() if cidrs == WILDCARD else _cidrs(v, "istio-service-cidr"),
        service_exclude_cidrs=excluded,
        outbound_ports=_ports(v, "istio-outbound-ports"),
        outbound_exclude_ports=_ports(v, "istio-local-outbound-ports-exclude"),
        values=dict(v),
    )


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _port(v: dict[str, str], name: str, text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise CaptureConfigError(f"--{name}: {text.strip()!r} is not a port (1-65535)")
    return port


def _ports(v: dict[str, str], name: str) -> tuple[int, ...]:
    return tuple(_port(v, name, item) for item in _items(v[name]))


def _ids(v: dict[str, str], name: str) -> tuple[str, ...]:
    ids = _items(v[name])
    for item in ids:
        if not item.isdigit():
            raise CaptureConfigError(f"--{name}: {item!r} is not a numeric id")
    return tuple(ids)


def _cidrs(v: dict[str, str], name: str) -> tuple[str, ...]:
    out: list[str] = []
    for item in _items(v[name]):
        if item == WILDCARD:
            out.append(item)
            continue
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise CaptureConfigError(f"--{name}: {item!r} is not a CIDR") from None
    return tuple(out)
