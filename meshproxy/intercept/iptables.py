"""Istio's REDIRECT-mode nat rules (istio-iptables), as an iptables-restore document.

Rule order and chain names follow istio/istio tools/istio-iptables, so people who know Istio's
rules can read these: the proxy's own UID/GID is exempt, 127.0.0.6 marks the inbound
passthrough's connections to the app, and the proxy's ports are excluded from capture.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CaptureSpec:
    proxy_uid: int = 1337
    proxy_gid: int = 1337
    outbound_port: int = 15001
    inbound_port: int = 15006
    exclude_inbound_ports: tuple[int, ...] = (15000, 15020, 15021, 15090)
    exclude_outbound_ports: tuple[int, ...] = ()
    include_outbound_cidrs: tuple[str, ...] = ("0.0.0.0/0",)
    capture_inbound: bool = True


def render_rules(spec: CaptureSpec) -> str:
    """The nat table for `iptables-restore --noflush`."""
    uid, gid = spec.proxy_uid, spec.proxy_gid
    lines = ["*nat"]
    for chain in ("ISTIO_INBOUND", "ISTIO_REDIRECT", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT"):
        lines.append(f":{chain} - [0:0]")
    lines.append(f"-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports {spec.inbound_port}")
    lines.append(f"-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {spec.outbound_port}")
    if spec.capture_inbound:
        lines.append("-A PREROUTING -p tcp -j ISTIO_INBOUND")
        lines.append("-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN")
        for port in spec.exclude_inbound_ports:
            lines.append(f"-A ISTIO_INBOUND -p tcp --dport {port} -j RETURN")
        lines.append("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT")
    lines.append("-A OUTPUT -p tcp -j ISTIO_OUTPUT")
    for port in spec.exclude_outbound_ports:
        lines.append(f"-A ISTIO_OUTPUT -p tcp --dport {port} -j RETURN")
    lines += [
        "-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN",
        f"-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner "
        f"{uid} -j ISTIO_IN_REDIRECT",
        f"-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner {uid} -j RETURN",
        f"-A ISTIO_OUTPUT -m owner --uid-owner {uid} -j RETURN",
        f"-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner "
        f"{gid} -j ISTIO_IN_REDIRECT",
        f"-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner {gid} -j RETURN",
        f"-A ISTIO_OUTPUT -m owner --gid-owner {gid} -j RETURN",
        "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN",
    ]
    for cidr in spec.include_outbound_cidrs:
        lines.append(f"-A ISTIO_OUTPUT -d {cidr} -j ISTIO_REDIRECT")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def apply_rules(spec: CaptureSpec, netns: str | None = None) -> None:
    """Load the rules with iptables-restore (in network namespace `netns` if given)."""
    restore = shutil.which("iptables-restore")
    if restore is None:
        raise RuntimeError("iptables-restore not found; install the iptables package")
    cmd: Sequence[str] = [restore, "--noflush"]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    subprocess.run(cmd, input=render_rules(spec).encode(), check=True, timeout=30)
