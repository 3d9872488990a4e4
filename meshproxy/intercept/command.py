"""`meshproxy iptables`: istio-iptables' flags and environment, plus --apply/--cleanup."""

from __future__ import annotations

import argparse
import os
import sys

from meshproxy.intercept.capture_config import SETTINGS, CaptureConfigError, resolve

EPILOG = """\
Every flag can also come from its environment variable (shown with the flag); a flag beats
the variable. Defaults are the values Istio's sidecar injector passes to istio-iptables.
Without --apply or --cleanup the rules are printed (iptables-restore documents, IPv4 then
IPv6) and nothing is changed.
"""


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    for s in SETTINGS:
        names = [f"-{s.short}", f"--{s.long}"] if s.short else [f"--{s.long}"]
        default = s.default if s.default else "''" if s.long != "proxy-gid" else "the UIDs"
        parser.add_argument(
            *names,
            dest=s.long,
            metavar="VALUE",
            default=None,
            help=f"{s.help} (default: {default}; env {s.env})",
        )
    action = parser.add_mutually_exclusive_group()
    action.add_argument(
        "--apply", action="store_true", help="install the rules (replacing earlier ones)"
    )
    action.add_argument(
        "--cleanup", action="store_true", help="remove the rules --apply installed, if any"
    )
    action.add_argument(
        "-n",
        "--dry-run",
        action="store_true",
        help="print the rules and change nothing (what happens without --apply/--cleanup)",
    )
    parser.add_argument("--netns", help="act inside this network namespace (ip netns)")
    parser.add_argument(
        "--iptables-backend",
        choices=("auto", "nft", "legacy"),
        default="auto",
        help="auto: the one already holding rules here, else the system's iptables",
    )
    parser.add_argument(
        "--ipv6",
        choices=("auto", "on", "off"),
        default="auto",
        help="ip6tables rules too; auto: when IPv6 is enabled in the namespace",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from meshproxy.intercept.apply import CaptureError, apply, cleanup
    from meshproxy.intercept.iptables import render_text

    try:
        cfg = resolve({s.long: getattr(args, s.long) for s in SETTINGS}, os.environ)
    except CaptureConfigError as exc:
        print(f"meshproxy iptables: {exc}", file=sys.stderr)
        return 2
    dry_run = args.dry_run or os.environ.get("DRY_RUN", "").lower() in ("1", "true")
    try:
        if args.cleanup and not dry_run:
            lines = cleanup(args.netns, args.iptables_backend, args.ipv6)
        elif args.apply and not dry_run:
            lines = apply(cfg, args.netns, args.iptables_backend, args.ipv6)
        else:
            print(render_text(cfg), end="")
            return 0
    except CaptureError as exc:
        print(f"meshproxy iptables: {exc}", file=sys.stderr)
        return 1
    for line in lines:
        print(line)
    return 0
