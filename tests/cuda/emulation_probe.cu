// Probe kernels for the CPU emulation of CUDA (csrc/emulation): correct warp/block
// primitives, and the misuse the emulator must report instead of returning garbage.
// Built by tests/test_cuda_emulation.py with the host compiler; prints one line per case.
#include <cstdio>
#include <cuda_runtime.h>

__global__ void warp_sum(const float* x, float* out) {
  float v = x[blockIdx.x * blockDim.x + threadIdx.x];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  if ((threadIdx.x & 31) == 0) out[(blockIdx.x * blockDim.x + threadIdx.x) / 32] = v;
}

__global__ void broadcast_and_shift(int* out) {
  const int lane = threadIdx.x & 31;
  const int b = __shfl_sync(0xffffffffu, lane * 10, 7);
  const int d = __shfl_down_sync(0xffffffffu, lane, 3);
  out[threadIdx.x] = b * 1000 + d;
}

template <bool SYNC>
__global__ void neighbour_via_shared(int* out) {
  __shared__ int s[64];
  s[threadIdx.x] = static_cast<int>(threadIdx.x) + 100 * static_cast<int>(blockIdx.x);
  if (SYNC) __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

__global__ void shuffle_outside_mask(float* out) {
  out[threadIdx.x] = __shfl_sync(0x0000ffffu, 1.0f, 0);  // lanes 16..31 are not members
}

__global__ void shuffle_after_exit(float* out) {
  if (threadIdx.x >= 8) return;  // not warp-uniform
  out[threadIdx.x] = __shfl_sync(0xffffffffu, 1.0f, 0);
}

__global__ void barrier_deadlock(float* out) {
  if (threadIdx.x < 16) {
    out[threadIdx.x] = __shfl_sync(0xffffffffu, 1.0f, 0);
  } else {
    __syncthreads();
  }
}

int main() {
  float x[128], sums[4] = {0, 0, 0, 0};
  for (int i = 0; i < 128; ++i) x[i] = static_cast<float>(i);
  warp_sum<<<2, 64>>>(x, sums);
  std::printf("warp_sum %s %g %g %g %g\n", cudaGetErrorString(cudaGetLastError()), sums[0],
              sums[1], sums[2], sums[3]);

  int bs[32];
  broadcast_and_shift<<<1, 32>>>(bs);
  std::printf("broadcast_and_shift %s %d %d %d\n", cudaGetErrorString(cudaGetLastError()),
              bs[0], bs[28], bs[31]);

  int nb[128];
  neighbour_via_shared<true><<<2, 64>>>(nb);
  int bad = 0;
  for (int i = 0; i < 128; ++i) bad += nb[i] != (i % 64 + 1) % 64 + 100 * (i / 64);
  std::printf("shared_synced %s wrong=%d\n", cudaGetErrorString(cudaGetLastError()), bad);
  neighbour_via_shared<false><<<2, 64>>>(nb);
  bad = 0;
  for (int i = 0; i < 128; ++i) bad += nb[i] != (i % 64 + 1) % 64 + 100 * (i / 64);
  std::printf("shared_racy %s wrong=%d\n", cudaGetErrorString(cudaGetLastError()), bad);

  float o[32];
  shuffle_outside_mask<<<1, 32>>>(o);
  std::printf("outside_mask %s\n", cudaGetErrorString(cudaGetLastError()));
  shuffle_after_exit<<<1, 32>>>(o);
  std::printf("after_exit %s\n", cudaGetErrorString(cudaGetLastError()));
  barrier_deadlock<<<1, 64>>>(o);
  std::printf("deadlock %s\n", cudaGetErrorString(cudaGetLastError()));
  warp_sum<<<1, 2048>>>(x, sums);
  std::printf("too_many_threads %s\n", cudaGetErrorString(cudaGetLastError()));
  return 0;
}
