"""The build backend: setuptools', plus what compiling the hot path with mypyc needs.

A plain `pip install .` or `pip wheel .` builds in an isolated environment that holds only
the build requirements. To compile the hot path (setup.py), mypy must be there, and so must
the runtime dependencies, so that mypyc compiles against their real types (the same program
that `scripts/compiled-copy.sh` tests). Editable builds and sdists get none of it: they are
never compiled. MESHPROXY_MYPYC=0 asks for the interpreted build and skips it all.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from setuptools import build_meta as _setuptools
from setuptools.build_meta import (  # noqa: F401  (the hooks a PEP 517 backend exposes)
    build_editable,
    build_sdist,
    build_wheel,
    get_requires_for_build_editable,
    get_requires_for_build_sdist,
    prepare_metadata_for_build_editable,
    prepare_metadata_for_build_wheel,
)

COMPILER_REQUIREMENTS = ["mypy>=1.8", "types-PyYAML", "types-protobuf"]


def _runtime_requirements() -> list[str]:
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    with pyproject.open("rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def get_requires_for_build_wheel(config_settings: dict[str, Any] | None = None) -> list[str]:
    base = list(_setuptools.get_requires_for_build_wheel(config_settings))
    if os.environ.get("MESHPROXY_MYPYC", "auto") == "0":
        return base
    return base + COMPILER_REQUIREMENTS + _runtime_requirements()
