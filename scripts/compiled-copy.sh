#!/usr/bin/env bash
# Copy the package, tests and configs to DEST and compile the hot path there with mypyc,
# in place (the .so files land next to the .py files of the copy, never of this tree).
# usage: scripts/compiled-copy.sh DEST [PYTHON]    (PYTHON must have mypy installed)
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
dest=$1
python=${2:-python3}
mkdir -p "$dest"
cp -r "$src/meshproxy" "$src/tests" "$src/config" "$src/benchmarks" "$src/pyproject.toml" \
  "$src/hot-modules.txt" "$dest/"
# config/demo is a symlink into the package: keep it pointing inside the copy.
cd "$dest"
mapfile -t modules < <(grep -v '^#' hot-modules.txt | sed '/^\s*$/d')
"$python" -m mypyc "${modules[@]}" > mypyc.log 2>&1 || { tail -40 mypyc.log >&2; exit 1; }
rm -rf build
echo "compiled ${#modules[@]} modules in $dest"
