"""Session-wide set-up for every test directory."""

from __future__ import annotations

import compileall
import fcntl
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import meshproxy


def pytest_sessionstart(session: pytest.Session) -> None:
    """Byte-compile the package under test once, before the suite starts its proxies.

    Where PYTHONDONTWRITEBYTECODE is set (as on CI's machine), an editable install has no
    .pyc files, and each of the hundreds of proxies the suite starts would compile about
    a hundred modules from source: 0.1 s apiece. compileall writes them regardless.
    """
    compileall.compile_dir(Path(meshproxy.__file__).parent, quiet=1)


@pytest.fixture
def demo_ports_free() -> Iterator[None]:
    """Wait until the quick start `.ci/run` runs beside this pass has finished its demo.

    The demo binds fixed ports (15000, 15021, 15080, 18181, 18182) and lingers 20 s; a test
    that starts a demo or the standalone recipe on those ports must not overlap it.
    """
    record = os.environ.get("MESHPROXY_QUICK_START_RUN")
    if record:
        deadline = time.monotonic() + 840
        while not (Path(record) / "quick-start.rc").exists() and time.monotonic() < deadline:
            time.sleep(0.5)
    # And one such test at a time across processes (pytest-xdist workers, CI's two passes).
    with open(Path(tempfile.gettempdir()) / "meshproxy-demo-ports.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
