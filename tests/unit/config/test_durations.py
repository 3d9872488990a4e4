from __future__ import annotations

import pytest

from meshproxy.config.reader import parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("10s", 10.0),
        ("1.5s", 1.5),
        ("250ms", 0.25),
        ("1m30s", 90.0),
        ("2h", 7200.0),
        ("100us", 0.0001),
    ],
)
def test_valid(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "10", "s", "10 s", "-1s", "1.5.5s", "10sec", "1s 2s"])
def test_invalid(text: str) -> None:
    assert parse_duration(text) is None
