"""Istio's REDIRECT-mode nat rules (istio-iptables), for IPv4 and IPv6.

Rule order and chain names follow istio/istio tools/istio-iptables, so people who know Istio's
rules can read these: the proxy's own UID/GID is exempt, 127.0.0.6 (::6) marks the inbound
passthrough's connections to the app, the tunnel port 15008 is never redirected, and the
proxy's own ports are excluded from inbound capture.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from meshproxy.intercept.capture_config import CaptureConfig

CHAINS = ("ISTIO_INBOUND", "ISTIO_REDIRECT", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT")
MULTIPORT_MAX = 15  # the multiport match takes at most 15 ports


@dataclass(frozen=True, slots=True)
class Family:
    name: str  # "ipv4" / "ipv6"
    tool: str  # iptables / ip6tables
    passthrough_source: str  # the inbound passthrough's bind address (Istio's loop guard)
    loopback: str
    version: int


IPV4 = Family("ipv4", "iptables", "127.0.0.6/32", "127.0.0.1/32", 4)
IPV6 = Family("ipv6", "ip6tables", "::6/128", "::1/128", 6)


@dataclass(frozen=True, slots=True)
class RuleSet:
    """The nat table's rules for one family: `-A CHAIN ...` lines, in order."""

    family: Family
    rules: tuple[str, ...]

    def restore_text(self) -> str:
        """An iptables-restore document that creates the chains and appends the rules."""
        lines = ["*nat", *(f":{c} - [0:0]" for c in CHAINS), *self.rules, "COMMIT"]
        return "\n".join(lines) + "\n"


def _port_match(ports: tuple[int, ...], proto: str, negate: bool = False) -> list[str]:
    """`-p tcp --dport N` for one port, `-m multiport --dports a,b` for several (15 at most
    per rule, as multiport allows)."""
    bang = "! " if negate else ""
    if len(ports) == 1:
        return [f"-p {proto} {bang}--dport {ports[0]}"]
    return [
        f"-p {proto} -m multiport {bang}--dports "
        + ",".join(str(p) for p in ports[i : i + MULTIPORT_MAX])
        for i in range(0, len(ports), MULTIPORT_MAX)
    ]


def _of_family(cidrs: tuple[str, ...], family: Family) -> list[str]:
    return [c for c in cidrs if ipaddress.ip_network(c).version == family.version]


def render(cfg: CaptureConfig, family: Family) -> RuleSet:
    rules: list[str] = []
    add = rules.append
    add(f"-A ISTIO_INBOUND -p tcp --dport {cfg.inbound_tunnel_port} -j RETURN")
    add(f"-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {cfg.envoy_port}")
    add(f"-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports {cfg.inbound_capture_port}")
    if cfg.captures_inbound:
        add("-A PREROUTING -p tcp -j ISTIO_INBOUND")
        if cfg.capture_all_inbound:
            if cfg.local_exclude_ports:
                for match in _port_match(cfg.local_exclude_ports, "tcp"):
                    add(f"-A ISTIO_INBOUND {match} -j RETURN")
            add("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT")
        else:
            for port in cfg.inbound_ports:
                add(f"-A ISTIO_INBOUND -p tcp --dport {port} -j ISTIO_IN_REDIRECT")
    add("-A OUTPUT -j ISTIO_OUTPUT")
    if cfg.outbound_exclude_ports:
        for proto in ("tcp", "udp"):
            for match in _port_match(cfg.outbound_exclude_ports, proto):
                add(f"-A ISTIO_OUTPUT {match} -j RETURN")
    add(f"-A ISTIO_OUTPUT -o lo -s {family.passthrough_source} -j RETURN")
    tunnel = cfg.inbound_tunnel_port
    for kind, ids in (("uid", cfg.proxy_uids), ("gid", cfg.proxy_gids)):
        for owner in ids:
            # The proxy calling its own pod through a VIP: to the inbound side.
            add(
                f"-A ISTIO_OUTPUT -o lo ! -d {family.loopback} -p tcp ! --dport {tunnel} "
                f"-m owner --{kind}-owner {owner} -j ISTIO_IN_REDIRECT"
            )
            # The app calling itself over lo: untouched.
            add(f"-A ISTIO_OUTPUT -o lo -m owner ! --{kind}-owner {owner} -j RETURN")
            # Anything else the proxy sends: never back into the proxy.
            add(f"-A ISTIO_OUTPUT -m owner --{kind}-owner {owner} -j RETURN")
    add(f"-A ISTIO_OUTPUT -d {family.loopback} -j RETURN")
    for cidr in _of_family(cfg.service_exclude_cidrs, family):
        add(f"-A ISTIO_OUTPUT -d {cidr} -j RETURN")
    for port in cfg.outbound_ports:
        add(f"-A ISTIO_OUTPUT -p tcp --dport {port} -j ISTIO_REDIRECT")
    if cfg.capture_all_outbound:
        add("-A ISTIO_OUTPUT -j ISTIO_REDIRECT")
    else:
        for cidr in _of_family(cfg.service_cidrs, family):
            add(f"-A ISTIO_OUTPUT -d {cidr} -j ISTIO_REDIRECT")
    return RuleSet(family, tuple(rules))


def render_text(cfg: CaptureConfig, families: tuple[Family, ...] = (IPV4, IPV6)) -> str:
    """What `meshproxy iptables` prints: one iptables-restore document per family."""
    parts = []
    for family in families:
        parts.append(f"# {family.tool}-restore --noflush ({family.name})\n")
        parts.append(render(cfg, family).restore_text())
    return "".join(parts)
