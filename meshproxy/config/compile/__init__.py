"""Compile validated resources into a Snapshot: resolve every reference, build route tables.

A pure function: the same resources always give the same snapshot (apart from `version`).
Problems found here (dangling hosts and subsets, port clashes) are reported like parse errors,
with the resource and field they come from.
"""

from meshproxy.config.compile.build import compile_snapshot
from meshproxy.config.compile.common import INBOUND_PASSTHROUGH, PASSTHROUGH
from meshproxy.config.compile.routes import retry_policy

__all__ = ["INBOUND_PASSTHROUGH", "PASSTHROUGH", "compile_snapshot", "retry_policy"]
