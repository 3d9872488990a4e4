"""docs/robustness.md names, for every catalog case, tests that exist: each bold
`file::test` is a test function in that file, and every row has one under tests/robustness."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TABLE = REPO / "docs" / "robustness.md"
_DASH = "\u2013"  # the en dash in a range of ids, as in "G04 to G06"
_BOLD = re.compile(r"\*\*([^*]+)\*\*")
# The catalog's groups and how many cases each has (101 in all).
_CASES = {"A": 13, "B": 8, "C": 8, "D": 10, "E": 7, "F": 6, "G": 11, "H": 8, "I": 11, "J": 3}
_CASES |= {"K": 8, "L": 8}


def _expand(case: str) -> list[str]:
    first, _, last = case.partition(_DASH)
    end = int(last[1:]) if last else int(first[1:])
    return [f"{first[0]}{n:02d}" for n in range(int(first[1:]), end + 1)]


def _rows() -> list[tuple[str, list[tuple[Path, str]]]]:
    rows = []
    for line in TABLE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not re.fullmatch(rf"[A-L]\d\d({_DASH}[A-L]\d\d)?", cells[0]):
            continue
        named: list[tuple[Path, str]] = []
        current: Path | None = None
        for ref in _BOLD.findall(cells[-1]):
            file, _, test = ref.partition("::")
            if file:
                path = Path(file)
                current = (
                    REPO / path if path.parts[0] == "tests" else REPO / "tests/robustness" / path
                )
            assert current is not None, f"{cells[0]}: {ref} names no file"
            named.append((current, test.split("[")[0]))
        rows.append((cells[0], named))
    return rows


def test_every_named_test_exists() -> None:
    rows = _rows()
    listed = sorted(i for case, _ in rows for i in _expand(case))
    assert listed == sorted(
        f"{g}{n:02d}" for g, count in _CASES.items() for n in range(1, count + 1)
    )
    for case, named in rows:
        for path, test in named:
            assert path.is_file(), f"{case}: {path} does not exist"
            if test:
                assert re.search(rf"^(async )?def {re.escape(test)}\(", path.read_text(), re.M), (
                    f"{case}: {path.name} has no {test}"
                )


def test_every_case_has_a_test_under_tests_robustness_named_by_its_id() -> None:
    for case, named in _rows():
        first = case.split(_DASH)[0]
        # A test function named by the id, or a whole file named by it (test_catalog_a13.py).
        under = [t or p.name.upper() for p, t in named if p.parent == REPO / "tests/robustness"]
        assert under, f"{case}: no test under tests/robustness"
        assert any(first in t for t in under), f"{case}: no test named by its id"
