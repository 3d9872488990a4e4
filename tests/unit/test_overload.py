"""The overload settings and the container memory limit the overload actions use."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from meshproxy.config.loader import load_snapshot
from meshproxy.config.schema.overload import parse_quantity
from meshproxy.errors import ConfigError
from meshproxy.overload import container_memory_limit, rss_bytes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512Mi", 512 * 2**20),
        ("1Gi", 2**30),
        ("1G", 10**9),
        ("1.5Gi", 3 * 2**29),
        ("300k", 300_000),
        (268435456, 268435456),
        ("0", 0),
        (0, 0),
        ("lots", None),
        ("-1Mi", None),
        (-5, None),
        (True, None),
        ("12Q", None),
    ],
)
def test_memory_quantities_read_as_kubernetes_writes_them(text: object, expected: int) -> None:
    assert parse_quantity(text) == expected


def _config(tmp_path: Path, overload: str) -> Path:
    path = tmp_path / "mesh.yaml"
    path.write_text(
        textwrap.dedent(
            f"""
            apiVersion: meshproxy.io/v1alpha1
            kind: ProxyConfig
            metadata: {{name: p}}
            spec:
              interceptionMode: NONE
              overload: {overload}
            """
        )
    )
    return path


def test_overload_settings_load_and_default_to_the_container_limit(tmp_path: Path) -> None:
    o = load_snapshot(_config(tmp_path, "{}")).settings.overload
    assert (o.memory_limit, o.shrink_heap, o.stop_requests) == (-1, 0.90, 0.95)
    o = load_snapshot(
        _config(tmp_path, "{memoryLimit: 300Mi, stopAcceptingRequestsThreshold: 0.8}")
    ).settings.overload
    assert (o.memory_limit, o.shrink_heap, o.stop_requests) == (300 * 2**20, 0.90, 0.8)


@pytest.mark.parametrize(
    ("overload", "message"),
    [
        ("{memoryLimit: lots}", 'overload.memoryLimit: expected a memory quantity such as "512Mi"'),
        ("{shrinkHeapThreshold: 1.5}", "overload.shrinkHeapThreshold: expected a fraction"),
        ("{stopAcceptingRequestsThreshold: 0}", "stopAcceptingRequestsThreshold: expected a fr"),
        ("{stopAcceptingRequests: 0.9}", "stopAcceptingRequests"),
    ],
)
def test_bad_overload_settings_are_config_errors(
    tmp_path: Path, overload: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_snapshot(_config(tmp_path, overload))
    assert any(message in str(i) for i in info.value.issues), info.value.issues


def test_the_container_limit_is_read_from_either_cgroup_version(tmp_path: Path) -> None:
    """Read through /proc/self/cgroup; where its path does not exist under the mount (a
    container's own cgroup namespace), the mount's root is the container's cgroup."""
    (tmp_path / "memory").mkdir()
    (tmp_path / "unified").mkdir()
    for limit_file in (
        tmp_path / "memory.max",
        tmp_path / "unified" / "memory.max",
        tmp_path / "memory" / "memory.limit_in_bytes",
    ):
        limit_file.write_text("268435456\n")
    assert container_memory_limit(tmp_path) == 268435456
    for limit_file in (tmp_path / "memory.max", tmp_path / "unified" / "memory.max"):
        limit_file.write_text("max\n")
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert container_memory_limit(tmp_path) is None  # v2 "max", v1's near-2**63: no limit
    assert container_memory_limit(tmp_path / "nothing-here") is None


def test_rss_is_read_from_proc() -> None:
    before = rss_bytes()
    block = bytearray(64 * 2**20)  # touched: resident
    for i in range(0, len(block), 4096):
        block[i] = 1
    assert rss_bytes() - before >= 60 * 2**20
    del block
