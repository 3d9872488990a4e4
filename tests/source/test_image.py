"""The image's build steps, checked without a container engine: the build context that
.dockerignore leaves holds every path the Dockerfile copies, and the example configs the image
ships have no symlink left dangling (config/demo points into the package)."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.support.proxy import free_port

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
    # config/kubernetes holds manifests, not a mesh config: validate leaves it out.
    dirs = [p for p in examples.iterdir() if p.is_dir() and p.name != "kubernetes"]
    assert out.stdout.count(": OK (") == len(dirs)


def dockerfile_instructions(name: str) -> list[str]:
    """The Dockerfile's instructions of one kind, continuation lines joined."""
    joined = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    return [line[len(name) + 1 :].strip() for line in joined.splitlines() if line.startswith(name)]


def test_the_image_steps_install_a_proxy_that_runs_as_uid_1337() -> None:
    """The Dockerfile's own commands, into a clean prefix instead of an image: the build
    stage's `pip wheel` (interpreted here, to keep CI short: CI's second pass installs the
    compiled build), the final stage's `pip install` of that wheel, then the image's command
    run as uid 1337 and its HEALTHCHECK."""
    work = Path(tempfile.mkdtemp(prefix="meshproxy-image-"))
    try:
        os.chmod(work, 0o755)  # uid 1337 runs from here
        src, wheels, prefix = work / "src", work / "wheels", work / "prefix"
        build_context(src)
        (wheel_step,) = [r for r in dockerfile_instructions("RUN") if "pip wheel" in r]
        command = (
            wheel_step.replace("MESHPROXY_MYPYC=1", "MESHPROXY_MYPYC=0")
            .replace("pip wheel", f"{sys.executable} -m pip wheel -q")
            .replace("/wheels", str(wheels))
            .replace("/examples", str(work / "examples"))
        )
        subprocess.run(["bash", "-c", command], cwd=src, check=True, timeout=600)
        subprocess.run([sys.executable, "-m", "venv", str(prefix)], check=True, timeout=120)
        (install_step,) = [r for r in dockerfile_instructions("RUN") if "pip install" in r]
        pip_install = install_step.split("&&")[0].replace("/wheels", str(wheels))
        pip_install = pip_install.replace("pip install", f"{prefix}/bin/pip install -q", 1)
        subprocess.run(["bash", "-c", pip_install], check=True, timeout=600)
        for path in (work, *work.rglob("*")):
            os.lchown(path, 1337, 1337)

        admin, status = free_port(), free_port()
        config = work / "config"
        config.mkdir()
        (config / "mesh.yaml").write_text(
            "apiVersion: meshproxy.io/v1alpha1\nkind: ProxyConfig\nmetadata: {name: image}\n"
            f"spec: {{interceptionMode: NONE, proxyAdminPort: {admin}, statusPort: {status}}}\n"
        )
        (cmd,) = dockerfile_instructions("CMD")
        (entry,) = dockerfile_instructions("ENTRYPOINT")
        argv = json.loads(entry) + json.loads(cmd)
        assert argv == ["meshproxy", "run", "-c", "/etc/meshproxy"]
        as_1337 = ["setpriv", "--reuid", "1337", "--regid", "1337", "--clear-groups"]
        proxy = subprocess.Popen(
            [*as_1337, str(prefix / "bin" / argv[0]), *argv[1:-1], str(config)],
            cwd="/",
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            health = dockerfile_instructions("HEALTHCHECK")[0].split("CMD", 1)[1]
            check = [*json.loads(health), "--url", f"http://127.0.0.1:{status}/healthz/ready"]
            out = subprocess.run(
                [*as_1337, str(prefix / "bin" / check[0]), *check[1:]],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            if out.returncode != 0:
                proxy.terminate()
                log = proxy.communicate(timeout=20)[0].decode()
                raise AssertionError(f"{out.stdout}{out.stderr}\nthe proxy's log:\n{log}")
            ps = subprocess.run(
                ["ps", "-o", "uid=", "-p", str(proxy.pid)], capture_output=True, text=True
            )
            assert ps.stdout.strip() == "1337"
        finally:
            proxy.terminate()
            log = proxy.communicate(timeout=20)[0].decode()
        assert proxy.returncode == 0, log
        assert "ready: config version 1" in log
        rules = subprocess.run(
            [str(prefix / "bin" / "meshproxy"), "iptables"], capture_output=True, text=True
        )
        assert "-A ISTIO_OUTPUT -j ISTIO_REDIRECT" in rules.stdout.splitlines()
    finally:
        shutil.rmtree(work, ignore_errors=True)
