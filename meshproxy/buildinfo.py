"""What build is running: whether the hot path was compiled with mypyc (see setup.py)."""

from __future__ import annotations


def hot_path_compiled() -> bool:
    import meshproxy.proxy.stream as stream

    return not str(stream.__file__).endswith(".py")


def describe() -> str:
    return "compiled (mypyc)" if hot_path_compiled() else "interpreted"
