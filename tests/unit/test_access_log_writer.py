"""The access-log writer thread: lines reach the file soon after a quiet spell as well as in
a burst, close() writes everything queued, the queue stays bounded, and an idle
log never wakes its thread."""

from __future__ import annotations

import time
from pathlib import Path

from meshproxy.observe.accesslog import QUEUE_LINES, LogWriter
from tests.support.proxy import wait_for


def _wait_for_lines(path: Path, n: int, timeout: float = 5.0) -> list[str]:
    """The file's lines once it has `n` of them, or after `timeout` seconds."""
    wait_for(lambda: len(path.read_text().splitlines()) >= n, timeout)
    return path.read_text().splitlines()


def _wakeups(writer: LogWriter) -> int:
    """How many times the kernel ran the writer's thread (its third schedstat field)."""
    tid = writer._writer.native_id
    return int(Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[2])


def test_lines_arrive_after_a_quiet_spell_and_in_a_burst(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    writer = LogWriter(str(path))
    try:
        assert writer.write("first\n")
        assert _wait_for_lines(path, 1) == ["first"]
        time.sleep(0.3)  # quiet: the thread sleeps until the next line
        assert writer.write("second\n")
        assert _wait_for_lines(path, 2) == ["first", "second"]
        for i in range(3000):  # more than a batch
            writer.write(f"{i}\n")
        assert len(_wait_for_lines(path, 3002)) == 3002
    finally:
        writer.close()
        writer.wait_closed(5.0)


def test_close_writes_everything_queued(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    writer = LogWriter(str(path))
    for i in range(5000):
        assert writer.write(f"line {i}\n")
    writer.close()
    writer.wait_closed(5.0)
    lines = path.read_text().splitlines()
    assert lines == [f"line {i}" for i in range(5000)]


def test_the_queue_stays_bounded_and_every_accepted_line_is_written(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    writer = LogWriter(str(path))
    accepted = []
    for i in range(QUEUE_LINES * 3):  # as fast as Python goes: the queue may fill
        if writer.write(f"{i}\n"):
            accepted.append(str(i))
        assert len(writer._lines) <= QUEUE_LINES
    writer.close()
    writer.wait_closed(10.0)
    assert path.read_text().splitlines() == accepted


def test_an_idle_log_does_not_wake_its_thread(tmp_path: Path) -> None:
    writer = LogWriter(str(tmp_path / "access.log"))
    try:
        writer.write("one\n")
        _wait_for_lines(tmp_path / "access.log", 1)
        time.sleep(0.2)  # the batch written, the thread back asleep
        before = _wakeups(writer)
        time.sleep(1.0)
        assert _wakeups(writer) - before <= 1  # polling every 0.1 s would run it ~10 times
    finally:
        writer.close()
        writer.wait_closed(5.0)
