"""A direction's metric overrides hash once (every request's metric key includes them), and
still work as a dict key after travelling to another process with other string hashes."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

from meshproxy.config.telemetry import DirectionMetrics, MetricView


def overrides() -> DirectionMetrics:
    view = MetricView(False, frozenset({"request_protocol"}), (("route", 0),))
    return DirectionMetrics((view,) * 6, ("request.path",))


def test_equal_overrides_hash_and_compare_equal() -> None:
    a, b = overrides(), overrides()
    assert a == b and hash(a) == hash(b) and {a: 1}[b] == 1
    assert a != DirectionMetrics(a.views, ())


def test_unpickled_in_a_process_with_other_string_hashes_finds_its_series() -> None:
    child = (
        "import pickle, sys\n"
        "from tests.unit.config.test_direction_metrics import overrides\n"
        "received = pickle.loads(sys.stdin.buffer.read())\n"
        "print({overrides(): 'series'}.get(received))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", child],
        input=pickle.dumps(overrides()),
        capture_output=True,
        env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"},
        cwd=Path(__file__).resolve().parents[3],  # where `tests` imports from
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == b"series", out.stderr
