"""Compare a micro-benchmark run with the saved baseline and print what got slower.

    python -m pytest benchmarks --benchmark-enable --benchmark-json=/tmp/now.json
    python -m benchmarks.compare [--baseline benchmarks/baseline.json] /tmp/now.json

Medians are compared (the mean carries this shared machine's outliers). A case more than
--threshold slower than its baseline is marked REGRESSION; the exit status stays 0, since a
benchmark here prints figures and never fails a build. To save a new baseline, run the first
command with --benchmark-json=benchmarks/baseline.json on the machine the figures are for
(then drop each case's stats.data, every round's timing: 28 MB, and only medians are read);
comparing across machines or builds (compiled / interpreted, recorded per case) says so.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

BASELINE = Path(__file__).with_name("baseline.json")


def _cases(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    data = json.loads(path.read_text())
    return data.get("machine_info", {}), {b["fullname"]: b for b in data["benchmarks"]}


def compare(baseline: Path, current: Path, threshold: float) -> list[str]:
    """The report's lines."""
    base_machine, base = _cases(baseline)
    now_machine, now = _cases(current)
    lines = []
    if base_machine.get("node") != now_machine.get("node") or base_machine.get("cpu", {}).get(
        "brand_raw"
    ) != now_machine.get("cpu", {}).get("brand_raw"):
        lines.append("note: the baseline was measured on another machine; ratios are rough")
    width = max((len(name) for name in now), default=10)
    lines.append(f"{'case':<{width}}  {'baseline':>10}  {'now':>10}  {'ratio':>6}")
    regressions = 0
    for name, case in sorted(now.items()):
        median = case["stats"]["median"]
        old = base.get(name)
        if old is None:
            lines.append(f"{name:<{width}}  {'-':>10}  {_time(median):>10}  {'new':>6}")
            continue
        ratio = median / old["stats"]["median"]
        mark = ""
        if ratio > 1 + threshold:
            mark = "  REGRESSION"
            regressions += 1
        builds = {old.get("extra_info", {}).get("build"), case.get("extra_info", {}).get("build")}
        if len(builds) > 1:
            mark += f"  (builds differ: {' vs '.join(sorted(str(b) for b in builds))})"
        lines.append(
            f"{name:<{width}}  {_time(old['stats']['median']):>10}  {_time(median):>10}  "
            f"{ratio:>5.2f}x{mark}"
        )
    for name in sorted(set(base) - set(now)):
        lines.append(f"{name:<{width}}  (in the baseline, not run now)")
    lines.append(
        f"{regressions} of {len(now)} cases more than {threshold:.0%} slower than the baseline"
    )
    return lines


def _time(seconds: float) -> str:
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    if seconds >= 1e-6:
        return f"{seconds * 1e6:.2f} us"
    return f"{seconds * 1e9:.0f} ns"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("current", type=Path, help="a --benchmark-json file of the run to check")
    parser.add_argument("--baseline", type=Path, default=BASELINE)
    parser.add_argument("--threshold", type=float, default=0.10, help="0.10: 10%% slower")
    args = parser.parse_args(argv)
    for line in compare(args.baseline, args.current, args.threshold):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
