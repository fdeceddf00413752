#!/usr/bin/env bash
# A second virtualenv, .venv-llmc, for the llm-compressor end-to-end test alone: llmcompressor
# pins transformers to a narrow range (0.14.0.1: >=5.15,<=5.17) that can lag the newest one
# the main .venv gets, so it gets its own pinned, co-installable set here (CPU torch, pinned
# so the resolver cannot pull the CUDA wheels). Fails if anything does not install.
# Run the test with: FASTPRUNE_REQUIRE=llmcompressor .venv-llmc/bin/python -m pytest -q \
#   tests/test_compat.py -k llmcompressor   (a skip for want of llmcompressor then fails)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LLMC=("torch==2.13.0" "llmcompressor==0.14.0.1" "transformers==5.17.0")
[ -d .venv-llmc ] || "$PY" -m venv .venv-llmc
. .venv-llmc/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "${LLMC[0]}"
python -m pip install -q -e ".[test]" "${LLMC[@]}"
python -c "import torch, transformers, llmcompressor, fastprune; print('llmcompressor', llmcompressor.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
