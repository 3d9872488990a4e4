"""Optional compiled build: MESHPROXY_MYPYC=1 compiles the hot-path modules with mypyc.

Everything else is declared in pyproject.toml. The compiled build needs a C compiler, the
Python headers and mypy in the build environment, e.g.
    pip install mypy setuptools wheel && MESHPROXY_MYPYC=1 pip install --no-build-isolation .
Editable (-e) installs should stay interpreted: a stale compiled module would shadow edits.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import setup


def hot_modules() -> list[str]:
    text = (Path(__file__).parent / "hot-modules.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


ext_modules = []
if os.environ.get("MESHPROXY_MYPYC") == "1":
    from mypyc.build import mypycify

    ext_modules = mypycify(hot_modules(), opt_level="3")

setup(ext_modules=ext_modules)
