#!/usr/bin/env bash
# The GPU run of issues #20 and #22 (recorded so that it can be repeated): both sweeps side by side on one GPU.
# Every run of them also runs on a CPU (drop --device cuda; the configs give the CPU commands).
#   bash scripts/gpu-sweeps.sh OUT_DIR [SECONDS]
# OUT_DIR gets results.tgz (runs.jsonl, failures, per-run summaries, log tails and summaries) and the winners'
# weights (scripts/gpu_pack.py) as weights.tar.partNN pieces of at most 15 MiB.
set -uo pipefail
OUT=${1:?usage: gpu-sweeps.sh OUT_DIR [SECONDS]}
LIMIT=${2:-470}
mkdir -p "$OUT" runs
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
timeout "$LIMIT" $PY -m lmlab sweep run --config configs/sweep-dialogsum.yaml --device cuda --workers 5 \
    --threads-per-run 2 > runs/dialogsum.log 2>&1 &
timeout "$LIMIT" $PY -m lmlab sweep run --config configs/sweep-student.yaml --device cuda --workers 3 \
    --threads-per-run 2 > runs/student.log 2>&1 &
wait
STAGE=$(mktemp -d)
nvidia-smi > "$STAGE/gpu.txt" 2>&1 || true
$PY scripts/gpu_pack.py "$STAGE" > "$STAGE/pack.log" 2>&1 || echo "packing failed" >> "$STAGE/pack.log"
cp runs/dialogsum.log runs/student.log "$STAGE/"
for s in dialogsum student; do
  mkdir -p "$STAGE/results/$s"
  cp runs/sweep-$s/runs.jsonl runs/sweep-$s/failed.jsonl "$STAGE/results/$s/" 2>/dev/null || true
  for d in runs/sweep-$s/*/; do  # each run's training summary, log tails and summaries
    id=$(basename "$d"); mkdir -p "$STAGE/results/$s/$id"
    cp "$d/train/summary.json" "$STAGE/results/$s/$id/" 2>/dev/null || true
    tail -n 30 "$d/train.log" > "$STAGE/results/$s/$id/train.log.tail" 2>/dev/null || true
    for e in "$d"/eval-*.log; do [ -f "$e" ] && tail -n 15 "$e" > "$STAGE/results/$s/$id/$(basename "$e").tail"; done
    for r in "$d"/eval-*/results.jsonl; do
      [ -f "$r" ] && cp "$r" "$STAGE/results/$s/$id/$(basename "$(dirname "$r")").results.jsonl"
    done
  done
done
tar czf "$OUT/results.tgz" -C "$STAGE" results gpu.txt pack.log dialogsum.log student.log $( [ -f "$STAGE/winners.json" ] && echo winners.json )
[ -f "$STAGE/weights.tar" ] && split -b 15M -d "$STAGE/weights.tar" "$OUT/weights.tar.part"
ls -la "$OUT"
