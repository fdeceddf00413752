// fastprune CUDA kernels: torch-free entry points (raw pointers, sizes, a stream).
// Each returns the launch's cudaError_t; the torch binding (binding.cpp) checks tensors.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace fastprune {

// Op obs_sweep (contract: fastprune/ops/obs_sweep.py). Masks are keep-masks (1 = kept).
// For column i of the block: err = (w_i * !keep_i) / Hinv[i,i]; W[:, j] -= err * Hinv[i, j]
// for j > i. prune_n > 0 picks each group's prune_n lowest w^2 / Hinv_jj^2 (ties: lower
// column) from the updated weights when the sweep reaches it, and keep_in (may be null)
// forces its zeros pruned (score -1: before every real score); else keep_in is used as given. count <= 256; N:M needs
// 32 % prune_m == 0. Outputs Q, Err are [rows, count] row-major; keep_out is [rows, count]
// bytes (0/1); loss is [rows] = sum err^2 / 2.
cudaError_t obs_sweep_f32(const float* W, int64_t stride_wm, int64_t stride_wn,
                          const float* Hinv, int64_t stride_hm, int64_t stride_hn,
                          const uint8_t* keep_in, int64_t stride_km, int64_t stride_kn,
                          float* Q, float* Err, uint8_t* keep_out, float* loss, int rows,
                          int count, int prune_n, int prune_m, cudaStream_t stream);
// The grids of a quantized sweep (contract: the op's QuantBlock). scale and zero are
// [layers, rows, groups] row-major, groups = ceil(count / group_size); column i uses group
// i / group_size: q = scale * (clamp(rint(w / scale) + zero, 0, maxq) - zero), or (fp8)
// float8_e4m3(w / scale) * scale, of w * keep; its error is (w - q) / Hinv[i,i]. With find,
// a group's grid is found from its updated columns when the sweep reaches its first column
// (GPTQ's find_params) and written over scale/zero; else scale/zero are only read.
struct ObsSweepQuant {
  float* scale = nullptr;
  float* zero = nullptr;
  int groups = 0;
  int group_size = 1;
  int maxq = 1;  // 2^bits - 1 (ignored by fp8)
  bool sym = false;
  bool fp8 = false;
  bool find = false;
};

// The same for `layers` blocks at once (1 <= layers <= 65535), each with its own Hinv block:
// inputs of layer b start at b * stride_?b; outputs are [layers, rows, count] (loss
// [layers, rows]) contiguous.
cudaError_t obs_sweep_batched_f32(int layers, const float* W, int64_t stride_wb,
                                  int64_t stride_wm, int64_t stride_wn, const float* Hinv,
                                  int64_t stride_hb, int64_t stride_hm, int64_t stride_hn,
                                  const uint8_t* keep_in, int64_t stride_kb, int64_t stride_km,
                                  int64_t stride_kn, float* Q, float* Err, uint8_t* keep_out,
                                  float* loss, int rows, int count, int prune_n, int prune_m,
                                  cudaStream_t stream);
// The batched sweep with each kept weight rounded to its group's grid (ObsSweepQuant).
cudaError_t obs_sweep_quant_batched_f32(int layers, const float* W, int64_t stride_wb,
                                        int64_t stride_wm, int64_t stride_wn, const float* Hinv,
                                        int64_t stride_hb, int64_t stride_hm, int64_t stride_hn,
                                        const uint8_t* keep_in, int64_t stride_kb,
                                        int64_t stride_km, int64_t stride_kn, float* Q,
                                        float* Err, uint8_t* keep_out, float* loss, int rows,
                                        int count, int prune_n, int prune_m,
                                        const ObsSweepQuant& quant, cudaStream_t stream);

// SparseSwaps best 1-swap per row (contract: fastprune/ops/swap_search.py):
// minimise over kept u / pruned p (N:M: same group) of
//   D = w_u^2 H_uu + w_p^2 H_pp - 2 w_u w_p H_up + 2 w_u c_u - 2 w_p c_p.
// w, keep, c are [*, cols] row-major with leading dimension ld; row_idx (nrows entries,
// may be null = rows 0..nrows-1) selects the rows searched. H is [cols, cols] row-major.
// Results per searched row: best_val (+inf if no pair), best_u, best_p.
// workspace: swap_search_workspace_floats(nrows, cols) floats (unused for N:M).
int64_t swap_search_workspace_floats(int nrows, int cols, int num_sms);
cudaError_t swap_search_f32(const float* w, const uint8_t* keep, const float* c,
                            const float* H, const int64_t* row_idx, int nrows, int cols,
                            int64_t ld, int prune_n, int prune_m, float* best_val,
                            int64_t* best_u, int64_t* best_p, float* workspace, int num_sms,
                            cudaStream_t stream);

}  // namespace fastprune
