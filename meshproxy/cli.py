"""Command line: run, validate, demo, bench, iptables, wait, inject, ca, version."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import os
import sys
from pathlib import Path
from typing import TextIO

from meshproxy import __version__
from meshproxy.errors import ConfigError


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
    from meshproxy.observe.accesslog import AccessLogError
    from meshproxy.runtime import Runtime

    path = Path(args.config)
    loaded = hashlib.sha256()
    try:
        snapshot = without_collection(lambda: load_snapshot(path, loaded))
    except ConfigError as exc:
        print(
            f"meshproxy: refusing to start, the config has {len(exc.issues)} problem(s):",
            file=sys.stderr,
        )
        _print_config_error(exc, sys.stderr)
        return 2

    from meshproxy.workers import fork_workers, worker_count

    freeze_startup_heap()
    role = fork_workers(worker_count(snapshot.settings.concurrency))

    async def main() -> int:
        try:
            return await Runtime(path, snapshot, role, loaded.digest()).run()
        except AccessLogError as exc:
            print(f"meshproxy: cannot start: {exc}", file=sys.stderr)
            return 3
        except OSError as exc:
            print(f"meshproxy: cannot start: {exc}", file=sys.stderr)
            return 3

    code = _run_loop(main)
    # Drain flushed what matters (access logs written, spans exported). Left are the file
    # watchers' threads, which notice the stop only at their next step (up to 250 ms): the
    # process exits now rather than wait for them.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _print_config_error(exc: ConfigError, file: TextIO) -> None:
    for issue in exc.issues:
        print(f"  {issue}" if file is sys.stderr else issue, file=file)
    if exc.withheld:
        print(
            f"({exc.withheld} cross-reference problem(s) not shown: they may follow from the "
            "above; fix those first)",
            file=file,
        )


def cmd_validate(args: argparse.Namespace) -> int:
    from meshproxy.config.loader import load_snapshot
    from meshproxy.config.source import config_roots

    failed = 0
    for arg in args.config:
        roots = config_roots(Path(arg))
        if not roots:
            print(f"{arg}: no *.yaml files found (in it or in any directory below it)")
            failed += 1
        for root in roots:
            try:
                snapshot = load_snapshot(root)
            except ConfigError as exc:
                _print_config_error(exc, sys.stdout)
                print(f"{root}: {len(exc.issues)} problem(s) found")
                failed += 1
                continue
            for w in snapshot.warnings:
                print(f"warning: {w}")
            print(
                f"{root}: OK ({len(snapshot.listeners)} listeners, "
                f"{len(snapshot.clusters)} clusters)"
            )
    return 1 if failed else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from meshproxy.demo.run import run_demo

    return _run_loop(lambda: run_demo(requests=args.requests, linger=args.linger))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


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


def cmd_bench(args: argparse.Namespace) -> int:
    from meshproxy.bench.harness import main as bench

    return bench(args)


def cmd_version(args: argparse.Namespace) -> int:
    from meshproxy.buildinfo import describe

    print(f"meshproxy {__version__} (hot path {describe()})")
    return 0


EXIT_CODES = """\
exit codes:
  0  success (run: a clean shutdown after SIGTERM or POST /quitquitquit)
  1  validate found problems; iptables, inject, ca or demo failed; wait gave up
  2  a usage error (bad flag or value); run refused an invalid config
  3  run could not start (a port in use, an access log that cannot be opened, ...)
"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default in its help (where it has one), epilogs kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default in (None, False, [], argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def _sub(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, text: str
) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=text, description=text, formatter_class=_HelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    from meshproxy.inject.command import add_parser as add_inject_parser
    from meshproxy.intercept.command import add_parser as add_iptables_parser
    from meshproxy.wait import add_parser as add_wait_parser

    parser = argparse.ArgumentParser(
        prog="meshproxy",
        description="A service-mesh sidecar proxy that reads Istio's resource YAML.",
        epilog=EXIT_CODES,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"meshproxy {__version__}", help="print the version"
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (stderr)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _sub(sub, "run", "run the proxy with a config file or directory (watched for changes)")
    p.add_argument(
        "-c", "--config", required=True, help="a YAML file, or a directory of *.yaml files"
    )
    p.set_defaults(func=cmd_run)

    p = _sub(sub, "validate", "check configs and print every problem with file:line")
    p.add_argument(
        "config",
        nargs="+",
        help="YAML files or directories; a directory without YAML files of its own is "
        "searched for directories that have some, each validated as one config",
    )
    p.set_defaults(func=cmd_validate)

    p = _sub(sub, "demo", "start demo backends and the proxy, drive traffic, report")
    p.add_argument("--requests", type=_positive_int, default=200, help="requests to send")
    p.add_argument(
        "--linger",
        type=float,
        default=20.0,
        help="seconds to keep serving after the report, for a look at the admin port "
        "(0 exits at once)",
    )
    p.set_defaults(func=cmd_demo)

    p = _sub(sub, "iptables", "print, --apply or --cleanup Istio's capture rules")
    add_iptables_parser(p)

    p = _sub(sub, "wait", "block until the proxy is ready (a postStart hook, as pilot-agent wait)")
    add_wait_parser(p)

    p = _sub(sub, "inject", "add the sidecar to Kubernetes workloads (as istioctl kube-inject)")
    add_inject_parser(p)

    p = _sub(sub, "ca", "a development mesh CA: init a root, issue workload certs")
    ca = p.add_subparsers(dest="ca_command", required=True, metavar="COMMAND")
    q = _sub(ca, "init", "create a root CA (root-cert.pem, root-key.pem) in --dir")
    q.add_argument("--dir", required=True, help="where to write the root CA")
    q.add_argument("--trust-domain", default="cluster.local", help="the SPIFFE trust domain")
    q.add_argument("--ttl", type=_duration, default="87600h", help="validity, e.g. 87600h")
    q.add_argument("--algorithm", choices=["ecdsa", "rsa"], default="ecdsa", help="key type")
    q.set_defaults(func=cmd_ca_init)
    q = _sub(ca, "issue", "issue a SPIFFE workload cert in Istio's file layout")
    q.add_argument("--ca", required=True, help="the directory `ca init` wrote")
    q.add_argument(
        "--spiffe-id", required=True, help="e.g. spiffe://cluster.local/ns/default/sa/reviews"
    )
    q.add_argument("--out", required=True, help="writes cert-chain.pem, key.pem, root-cert.pem")
    q.add_argument("--ttl", type=_duration, default="24h", help="validity, e.g. 24h")
    q.add_argument("--dns", action="append", default=[], help="an extra DNS SAN (repeatable)")
    q.add_argument("--algorithm", choices=["ecdsa", "rsa"], default="ecdsa", help="key type")
    q.set_defaults(func=cmd_ca_issue)

    p = _sub(
        sub,
        "bench",
        "benchmark meshproxy against direct calls, nginx and a bare relay, in one run",
    )
    from meshproxy.bench.harness import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = _sub(sub, "version", "print the version and which build of the hot path runs")
    p.set_defaults(func=cmd_version)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.log_level)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
