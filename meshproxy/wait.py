"""`meshproxy wait`: block until the proxy reports ready (Istio's `pilot-agent wait`).

Run as the sidecar container's postStart hook, it holds the application's containers back
until the proxy can carry their traffic (Istio's holdApplicationUntilProxyStarts). Same flags
as pilot-agent wait, same defaults.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:15021/healthz/ready"


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=DEFAULT_URL, help="the readiness URL to poll")
    parser.add_argument(
        "--timeoutSeconds", type=_positive, default=60.0, help="give up after this long"
    )
    parser.add_argument(
        "--periodMillis", type=_positive, default=500.0, help="time between attempts"
    )
    parser.add_argument(
        "--requestTimeoutMillis", type=_positive, default=500.0, help="timeout of each attempt"
    )
    parser.set_defaults(func=run)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text!r}")
    return value


def probe(url: str, timeout: float) -> str | None:
    """None when ready, else what the last attempt said."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return None if resp.status == 200 else f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}: {exc.read().decode(errors='replace').strip()}"
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        return str(reason)


def run(args: argparse.Namespace) -> int:
    if not args.url.startswith(("http://", "https://")):
        print(f"meshproxy wait: --url must be an http(s) URL, got {args.url!r}", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.timeoutSeconds
    print(f"waiting for {args.url} (up to {args.timeoutSeconds:g}s)", flush=True)
    while True:
        last = probe(args.url, args.requestTimeoutMillis / 1000)
        if last is None:
            print("meshproxy is ready", flush=True)
            return 0
        if time.monotonic() + args.periodMillis / 1000 > deadline:
            print(
                f"meshproxy wait: not ready after {args.timeoutSeconds:g}s; last answer: {last}",
                file=sys.stderr,
            )
            return 1
        time.sleep(args.periodMillis / 1000)
