"""Command line: run, validate, demo, version."""

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
    from meshproxy.config.loader import load_snapshot
    from meshproxy.errors import ConfigError
    from meshproxy.runtime import Runtime

    path = Path(args.config)
    try:
        snapshot = load_snapshot(path)
    except ConfigError as exc:
        print(
            f"meshproxy: refusing to start, the config has {len(exc.issues)} problem(s):",
            file=sys.stderr,
        )
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return 2

    async def main() -> int:
        runtime = Runtime(path, snapshot)
        try:
            return await runtime.run()
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
    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=lambda a: print(f"meshproxy {__version__}") or 0)
    args = parser.parse_args(argv)
    _configure_logging(args.log_level)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
