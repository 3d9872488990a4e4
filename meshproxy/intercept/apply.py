"""Install and remove the capture rules, idempotently, with iptables-restore.

Each change is one iptables-restore transaction per family, so a pod never runs with half of
the rules. Installing first deletes any jumps an earlier run left in PREROUTING/OUTPUT and
re-declares (flushes) the ISTIO_* chains, so applying twice leaves one set of rules; cleanup
deletes exactly those jumps and chains and nothing else, and does nothing when they are absent.
The backend (iptables-nft or iptables-legacy) is the one already holding rules in this
namespace, as istio-iptables chooses, else the system's default `iptables`.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from meshproxy.errors import MeshproxyError
from meshproxy.intercept.capture_config import CaptureConfig
from meshproxy.intercept.iptables import CHAINS, IPV4, IPV6, Family, render

logger = logging.getLogger(__name__)
BUILTIN_JUMP_CHAINS = ("PREROUTING", "OUTPUT")
IPV6_PASSTHROUGH_ADDRESS = "::6/128"  # bindable only once added to lo (unlike 127.0.0.6)


class CaptureError(MeshproxyError):
    """iptables could not be run or refused the rules; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Backend:
    variant: str  # "" (system default), "nft" or "legacy"

    def command(self, family: Family, action: str) -> str:
        middle = f"-{self.variant}" if self.variant else ""
        return f"{family.tool}{middle}-{action}"


class Runner:
    """Runs iptables tools, inside network namespace `netns` when given."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns

    def run(self, cmd: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        if shutil.which(cmd[0]) is None:
            raise CaptureError(f"{cmd[0]} not found; install the iptables package")
        full = ["ip", "netns", "exec", self.netns, *cmd] if self.netns else list(cmd)
        try:
            return subprocess.run(
                full, input=stdin, capture_output=True, text=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CaptureError(f"{' '.join(full)}: {exc}") from exc

    def ipv6_enabled(self) -> bool:
        """IPv6 is up in the namespace (an IPv6-disabled pod has no ip6tables nat to fill)."""
        out = self.run(["cat", "/proc/sys/net/ipv6/conf/all/disable_ipv6"])
        return out.returncode == 0 and out.stdout.strip() == "0"


def choose_backend(runner: Runner, requested: str) -> Backend:
    if requested in ("nft", "legacy"):
        return Backend(requested)
    counts = {}
    for variant in ("legacy", "nft"):
        tool = Backend(variant).command(IPV4, "save")
        if shutil.which(tool) is None:
            continue
        out = runner.run([tool])
        counts[variant] = sum(1 for line in out.stdout.splitlines() if line.startswith("-A "))
    if counts.get("legacy", 0) > 0 and counts.get("nft", 0) == 0:
        return Backend("legacy")
    return Backend("")


def saved_nat(runner: Runner, backend: Backend, family: Family) -> list[str]:
    out = runner.run([backend.command(family, "save"), "-t", "nat"])
    if out.returncode != 0:
        raise CaptureError(
            f"{backend.command(family, 'save')} failed: {out.stderr.strip() or out.returncode}"
        )
    return out.stdout.splitlines()


def our_jumps(saved: list[str]) -> list[str]:
    """Rules in PREROUTING/OUTPUT that jump to an ISTIO_* chain of ours, as saved."""
    jumps = []
    for line in saved:
        parts = line.split()
        if len(parts) < 3 or parts[0] != "-A" or parts[1] not in BUILTIN_JUMP_CHAINS:
            continue
        target = parts[parts.index("-j") + 1 :][:1] if "-j" in parts else []
        if target and target[0] in CHAINS:
            jumps.append(line)
    return jumps


def our_chains(saved: list[str]) -> list[str]:
    present = {line[1:].split()[0] for line in saved if line.startswith(":")}
    return [c for c in CHAINS if c in present]


def install_document(cfg: CaptureConfig, family: Family, saved: list[str]) -> str:
    """Delete old jumps, (re)declare the chains (which flushes them), append the rules."""
    lines = ["*nat"]
    lines += ["-D" + jump[2:] for jump in our_jumps(saved)]
    lines += [f":{c} - [0:0]" for c in CHAINS]
    lines += render(cfg, family).rules
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def cleanup_document(saved: list[str]) -> str | None:
    """Delete our jumps and chains; None when there is nothing of ours."""
    jumps, chains = our_jumps(saved), our_chains(saved)
    if not jumps and not chains:
        return None
    lines = ["*nat", *("-D" + jump[2:] for jump in jumps)]
    lines += [f":{c} - [0:0]" for c in chains]  # flush first: a chain must be empty to go
    lines += [f"-X {c}" for c in chains]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _restore(runner: Runner, backend: Backend, family: Family, document: str) -> None:
    tool = backend.command(family, "restore")
    out = runner.run([tool, "--noflush"], stdin=document)
    if out.returncode != 0:
        raise CaptureError(f"{tool} refused the rules: {out.stderr.strip()}")


def families_for(runner: Runner, ipv6: str) -> tuple[Family, ...]:
    if ipv6 == "off" or (ipv6 == "auto" and not runner.ipv6_enabled()):
        return (IPV4,)
    return (IPV4, IPV6)


def apply(
    cfg: CaptureConfig, netns: str | None = None, backend: str = "auto", ipv6: str = "auto"
) -> list[str]:
    """Install the rules; returns one line per family saying what was done."""
    runner = Runner(netns)
    chosen = choose_backend(runner, backend)
    done = []
    for family in families_for(runner, ipv6):
        saved = saved_nat(runner, chosen, family)
        replaced = len(our_jumps(saved))
        if family is IPV6 and cfg.captures_inbound:
            _add_ipv6_passthrough_address(runner)
        _restore(runner, chosen, family, install_document(cfg, family, saved))
        count = len(render(cfg, family).rules)
        note = " (replacing the rules installed before)" if replaced else ""
        done.append(f"{chosen.command(family, 'restore')}: {count} rules installed{note}")
    return done


def cleanup(netns: str | None = None, backend: str = "auto", ipv6: str = "auto") -> list[str]:
    """Remove what apply() installed; safe to run when nothing is there."""
    runner = Runner(netns)
    chosen = choose_backend(runner, backend)
    done = []
    for family in families_for(runner, ipv6):
        saved = saved_nat(runner, chosen, family)
        document = cleanup_document(saved)
        if family is IPV6:
            runner.run(["ip", "-6", "addr", "del", IPV6_PASSTHROUGH_ADDRESS, "dev", "lo"])
        if document is None:
            done.append(f"{family.tool}: nothing to remove")
            continue
        _restore(runner, chosen, family, document)
        done.append(
            f"{family.tool}: removed {len(our_jumps(saved))} jumps and "
            f"{len(our_chains(saved))} chains"
        )
    return done


def _add_ipv6_passthrough_address(runner: Runner) -> None:
    out = runner.run(["ip", "-6", "addr", "add", IPV6_PASSTHROUGH_ADDRESS, "dev", "lo"])
    if out.returncode != 0 and not any(w in out.stderr.lower() for w in ("exists", "already")):
        raise CaptureError(f"adding {IPV6_PASSTHROUGH_ADDRESS} to lo failed: {out.stderr.strip()}")
