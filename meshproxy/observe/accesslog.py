"""Access log lines in Envoy's default text format, one per stream."""

from __future__ import annotations

import codecs
import sys
import time
from typing import TextIO

from meshproxy.errors import MeshproxyError
from meshproxy.observe.recorder import StreamRecord

# Looked up now, not on the first request: at the file-descriptor limit the codec's module
# could not be imported then, and the log line would be lost with the request (catalog H04).
codecs.lookup("unicode_escape")


def _q(value: str) -> str:
    # Control bytes are escaped so one request is always one line (CVE-2024-45808 class).
    if not value:
        return "-"
    return value.encode("unicode_escape").decode("ascii").replace('"', '\\"')


def format_line(rec: StreamRecord) -> str:
    start = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(rec.start_time))
    ms = int((rec.start_time % 1) * 1000)
    return (
        f'[{start}.{ms:03d}Z] "{_q(rec.method)} {_q(rec.path)} {rec.request_protocol}" '
        f"{rec.response_code} {rec.response_flags} {rec.request_bytes} {rec.response_bytes} "
        f'{int(rec.duration_ms)} "{_q(rec.x_forwarded_for)}" "{_q(rec.user_agent)}" '
        f'"{_q(rec.request_id)}" "{_q(rec.authority)}" "{_q(rec.upstream_host)}" '
        f"{_q(rec.cluster)} {_q(rec.route_name)}\n"
    )


class AccessLogError(MeshproxyError):
    pass


class AccessLog:
    """Appends one line per stream. Connections hold the log they started with, so after a
    reload the old file closes when its last connection drops it; `close` is for a log that
    was opened for a config that was then rejected."""

    __slots__ = ("_owned", "_stream")

    def __init__(self, stream: TextIO, owned: bool) -> None:
        self._stream = stream
        self._owned = owned  # stdout and stderr are not ours to close

    def __call__(self, rec: StreamRecord) -> None:
        self._stream.write(format_line(rec))

    def close(self) -> None:
        if self._owned:
            self._stream.close()


def open_access_log(path: str) -> AccessLog | None:
    """A writer for ProxyConfig accessLogFile ("" = off, "/dev/stdout" = stdout); an
    AccessLogError names the file when it cannot be opened for appending."""
    if not path:
        return None
    if path in ("/dev/stdout", "-"):
        return AccessLog(sys.stdout, owned=False)
    if path == "/dev/stderr":
        return AccessLog(sys.stderr, owned=False)
    try:
        stream = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
    except OSError as exc:
        raise AccessLogError(f"accessLogFile {path}: {exc.strerror or exc}") from None
    return AccessLog(stream, owned=True)
