"""Typed field access over a YAML document that records every problem with its exact location."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from typing import Any

from meshproxy.config.source import Document, Path_
from meshproxy.errors import ConfigIssue

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def format_path(path: Path_) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def parse_duration(text: str) -> float | None:
    """Seconds in a Go/Istio duration ("1.5s", "100ms", "1m30s"); None when malformed."""
    if not text:
        return None
    pos = 0
    total = 0.0
    for m in _DURATION_PART.finditer(text):
        if m.start() != pos:
            return None
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    return total if pos == len(text) else None


def closest(word: str, choices: Iterable[str]) -> str | None:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = closest(word, choices)
    return f' (did you mean "{close}"?)' if close else ""


class Reader:
    """Reads fields of one resource; a wrong field becomes an issue and a None, never a raise."""

    def __init__(self, doc: Document, resource: str, issues: list[ConfigIssue]) -> None:
        self.doc = doc
        self.resource = resource
        self.issues = issues

    def error(self, path: Path_, message: str) -> None:
        self.issues.append(
            ConfigIssue(
                self.doc.file,
                self.doc.line_of(path),
                self.doc.index,
                self.resource,
                format_path(path) or None,
                message,
            )
        )

    def mapping(
        self, value: Any, path: Path_, allowed: Iterable[str], required: Iterable[str] = ()
    ) -> dict[str, Any] | None:
        """`value` as a mapping with only `allowed` keys (unknown keys are reported)."""
        if value is None:
            value = {}
        if not isinstance(value, dict):
            self.error(path, f"expected a mapping, got {_kind(value)}")
            return None
        allowed = tuple(allowed)
        suggested = set()
        for key in value:
            if key not in allowed:
                close = closest(key, allowed)
                suggested.add(close)
                hint = f' (did you mean "{close}"?)' if close else ""
                self.error((*path, key), f"unknown field{hint}")
        for key in required:
            # A misspelt required field is one mistake: the "did you mean" above says it.
            if value.get(key) is None and key not in suggested:
                self.error((*path, key), "required field is missing")
        return value

    def items(self, m: Mapping[str, Any], key: str, path: Path_) -> list[tuple[Path_, Any]]:
        """The elements of list field `key`, each with its path."""
        value = m.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            self.error((*path, key), f"expected a list, got {_kind(value)}")
            return []
        return [((*path, key, i), v) for i, v in enumerate(value)]

    def string(
        self, m: Mapping[str, Any], key: str, path: Path_, default: str | None = None
    ) -> str | None:
        value = m.get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            self.error((*path, key), f"expected a string, got {_kind(value)}")
            return default
        return value

    def strings(self, m: Mapping[str, Any], key: str, path: Path_) -> tuple[str, ...]:
        out = []
        for item_path, item in self.items(m, key, path):
            if isinstance(item, str):
                out.append(item)
            else:
                self.error(item_path, f"expected a string, got {_kind(item)}")
        return tuple(out)

    def string_map(self, m: Mapping[str, Any], key: str, path: Path_) -> dict[str, str]:
        value = m.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.error((*path, key), f"expected a mapping of strings, got {_kind(value)}")
            return {}
        out = {}
        for k, v in value.items():
            if not isinstance(v, str | int | float) or isinstance(v, bool):
                self.error((*path, key, k), f"expected a string, got {_kind(v)}")
                continue
            out[k] = str(v)
        return out

    def integer(
        self,
        m: Mapping[str, Any],
        key: str,
        path: Path_,
        default: int | None = None,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> int | None:
        value = m.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.error((*path, key), f"expected an integer, got {_kind(value)}")
            return default
        if minimum is not None and value < minimum:
            self.error((*path, key), f"must be at least {minimum}, got {value}")
            return default
        if maximum is not None and value > maximum:
            self.error((*path, key), f"must be at most {maximum}, got {value}")
            return default
        return value

    def port(self, m: Mapping[str, Any], key: str, path: Path_) -> int | None:
        return self.integer(m, key, path, minimum=1, maximum=65535)

    def boolean(self, m: Mapping[str, Any], key: str, path: Path_, default: bool = False) -> bool:
        value = m.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.error((*path, key), f"expected true or false, got {_kind(value)}")
            return default
        return value

    def duration(
        self, m: Mapping[str, Any], key: str, path: Path_, default: float | None = None
    ) -> float | None:
        value = m.get(key)
        if value is None:
            return default
        seconds = parse_duration(value) if isinstance(value, str) else None
        if seconds is None:
            self.error((*path, key), f'expected a duration such as "10s" or "250ms", got {value!r}')
            return default
        return seconds

    def choice(
        self,
        m: Mapping[str, Any],
        key: str,
        path: Path_,
        choices: Iterable[str],
        default: str | None = None,
    ) -> str | None:
        value = m.get(key)
        if value is None:
            return default
        choices = tuple(choices)
        if value not in choices:
            hint = did_you_mean(str(value), choices)
            self.error((*path, key), f"must be one of {', '.join(choices)}, got {value!r}{hint}")
            return default
        return str(value)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return f"boolean {value}".lower()
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"string {value!r}"
    if value is None:
        return "null"
    return f"{type(value).__name__} {value!r}"
