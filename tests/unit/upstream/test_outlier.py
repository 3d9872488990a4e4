"""Consecutive-error ejection rules (Envoy's), without sockets."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from meshproxy.config.snapshot import OutlierSpec
from meshproxy.upstream.outlier import OutlierDetector


@dataclass
class Host:
    ejected: bool = False
    ejections: int = 0
    consecutive_5xx: int = 0
    consecutive_gateway: int = 0


def run(coro_fn):  # type: ignore[no-untyped-def]
    return asyncio.run(coro_fn())


def test_consecutive_5xx_and_success_resets() -> None:
    async def body() -> None:
        hosts = [Host(), Host(), Host(), Host()]
        d = OutlierDetector(OutlierSpec(consecutive_5xx=3, max_ejection_percent=100), lambda: hosts)
        h = hosts[0]
        d.report(h, 500)
        d.report(h, None)  # a local failure counts as a 5xx
        d.report(h, 200)  # ... but a success starts again
        d.report(h, 503)
        d.report(h, 500)
        assert not h.ejected
        d.report(h, 502)
        assert h.ejected and h.ejections == 1

    run(body)


def test_gateway_errors_only_count_502_503_504() -> None:
    async def body() -> None:
        hosts = [Host(), Host()]
        d = OutlierDetector(
            OutlierSpec(consecutive_5xx=0, consecutive_gateway=2, max_ejection_percent=100),
            lambda: hosts,
        )
        d.report(hosts[0], 500)
        d.report(hosts[0], 500)
        assert not hosts[0].ejected
        d.report(hosts[0], 503)
        d.report(hosts[0], 504)
        assert hosts[0].ejected

    run(body)


def test_max_ejection_percent_and_min_health() -> None:
    async def body() -> None:
        hosts = [Host() for _ in range(4)]
        d = OutlierDetector(OutlierSpec(consecutive_5xx=1, max_ejection_percent=50), lambda: hosts)
        for h in hosts:
            d.report(h, 500)
        assert sum(h.ejected for h in hosts) == 2  # 50 % of 4
        hosts2 = [Host() for _ in range(4)]
        d2 = OutlierDetector(
            OutlierSpec(consecutive_5xx=1, max_ejection_percent=100, min_health_percent=75),
            lambda: hosts2,
        )
        for h in hosts2:
            d2.report(h, 500)
        assert sum(h.ejected for h in hosts2) == 1  # 3 of 4 must stay healthy

    run(body)


def test_ejection_ends_after_base_time_times_count() -> None:
    async def body() -> None:
        hosts = [Host(), Host()]
        d = OutlierDetector(
            OutlierSpec(consecutive_5xx=1, base_ejection_time=0.05, max_ejection_percent=100),
            lambda: hosts,
        )
        d.report(hosts[0], 500)
        assert hosts[0].ejected
        await asyncio.sleep(0.08)
        assert not hosts[0].ejected
        d.report(hosts[0], 500)  # second ejection lasts twice as long
        await asyncio.sleep(0.07)
        assert hosts[0].ejected
        await asyncio.sleep(0.05)
        assert not hosts[0].ejected

    run(body)
