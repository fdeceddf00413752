// Fused OBS sweep for one block of columns: one warp per R rows, the block's columns spread
// over the lanes (column s*32 + lane lives in register slot s), Hinv rows read through the
// read-only cache and each swept column's error broadcast across the warp with __shfl_sync
// (one shuffle per row and column). A batch of layers (each with its own Hinv block) is
// swept in one launch: blockIdx.y is the layer, selected by the batch strides.
// Quantization (QUANT): each lane rounds its own column to the row's current grid when the
// sweep reaches it, keeps q in place of w and its error in a second register array; a
// group's grid is read at its first column or, with find, found there by a warp min/max
// over the group's updated columns. Rounding is plain IEEE arithmetic (rintf; float8 e4m3
// by scaling onto its grid), so it is exact on every architecture and on the emulator.
#include "fastprune_kernels.h"

namespace fastprune {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kRowsPerWarp = 4;
constexpr int kWarpsPerBlock = 4;

// x rounded to float8 e4m3fn (nearest even, saturated to +-448): rint(x * 2^(3-e)) * 2^(e-3)
// with e the binade of x, at least -6 (the subnormal step 2^-9); the scalings are exact.
__device__ __forceinline__ float round_e4m3(float x) {
  x = fminf(fmaxf(x, -448.0f), 448.0f);
  const int e = max(static_cast<int>((__float_as_uint(x) >> 23) & 0xffu) - 127, -6);
  const float y = rintf(x * __uint_as_float(static_cast<unsigned>(130 - e) << 23));
  return y * __uint_as_float(static_cast<unsigned>(124 + e) << 23);
}

// w on the grid (sc, zr): sc * (clamp(rint(w / sc) + zr, 0, maxq) - zr), or e4m3(w / sc) * sc.
// __fmul_rn keeps the product rounded on its own (no fused multiply-add into w - q).
__device__ __forceinline__ float quantize(float w, float sc, float zr, float maxq, bool fp8) {
  const float x = w / sc;
  if (fp8) return __fmul_rn(round_e4m3(x), sc);
  const float c = fminf(fmaxf(rintf(x) + zr, 0.0f), maxq);
  return __fmul_rn(sc, c - zr);
}

// GPTQ's find_params from lo = min(w, 0), hi = max(w, 0) (fp8: hi = max |w|).
__device__ __forceinline__ void find_grid(float lo, float hi, const ObsSweepQuant& qz, float& sc,
                                          float& zr) {
  if (qz.fp8) {
    sc = hi == 0.0f ? 1.0f : hi / 448.0f;
    zr = 0.0f;
    return;
  }
  if (qz.sym) {
    hi = fmaxf(-lo, hi);
    lo = lo < 0.0f ? -hi : lo;
  }
  if (lo == 0.0f && hi == 0.0f) {
    lo = -1.0f;
    hi = 1.0f;
  }
  const float maxq = static_cast<float>(qz.maxq);
  sc = (hi - lo) / maxq;
  zr = qz.sym ? (maxq + 1.0f) / 2.0f : rintf(-lo / sc);
}

template <int SLOTS, bool QUANT>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    obs_sweep_kernel(const float* __restrict__ W, int64_t swb, int64_t swm, int64_t swn,
                     const float* __restrict__ Hinv, int64_t shb, int64_t shm, int64_t shn,
                     const uint8_t* __restrict__ keep_in, int64_t skb, int64_t skm,
                     int64_t skn, float* __restrict__ Q, float* __restrict__ Err,
                     uint8_t* __restrict__ keep_out, float* __restrict__ loss, int rows,
                     int count, int prune_n, int prune_m, ObsSweepQuant qz) {
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
    if (QUANT) {  // grids: [layers, rows, groups] contiguous
      qz.scale += b * rows * qz.groups;
      qz.zero += b * rows * qz.groups;
    }
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
  // QUANT: the error of this lane's column of each slot (as w holds its q once swept), and
  // each row's current grid (uniform across the warp)
  float e[R][QUANT ? SLOTS : 1];
  float sc[R], zr[R];
  const float maxq = static_cast<float>(qz.maxq);
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
      if (QUANT) e[r][QUANT ? s : 0] = 0.0f;
      if (ok && keep_in != nullptr && !keep_in[row * skm + col * skn]) pbits[r] |= 1u << s;
    }
    fbits[r] = nm ? pbits[r] : 0u;
    sc[r] = 1.0f;
    zr[r] = 0.0f;
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
      if (QUANT && i % qz.group_size == 0) {  // the group's grid (uniform branch)
        const int g = i / qz.group_size;
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const int row = row0 + r;
          if (qz.find) {
            // min(w, 0) and max(w, 0) (fp8: max |w|) over the group's updated columns
            float lo = 0.0f, hi = 0.0f;
#pragma unroll
            for (int t = 0; t < SLOTS; ++t) {
              const int col = t * 32 + lane;
              if (col >= i && col < i + qz.group_size && col < count) {
                lo = fminf(lo, w[r][t]);
                hi = fmaxf(hi, qz.fp8 ? fabsf(w[r][t]) : w[r][t]);
              }
            }
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) {
              lo = fminf(lo, __shfl_xor_sync(kFull, lo, off));
              hi = fmaxf(hi, __shfl_xor_sync(kFull, hi, off));
            }
            find_grid(lo, hi, qz, sc[r], zr[r]);
            if (lane == 0 && row < rows) {
              qz.scale[static_cast<int64_t>(row) * qz.groups + g] = sc[r];
              qz.zero[static_cast<int64_t>(row) * qz.groups + g] = zr[r];
            }
          } else if (row < rows) {
            sc[r] = qz.scale[static_cast<int64_t>(row) * qz.groups + g];
            zr[r] = qz.zero[static_cast<int64_t>(row) * qz.groups + g];
          }
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
        const bool pruned = (pbits[r] >> s) & 1u;
        float mine;
        if (QUANT) {  // q = quant(w * keep); err = (w - q) / d; the column then holds q
          const float q = quantize(pruned ? 0.0f : w[r][s], sc[r], zr[r], maxq, qz.fp8);
          mine = (w[r][s] - q) / dcol[s];
          if (lane == l) {
            w[r][s] = q;
            e[r][QUANT ? s : 0] = mine;
          }
        } else {
          mine = pruned ? w[r][s] / dcol[s] : 0.0f;
        }
        const float err = __shfl_sync(kFull, mine, l);
#pragma unroll
        for (int t = s; t < SLOTS; ++t) w[r][t] = fmaf(-err, h[t], w[r][t]);
      }
    }
  }

  // columns are frozen once swept: Q = w * keep, Err = w / d where pruned (QUANT: w holds q
  // and e the errors)
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int row = row0 + r;
    float acc = 0.0f;
#pragma unroll
    for (int s = 0; s < SLOTS; ++s) {
      const int col = s * 32 + lane;
      if (row < rows && col < count) {
        const bool p = (pbits[r] >> s) & 1u;
        const float ev = QUANT ? e[r][QUANT ? s : 0] : (p ? w[r][s] / dcol[s] : 0.0f);
        const int64_t o = static_cast<int64_t>(row) * count + col;
        Q[o] = QUANT || !p ? w[r][s] : 0.0f;
        Err[o] = ev;
        keep_out[o] = p ? 0 : 1;
        acc = fmaf(ev, ev, acc);
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(kFull, acc, off);
    if (lane == 0 && row < rows) loss[row] = 0.5f * acc;
  }
}

}  // namespace

namespace {

cudaError_t launch_obs_sweep(int layers, const float* W, int64_t stride_wb, int64_t stride_wm,
                             int64_t stride_wn, const float* Hinv, int64_t stride_hb,
                             int64_t stride_hm, int64_t stride_hn, const uint8_t* keep_in,
                             int64_t stride_kb, int64_t stride_km, int64_t stride_kn, float* Q,
                             float* Err, uint8_t* keep_out, float* loss, int rows, int count,
                             int prune_n, int prune_m, const ObsSweepQuant* quant,
                             cudaStream_t stream) {
  if (layers <= 0 || layers > 65535 || rows <= 0 || count <= 0 || count > 256)
    return cudaErrorInvalidValue;
  if (prune_n > 0 && (prune_m <= 0 || prune_n >= prune_m || 32 % prune_m != 0))
    return cudaErrorInvalidValue;
  if (prune_n == 0 && keep_in == nullptr) return cudaErrorInvalidValue;
  if (quant != nullptr &&
      (quant->scale == nullptr || quant->zero == nullptr || quant->group_size < 1 ||
       quant->groups != (count + quant->group_size - 1) / quant->group_size ||
       (!quant->fp8 && (quant->maxq < 1 || quant->maxq > 255))))
    return cudaErrorInvalidValue;
  const ObsSweepQuant qz = quant != nullptr ? *quant : ObsSweepQuant{};
  const int rows_per_block = kRowsPerWarp * kWarpsPerBlock;
  const dim3 grid((rows + rows_per_block - 1) / rows_per_block, layers);
  const dim3 block(kWarpsPerBlock * 32);
  const int slots = (count + 31) / 32;
#define FASTPRUNE_SWEEP(S, QUANT)                                                           \
  obs_sweep_kernel<S, QUANT><<<grid, block, 0, stream>>>(                                   \
      W, stride_wb, stride_wm, stride_wn, Hinv, stride_hb, stride_hm, stride_hn, keep_in,  \
      stride_kb, stride_km, stride_kn, Q, Err, keep_out, loss, rows, count, prune_n, prune_m, \
      qz)
#define FASTPRUNE_SWEEP_Q(S)   \
  if (quant != nullptr) {      \
    FASTPRUNE_SWEEP(S, true);  \
  } else {                     \
    FASTPRUNE_SWEEP(S, false); \
  }
  if (slots <= 1) {
    FASTPRUNE_SWEEP_Q(1)
  } else if (slots <= 2) {
    FASTPRUNE_SWEEP_Q(2)
  } else if (slots <= 4) {
    FASTPRUNE_SWEEP_Q(4)
  } else {
    FASTPRUNE_SWEEP_Q(8)
  }
#undef FASTPRUNE_SWEEP_Q
#undef FASTPRUNE_SWEEP
  return cudaGetLastError();
}

}  // namespace

cudaError_t obs_sweep_batched_f32(int layers, const float* W, int64_t stride_wb,
                                  int64_t stride_wm, int64_t stride_wn, const float* Hinv,
                                  int64_t stride_hb, int64_t stride_hm, int64_t stride_hn,
                                  const uint8_t* keep_in, int64_t stride_kb, int64_t stride_km,
                                  int64_t stride_kn, float* Q, float* Err, uint8_t* keep_out,
                                  float* loss, int rows, int count, int prune_n, int prune_m,
                                  cudaStream_t stream) {
  return launch_obs_sweep(layers, W, stride_wb, stride_wm, stride_wn, Hinv, stride_hb,
                          stride_hm, stride_hn, keep_in, stride_kb, stride_km, stride_kn, Q, Err,
                          keep_out, loss, rows, count, prune_n, prune_m, nullptr, stream);
}

cudaError_t obs_sweep_quant_batched_f32(int layers, const float* W, int64_t stride_wb,
                                        int64_t stride_wm, int64_t stride_wn, const float* Hinv,
                                        int64_t stride_hb, int64_t stride_hm, int64_t stride_hn,
                                        const uint8_t* keep_in, int64_t stride_kb,
                                        int64_t stride_km, int64_t stride_kn, float* Q,
                                        float* Err, uint8_t* keep_out, float* loss, int rows,
                                        int count, int prune_n, int prune_m,
                                        const ObsSweepQuant& quant, cudaStream_t stream) {
  return launch_obs_sweep(layers, W, stride_wb, stride_wm, stride_wn, Hinv, stride_hb,
                          stride_hm, stride_hn, keep_in, stride_kb, stride_km, stride_kn, Q, Err,
                          keep_out, loss, rows, count, prune_n, prune_m, &quant, stream);
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
