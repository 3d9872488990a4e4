"""The build: the hot-path modules (hot-modules.txt) compiled with mypyc whenever possible.

`pip install .` and `pip wheel .` compile them when a C compiler and the Python headers are
present (the build backend in buildsupport/ brings mypy); without them, or if compiling
fails, the same source installs interpreted and the build says so once. MESHPROXY_MYPYC=0
asks for the interpreted build, MESHPROXY_MYPYC=1 makes compiling mandatory (an error if it
cannot be done). Editable installs (`pip install -e .`) are never compiled: a compiled module
would shadow later edits of its source. Everything else is declared in pyproject.toml.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

# setuptools commands that produce installable code; metadata, sdist and editable builds
# never compile (pip runs those first or instead, and mypyc would run for nothing).
BUILD_COMMANDS = {"bdist_wheel", "build", "build_ext", "install", "bdist"}
WARNING = "meshproxy: building the INTERPRETED hot path (about 1.7x the CPU per request): "


def hot_modules() -> list[str]:
    text = (Path(__file__).parent / "hot-modules.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


def why_not_compilable() -> str | None:
    """What is missing for a mypyc build, or None when everything is there."""
    compiler = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        return f"no C compiler ({compiler!r} not found; Debian: apt-get install gcc)"
    include = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not include.exists():
        return f"no Python headers ({include} missing; Debian: apt-get install python3-dev)"
    try:
        import mypyc.build  # noqa: F401
    except ImportError:
        return "mypy is not installed in the build environment (pip install mypy)"
    return None


def warn(reason: str) -> None:
    print(f"\nWARNING: {WARNING}{reason}\n", file=sys.stderr)


class OptionalBuildExt(build_ext):
    """build_ext that falls back to the interpreted modules when compiling fails (auto mode)."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as error:  # a compiler or linker failure, whatever its class
            if os.environ.get("MESHPROXY_MYPYC") == "1":
                raise
            warn(f"compiling failed: {error}")
            self.extensions = []


def compiled_extensions() -> list[object]:
    choice = os.environ.get("MESHPROXY_MYPYC", "auto")
    if choice == "0" or not BUILD_COMMANDS.intersection(sys.argv[1:]):
        return []
    missing = why_not_compilable()
    if missing is not None:
        if choice == "1":
            sys.exit(f"MESHPROXY_MYPYC=1 but the hot path cannot be compiled: {missing}")
        warn(missing)
        return []
    from mypyc.build import mypycify

    return list(mypycify(hot_modules(), opt_level="3"))


setup(ext_modules=compiled_extensions(), cmdclass={"build_ext": OptionalBuildExt})
