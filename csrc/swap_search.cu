// SparseSwaps best 1-swap per row. Unstructured: a pre-pass writes per-entry terms
// (A_u, X_u for kept u; B_p, Y_p for pruned p) so that D = A_u + B_p + X_u * H_up * Y_p;
// the search kernel gives each block R rows and a tile of p columns held in registers, walks
// the u range (rows of H read once per block and reused by its R rows), keeps each row's
// best pair, and writes one partial per (row, tile, split); a last kernel reduces partials.
// N:M: one warp per row, lanes over groups, all m x m pairs of a group.
#include <math_constants.h>

#include "fastprune_kernels.h"

namespace fastprune {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kThreads = 256;
constexpr int kRows = 8;   // rows per block
constexpr int kPT = 2;     // p columns per thread
constexpr int kTileP = kThreads * kPT;
constexpr int kUChunk = 128;

__device__ __forceinline__ int64_t src_row(const int64_t* row_idx, int r) {
  return row_idx ? row_idx[r] : static_cast<int64_t>(r);
}

// A = keep ? w^2 H_uu + 2 w c : inf;  X = keep ? -2 w : 0
// B = keep ? inf : w^2 H_pp - 2 w c;  Y = keep ? 0 : w
__global__ void swap_terms_kernel(const float* __restrict__ w, const uint8_t* __restrict__ keep,
                                  const float* __restrict__ c, const float* __restrict__ H,
                                  const int64_t* __restrict__ row_idx, int nrows, int cols,
                                  int64_t ld, float* __restrict__ A, float* __restrict__ X,
                                  float* __restrict__ B, float* __restrict__ Y) {
  const int r = blockIdx.x;  // rows on x: gridDim.y would cap them at 65535
  const int col = blockIdx.y * blockDim.x + threadIdx.x;
  if (r >= nrows || col >= cols) return;
  const int64_t src = src_row(row_idx, r) * ld + col;
  const float wv = w[src];
  const float cv = c[src];
  const float sq = wv * wv * H[static_cast<int64_t>(col) * cols + col];
  const int64_t o = static_cast<int64_t>(r) * cols + col;
  if (keep[src]) {
    A[o] = sq + 2.0f * wv * cv;
    X[o] = -2.0f * wv;
    B[o] = CUDART_INF_F;
    Y[o] = 0.0f;
  } else {
    A[o] = CUDART_INF_F;
    X[o] = 0.0f;
    B[o] = sq - 2.0f * wv * cv;
    Y[o] = wv;
  }
}

__device__ __forceinline__ void better(float v, uint32_t idx, float& bv, uint32_t& bi) {
  if (v < bv || (v == bv && idx < bi)) {
    bv = v;
    bi = idx;
  }
}

// (value, packed index) minimum across the warp, ties to the lower index; every lane ends
// with the warp's best.
__device__ __forceinline__ void warp_best(float& v, uint32_t& i) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float ov = __shfl_xor_sync(kFull, v, off);
    const uint32_t oi = __shfl_xor_sync(kFull, i, off);
    better(ov, oi, v, i);
  }
}

__global__ void __launch_bounds__(kThreads)
    swap_search_kernel(const float* __restrict__ A, const float* __restrict__ X,
                       const float* __restrict__ B, const float* __restrict__ Y,
                       const float* __restrict__ H, int nrows, int cols, int usplits,
                       float* __restrict__ part_val, uint32_t* __restrict__ part_idx) {
  __shared__ float sA[kRows][kUChunk];
  __shared__ float sX[kRows][kUChunk];
  __shared__ float red_v[kThreads / 32][kRows];
  __shared__ uint32_t red_i[kThreads / 32][kRows];
  const int r0 = blockIdx.x * kRows;
  const int tile = blockIdx.y;
  const int split = blockIdx.z;
  const int tid = threadIdx.x;
  const int ulen = (cols + usplits - 1) / usplits;
  const int u_begin = split * ulen;
  const int u_end = min(cols, u_begin + ulen);

  float b[kRows][kPT], y[kRows][kPT];
  int pcol[kPT];
#pragma unroll
  for (int k = 0; k < kPT; ++k) pcol[k] = tile * kTileP + k * kThreads + tid;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int k = 0; k < kPT; ++k) {
      const bool ok = r0 + r < nrows && pcol[k] < cols;
      const int64_t o = static_cast<int64_t>(r0 + r) * cols + pcol[k];
      b[r][k] = ok ? B[o] : CUDART_INF_F;
      y[r][k] = ok ? Y[o] : 0.0f;
    }
  }
  float bv[kRows];
  uint32_t bi[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    bv[r] = CUDART_INF_F;
    bi[r] = 0xffffffffu;
  }

  for (int u0 = u_begin; u0 < u_end; u0 += kUChunk) {
    __syncthreads();
    for (int e = tid; e < kRows * kUChunk; e += kThreads) {
      const int r = e / kUChunk, uu = e % kUChunk;
      const bool ok = r0 + r < nrows && u0 + uu < u_end;
      const int64_t o = static_cast<int64_t>(r0 + r) * cols + u0 + uu;
      sA[r][uu] = ok ? A[o] : CUDART_INF_F;
      sX[r][uu] = ok ? X[o] : 0.0f;
    }
    __syncthreads();
    const int n = min(kUChunk, u_end - u0);
    for (int uu = 0; uu < n; ++uu) {
      const int u = u0 + uu;
      float h[kPT];
#pragma unroll
      for (int k = 0; k < kPT; ++k)
        h[k] = pcol[k] < cols ? __ldg(&H[static_cast<int64_t>(u) * cols + pcol[k]]) : 0.0f;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const float a = sA[r][uu];
        if (a == CUDART_INF_F) continue;  // u not kept in this row: uniform over the block
        const float x = sX[r][uu];
#pragma unroll
        for (int k = 0; k < kPT; ++k) {
          const float v = fmaf(x, h[k] * y[r][k], a + b[r][k]);
          better(v, static_cast<uint32_t>(u) * static_cast<uint32_t>(cols) + pcol[k], bv[r],
                 bi[r]);
        }
      }
    }
  }

  // block reduction per row: warp shuffles, then across warps in shared memory
  const int lane = tid & 31, wid = tid >> 5;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    float v = bv[r];
    uint32_t i = bi[r];
    warp_best(v, i);
    if (lane == 0) {
      red_v[wid][r] = v;
      red_i[wid][r] = i;
    }
  }
  __syncthreads();
  if (tid < kRows && r0 + tid < nrows) {
    float v = CUDART_INF_F;
    uint32_t i = 0xffffffffu;
    for (int q = 0; q < kThreads / 32; ++q) better(red_v[q][tid], red_i[q][tid], v, i);
    const int64_t o = static_cast<int64_t>(r0 + tid) * gridDim.y * gridDim.z +
                      static_cast<int64_t>(tile) * gridDim.z + split;
    part_val[o] = v;
    part_idx[o] = i;
  }
}

__global__ void reduce_partials_kernel(const float* __restrict__ part_val,
                                       const uint32_t* __restrict__ part_idx, int nrows,
                                       int nparts, int cols, float* __restrict__ best_val,
                                       int64_t* __restrict__ best_u,
                                       int64_t* __restrict__ best_p) {
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= nrows) return;
  float v = CUDART_INF_F;
  uint32_t i = 0xffffffffu;
  for (int q = 0; q < nparts; ++q) {
    const int64_t o = static_cast<int64_t>(r) * nparts + q;
    better(part_val[o], part_idx[o], v, i);
  }
  best_val[r] = v;
  best_u[r] = v < CUDART_INF_F ? static_cast<int64_t>(i / static_cast<uint32_t>(cols)) : 0;
  best_p[r] = v < CUDART_INF_F ? static_cast<int64_t>(i % static_cast<uint32_t>(cols)) : 0;
}

__global__ void swap_search_nm_kernel(const float* __restrict__ w,
                                      const uint8_t* __restrict__ keep,
                                      const float* __restrict__ c, const float* __restrict__ H,
                                      const int64_t* __restrict__ row_idx, int nrows, int cols,
                                      int64_t ld, int m, float* __restrict__ best_val,
                                      int64_t* __restrict__ best_u,
                                      int64_t* __restrict__ best_p) {
  const int lane = threadIdx.x & 31;
  const int r = blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (r >= nrows) return;  // warp-uniform
  const int64_t base = src_row(row_idx, r) * ld;
  float bv = CUDART_INF_F;
  uint32_t bi = 0xffffffffu;
  for (int g = lane; g < cols / m; g += 32) {
    for (int du = 0; du < m; ++du) {
      const int u = g * m + du;
      if (!keep[base + u]) continue;
      const float wu = w[base + u];
      const float a = wu * wu * H[static_cast<int64_t>(u) * cols + u] + 2.0f * wu * c[base + u];
      for (int dp = 0; dp < m; ++dp) {
        const int p = g * m + dp;
        if (keep[base + p]) continue;
        const float wp = w[base + p];
        const float bp = wp * wp * H[static_cast<int64_t>(p) * cols + p] - 2.0f * wp * c[base + p];
        const float v = fmaf(-2.0f * wu, H[static_cast<int64_t>(u) * cols + p] * wp, a + bp);
        better(v, static_cast<uint32_t>(u) * static_cast<uint32_t>(cols) + p, bv, bi);
      }
    }
  }
  warp_best(bv, bi);
  if (lane == 0) {
    best_val[r] = bv;
    best_u[r] = bv < CUDART_INF_F ? static_cast<int64_t>(bi / static_cast<uint32_t>(cols)) : 0;
    best_p[r] = bv < CUDART_INF_F ? static_cast<int64_t>(bi % static_cast<uint32_t>(cols)) : 0;
  }
}

void search_grid(int nrows, int cols, int num_sms, int& rowblocks, int& tiles, int& usplits) {
  rowblocks = (nrows + kRows - 1) / kRows;
  tiles = (cols + kTileP - 1) / kTileP;
  const int want = 4 * (num_sms > 0 ? num_sms : 132);
  const int have = rowblocks * tiles;
  const int max_splits = (cols + kUChunk - 1) / kUChunk;
  usplits = have >= want ? 1 : min(max_splits, (want + have - 1) / have);
}

}  // namespace

int64_t swap_search_workspace_floats(int nrows, int cols, int num_sms) {
  int rowblocks, tiles, usplits;
  search_grid(nrows, cols, num_sms, rowblocks, tiles, usplits);
  // A, X, B, Y terms + partial values + partial indices (uint32, same size as float)
  return 4 * static_cast<int64_t>(nrows) * cols +
         2 * static_cast<int64_t>(nrows) * tiles * usplits;
}

cudaError_t swap_search_f32(const float* w, const uint8_t* keep, const float* c,
                            const float* H, const int64_t* row_idx, int nrows, int cols,
                            int64_t ld, int prune_n, int prune_m, float* best_val,
                            int64_t* best_u, int64_t* best_p, float* workspace, int num_sms,
                            cudaStream_t stream) {
  if (nrows <= 0) return cudaSuccess;
  if (cols <= 0 || cols >= 65536) return cudaErrorInvalidValue;  // packed u * cols + p
  if (prune_n > 0) {
    if (prune_m <= 0 || cols % prune_m != 0) return cudaErrorInvalidValue;
    const int warps = 4;
    swap_search_nm_kernel<<<(nrows + warps - 1) / warps, warps * 32, 0, stream>>>(
        w, keep, c, H, row_idx, nrows, cols, ld, prune_m, best_val, best_u, best_p);
    return cudaGetLastError();
  }
  int rowblocks, tiles, usplits;
  search_grid(nrows, cols, num_sms, rowblocks, tiles, usplits);
  const int64_t n = static_cast<int64_t>(nrows) * cols;
  float* A = workspace;
  float* X = A + n;
  float* B = X + n;
  float* Y = B + n;
  float* part_val = Y + n;
  uint32_t* part_idx =
      reinterpret_cast<uint32_t*>(part_val + static_cast<int64_t>(nrows) * tiles * usplits);
  swap_terms_kernel<<<dim3(nrows, (cols + 255) / 256), 256, 0, stream>>>(
      w, keep, c, H, row_idx, nrows, cols, ld, A, X, B, Y);
  swap_search_kernel<<<dim3(rowblocks, tiles, usplits), kThreads, 0, stream>>>(
      A, X, B, Y, H, nrows, cols, usplits, part_val, part_idx);
  reduce_partials_kernel<<<(nrows + 127) / 128, 128, 0, stream>>>(
      part_val, part_idx, nrows, tiles * usplits, cols, best_val, best_u, best_p);
  return cudaGetLastError();
}

}  // namespace fastprune
