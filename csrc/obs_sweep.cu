// Fused OBS sweep for one block of columns: one warp per R rows, the block's columns spread
// over the lanes (column s*32 + lane lives in register slot s), Hinv rows read through the
// read-only cache and each swept column's error broadcast across the warp with __shfl_sync
// (one shuffle per row and column). A batch of layers (each with its own Hinv block) is
// swept in one launch: blockIdx.y is the layer, selected by the batch strides.
#include "fastprune_kernels.h"

namespace fastprune {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kRowsPerWarp = 4;
constexpr int kWarpsPerBlock = 4;

template <int SLOTS>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    obs_sweep_kernel(const float* __restrict__ W, int64_t swb, int64_t swm, int64_t swn,
                     const float* __restrict__ Hinv, int64_t shb, int64_t shm, int64_t shn,
                     const uint8_t* __restrict__ keep_in, int64_t skb, int64_t skm,
                     int64_t skn, float* __restrict__ Q, float* __restrict__ Err,
                     uint8_t* __restrict__ keep_out, float* __restrict__ loss, int rows,
                     int count, int prune_n, int prune_m) {
  constexpr int R = kRowsPerWarp;
  {  // this block's layer of the batch; outputs are [layers, rows, count] contiguous
    const int64_t b = blockIdx.y;
    W += b * swb;
    Hinv += b * shb;
    if (keep_in != nullptr) keep_in += b * skb;
    const int64_t out = b * static_cast<int64_t>(rows) * count;
    Q += out;
    Err += out;
    keep_out += out;
    loss += b * rows;
  }
  const int lane = threadIdx.x & 31;
  const int warp = blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5);
  const int row0 = warp * R;
  if (row0 >= rows) return;  // warp-uniform
  const bool nm = prune_n > 0;

  float w[R][SLOTS];
  uint32_t pbits[R];  // bit s: column s*32 + lane is pruned
  uint32_t fbits[R];  // N:M: bit s: column s*32 + lane is forced pruned (keep_in == 0)
  float dcol[SLOTS];
#pragma unroll
  for (int s = 0; s < SLOTS; ++s) {
    const int col = s * 32 + lane;
    dcol[s] = col < count ? Hinv[col * (shm + shn)] : 1.0f;
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int row = row0 + r;
    pbits[r] = 0u;
#pragma unroll
    for (int s = 0; s < SLOTS; ++s) {
      const int col = s * 32 + lane;
      const bool ok = row < rows && col < count;
      w[r][s] = ok ? W[row * swm + col * swn] : 0.0f;
      if (ok && keep_in != nullptr && !keep_in[row * skm + col * skn]) pbits[r] |= 1u << s;
    }
    fbits[r] = nm ? pbits[r] : 0u;
  }

#pragma unroll
  for (int s = 0; s < SLOTS; ++s) {
    for (int l = 0; l < 32; ++l) {
      const int i = s * 32 + l;
      if (i >= count) break;  // uniform across the warp
      if (nm && i % prune_m == 0) {
        // the group is lanes [l, l + prune_m) of slot s (32 % prune_m == 0)
        const bool mine = lane >= l && lane < l + prune_m;
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const float sc =
              ((fbits[r] >> s) & 1u) ? -1.0f : (w[r][s] * w[r][s]) / (dcol[s] * dcol[s]);
          int rank = 0;
          for (int k = 0; k < prune_m; ++k) {
            const float o = __shfl_sync(kFull, sc, l + k);
            rank += (o < sc) || (o == sc && l + k < lane);
          }
          if (mine && rank < prune_n) pbits[r] |= 1u << s;
        }
      }
      float h[SLOTS];
#pragma unroll
      for (int t = 0; t < SLOTS; ++t) {
        const int col = t * 32 + lane;
        h[t] = (t >= s && col > i && col < count) ? __ldg(&Hinv[i * shm + col * shn]) : 0.0f;
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        // every lane forms err for its own column (dcol[s] is Hinv_ii on lane l); one
        // shuffle per row then broadcasts column i's
        const float mine = ((pbits[r] >> s) & 1u) ? w[r][s] / dcol[s] : 0.0f;
        const float err = __shfl_sync(kFull, mine, l);
#pragma unroll
        for (int t = s; t < SLOTS; ++t) w[r][t] = fmaf(-err, h[t], w[r][t]);
      }
    }
  }

  // columns are frozen once swept: Q = w * keep, Err = w / d where pruned
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int row = row0 + r;
    float acc = 0.0f;
#pragma unroll
    for (int s = 0; s < SLOTS; ++s) {
      const int col = s * 32 + lane;
      if (row < rows && col < count) {
        const bool p = (pbits[r] >> s) & 1u;
        const float e = p ? w[r][s] / dcol[s] : 0.0f;
        const int64_t o = static_cast<int64_t>(row) * count + col;
        Q[o] = p ? 0.0f : w[r][s];
        Err[o] = e;
        keep_out[o] = p ? 0 : 1;
        acc = fmaf(e, e, acc);
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(kFull, acc, off);
    if (lane == 0 && row < rows) loss[row] = 0.5f * acc;
  }
}

}  // namespace

cudaError_t obs_sweep_batched_f32(int layers, const float* W, int64_t stride_wb,
                                  int64_t stride_wm, int64_t stride_wn, const float* Hinv,
                                  int64_t stride_hb, int64_t stride_hm, int64_t stride_hn,
                                  const uint8_t* keep_in, int64_t stride_kb, int64_t stride_km,
                                  int64_t stride_kn, float* Q, float* Err, uint8_t* keep_out,
                                  float* loss, int rows, int count, int prune_n, int prune_m,
                                  cudaStream_t stream) {
  if (layers <= 0 || layers > 65535 || rows <= 0 || count <= 0 || count > 256)
    return cudaErrorInvalidValue;
  if (prune_n > 0 && (prune_m <= 0 || prune_n >= prune_m || 32 % prune_m != 0))
    return cudaErrorInvalidValue;
  if (prune_n == 0 && keep_in == nullptr) return cudaErrorInvalidValue;
  const int rows_per_block = kRowsPerWarp * kWarpsPerBlock;
  const dim3 grid((rows + rows_per_block - 1) / rows_per_block, layers);
  const dim3 block(kWarpsPerBlock * 32);
  const int slots = (count + 31) / 32;
#define FASTPRUNE_SWEEP(S)                                                                 \
  obs_sweep_kernel<S><<<grid, block, 0, stream>>>(                                         \
      W, stride_wb, stride_wm, stride_wn, Hinv, stride_hb, stride_hm, stride_hn, keep_in, \
      stride_kb, stride_km, stride_kn, Q, Err, keep_out, loss, rows, count, prune_n, prune_m)
  if (slots <= 1) {
    FASTPRUNE_SWEEP(1);
  } else if (slots <= 2) {
    FASTPRUNE_SWEEP(2);
  } else if (slots <= 4) {
    FASTPRUNE_SWEEP(4);
  } else {
    FASTPRUNE_SWEEP(8);
  }
#undef FASTPRUNE_SWEEP
  return cudaGetLastError();
}

cudaError_t obs_sweep_f32(const float* W, int64_t stride_wm, int64_t stride_wn,
                          const float* Hinv, int64_t stride_hm, int64_t stride_hn,
                          const uint8_t* keep_in, int64_t stride_km, int64_t stride_kn,
                          float* Q, float* Err, uint8_t* keep_out, float* loss, int rows,
                          int count, int prune_n, int prune_m, cudaStream_t stream) {
  return obs_sweep_batched_f32(1, W, 0, stride_wm, stride_wn, Hinv, 0, stride_hm, stride_hn,
                               keep_in, 0, stride_km, stride_kn, Q, Err, keep_out, loss, rows,
                               count, prune_n, prune_m, stream);
}

}  // namespace fastprune
