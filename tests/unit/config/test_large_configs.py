"""Large configs: what a reload leaves behind, and that the loader never holds them twice."""

from __future__ import annotations

import gc
from pathlib import Path

from meshproxy.collector import collector_paused, without_collection
from meshproxy.config import source
from meshproxy.config.loader import load_snapshot
from tests.support.big_config import services_yaml


def test_reloading_keeps_nothing_of_earlier_loads(tmp_path: Path) -> None:
    """The YAML constructor used to memoize every scalar node it built, so each reload kept
    the whole previous config's node tree alive: memory grew with every config change."""
    (tmp_path / "mesh.yaml").write_text(services_yaml(200))
    load_snapshot(tmp_path)
    gc.collect()
    before = len(gc.get_objects())
    for _ in range(5):
        load_snapshot(tmp_path)
    gc.collect()
    assert len(gc.get_objects()) - before < 500  # 200 services leaked ~3,000 objects a load
    assert not source._constructor.constructed_objects


def test_tcp_routes_bind_to_their_own_service_in_a_large_config(tmp_path: Path) -> None:
    (tmp_path / "mesh.yaml").write_text(services_yaml(400))
    snapshot = load_snapshot(tmp_path)
    for i in (1, 201, 399):
        binding = snapshot.outbound_by_vip[(f"10.{i // 250}.{i % 250}.1", 80)]
        assert binding.tcp_cluster == f"outbound|80||s{(i + 2) % 400}.example.internal"
    assert snapshot.outbound_by_vip[("10.0.2.1", 80)].tcp_cluster is None  # HTTP


def test_a_load_runs_with_the_collector_paused_and_restores_it() -> None:
    assert gc.isenabled()
    seen: list[bool] = []
    assert without_collection(lambda: seen.append(gc.isenabled()) or 7) == 7
    assert seen == [False] and gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()  # a caller's own pause is left as it was
    finally:
        gc.enable()
