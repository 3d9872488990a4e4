"""Command line: run, validate, demo, iptables, ca, version."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from meshproxy import __version__


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _run_loop(coro_factory: object) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep running without it
        return int(asyncio.run(coro_factory()))  # type: ignore[operator]
    return int(uvloop.run(coro_factory()))  # type: ignore[operator]


def cmd_run(args: argparse.Namespace) -> int:
    from meshproxy.collector import freeze_startup_heap, without_collection
    from meshproxy.config.loader import load_snapshot
    from meshproxy.errors import ConfigError
    from meshproxy.observe.accesslog import AccessLogError
    from meshproxy.runtime import Runtime

    path = Path(args.config)
    try:
        snapshot = without_collection(lambda: load_snapshot(path))
    except ConfigError as exc:
        print(
            f"meshproxy: refusing to start, the config has {len(exc.issues)} problem(s):",
            file=sys.stderr,
        )
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return 2

    from meshproxy.workers import fork_workers, worker_count

    freeze_startup_heap()
    role = fork_workers(worker_count(snapshot.settings.concurrency))

    async def main() -> int:
        try:
            return await Runtime(path, snapshot, role).run()
        except AccessLogError as exc:
            print(f"meshproxy: cannot start: {exc}", file=sys.stderr)
            return 3
        except OSError as exc:
            print(f"meshproxy: cannot start: {exc}", file=sys.stderr)
            return 3

    return _run_loop(main)


def cmd_validate(args: argparse.Namespace) -> int:
    from meshproxy.config.loader import load_snapshot
    from meshproxy.errors import ConfigError

    try:
        snapshot = load_snapshot(Path(args.config))
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue)
        print(f"{len(exc.issues)} problem(s) found", file=sys.stderr)
        return 1
    for w in snapshot.warnings:
        print(f"warning: {w}")
    print(
        f"{args.config}: OK ({len(snapshot.listeners)} listeners, "
        f"{len(snapshot.clusters)} clusters)"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from meshproxy.demo.run import run_demo

    return _run_loop(lambda: run_demo(requests=args.requests, linger=args.linger))


def cmd_iptables(args: argparse.Namespace) -> int:
    from meshproxy.intercept.iptables import CaptureSpec, apply_rules, render_rules

    spec = CaptureSpec(
        proxy_uid=args.proxy_uid,
        proxy_gid=args.proxy_gid,
        outbound_port=args.outbound_port,
        inbound_port=args.inbound_port,
        exclude_inbound_ports=tuple(args.exclude_inbound_ports),
        exclude_outbound_ports=tuple(args.exclude_outbound_ports),
        include_outbound_cidrs=tuple(args.include_outbound_cidrs),
        capture_inbound=not args.no_inbound,
    )
    if not args.apply:
        print(render_rules(spec), end="")
        return 0
    try:
        apply_rules(spec, args.netns)
    except (RuntimeError, OSError) as exc:
        print(f"meshproxy iptables: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # CalledProcessError: iptables printed why
        print(f"meshproxy iptables: iptables-restore failed: {exc}", file=sys.stderr)
        return 1
    return 0


def _ports(text: str) -> list[int]:
    try:
        ports = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ports, got {text!r}") from None
    if any(not 0 < p < 65536 for p in ports):
        raise argparse.ArgumentTypeError(f"ports must be 1-65535, got {text!r}")
    return ports


def _duration(text: str) -> float:
    from meshproxy.config.reader import parse_duration

    seconds = parse_duration(text)
    if seconds is None or seconds <= 0:
        raise argparse.ArgumentTypeError(f"expected a duration like 24h or 90m, got {text!r}")
    return seconds


def cmd_ca_init(args: argparse.Namespace) -> int:
    import datetime as dt

    from meshproxy.security.ca import CaError, init_ca

    try:
        root = init_ca(
            Path(args.dir), args.trust_domain, dt.timedelta(seconds=args.ttl), args.algorithm
        )
    except (CaError, OSError) as exc:
        print(f"meshproxy ca init: {exc}", file=sys.stderr)
        return 1
    print(
        f"root CA for trust domain {args.trust_domain} in {args.dir} "
        f"(valid until {root.cert.not_valid_after_utc.isoformat()})"
    )
    return 0


def cmd_ca_issue(args: argparse.Namespace) -> int:
    import datetime as dt

    from meshproxy.security.ca import CaError, issue_workload, load_root, write_workload
    from meshproxy.security.spiffe import SpiffeError, SpiffeId

    try:
        spiffe = SpiffeId.parse(args.spiffe_id)
        root = load_root(Path(args.ca))
        cert, key = issue_workload(
            root,
            spiffe,
            dt.timedelta(seconds=args.ttl),
            dns_names=tuple(args.dns or ()),
            algorithm=args.algorithm,
        )
        write_workload(Path(args.out), cert, key, [root.cert])
    except (CaError, SpiffeError, OSError, ValueError) as exc:
        print(f"meshproxy ca issue: {exc}", file=sys.stderr)
        return 1
    print(f"{spiffe} in {args.out} (valid until {cert.not_valid_after_utc.isoformat()})")
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    from meshproxy.buildinfo import describe

    print(f"meshproxy {__version__} (hot path {describe()})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshproxy", description=__doc__)
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the proxy with a config file or directory")
    p.add_argument("-c", "--config", required=True, help="YAML file or directory of YAML files")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("validate", help="check a config and print every problem")
    p.add_argument("config")
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("demo", help="start demo backends and the proxy, drive traffic, report")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--linger", type=float, default=20.0, help="seconds to keep serving")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("iptables", help="print (or --apply) Istio's REDIRECT capture rules")
    p.add_argument("--apply", action="store_true", help="load them with iptables-restore")
    p.add_argument("--netns", help="with --apply: inside this network namespace")
    p.add_argument("--proxy-uid", type=int, default=1337)
    p.add_argument("--proxy-gid", type=int, default=1337)
    p.add_argument("--outbound-port", type=int, default=15001)
    p.add_argument("--inbound-port", type=int, default=15006)
    p.add_argument("--exclude-inbound-ports", type=_ports, default=[15000, 15020, 15021, 15090])
    p.add_argument("--exclude-outbound-ports", type=_ports, default=[])
    p.add_argument("--include-outbound-cidrs", type=lambda s: s.split(","), default=["0.0.0.0/0"])
    p.add_argument("--no-inbound", action="store_true", help="capture outbound traffic only")
    p.set_defaults(func=cmd_iptables)
    p = sub.add_parser("ca", help="a development mesh CA: init a root, issue workload certs")
    ca = p.add_subparsers(dest="ca_command", required=True)
    q = ca.add_parser("init", help="create a root CA (root-cert.pem, root-key.pem) in --dir")
    q.add_argument("--dir", required=True)
    q.add_argument("--trust-domain", default="cluster.local")
    q.add_argument("--ttl", type=_duration, default=_duration("87600h"), help="e.g. 87600h")
    q.add_argument("--algorithm", choices=["ecdsa", "rsa"], default="ecdsa")
    q.set_defaults(func=cmd_ca_init)
    q = ca.add_parser("issue", help="issue a SPIFFE workload cert in Istio's file layout")
    q.add_argument("--ca", required=True, help="the directory `ca init` wrote")
    q.add_argument(
        "--spiffe-id", required=True, help="e.g. spiffe://cluster.local/ns/default/sa/reviews"
    )
    q.add_argument("--out", required=True, help="writes cert-chain.pem, key.pem, root-cert.pem")
    q.add_argument("--ttl", type=_duration, default=_duration("24h"))
    q.add_argument("--dns", action="append", help="an extra DNS SAN (repeatable)")
    q.add_argument("--algorithm", choices=["ecdsa", "rsa"], default="ecdsa")
    q.set_defaults(func=cmd_ca_issue)
    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=cmd_version)
    args = parser.parse_args(argv)
    _configure_logging(args.log_level)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
