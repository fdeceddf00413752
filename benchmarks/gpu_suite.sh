#!/usr/bin/env bash
# One call on a GPU machine (e.g. the device tool): install fastprune without touching the
# machine's torch/triton, run the GPU tests and every benchmark, and leave the results in
# benchmarks/results/ (and in $OUT when set). Usage: bash benchmarks/gpu_suite.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
quick=${1:-}
tag=$(python3 -c "import torch;print(torch.cuda.get_device_name().replace(' ','_'))" 2>/dev/null || echo gpu)
res=benchmarks/results
mkdir -p "$res"
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$res/gpu_${tag}_env.txt"
python3 -c "import torch,triton;print('torch',torch.__version__,'triton',triton.__version__,'cuda',torch.version.cuda)" | tee -a "$res/gpu_${tag}_env.txt"
python3 -m pytest -q tests/test_gpu.py tests/test_cuda_backend.py tests/test_triton_obs.py \
  tests/test_triton_swaps.py tests/test_compat.py tests/test_autoselect.py 2>&1 | tee "$res/gpu_${tag}_tests.txt"
# the compiler's register/spill report for this device's architecture
arch=$(python3 -c "import torch;print('sm_%d%d' % torch.cuda.get_device_capability())")
for f in obs_sweep swap_search; do
  nvcc -std=c++17 -O3 -arch="$arch" --resource-usage -c "csrc/$f.cu" -o /tmp/"$f".o 2>&1
done | tee "$res/gpu_${tag}_ptxas.txt"
# what backend='auto' picks here (times both once; cached)
python3 -c "
import torch, fastprune.ops as o
d = torch.device('cuda')
for ops in [('block_prune_mask', 'obs_sweep'), ('swap_search', 'swap_apply')]:
    print('auto', ops, '->', o.resolve_backend('auto', d, ops))
from fastprune.ops.autoselect import cache_path; print(cache_path().read_text())
" 2>&1 | tee -a "$res/gpu_${tag}_env.txt"
# one module per op: every backend that runs here, the original loops, the floors
for op in obs_sweep column_losses block_prune_mask swap_search; do
  python3 -m benchmarks.bench_$op $quick --out "$res/${op}_${tag}" 2>&1 | tail -100
done
# end to end (DESIGN §5): 7B shape, 4 of 32 blocks, and 70B shape, 1 of 80 blocks, projected
python3 -m benchmarks.bench_end_to_end --shape llama2-7b --blocks 4 --out "$res/e2e_llama2-7b_${tag}" 2>&1 | tail -3
python3 -m benchmarks.bench_end_to_end --shape llama2-70b --blocks 1 --out "$res/e2e_llama2-70b_${tag}" 2>&1 | tail -3
if [ -n "${OUT:-}" ]; then cp "$res"/*"${tag}"* "$OUT"/ 2>/dev/null; fi
