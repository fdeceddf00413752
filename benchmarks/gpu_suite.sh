#!/usr/bin/env bash
# The GPU suite in steps, each meant for one device call of under 8 minutes:
#
#   bash benchmarks/gpu_suite.sh tests     # versions, ptxas report, the GPU tests (~3 min on an H100)
#   bash benchmarks/gpu_suite.sh quick     # every benchmarks.bench_<op> --quick (~1 min)
#   bash benchmarks/gpu_suite.sh kernels   # every benchmarks.bench_<op> at full shapes
#   bash benchmarks/gpu_suite.sh e2e       # prune_model on the 7B (4 blocks) and 70B (1 block) shapes
#   bash benchmarks/gpu_suite.sh moe       # one Qwen3-30B-A3B block; experts batched vs one by one
#
# Several steps may follow one another in one call (`gpu_suite.sh tests kernels`).
# Every command runs under `timeout`; after each one the step's results are bundled again
# into $OUT/<step>.tgz and its log is $OUT/<step>.log, so a call always brings back what
# finished (two files per step). Without $OUT the results stay in benchmarks/results/gpu/.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
[ $# -gt 0 ] || {
  echo "usage: gpu_suite.sh STEP... (tests, quick, kernels, e2e, moe)" >&2
  exit 2
}
out=${OUT:-benchmarks/results/gpu}
mkdir -p "$out"
step=setup
log="$out/setup.log"
snap() { tar czf "$out/$step.tgz" -C "$res" . 2>/dev/null; }
say() { echo "== $* ($(date +%T))" | tee -a "$log"; }
# run SECONDS CMD...: one timed-out command, its output into the log, then a snapshot
run() {
  local limit=$1
  shift
  say "$*"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || say "exit $rc: $*"
  snap
}
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$log" 2>&1 || {
  say "install failed"
  exit 1
}
tag=$(python3 -c "import torch;print(torch.cuda.get_device_name().replace(' ','_'))" 2>/dev/null || echo gpu)

for step in "$@"; do
res=$(mktemp -d)
log="$out/$step.log"
: >"$log"
case $step in
tests)
  run 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  run 60 python3 -c "import torch,triton,transformers;print('torch',torch.__version__,'triton',triton.__version__,'cuda',torch.version.cuda,'transformers',transformers.__version__,'sms',torch.cuda.get_device_properties(0).multi_processor_count)"
  arch=$(python3 -c "import torch;print('sm_%d%d' % torch.cuda.get_device_capability())")
  for f in obs_sweep swap_search; do
    run 120 nvcc -std=c++17 -O3 -arch="$arch" --resource-usage -c "csrc/$f.cu" -o "/tmp/$f.o"
  done
  # GPU tests: every op on every backend against its float64 oracle, the solvers on CUDA
  xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n 6")
  run 330 python3 -m pytest -q -rfEs $xdist --junitxml="$res/gpu_${tag}_tests.xml" \
    tests/ops tests/test_backends.py tests/test_gpu.py tests/test_cuda_ext.py tests/test_autoselect.py \
    "tests/test_stream_prune.py::test_streamed_on_cuda_equals_in_memory_on_cuda"
  ;;
quick)
  for op in obs_sweep column_losses block_prune_mask swap_search; do
    run 90 python3 -m benchmarks.bench_$op --quick --out "$res/${op}_quick_${tag}"
  done
  ;;
kernels)
  run 150 python3 -m benchmarks.bench_obs_sweep --out "$res/obs_sweep_${tag}"
  run 90 python3 -m benchmarks.bench_column_losses --out "$res/column_losses_${tag}"
  run 60 python3 -m benchmarks.bench_block_prune_mask --out "$res/block_prune_mask_${tag}"
  run 120 python3 -m benchmarks.bench_swap_search --out "$res/swap_search_${tag}"
  run 60 python3 -m benchmarks.bench_inverse --check --out "$res/inverse_${tag}"
  ;;
e2e)
  run 270 python3 -m benchmarks.bench_end_to_end --shape llama2-7b --blocks 4 --out "$res/e2e_llama2-7b_${tag}"
  run 150 python3 -m benchmarks.bench_end_to_end --shape llama2-70b --blocks 1 --out "$res/e2e_llama2-70b_${tag}"
  ;;
moe)
  run 60 python3 -m pytest -q tests/test_sparsegpt_batched.py tests/test_moe.py -k "sweep or experts or fused"
  run 120 python3 -m benchmarks.bench_experts_batch --out "$res/experts_batch_${tag}"
  run 240 python3 -m benchmarks.bench_end_to_end --shape qwen3-30b-a3b --blocks 2 --dtype bfloat16 \
    --method sparsegpt --out "$res/e2e_qwen3-30b-a3b_${tag}"
  ;;
*)
  echo "unknown step $step (tests, quick, kernels, e2e, moe)" >&2
  exit 2
  ;;
esac
say "done"
done
