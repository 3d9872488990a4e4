"""What build is running: whether the hot path was compiled with mypyc (see setup.py)."""

from __future__ import annotations

import sysconfig
from pathlib import Path


def hot_path_compiled() -> bool:
    import meshproxy.proxy.stream as stream

    return not str(stream.__file__).endswith(".py")


def describe() -> str:
    return "compiled (mypyc)" if hot_path_compiled() else "interpreted"


def installed_from_wheel() -> bool:
    """True when the package lives in site-packages (not an editable install or a checkout)."""
    import meshproxy

    here = Path(meshproxy.__file__).resolve().parent
    paths = sysconfig.get_paths()
    roots = {Path(paths[key]).resolve() for key in ("purelib", "platlib")}
    return here.parent in roots


def interpreted_build_warning() -> str | None:
    """The one start-up warning for an installed build whose hot path did not get compiled."""
    if hot_path_compiled() or not installed_from_wheel():
        return None
    return (
        "the hot path runs interpreted (about 1.7x the CPU per request): this install was "
        "built without mypyc (no C compiler or Python headers at install time, or "
        "MESHPROXY_MYPYC=0); reinstall with gcc and python3-dev present for the compiled build"
    )
