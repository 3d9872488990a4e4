"""Read YAML documents with the line of every value, safely (no tags, bounded size and aliases)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import yaml

from meshproxy.errors import ConfigIssue

MAX_FILE_BYTES = 8 * 1024 * 1024
MAX_NODES = 500_000  # bounds alias expansion ("billion laughs")

Path_ = tuple[str | int, ...]


@dataclass(slots=True)
class Document:
    """One YAML document: its plain value and the line of each path inside it."""

    file: str
    index: int  # 1-based position in the file
    value: Any
    lines: dict[Path_, int] = field(default_factory=dict)

    def line_of(self, path: Path_) -> int | None:
        """The line of `path`, or of its nearest located ancestor."""
        while True:
            if path in self.lines:
                return self.lines[path]
            if not path:
                return None
            path = path[:-1]


class _Budget:
    def __init__(self) -> None:
        self.nodes = 0


def _convert(node: yaml.Node, path: Path_, lines: dict[Path_, int], budget: _Budget) -> Any:
    budget.nodes += 1
    if budget.nodes > MAX_NODES:
        raise ValueError(f"document expands to more than {MAX_NODES} values (alias bomb?)")
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode | yaml.SequenceNode) and node.tag not in _PLAIN_TAGS:
        raise ValueError(f"line {node.start_mark.line + 1}: tag {node.tag} is not allowed")
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise ValueError("YAML merge keys (<<) are not supported")
            key = _scalar(key_node)
            if not isinstance(key, str):
                key = str(key)
            if key in out:
                raise ValueError(f"line {key_node.start_mark.line + 1}: duplicate key {key!r}")
            lines[(*path, key)] = key_node.start_mark.line + 1
            out[key] = _convert(value_node, (*path, key), lines, budget)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_convert(item, (*path, i), lines, budget) for i, item in enumerate(node.value)]
    return _scalar(node)


# libyaml's composer when PyYAML has it: the same nodes and line marks, about 10x faster than
# the pure-Python one (a 5 MB config: seconds, not half a minute).
_LOADER: Final = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_PLAIN_TAGS = frozenset({"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"})
_constructor = yaml.SafeLoader("")  # used only for its scalar constructors
# tag -> constructor function; the None entry answers unknown tags with an error
_SCALARS: Final[dict[str | None, Callable[[Any, yaml.Node], Any]]] = (
    yaml.SafeLoader.yaml_constructors
)


def _scalar(node: yaml.Node) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        raise ValueError(f"line {node.start_mark.line + 1}: expected a scalar")
    # The constructor function itself, not construct_object(): that one memoizes every node
    # it sees in the loader, so each reload kept the whole previous config alive.
    return _SCALARS.get(node.tag, _SCALARS[None])(_constructor, node)


def parse_documents(text: str, file: str) -> tuple[list[Document], list[ConfigIssue]]:
    """Parse every document of a YAML stream; syntax errors become issues, never exceptions."""
    docs: list[Document] = []
    issues: list[ConfigIssue] = []
    # One document's nodes at a time: a 5 MB config's whole node tree alive at once made
    # every garbage collection during a reload walk millions of objects.
    try:
        for index, node in enumerate(yaml.compose_all(text, Loader=_LOADER), start=1):
            if node is None:
                continue
            lines: dict[Path_, int] = {}
            try:
                value = _convert(node, (), lines, _Budget())
            except (ValueError, yaml.YAMLError) as exc:
                line = node.start_mark.line + 1
                issues.append(ConfigIssue(file, line, index, None, None, f"invalid YAML: {exc}"))
                continue
            if value is not None:
                docs.append(Document(file, index, value, lines))
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        return [], [ConfigIssue(file, line, None, None, None, f"invalid YAML: {exc.problem}")]
    except yaml.YAMLError as exc:
        return [], [ConfigIssue(file, None, None, None, None, f"invalid YAML: {exc}")]
    return docs, issues


def config_files(path: Path) -> list[Path]:
    """The YAML files a config path names: the file itself, or a directory's *.yaml/*.yml.

    Hidden entries are skipped, so a Kubernetes ConfigMap mount (`..data`, `..2025_…`) is read
    through its visible symlinks only, exactly once.
    """
    if path.is_dir():
        return sorted(
            p
            for p in path.iterdir()
            if not p.name.startswith(".") and p.suffix in (".yaml", ".yml") and p.is_file()
        )
    return [path]


def config_roots(path: Path) -> list[Path]:
    """The configs under `path`, for `validate`: a file; a directory holding YAML files; or
    else each directory below it that does (`validate config` finds config/demo, ...)."""
    if not path.is_dir() or config_files(path):
        return [path]
    roots: list[Path] = []
    for child in sorted(path.iterdir()):
        if child.is_dir() and not child.name.startswith("."):
            roots += [
                r
                for r in config_roots(child)
                if r.is_dir() and config_files(r) and _holds_mesh_resources(r)
            ]
    return roots


MESH_API_GROUPS = ("networking.istio.io/", "security.istio.io/", "telemetry.istio.io/")
OWN_API_GROUP = "meshproxy.io/"


def _holds_mesh_resources(directory: Path) -> bool:
    """Whether a directory found by searching is a mesh config, not (say) Kubernetes
    manifests kept beside the examples: some top-level apiVersion is Istio's or ours."""
    import yaml

    for file in config_files(directory):
        try:
            for doc in yaml.safe_load_all(file.read_text()):
                version = doc.get("apiVersion") if isinstance(doc, dict) else None
                if isinstance(version, str) and version.startswith(
                    (*MESH_API_GROUPS, OWN_API_GROUP)
                ):
                    return True
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return True  # unreadable: let validate say what is wrong with it
    return False


class Digest(Protocol):
    def update(self, data: bytes, /) -> None: ...

    def digest(self) -> bytes: ...


def note_file(digest: Digest, file: Path, data: bytes | None, size: int = 0) -> None:
    """Add one config file to a fingerprint: its name and content (or, for a file too big
    to be read, its size). read_sources notes exactly the bytes it parses, so a fingerprint
    taken while loading describes what was loaded, even when the files change meanwhile."""
    digest.update(str(file).encode() + b"\0")
    digest.update(data if data is not None else b"size:%d" % size)
    digest.update(b"\0")


def fingerprint(path: Path) -> bytes:
    """A digest of every config file's name and content, to skip reloads that change nothing."""
    import hashlib

    digest = hashlib.sha256()
    try:
        for file in config_files(path) if path.exists() else []:
            try:
                size = os.stat(file).st_size
                note_file(digest, file, file.read_bytes() if size <= MAX_FILE_BYTES else None, size)
            except OSError:
                note_file(digest, file, b"")
    except OSError:
        pass
    return digest.digest()


def stat_signature(path: Path) -> tuple[tuple[str, int, int, int], ...]:
    """Each config file's name, inode, size and modification time: what changes when a file
    is rewritten or a ConfigMap's symlinks are swapped, found without reading any file."""
    entries: list[tuple[str, int, int, int]] = []
    try:
        for file in config_files(path) if path.exists() else []:
            with contextlib.suppress(OSError):
                st = file.stat()
                entries.append((str(file), st.st_ino, st.st_size, st.st_mtime_ns))
    except OSError:
        pass
    return tuple(entries)


def read_sources(
    path: Path, digest: Digest | None = None
) -> tuple[list[Document], list[ConfigIssue]]:
    """Read and parse every config file under `path`; `digest` notes what was read."""
    docs: list[Document] = []
    issues: list[ConfigIssue] = []
    if not path.exists():
        return [], [ConfigIssue(str(path), None, None, None, None, "no such file or directory")]
    files = config_files(path)
    if not files:
        return [], [ConfigIssue(str(path), None, None, None, None, "no *.yaml files found")]
    for file in files:
        name = str(file)
        try:
            size = os.stat(file).st_size
            if size > MAX_FILE_BYTES:
                if digest is not None:
                    note_file(digest, file, None, size)
                issues.append(
                    ConfigIssue(
                        name, None, None, None, None, f"file is larger than {MAX_FILE_BYTES} bytes"
                    )
                )
                continue
            data = file.read_bytes()
            if digest is not None:
                note_file(digest, file, data)
            # As read_text would give it: universal newlines.
            text = data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
        except (OSError, UnicodeDecodeError) as exc:
            issues.append(ConfigIssue(name, None, None, None, None, f"cannot read: {exc}"))
            continue
        file_docs, file_issues = parse_documents(text, name)
        docs.extend(file_docs)
        issues.extend(file_issues)
    if not docs and not issues:
        issues.append(
            ConfigIssue(str(path), None, None, None, None, "empty: no YAML documents in it")
        )
    return docs, issues
