// Thin torch binding for the torch-free kernels: checks devices, dtypes, shapes and
// contiguity, allocates outputs, and launches on the stream the caller passes (Python hands
// in torch.cuda.current_stream() and the SM count and holds the device guard, so this file
// needs no CUDA headers of torch's). Built with FASTPRUNE_CPU_EMULATION it takes CPU tensors
// and runs the same kernels on the CPU emulator of csrc/emulation/.
#include <torch/extension.h>

#include <tuple>

#include "fastprune_kernels.h"

namespace {

#ifdef FASTPRUNE_CPU_EMULATION
constexpr bool kEmulated = true;
#else
constexpr bool kEmulated = false;
#endif

void check_cuda(const torch::Tensor& t, const char* name, torch::ScalarType dtype) {
  TORCH_CHECK(kEmulated ? t.is_cpu() : t.is_cuda(), name, " must be a ",
              kEmulated ? "CPU tensor (emulated build)" : "CUDA tensor");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ",
              t.scalar_type());
}

void check_ok(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

// One block W1 [rows, count] with Hinv1 [count, count], or a batch of layers W1 [E, rows,
// count] with Hinv1 [E, count, count] (outputs gain the leading E). With scale and zero
// ([(E,) rows, groups] float32) each kept weight is rounded to its group's grid, and the
// grids used (copies, the found ones written in) are returned after Q, Err, keep, loss
// (undefined without quantization).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor,
           torch::Tensor>
obs_sweep(const torch::Tensor& W1, const torch::Tensor& Hinv1,
          const c10::optional<torch::Tensor>& keep1, int64_t prune_n, int64_t prune_m,
          const c10::optional<torch::Tensor>& scale, const c10::optional<torch::Tensor>& zero,
          int64_t group_size, int64_t maxq, bool sym, bool fp8, bool find, int64_t stream) {
  check_cuda(W1, "W1", torch::kFloat32);
  check_cuda(Hinv1, "Hinv1", torch::kFloat32);
  const bool batched = W1.dim() == 3;
  TORCH_CHECK((W1.dim() == 2 || batched) && Hinv1.dim() == W1.dim(),
              "W1 and Hinv1 must be 2-D, or 3-D for a batch of layers");
  const int64_t layers = batched ? W1.size(0) : 1;
  const int64_t rows = W1.size(-2), count = W1.size(-1);
  TORCH_CHECK(Hinv1.size(-2) == count && Hinv1.size(-1) == count &&
                  (!batched || Hinv1.size(0) == layers),
              "Hinv1 must be [(E,) count, count]");
  TORCH_CHECK(count >= 1 && count <= 256, "count (block size) must be in [1, 256], got ", count);
  TORCH_CHECK(layers <= 65535, "at most 65535 layers in a batch, got ", layers);
  TORCH_CHECK(W1.device() == Hinv1.device(), "W1 and Hinv1 must be on one device");
  const uint8_t* kin = nullptr;
  int64_t skb = 0, skm = 0, skn = 0;
  if (prune_n > 0) {
    TORCH_CHECK(prune_m > prune_n && 32 % prune_m == 0 && count % prune_m == 0,
                "N:M needs prune_n < prune_m, 32 % prune_m == 0 and count % prune_m == 0");
  } else {
    TORCH_CHECK(keep1.has_value(), "keep1 is required without an N:M pattern");
  }
  if (keep1.has_value()) {  // N:M: its zeros are forced pruned
    const auto& k = *keep1;
    check_cuda(k, "keep1", torch::kBool);
    TORCH_CHECK(k.sizes() == W1.sizes(), "keep1 must have W1's shape");
    TORCH_CHECK(k.device() == W1.device(), "keep1 must be on W1's device");
    kin = reinterpret_cast<const uint8_t*>(k.data_ptr<bool>());
    skb = batched ? k.stride(0) : 0;
    skm = k.stride(-2);
    skn = k.stride(-1);
  }
  TORCH_CHECK(scale.has_value() == zero.has_value(), "scale and zero go together");
  const bool quant = scale.has_value();
  torch::Tensor S, Z;
  fastprune::ObsSweepQuant qz;
  if (quant) {
    TORCH_CHECK(group_size >= 1, "group_size must be >= 1, got ", group_size);
    TORCH_CHECK(fp8 || (maxq >= 1 && maxq <= 255), "maxq must be in [1, 255], got ", maxq);
    const int64_t groups = (count + group_size - 1) / group_size;
    auto want = W1.sizes().vec();
    want.back() = groups;
    for (const auto* t : {&*scale, &*zero}) {
      check_cuda(*t, "scale/zero", torch::kFloat32);
      TORCH_CHECK(t->sizes() == torch::IntArrayRef(want), "scale and zero must be [(E,) rows, ",
                  groups, "] (", count, " columns in groups of ", group_size, "), got ",
                  t->sizes());
      TORCH_CHECK(t->device() == W1.device(), "scale and zero must be on W1's device");
    }
    S = scale->clone(at::MemoryFormat::Contiguous);  // the kernel writes the grids it finds
    Z = zero->clone(at::MemoryFormat::Contiguous);
    qz.scale = S.data_ptr<float>();
    qz.zero = Z.data_ptr<float>();
    qz.groups = static_cast<int>(groups);
    qz.group_size = static_cast<int>(std::min<int64_t>(group_size, count));
    qz.maxq = static_cast<int>(maxq);
    qz.sym = sym;
    qz.fp8 = fp8;
    qz.find = find;
  }
  auto Q = torch::empty(W1.sizes(), W1.options());
  auto E = torch::empty(W1.sizes(), W1.options());
  auto K = torch::empty(W1.sizes(), W1.options().dtype(torch::kBool));
  auto L = torch::empty(W1.sizes().slice(0, W1.dim() - 1), W1.options());
  if (rows == 0 || layers == 0) return {Q, E, K, L, S, Z};
  const auto ok = [&](auto launch) {
    return launch(static_cast<int>(layers), W1.data_ptr<float>(), batched ? W1.stride(0) : 0,
                  W1.stride(-2), W1.stride(-1), Hinv1.data_ptr<float>(),
                  batched ? Hinv1.stride(0) : 0, Hinv1.stride(-2), Hinv1.stride(-1), kin, skb,
                  skm, skn, Q.data_ptr<float>(), E.data_ptr<float>(),
                  reinterpret_cast<uint8_t*>(K.data_ptr<bool>()), L.data_ptr<float>(),
                  static_cast<int>(rows), static_cast<int>(count), static_cast<int>(prune_n),
                  static_cast<int>(prune_m));
  };
  const auto st = reinterpret_cast<cudaStream_t>(stream);
  check_ok(ok([&](auto... a) {
             return quant ? fastprune::obs_sweep_quant_batched_f32(a..., qz, st)
                          : fastprune::obs_sweep_batched_f32(a..., st);
           }),
           "obs_sweep");
  return {Q, E, K, L, S, Z};
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> swap_search(
    const torch::Tensor& w, const torch::Tensor& keep, const torch::Tensor& c,
    const torch::Tensor& H, int64_t prune_n, int64_t prune_m,
    const c10::optional<torch::Tensor>& rows, int64_t num_sms, int64_t stream) {
  check_cuda(w, "w", torch::kFloat32);
  check_cuda(c, "c", torch::kFloat32);
  check_cuda(H, "H", torch::kFloat32);
  check_cuda(keep, "keep", torch::kBool);
  TORCH_CHECK(w.dim() == 2 && w.sizes() == keep.sizes() && w.sizes() == c.sizes(),
              "w, keep and c must be 2-D of one shape");
  TORCH_CHECK(w.is_contiguous() && keep.is_contiguous() && c.is_contiguous() &&
                  H.is_contiguous(),
              "w, keep, c and H must be contiguous");
  const int64_t cols = w.size(1);
  TORCH_CHECK(H.dim() == 2 && H.size(0) == cols && H.size(1) == cols, "H must be [cols, cols]");
  TORCH_CHECK(cols < 65536, "cols must be < 65536");
  TORCH_CHECK(keep.device() == w.device() && c.device() == w.device() && H.device() == w.device(),
              "w, keep, c and H must be on one device");
  const int64_t* idx = nullptr;
  int64_t nrows = w.size(0);
  torch::Tensor rows_l;
  if (rows.has_value()) {
    rows_l = rows->to(w.device(), torch::kLong).contiguous();
    TORCH_CHECK(rows_l.dim() == 1, "rows must be 1-D");
    if (rows_l.numel() > 0) {
      const auto mm = torch::aminmax(rows_l);
      TORCH_CHECK(std::get<0>(mm).item<int64_t>() >= 0 &&
                      std::get<1>(mm).item<int64_t>() < w.size(0),
                  "rows must index rows of w");
    }
    idx = rows_l.data_ptr<int64_t>();
    nrows = rows_l.numel();
  }
  auto val = torch::empty({nrows}, w.options());
  auto bu = torch::empty({nrows}, w.options().dtype(torch::kLong));
  auto bp = torch::empty({nrows}, w.options().dtype(torch::kLong));
  if (nrows == 0) return {bu, bp, val};
  TORCH_CHECK(num_sms >= 1, "num_sms must be >= 1");
  const int sms = static_cast<int>(num_sms);
  torch::Tensor ws;
  float* ws_ptr = nullptr;
  if (prune_n == 0) {
    ws = torch::empty({fastprune::swap_search_workspace_floats(static_cast<int>(nrows),
                                                               static_cast<int>(cols), sms)},
                      w.options());
    ws_ptr = ws.data_ptr<float>();
  }
  check_ok(fastprune::swap_search_f32(
               w.data_ptr<float>(), reinterpret_cast<const uint8_t*>(keep.data_ptr<bool>()),
               c.data_ptr<float>(), H.data_ptr<float>(), idx, static_cast<int>(nrows),
               static_cast<int>(cols), w.stride(0), static_cast<int>(prune_n),
               static_cast<int>(prune_m), val.data_ptr<float>(), bu.data_ptr<int64_t>(),
               bp.data_ptr<int64_t>(), ws_ptr, sms, reinterpret_cast<cudaStream_t>(stream)),
           "swap_search");
  return {bu, bp, val};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastprune CUDA kernels (obs_sweep, swap_search)";
  m.def("obs_sweep", &obs_sweep, "fused OBS sweep of one column block (or a batch of layers)");
  m.def("swap_search", &swap_search, "best 1-swap per row");
}
