// Host-side input checks of the fused side op, shared by the CPU and CUDA entry points so
// the contract is written once. Every integer is bounded before it is multiplied, so no
// check can overflow (a wrapped product would let bad shapes through to the kernels).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>

namespace dtl {

struct SideLimits {
  int64_t max_k;      // widest taps (K) the kernels take
  int64_t max_ksize;  // largest conv the kernels take
};

// Checks y/grad_out (B, N, d), taps (B, N, K), ups (d, K), conv_weight (d, 1, k, k) or none,
// the grid and β; `device` is where every tensor must live. Returns k (0 for DTL).
inline int64_t check_side_inputs(const char* op, c10::DeviceType device, const SideLimits& lim,
                                 const at::Tensor& y, const at::Tensor& taps,
                                 const at::Tensor& ups,
                                 const std::optional<at::Tensor>& conv_weight, int64_t grid_h,
                                 int64_t grid_w, int64_t num_prefix, double beta) {
  const char* where = device == c10::DeviceType::CUDA ? " (CUDA kernel)" : " (CPU kernel)";
  TORCH_CHECK(y.defined(), op, ": y/grad_out is undefined");
  const auto dt = y.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
              op, where, ": dtype must be float32, float16, bfloat16 or float64, got ", dt);
  const char* names[] = {"y/grad_out", "taps", "ups", "conv_weight"};
  const at::Tensor* ts[] = {&y, &taps, &ups, conv_weight ? &*conv_weight : nullptr};
  for (int i = 0; i < 4; ++i) {
    if (ts[i] == nullptr) continue;
    const at::Tensor& t = *ts[i];
    TORCH_CHECK(t.defined(), op, ": ", names[i], " is undefined");
    TORCH_CHECK(t.device().type() == device, op, where, ": ", names[i], " must be a ",
                c10::DeviceTypeName(device), " tensor, got ", t.device());
    TORCH_CHECK(t.device() == y.device(), op, ": ", names[i], " is on ", t.device(),
                " but y/grad_out is on ", y.device());
    TORCH_CHECK(t.scalar_type() == dt, op, ": ", names[i], " has dtype ", t.scalar_type(),
                " but y/grad_out has ", dt, " (all inputs must share one dtype)");
  }
  TORCH_CHECK(y.dim() == 3, op, ": y/grad_out must be (B, N, d), got shape ", y.sizes());
  TORCH_CHECK(taps.dim() == 3, op, ": taps must be (B, N, K), got shape ", taps.sizes());
  TORCH_CHECK(ups.dim() == 2, op, ": ups must be (d, K), got shape ", ups.sizes());
  TORCH_CHECK(taps.size(0) == y.size(0) && taps.size(1) == y.size(1), op, ": taps ",
              taps.sizes(), " do not match y ", y.sizes(), " in (B, N)");
  TORCH_CHECK(ups.size(0) == y.size(2), op, ": ups has ", ups.size(0), " rows but d = ",
              y.size(2));
  TORCH_CHECK(ups.size(1) == taps.size(2), op, ": ups has ", ups.size(1),
              " columns but taps have K = ", taps.size(2));
  TORCH_CHECK(taps.size(2) >= 1 && taps.size(2) <= lim.max_k, op, where, ": taps need 1 <= K <= ",
              lim.max_k, " columns, got ", taps.size(2));
  // β is used in the compute type (float; double for float64 I/O): it must be finite there
  TORCH_CHECK(std::isfinite(beta) && (dt == at::kDouble || std::isfinite(static_cast<float>(beta))),
              op, ": beta must be a finite number of the compute type (|beta| <= ",
              dt == at::kDouble ? "1.8e308" : "3.4e38", "), got ", beta);
  TORCH_CHECK(num_prefix >= 0 && num_prefix <= y.size(1), op, ": num_prefix must be in 0..",
              y.size(1), ", got ", num_prefix);
  if (!conv_weight) return 0;
  const at::Tensor& w = *conv_weight;
  const int64_t k = w.dim() == 4 ? w.size(3) : -1;
  TORCH_CHECK(w.dim() == 4 && w.size(0) == y.size(2) && w.size(1) == 1 && w.size(2) == k, op,
              ": conv_weight must be (d, 1, k, k) with d = ", y.size(2), ", got ", w.sizes());
  TORCH_CHECK(k >= 1 && k <= lim.max_ksize, op, where, ": conv size must be 1..", lim.max_ksize,
              ", got ", k);
  const int64_t patches = y.size(1) - num_prefix;
  // bounds first, then the product: grid_h, grid_w <= patches keeps grid_h * grid_w exact
  TORCH_CHECK(grid_h >= 1 && grid_w >= 1 && grid_h <= patches && grid_w <= patches &&
                  grid_h * grid_w == patches,
              op, ": ", y.size(1), " tokens do not hold ", num_prefix, " prefix tokens plus a ",
              grid_h, "x", grid_w, " patch grid");
  return k;
}

}  // namespace dtl
