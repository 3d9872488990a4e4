"""Every micro benchmark records which build it measured (compiled or interpreted), so
benchmarks/compare.py can say when a comparison mixes them."""

from __future__ import annotations

import pytest

from meshproxy.buildinfo import describe


@pytest.fixture(autouse=True)
def _build(request: pytest.FixtureRequest) -> None:
    if "benchmark" in request.fixturenames:
        request.getfixturevalue("benchmark").extra_info["build"] = describe()
