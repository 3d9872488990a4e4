"""The build: `pip wheel .` falls back to the interpreted hot path, saying so, without a compiler.

The compiled default itself is what CI's second pass installs and tests (`.ci/run` checks that
`pip install .` reports the compiled hot path); these cases cover the way down from it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCES = (
    "pyproject.toml",
    "setup.py",
    "hot-modules.txt",
    "README.md",
    "buildsupport",
    "meshproxy",
)


def build_wheel(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    source = tmp_path / "src"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("*.so"))
        else:
            shutil.copy2(REPO / name, source / name)
    out = tmp_path / "wheels"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(out), str(source)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=600,
    )
    return result, out


@pytest.mark.timeout(600)
def test_without_a_compiler_the_wheel_is_interpreted_and_the_build_says_why(
    tmp_path: Path,
) -> None:
    result, out = build_wheel(tmp_path, CC="no-such-cc", MESHPROXY_MYPYC="auto")
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert output.count("building the INTERPRETED hot path") == 1, output[-3000:]
    assert "no C compiler ('no-such-cc' not found" in output
    (wheel,) = out.glob("meshproxy-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "meshproxy/proxy/stream.py" in names
    assert not [n for n in names if n.endswith(".so")]


@pytest.mark.timeout(600)
def test_mypyc_1_makes_compiling_mandatory(tmp_path: Path) -> None:
    result, out = build_wheel(tmp_path, CC="no-such-cc", MESHPROXY_MYPYC="1")
    assert result.returncode != 0
    assert "MESHPROXY_MYPYC=1 but the hot path cannot be compiled: no C compiler" in (
        result.stdout + result.stderr
    )
    assert not list(out.glob("*.whl"))
