#!/usr/bin/env bash
# Create bench/.mergekit-venv with mergekit==0.1.5 for bench/bench_prune.py's (c) leg.
#
# torch is installed first and pinned (torch==2.13.0, the CPU wheel on this machine's disk): an
# unpinned torch would pull a multi-GB CUDA build. The same pin goes to pip as a constraints file
# when mergekit is installed, so its resolver can never swap torch out.
# Idempotent: a second run only checks that mergekit-yaml is there.
set -euo pipefail
cd "$(dirname "$0")"

python=${PYTHON:-python3.11}
venv=.mergekit-venv
if [ -x "$venv/bin/mergekit-yaml" ] && "$venv/bin/python" -c 'import mergekit, torch; assert torch.__version__.startswith("2.13.0")' 2>/dev/null; then
  echo "mergekit venv ready: $(cd "$venv" && pwd)"
  exit 0
fi

"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==2.13.0" > "$constraints"
"$venv/bin/python" -m pip install --quiet -c "$constraints" "torch==2.13.0"
"$venv/bin/python" -m pip install --quiet -c "$constraints" "mergekit==0.1.5"
"$venv/bin/python" -c 'import mergekit, torch; print("mergekit ok; torch", torch.__version__)'
"$venv/bin/mergekit-yaml" --help >/dev/null
echo "mergekit venv ready: $(cd "$venv" && pwd)"
