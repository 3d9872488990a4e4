"""The README's fenced blocks, read the same way by its tests and by `.ci/run`.

Standard library only: CI runs it with the system Python before any virtualenv exists
(`python3 tests/source/readme_blocks.py quick-start` prints the quick start's first command).
"""

from __future__ import annotations

import sys
from pathlib import Path

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def section(heading: str) -> str:
    start = README.index(heading + "\n")
    end = README.find("\n#", start + len(heading))
    return README[start : end if end >= 0 else None]


def code_blocks(text: str, lang: str = "sh") -> list[str]:
    """The fenced blocks of `text` whose info string is `lang` ("" for plain fences)."""
    blocks: list[str] = []
    current: list[str] | None = None
    for line in text.splitlines():
        if current is None and line.startswith("```"):
            current = [] if line[3:].strip() == lang else None
            if current is None:
                current = ["<other>"]
        elif current is not None and line.startswith("```"):
            if current[:1] != ["<other>"]:
                blocks.append("\n".join(current) + "\n")
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def quick_start_command() -> str:
    """The quick start's first command: install, then run the demo."""
    return code_blocks(section("## Quick start"))[0].strip()


if __name__ == "__main__":
    if sys.argv[1:] != ["quick-start"]:
        sys.exit("usage: readme_blocks.py quick-start")
    print(quick_start_command())
