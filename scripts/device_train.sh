#!/usr/bin/env bash
# Train an ensemble config's members in parallel on one GPU, then calibrate and evaluate it.
# Made for the lent GPU machine (its python3 has torch, numpy, opencv, scikit-learn, safetensors):
#   CONFIG=configs/gpu-reference.toml DATA=.data/fa384 OUT=/some/dir scripts/device_train.sh
# Writes OUT/<member>.safetensors (one file each) and OUT/results.tar.gz (manifest, split,
# training log, per-epoch histories, evaluation of the validation split, console log).
set -uo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/gpu-reference.toml}
DATA=${DATA:-.data/fa384}
PY=${PY:-python3}
WORK=${WORK:-/tmp/device-train}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
rm -rf "$WORK"; mkdir -p "$WORK/weights" "$WORK/logs"
W="$WORK/weights"; R="$WORK/runs"
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$WORK/logs/console.log"; }
command -v nvidia-smi >/dev/null && nvidia-smi -L | tee -a "$WORK/logs/console.log"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
  | tee -a "$WORK/logs/console.log"
log "prepare"
$PY -m inference train --config "$CONFIG" --data "$DATA" --out "$W" --runs "$R" --prepare-only \
  --no-progress 2>&1 | tee -a "$WORK/logs/console.log"
members=$($PY -c "
from inference.training.config import load_config
print(' '.join(m.draft.name for m in load_config('$CONFIG').members))")
log "train in parallel: $members"
pids=()
for m in $members; do
  $PY -m inference train --config "$CONFIG" --data "$DATA" --out "$W" --runs "$R" --member "$m" \
    --no-progress >"$WORK/logs/$m.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || log "a member failed (pid $pid)"; done
log "trained"; tail -n 3 "$WORK"/logs/*.log
log "calibrate"
$PY -m inference calibrate --weights "$W" --data "$DATA" 2>&1 | grep -v predicting | tee -a "$WORK/logs/console.log"
log "evaluate validation split"
$PY -m inference evaluate --weights "$W" --data "$DATA" --subset validation --out "$WORK/eval" \
  2>&1 | grep -v predicting | tee -a "$WORK/logs/console.log"
for m in $members; do cp "$R/$m/history.jsonl" "$WORK/logs/$m.history.jsonl" 2>/dev/null; done
log "done"
if [ -n "${OUT:-}" ]; then
  cp "$W"/*.safetensors "$OUT"/ 2>/dev/null
  tar -czf "$OUT/results.tar.gz" -C "$WORK" --exclude='*.safetensors' weights logs eval
fi
