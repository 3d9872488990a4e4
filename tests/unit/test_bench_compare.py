"""benchmarks/compare.py: a run against the saved baseline, regressions marked, never failed."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.compare import compare, main


def _run(path: Path, medians: dict[str, float], build: str = "compiled (mypyc)") -> Path:
    path.write_text(
        json.dumps(
            {
                "machine_info": {"node": "box", "cpu": {"brand_raw": "cpu"}},
                "benchmarks": [
                    {"fullname": name, "stats": {"median": m}, "extra_info": {"build": build}}
                    for name, m in medians.items()
                ],
            }
        )
    )
    return path


def test_slower_cases_are_marked_and_the_rest_are_not(tmp_path: Path) -> None:
    base = _run(tmp_path / "base.json", {"a": 1e-6, "b": 2e-6, "gone": 1e-6})
    now = _run(tmp_path / "now.json", {"a": 1.05e-6, "b": 3e-6, "new": 5e-9})
    lines = compare(base, now, 0.10)
    row = {line.split()[0]: line for line in lines}
    assert "REGRESSION" not in row["a"] and "1.05x" in row["a"]
    assert "REGRESSION" in row["b"] and "1.50x" in row["b"]
    assert "new" in row["new"] and "in the baseline, not run now" in row["gone"]
    assert lines[-1] == "1 of 3 cases more than 10% slower than the baseline"


def test_mixed_builds_are_called_out_and_the_exit_status_stays_zero(
    tmp_path: Path, capsys: object
) -> None:
    base = _run(tmp_path / "base.json", {"a": 1e-6}, build="interpreted")
    now = _run(tmp_path / "now.json", {"a": 1e-6})
    assert main([str(now), "--baseline", str(base)]) == 0
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    assert "builds differ: compiled (mypyc) vs interpreted" in out
