#!/usr/bin/env bash
# One lent-GPU session in one bounded command (the device budget is 15 minutes in all, starts
# included): train a config's members side by side on the one GPU under a wall-clock cap, bring
# the weights back at once, then a short torchrun (NCCL) run, the `paper` ensemble's inference
# speed, and the calibration and validation evaluation of what was trained, each step with its
# own time limit, so a slow step costs the later ones, never the weights.
#   CONFIG=configs/gpu-crossfit.toml DATA=.data/fa384 BUDGET=540 TRAIN_MINUTES=4.5 \
#     scripts/device_session.sh        # OUT (the device's $OUT) receives everything
# OUT/weights/ (manifest, split, members), OUT/logs/ (console, per-member logs and histories),
# OUT/ddp/, OUT/bench-paper-h200.txt, OUT/eval/.
set -uo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/gpu-crossfit.toml}
DATA=${DATA:-.data/fa384}
PY=${PY:-python3}
BUDGET=${BUDGET:-575}            # seconds for the whole script
TRAIN_MINUTES=${TRAIN_MINUTES:-4.5}
OUT=${OUT:-/tmp/device-out}
WORK=${WORK:-/tmp/device-session}
START=$(date +%s)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
rm -rf "$WORK"; mkdir -p "$WORK" "$OUT/logs" "$OUT/weights"
W="$WORK/weights"; R="$WORK/runs"; L="$OUT/logs"
exec 3>&1  # the console, whatever a step's output is redirected to
log() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$L/console.log" >&3; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
# run STEP SECONDS CMD...: the command under a limit that never passes the script's budget
step() {
  local name=$1 limit=$2; shift 2
  local remaining; remaining=$(left)
  (( limit > remaining - 5 )) && limit=$(( remaining - 5 ))
  if (( limit < 10 )); then log "skip $name: no time left"; return 0; fi
  log "$name (limit ${limit}s)"
  timeout --signal=INT --kill-after=5 "$limit" "$@"
  local rc=$?
  log "$name: exit $rc"
}

{ nvidia-smi -L; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  nproc; $PY -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, torch.cuda.is_available())"
  for m in numpy cv2 sklearn safetensors tqdm matplotlib scipy; do
    $PY -c "import $m" 2>/dev/null && echo "have $m" || echo "MISSING $m"; done
} 2>&1 | tee -a "$L/console.log"

step prepare 120 $PY -m inference train --config "$CONFIG" --data "$DATA" --out "$W" --runs "$R" \
  --prepare-only --no-progress >"$L/prepare.log" 2>&1
members=$($PY -c "
from inference.training.config import load_config
print(' '.join(m.draft.name for m in load_config('$CONFIG').members))")
log "train side by side, ${TRAIN_MINUTES} min each: $members"
pids=()
for m in $members; do
  $PY -m inference train --config "$CONFIG" --data "$DATA" --out "$W" --runs "$R" --member "$m" \
    --set "max_minutes=$TRAIN_MINUTES" --no-progress >"$L/$m.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || log "a member failed (pid $pid)"; done
log "trained"
for m in $members; do cp "$R/$m/history.jsonl" "$L/$m.history.jsonl" 2>/dev/null; done
cp -r "$W"/. "$OUT/weights/"
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv >>"$L/console.log" 2>&1

# torchrun: one process on the one GPU takes the NCCL + DDP path of a multi-GPU run
first=${members%% *}
mkdir -p "$WORK/ddp-runs" "$OUT/ddp"; ln -s "$R/cache" "$WORK/ddp-runs/cache"
step "torchrun 1 x NCCL" 75 $PY -m torch.distributed.run --standalone --nproc_per_node=1 \
  -m inference train --config "$CONFIG" --data "$DATA" --out "$WORK/ddp-weights" \
  --runs "$WORK/ddp-runs" --member "$first" --set epochs=2 --set max_minutes=0.6 --no-progress \
  >"$OUT/ddp/console.log" 2>&1
cp "$WORK/ddp-runs/$first/history.jsonl" "$OUT/ddp/" 2>/dev/null

step "paper inference speed" 120 $PY benchmarks/inference_speed.py --ensemble paper --no-cpu \
  --no-compile --runs 2 --gpu-batches 16 --verbose >"$OUT/bench-paper-h200.txt" 2>&1

step calibrate 120 $PY -m inference calibrate --weights "$W" --data "$DATA" >"$L/calibrate.log" 2>&1
cp "$W/manifest.toml" "$OUT/weights/manifest.calibrated.toml" 2>/dev/null
step "evaluate validation" 90 $PY -m inference evaluate --weights "$W" --data "$DATA" \
  --subset validation --out "$OUT/eval" >"$L/evaluate.log" 2>&1
log "done"
