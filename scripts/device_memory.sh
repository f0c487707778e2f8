#!/usr/bin/env bash
# Issue 13, part 4, on a lent GPU: what chunking does to CUDA memory and speed, and that chunked
# results equal one batch there too. One bounded command (the device budget is 15 minutes in all):
#   DATA=.data/fa60 scripts/device_memory.sh   # DATA: a folder with images/ (60 FracAtlas files)
# OUT (the device's $OUT) receives machine.txt, identity-*.txt and memory-cuda-*.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-.data/fa60}
PY=${PY:-python3}
OUT=${OUT:-/tmp/device-out}
BUDGET=${BUDGET:-500}
START=$(date +%s)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
mkdir -p "$OUT"
log() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/machine.txt"; }
# step NAME SECONDS FILE CMD...: the command under a limit that never passes the budget
step() {
  local name=$1 limit=$2 file=$3; shift 3
  local remaining=$(( BUDGET - ($(date +%s) - START) - 5 ))
  (( limit > remaining )) && limit=$remaining
  if (( limit < 15 )); then log "skip $name: no time left"; return 0; fi
  log "$name (limit ${limit}s)"
  timeout --signal=INT --kill-after=5 "$limit" "$@" >"$OUT/$file" 2>&1
  log "$name: exit $?"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } \
  >>"$OUT/machine.txt" 2>&1
M="benchmarks/memory.py --device cuda --data $DATA"
step identity-shipped 60 identity-shipped.txt $PY $M --ensemble shipped --identity --views 3 20 60 --fixed 4
step identity-paper 120 identity-paper.txt $PY $M --ensemble paper --identity --views 3 20 --fixed 4
step memory-paper 240 memory-cuda-paper.txt $PY $M --ensemble paper --views 1 3 20 60 --fixed 4
step memory-shipped 120 memory-cuda-shipped.txt $PY $M --ensemble shipped --views 1 3 20 60 --fixed 4
log done
