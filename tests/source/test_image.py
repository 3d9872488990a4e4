"""The image's build steps, checked without a container engine: the build context that
.dockerignore leaves holds every path the Dockerfile copies, and the example configs the image
ships have no symlink left dangling (config/demo points into the package)."""

from __future__ import annotations

import fnmatch
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip().rstrip("/") for line in lines if line.strip() and line[0] != "#"]


def in_context(relative: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path (or a parent of it) decides."""
    included = True
    for pattern in patterns:
        negated = pattern.startswith("!")
        bare = pattern[1:] if negated else pattern
        parts = relative.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(p, bare) for p in prefixes):
            included = negated
    return included


def build_context(dest: Path) -> list[str]:
    patterns = dockerignore_patterns()
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    kept = [path for path in tracked if in_context(path, patterns)]
    for path in kept:
        target = dest / path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / path, target, follow_symlinks=False)
    return kept


def copy_sources() -> list[str]:
    sources = []
    for line in (REPO / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            sources += words[1:-1]
    return sources


def test_the_build_context_has_what_the_dockerfile_copies(tmp_path: Path) -> None:
    kept = build_context(tmp_path)
    assert copy_sources(), "no COPY lines found"
    for source in copy_sources():
        assert (tmp_path / source).exists(), f"COPY {source}: not in the build context"
    # Nothing the image does not need: no tests, benchmarks, CI or git metadata.
    assert not [p for p in kept if p.split("/")[0] in ("tests", "benchmarks", ".ci", "scripts")]


def test_the_shipped_examples_resolve_symlinks_and_validate(tmp_path: Path) -> None:
    build_context(tmp_path / "src")
    # The Dockerfile's step: `cp -rL config /examples`.
    subprocess.run(
        ["cp", "-rL", "config", str(tmp_path / "examples")], cwd=tmp_path / "src", check=True
    )
    examples = tmp_path / "examples"
    assert not [p for p in examples.rglob("*") if p.is_symlink()]
    assert (examples / "demo" / "mesh.yaml").is_file()
    out = subprocess.run(
        [sys.executable, "-m", "meshproxy", "validate", str(examples)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count(": OK (") == len([p for p in examples.iterdir() if p.is_dir()])
