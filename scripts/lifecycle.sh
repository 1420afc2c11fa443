#!/usr/bin/env bash
# The generative-AI lifecycle of the course notes, example 2, end to end on DialogSum:
#
#   1. fine-tune the teacher on labeled data        lmlab finetune  (or reuse the adapter lmlab ships)
#   2. distill a student                            lmlab distill   (half the teacher's layers + a LoRA adapter
#                                                                    trained on human and teacher summaries)
#   3. quantize the student                          lmlab serve --quantize int8 (weight-only, when it loads)
#   4. serve the student                             lmlab serve --student (OpenAI-compatible API + playground)
#
# Usage:  bash scripts/lifecycle.sh [--retrain-teacher] [--quick] [--no-serve] [--out DIR] [--threads N] [--port P]
#
#   --retrain-teacher  step 1 trains a LoRA adapter with configs/finetune-smollm2-dialogsum-lora.yaml (about
#                      35 minutes on 2 cores) instead of reusing src/lmlab/adapters/smollm2-135m-instruct-dialogsum-lora
#   --quick            a smoke run: 8 unlabeled dialogues, 2 training steps (minutes; the student is not useful)
#
# The student is a bundle (docs/distill.md, "The student bundle"): the kept layers' share of the teacher's
# adapter plus the student's own adapter, ~29 MB over the base model's weights.
#   --no-serve         stop after step 3 (step 4 blocks until Ctrl-C)
#
# Every step resumes: rerun the same command after an interruption (the teacher's pseudo-labels and the
# training checkpoints are kept in OUT). Needs ../shared/data/dialogsum (hiddentest.jsonl, dev.jsonl); dev
# records 400-499 are the evaluation range and never train (lmlab distill refuses them).
set -euo pipefail

OUT=runs/lifecycle
THREADS=1
PORT=8000
RETRAIN=0
QUICK=0
SERVE=1
DATA=../shared/data/dialogsum
while [[ $# -gt 0 ]]; do
  case "$1" in
    --retrain-teacher) RETRAIN=1 ;;
    --quick) QUICK=1 ;;
    --no-serve) SERVE=0 ;;
    --out) OUT="$2"; shift ;;
    --threads) THREADS="$2"; shift ;;
    --port) PORT="$2"; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
cd "$(dirname "$0")/.."
LMLAB=".venv/bin/lmlab"
[[ -x "$LMLAB" ]] || LMLAB="lmlab"
resume_flag() { [[ -f "$1/checkpoint.pt" ]] && echo "--resume" || true; }

# 1. the teacher: SmolLM2-135M-Instruct + a DialogSum LoRA adapter
if [[ $RETRAIN == 1 ]]; then
  echo "== 1. fine-tune the teacher (LoRA) on DialogSum dev 0-399"
  STEPS=(); [[ $QUICK == 1 ]] && STEPS=(--steps 2 --set eval.rouge_examples=2)
  "$LMLAB" --threads "$THREADS" finetune --config configs/finetune-smollm2-dialogsum-lora.yaml \
    --out "$OUT/teacher" "${STEPS[@]}" $(resume_flag "$OUT/teacher")
  ADAPTER="$OUT/teacher/best"
else
  ADAPTER=src/lmlab/adapters/smollm2-135m-instruct-dialogsum-lora
  echo "== 1. the teacher: the shipped adapter $ADAPTER (--retrain-teacher trains it again)"
fi

# 2. the student: every other layer of the teacher + a LoRA adapter trained on the human summaries of dev 0-399
#    and the teacher's summaries of those and of the unlabeled hiddentest dialogues (a student bundle)
echo "== 2. distill a 15-layer student (LoRA) from human and teacher summaries"
SIZE=()
if [[ $QUICK == 1 ]]; then
  SIZE=(--data "$DATA/hiddentest.jsonl:0:8" --steps 2)
else
  SIZE=(--data "$DATA/hiddentest.jsonl" "$DATA/dev.jsonl:0:400")
fi
"$LMLAB" --threads "$THREADS" distill --config configs/distill-smollm2-dialogsum-student.yaml \
  --teacher-adapter "$ADAPTER" --out "$OUT/student" "${SIZE[@]}" $(resume_flag "$OUT/student")
STUDENT="$OUT/student/best"
[[ -f "$STUDENT/lmlab_student.json" ]] || { echo "error: $STUDENT is not a student bundle" >&2; exit 1; }
echo "   student bundle: $STUDENT ($(du -sh "$STUDENT" | cut -f1))"

# 3 + 4. serve it, quantized to int8 as it loads (the adapters are merged first, then every linear quantized):
#    /v1/chat/completions, /v1/summarize (the student's recipe), the playground at /
SERVE_CMD=("$LMLAB" --threads "$THREADS" serve smollm2-135m-instruct --student "$STUDENT" --quantize int8 --port "$PORT")
if [[ $SERVE == 1 ]]; then
  echo "== 3. quantize the student to int8 (weight-only, when the server loads it)"
  echo "== 4. serve the student on http://127.0.0.1:$PORT/ (Ctrl-C stops)"
  exec "${SERVE_CMD[@]}"
fi
echo "done: student bundle in $STUDENT; serve it (int8) with: ${SERVE_CMD[*]}"
