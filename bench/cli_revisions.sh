#!/bin/bash
# fapm prune with worker/ at an earlier revision and at the working tree, interleaved, per method.
#
#   bench/cli_revisions.sh PAIR_DIR BEFORE_REV [METHODS...]     (default: dare breadcrumbs nps fapm)
#
# PAIR_DIR is bench/make_pair.py's output (base/, finetuned/). The earlier revision is checked out
# as a detached worktree under /tmp and imported ahead of the installed tree, so both legs share
# .venv. Digest cache off; /usr/bin/time's wall, CPU and peak RSS and the output's sha256 per run.
set -euo pipefail
pair=$1 before=$2
shift 2
methods=${*:-dare breadcrumbs nps fapm}
repo=$(cd "$(dirname "$0")/.." && pwd)
tree=/tmp/fapm-bench-before-$before
[ -d "$tree" ] || git -C "$repo" worktree add -q --detach "$tree" "$before"
export FAPM_DIGEST_CACHE=off
for m in $methods; do
  extra=()
  [ "$m" = nps ] && extra=(--nps-weights 1,2,0.5,1.5,0,2.5,1,0.7)
  for leg in "$before:$tree" "HEAD:$repo"; do
    name=${leg%%:*} path=${leg#*:} out=/tmp/fapm-bench-rev-$m-${name}
    /usr/bin/time -f "$m $name %e s wall %U user %S sys %M KB" "$repo/.venv/bin/python" -c \
      "import sys; sys.path.insert(0, '$path'); import worker; assert worker.__file__.startswith('$path'); from worker.cli import main; sys.exit(main(sys.argv[1:]))" \
      prune --base "$pair/base" --finetuned "$pair/finetuned" --out "$out" --method "$m" \
      --sparsity 0.9 --overwrite "${extra[@]}" 2>&1 >/dev/null | tr '\r' '\n' | grep -a ' wall '
    sha256sum "$out"/*.safetensors | cut -c1-12
  done
done
