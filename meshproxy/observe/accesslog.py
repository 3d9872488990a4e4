"""Access logs: each configured log a format (config/logformat.py) and a writer thread.

The event loop only renders a line and hands it to a bounded queue; a thread of the log's
own writes it. A file or a terminal that cannot keep up costs the requests nothing: lines it
cannot take are dropped and counted (`meshproxy_access_log_dropped_total`).
"""

from __future__ import annotations

import codecs
import logging
import sys
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, TextIO

from meshproxy.config.cel import compile_filter
from meshproxy.config.logformat import (
    ISTIO_TEXT_FORMAT,
    NEEDS_ALL,
    FormatError,
    LogFormat,
    compile_labels,
    compile_text,
)
from meshproxy.config.telemetry import AccessLogSpec
from meshproxy.errors import MeshproxyError
from meshproxy.observe.logrender import render
from meshproxy.observe.recorder import StreamRecord

logger = logging.getLogger(__name__)

# Looked up now, not on the first request: at the file-descriptor limit the codec's module
# could not be imported then, and the log line would be lost with the request (catalog H04).
codecs.lookup("unicode_escape")

QUEUE_LINES: Final = 10_000  # lines a writer holds before it drops
# Lines that wake the writer before its interval: each wake is a GIL handoff, on the
# proxy's one CPU a context switch, so a busy proxy should wake it a few times a second.
BATCH_LINES: Final = 2_048
FLUSH_SECONDS: Final = 0.1  # how long a line may wait to be written


class AccessLogError(MeshproxyError):
    pass


@dataclass
class LogCounts:
    written: int = 0
    dropped: int = 0


class LogWriter:
    """Appends lines to one path from a thread of its own (stdout and stderr are not closed).

    The event loop only appends to a deque: no lock, no wake-up per line. The first line
    after the queue emptied wakes the thread, which writes what has gathered FLUSH_SECONDS
    later, or sooner once BATCH_LINES are waiting: a busy proxy pays one write syscall per
    batch rather than a thread switch per request, and an idle one no wake-ups at all.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._owned = path not in ("/dev/stdout", "-", "/dev/stderr")
        if path in ("/dev/stdout", "-"):
            self._stream: TextIO = sys.stdout
        elif path == "/dev/stderr":
            self._stream = sys.stderr
        else:
            try:
                self._stream = open(path, "a", encoding="utf-8")  # noqa: SIM115
            except OSError as exc:
                raise AccessLogError(f"{path}: {exc.strerror or exc}") from None
        self._lines: deque[str] = deque()
        self._wake = threading.Event()
        self._closing = False
        self._writer = threading.Thread(target=self._run, name="access-log", daemon=True)
        self._writer.start()

    def write(self, line: str) -> bool:
        """Queue a line; False when QUEUE_LINES are already waiting (the line is dropped)."""
        lines = self._lines
        if len(lines) >= QUEUE_LINES:
            return False
        lines.append(line)
        n = len(lines)
        if n == 1 or n == BATCH_LINES:  # the first line after a quiet spell, or a full batch
            self._wake.set()
        return True

    def _run(self) -> None:
        stream, lines, wake = self._stream, self._lines, self._wake
        while True:
            wake.wait()  # until a line arrives: an idle log costs nothing
            wake.clear()
            if not self._closing:
                wake.wait(FLUSH_SECONDS)  # gather more, unless a full batch wakes it
                wake.clear()
            closing = self._closing
            batch = []
            while lines:
                batch.append(lines.popleft())
            if batch:
                try:
                    stream.write("".join(batch))
                    stream.flush()
                except (OSError, ValueError) as exc:
                    logger.error("access log %s: cannot write: %s", self.path, exc)
            if closing and not lines:
                if self._owned:
                    stream.close()
                return

    def close(self) -> None:
        """Write what is queued, then close (the thread does it: this does not wait)."""
        self._closing = True
        self._wake.set()

    def wait_closed(self, timeout: float) -> None:
        """Block until close() has written everything (the process may exit after this)."""
        self._writer.join(timeout)


@dataclass(frozen=True)
class LogSink:
    writer: LogWriter
    format: LogFormat
    filter: Callable[[StreamRecord], bool] | None = None  # Telemetry filter.expression
    reporter: str | None = None  # "source": outbound streams only, "destination": inbound


class AccessLogs:
    """Every access log a stream goes to (ProxyConfig accessLogFile, the accessLogging
    providers); called once per HTTP stream or TCP connection."""

    def __init__(self, sinks: Sequence[LogSink], counts: LogCounts) -> None:
        self.sinks = tuple(sinks)
        self.counts = counts
        # What a record must carry for these logs (a filter's CEL attributes read it all).
        self.needs = 0
        for sink in self.sinks:
            self.needs |= NEEDS_ALL if sink.filter is not None else sink.format.needs

    def __call__(self, rec: StreamRecord) -> None:
        for sink in self.sinks:
            if sink.reporter is not None and sink.reporter != rec.reporter:
                continue
            check = sink.filter
            if check is not None and not check(rec):
                continue
            if sink.writer.write(render(sink.format, rec)):
                self.counts.written += 1
            else:
                self.counts.dropped += 1

    def close(self) -> None:
        for writer in {id(s.writer): s.writer for s in self.sinks}.values():
            writer.close()


def open_access_logs(
    specs: Sequence[AccessLogSpec], counts: LogCounts, writers: dict[str, LogWriter]
) -> AccessLogs | None:
    """The logs `specs` name, reusing the open writers in `writers` by path (a reload keeps
    a file open) and adding new ones to it; AccessLogError names a path that cannot open."""
    if not specs:
        return None
    created: list[LogWriter] = []
    sinks = []
    try:
        for spec in specs:
            writer = writers.get(spec.path)
            if writer is None:
                try:
                    writer = LogWriter(spec.path)
                except AccessLogError as exc:
                    raise AccessLogError(f"{spec.source} {exc}") from None
                created.append(writer)
                writers[spec.path] = writer
            fmt = (
                compile_labels(spec.labels)
                if spec.labels is not None
                else compile_text(spec.text or ISTIO_TEXT_FORMAT)
            )
            check = compile_filter(spec.filter) if spec.filter else None
            side = {"CLIENT": "source", "SERVER": "destination"}.get(spec.mode)
            sinks.append(LogSink(writer, fmt, check, side))
    except (AccessLogError, FormatError) as exc:
        for writer in created:
            writers.pop(writer.path, None)
            writer.close()
        raise AccessLogError(str(exc)) from None
    return AccessLogs(sinks, counts)
