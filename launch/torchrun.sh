#!/usr/bin/env bash
# Pretrain on one node with NPROC ranks (gloo on CPU, NCCL on GPUs):
#
#   launch/torchrun.sh NPROC CONFIG.yaml [section.key=value ...]
#
# runs `torchrun --standalone --nproc-per-node NPROC -m pretrain CONFIG.yaml ...` from any
# folder (the repository is put on PYTHONPATH), after checking the config against NPROC ranks
# as `python -m launch --dry-run CONFIG.yaml ... --world-size NPROC` does: an impossible layout
# stops here with its one-line error, before any rank starts. PYTHON: the interpreter of that
# check (default python3, the one torchrun should run too).
set -euo pipefail

usage() {
  echo "usage: launch/torchrun.sh NPROC CONFIG.yaml [section.key=value ...]" >&2
  echo "  runs torchrun --standalone --nproc-per-node NPROC -m pretrain CONFIG.yaml [overrides]" >&2
  exit 2
}

[[ $# -ge 2 && $1 =~ ^[1-9][0-9]*$ ]] || usage
nproc=$1
shift

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
# The check's report is not shown; on failure, its error is.
error=$("${PYTHON:-python3}" -m launch --dry-run "$@" --world-size "$nproc" 2>&1 >/dev/null) || {
  status=$?
  printf '%s\n' "$error" >&2
  exit "$status"
}
exec torchrun --standalone --nproc-per-node "$nproc" -m pretrain "$@"
