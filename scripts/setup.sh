#!/usr/bin/env bash
# Set up a fresh machine: a virtualenv in .venv with the CPU build of torch, triton (its
# interpreter runs the kernels on CPU), fastprune (editable) and the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned, so nothing below pulls the multi-GB CUDA wheels
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[triton,test]"
python -c "import torch, triton, fastprune; print('fastprune', fastprune.__version__, 'torch', torch.__version__, 'triton', triton.__version__)"
