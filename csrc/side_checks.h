// Host-side input checks of the fused side op, shared by the CPU and CUDA entry points so
// the contract is written once. Every integer is bounded before it is multiplied, so no
// check can overflow (a wrapped product would let bad shapes through to the kernels).
//
// Messages are built by dtl::msg, without iostreams: on the lent H100's image an extension
// built there crashed (SIGSEGV inside std::ostream::_M_insert<long>, a private copy linked
// into the .so) while TORCH_CHECK formatted a number into its message, instead of raising.
// TORCH_CHECK(cond, std::string) passes the string through untouched.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Exception.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <new>
#include <cstdio>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>

#include "cuda/side_plan.h"  // the CUDA kernels' limits (plain C++)

namespace dtl {

namespace msg_detail {
inline void put(std::string& s, const char* v) { s += v; }
inline void put(std::string& s, const std::string& v) { s += v; }
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline void put(std::string& s, T v) {
  s += std::to_string(v);
}
inline void put(std::string& s, double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  s += buf;
}
inline void put(std::string& s, c10::IntArrayRef v) {
  s += "[";
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(v[i]);
  }
  s += "]";
}
inline void put(std::string& s, c10::ScalarType v) { s += c10::toString(v); }
inline void put(std::string& s, const c10::Device& v) { s += v.str(); }
inline void put(std::string& s, c10::DeviceType v) { s += c10::DeviceTypeName(v); }
}  // namespace msg_detail

// The pieces concatenated into one std::string (numbers via std::to_string / snprintf).
template <typename... Args>
std::string msg(const Args&... args) {
  std::string s;
  (msg_detail::put(s, args), ...);
  return s;
}

// -- checks --

struct SideLimits {
  int64_t max_k;      // widest taps (K) the kernels take
  int64_t max_ksize;  // largest conv the kernels take
  bool mixed;         // they take 16-bit taps / ups beside a float32 y (the autocast mix)
  int64_t max_rows;   // most rows (B·N) they index
  int64_t max_d;      // widest y (d)
};

// Each backend's limits, here so that the step (step.cpp) checks a side op before it writes
// the caller's taps with the limits that op's kernels check. CPU: what its packed copies
// allow; CUDA: its plan's (cuda/side_plan.h), rows counted in 32-bit ints with a tile's
// headroom, d over at most 65535 grid blocks of 32 channels; Triton: none (its tiles follow
// K and k, its offsets are 64-bit).
constexpr SideLimits kCpuSideLimits{int64_t(1) << 30, int64_t(1) << 15, true, INT64_MAX,
                                    INT64_MAX};
constexpr SideLimits kCudaSideLimits{cuda_side::kMaxK, cuda_side::kMaxKS, true,
                                     (int64_t(1) << 31) - 1 - 4096, int64_t(65535) * 32};
constexpr SideLimits kTritonSideLimits{INT64_MAX, INT64_MAX, true, INT64_MAX, INT64_MAX};

// The dtypes of the side op: y (and grad_out, out, conv_weight) in one floating dtype; taps
// and ups in one dtype, y's or — beside a float32 y — bfloat16 / float16 (autocast keeps the
// residual stream float32 while the taps, a matmul's output, are 16-bit).
inline bool side_dtypes_ok(at::ScalarType y, at::ScalarType side) {
  return side == y || (y == at::kFloat && (side == at::kBFloat16 || side == at::kHalf));
}

// f(side_t{}) for the taps / ups dtype `s`: scalar_t itself, or bfloat16 / half beside a
// float32 y (the autocast mix; side_dtypes_ok admits no other). For the dispatch of the CPU
// and CUDA entry points.
template <typename scalar_t, typename F>
void with_side_type(at::ScalarType s, F&& f) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (s == at::kBFloat16) return f(c10::BFloat16{});
    if (s == at::kHalf) return f(c10::Half{});
  }
  f(scalar_t{});
}

// The shapes, the sizes within `lim`, β, the prefix and the grid (`where`: the kernel, for
// the messages). Returns k (0 for DTL).
inline int64_t check_side_shapes(const char* op, const char* where, const SideLimits& lim,
                                 const at::Tensor& y, const at::Tensor& taps, const at::Tensor& ups,
                                 const std::optional<at::Tensor>& conv_weight, int64_t grid_h,
                                 int64_t grid_w, int64_t num_prefix, double beta) {
  const auto dt = y.scalar_type();
  TORCH_CHECK(y.dim() == 3, msg(op, ": y/grad_out must be (B, N, d), got shape ", y.sizes()));
  TORCH_CHECK(taps.dim() == 3, msg(op, ": taps must be (B, N, K), got shape ", taps.sizes()));
  TORCH_CHECK(ups.dim() == 2, msg(op, ": ups must be (d, K), got shape ", ups.sizes()));
  TORCH_CHECK(taps.size(0) == y.size(0) && taps.size(1) == y.size(1),
              msg(op, ": taps ", taps.sizes(), " do not match y ", y.sizes(), " in (B, N)"));
  TORCH_CHECK(ups.size(0) == y.size(2),
              msg(op, ": ups has ", ups.size(0), " rows but d = ", y.size(2)));
  TORCH_CHECK(ups.size(1) == taps.size(2),
              msg(op, ": ups has ", ups.size(1), " columns but taps have K = ", taps.size(2)));
  TORCH_CHECK(taps.size(2) >= 1 && taps.size(2) <= lim.max_k,
              msg(op, where, ": taps need 1 <= K <= ", lim.max_k, " columns, got ", taps.size(2)));
  // bounds before the product (N ≤ max_rows, then B ≤ max_rows / N): it cannot overflow
  TORCH_CHECK(y.size(1) <= lim.max_rows &&
                  (y.size(1) == 0 || y.size(0) <= lim.max_rows / y.size(1)),
              msg(op, where, ": ", y.size(0), " x ", y.size(1), " rows are more than the ",
                  "kernels index (", lim.max_rows, ")"));
  TORCH_CHECK(y.size(2) <= lim.max_d,
              msg(op, where, ": d = ", y.size(2), " is too large (at most ", lim.max_d, ")"));
  // β is used in the compute type (float; double for float64 I/O): within its range (a β
  // just past FLT_MAX would round to it; contract.py's twin refuses it too)
  TORCH_CHECK(std::isfinite(beta) &&
                  (dt == at::kDouble || std::fabs(beta) <= double(FLT_MAX)),
              msg(op, ": beta must be a finite number of the compute type (|beta| <= ",
                  dt == at::kDouble ? "1.8e308" : "3.4e38", "), got ", beta));
  TORCH_CHECK(num_prefix >= 0 && num_prefix <= y.size(1),
              msg(op, ": num_prefix must be in 0..", y.size(1), ", got ", num_prefix));
  if (!conv_weight) return 0;
  const at::Tensor& w = *conv_weight;
  const int64_t k = w.dim() == 4 ? w.size(3) : -1;
  TORCH_CHECK(
      w.dim() == 4 && w.size(0) == y.size(2) && w.size(1) == 1 && w.size(2) == k,
      msg(op, ": conv_weight must be (d, 1, k, k) with d = ", y.size(2), ", got ", w.sizes()));
  TORCH_CHECK(k >= 1 && k <= lim.max_ksize,
              msg(op, where, ": conv size must be 1..", lim.max_ksize, ", got ", k));
  const int64_t patches = y.size(1) - num_prefix;
  // bounds first, then the product: grid_h, grid_w <= patches keeps grid_h * grid_w exact
  TORCH_CHECK(grid_h >= 1 && grid_w >= 1 && grid_h <= patches && grid_w <= patches &&
                  grid_h * grid_w == patches,
              msg(op, ": ", y.size(1), " tokens do not hold ", num_prefix, " prefix tokens plus a ",
                  grid_h, "x", grid_w, " patch grid"));
  return k;
}

// Checks y/grad_out (B, N, d), taps (B, N, K), ups (d, K), conv_weight (d, 1, k, k) or none,
// the grid and β; `device` is where every tensor must live. Returns k (0 for DTL).
inline int64_t check_side_inputs(const char* op, c10::DeviceType device, const SideLimits& lim,
                                 const at::Tensor& y, const at::Tensor& taps, const at::Tensor& ups,
                                 const std::optional<at::Tensor>& conv_weight, int64_t grid_h,
                                 int64_t grid_w, int64_t num_prefix, double beta) {
  const char* where = device == c10::DeviceType::CUDA ? " (CUDA kernel)" : " (CPU kernel)";
  TORCH_CHECK(y.defined(), msg(op, ": y/grad_out is undefined"));
  const auto dt = y.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
              msg(op, where, ": dtype must be float32, float16, bfloat16 or float64, got ", dt));
  const char* names[] = {"y/grad_out", "taps", "ups", "conv_weight"};
  const at::Tensor* ts[] = {&y, &taps, &ups, conv_weight ? &*conv_weight : nullptr};
  for (int i = 0; i < 4; ++i) {
    if (ts[i] == nullptr) continue;
    const at::Tensor& t = *ts[i];
    TORCH_CHECK(t.defined(), msg(op, ": ", names[i], " is undefined"));
    TORCH_CHECK(t.device().type() == device,
                msg(op, where, ": ", names[i], " must be a ", c10::DeviceTypeName(device),
                    " tensor, got ", t.device()));
    TORCH_CHECK(t.device() == y.device(), msg(op, ": ", names[i], " is on ", t.device(),
                                              " but y/grad_out is on ", y.device()));
  }
  const auto st = taps.scalar_type();
  TORCH_CHECK(ups.scalar_type() == st, msg(op, ": ups has dtype ", ups.scalar_type(),
                                           " but taps have ", st, " (they share one dtype)"));
  TORCH_CHECK(side_dtypes_ok(dt, st) && (st == dt || lim.mixed),
              msg(op, where, ": taps have dtype ", st, " but y/grad_out has ", dt,
                  lim.mixed ? " (taps / ups take y's dtype, or bfloat16 / float16 beside float32 y)"
                            : " (all inputs must share one dtype here)"));
  TORCH_CHECK(!conv_weight || conv_weight->scalar_type() == dt,
              msg(op, ": conv_weight has dtype ", conv_weight ? conv_weight->scalar_type() : dt,
                  " but y/grad_out has ", dt, " (the conv runs in y's dtype)"));
  return check_side_shapes(op, where, lim, y, taps, ups, conv_weight, grid_h, grid_w,
                           num_prefix, beta);
}

// A floating dtype (float32/16, bfloat16, float64): what the kernels compute in.
inline bool is_kernel_float(at::ScalarType dt) {
  return dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble;
}
inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(is_kernel_float(t.scalar_type()),
              msg(op, ": ", name, " must be float32, float16, bfloat16 or float64, got ",
                  t.scalar_type()));
}

// A dense strided tensor (not sparse, nested, mkldnn): what the kernels and the step's
// views take; anything else would fail deep inside ATen with a message naming nothing here.
// `index` ≥ 0: the name is a list's (inputs[index]).
inline void check_strided(const char* op, const char* name, const at::Tensor& t,
                          int64_t index = -1) {
  if (t.layout() == at::kStrided && !t.is_nested()) return;
  const char* got = t.is_nested()                  ? "a nested tensor"
                    : t.layout() == at::kSparse    ? "a sparse (COO) tensor"
                    : t.layout() == at::kMkldnn    ? "an mkldnn tensor"
                                                   : "a sparse compressed tensor";
  TORCH_CHECK(false, index < 0 ? msg(op, ": ", name, " must be a dense (strided) tensor, got ", got)
                               : msg(op, ": ", name, "[", index,
                                     "] must be a dense (strided) tensor, got ", got));
}

// f() with a host allocation it cannot make (the CPU kernels' packed copies and per-task
// partials, std::vector) refused by name instead of a bare std::bad_alloc: sizes within the
// limits can still be more than the machine holds (an expanded input, a very wide K).
template <typename F>
decltype(auto) with_host_alloc_named(const char* op, F&& f) {
  try {
    return f();
  } catch (const std::bad_alloc&) {
    TORCH_CHECK(false, msg(op, ": out of host memory for the kernel's working copies (sized by "
                           "d, K, k and the rows: an expanded or very wide input?)"));
  }
}

// The op's backward is not differentiable itself: with create_graph=True its gradients
// would carry no graph and a second derivative would silently miss its terms.
inline void refuse_double_backward(const char* op) {
  TORCH_CHECK(!at::GradMode::is_enabled(),
              msg(op, ": double backward (create_graph=True) is not supported: its gradients "
                      "are not differentiable"));
}

// write_taps_ / side_step: taps (B, N, K) floating; inputs[j] (B, N, d_j) and downs[j] (r_j, d_j)
// on its device, floating; their columns first_col … first_col + Σ r_j inside K.
// write_taps_'s arguments (and side_step_'s, `op`); returns the column after the last tap.
inline int64_t check_taps_inputs(const at::Tensor& taps, at::TensorList inputs,
                                 at::TensorList downs, int64_t first_col,
                                 const char* op = "dtl_kernels::write_taps_") {
  check_strided(op, "taps", taps);
  TORCH_CHECK(taps.dim() == 3, msg(op, ": taps must be (B, N, K), got shape ", taps.sizes()));
  check_floating(op, "taps", taps);
  TORCH_CHECK(inputs.size() == downs.size(),
              msg(op, ": ", inputs.size(), " inputs but ", downs.size(), " downs"));
  const int64_t k_cols = taps.size(2);
  TORCH_CHECK(first_col >= 0 && first_col <= k_cols,
              msg(op, ": first_col must be in 0..", k_cols, ", got ", first_col));
  int64_t col = first_col;
  for (size_t j = 0; j < inputs.size(); ++j) {
    const at::Tensor& z = inputs[j];
    const at::Tensor& a = downs[j];
    check_strided(op, "inputs", z, static_cast<int64_t>(j));
    check_strided(op, "downs", a, static_cast<int64_t>(j));
    TORCH_CHECK(z.dim() == 3 && z.size(0) == taps.size(0) && z.size(1) == taps.size(1),
                msg(op, ": inputs[", j, "] must be (B, N, d) with (B, N) = (", taps.size(0), ", ",
                    taps.size(1), "), got ", z.sizes()));
    TORCH_CHECK(a.dim() == 2 && a.size(1) == z.size(2) && a.size(0) >= 1,
                msg(op, ": downs[", j, "] must be (r, d) with d = ", z.size(2), ", got ",
                    a.sizes()));
    for (const at::Tensor* t : {&z, &a}) {
      TORCH_CHECK(is_kernel_float(t->scalar_type()),
                  msg(op, ": inputs[", j, "] and downs[", j, "] must be floating point, got ",
                      t->scalar_type()));
      TORCH_CHECK(t->device() == taps.device(),
                  msg(op, ": inputs[", j, "] / downs[", j, "] are on ", t->device(),
                      ", the taps on ", taps.device()));
    }
    // col <= k_cols and r <= k_cols - col: the sum cannot overflow
    TORCH_CHECK(a.size(0) <= k_cols - col,
                msg(op, ": the taps of inputs 0..", j, " end after column ", col + a.size(0),
                    " of ", k_cols));
    col += a.size(0);
  }
  return col;
}

// The bytes a tensor's elements can reach: [first, last] of its storage.
inline std::pair<int64_t, int64_t> byte_span(const at::Tensor& t) {
  int64_t lo = t.storage_offset(), hi = t.storage_offset();
  for (int64_t i = 0; i < t.dim(); ++i) {  // sizes ≥ 1 here (no empty tensor)
    const int64_t reach = (t.size(i) - 1) * t.stride(i);
    (reach < 0 ? lo : hi) += reach;
  }
  const int64_t item = static_cast<int64_t>(t.element_size());
  return {lo * item, (hi + 1) * item - 1};
}

// Refuse `other` where it may share memory with `written`: their byte spans overlap in the
// address space (conservative, where at::assert_no_overlap gives up on strided / expanded
// views). Addresses, not storages: two storages may hold the same memory (from_dlpack,
// frombuffer, from_numpy of a tensor's array), and one storage is only one way to share.
inline void check_not_sharing(const char* op, const char* name, const at::Tensor& written,
                              const at::Tensor& other) {
  if (written.numel() == 0 || other.numel() == 0 || !written.has_storage() ||
      !other.has_storage() || written.device() != other.device())
    return;
  // data_ptr() of the const storage: no copy-on-write storage is materialised to read it
  const auto base = [](const at::Tensor& t) {
    return reinterpret_cast<uintptr_t>(t.storage().data_ptr().get());
  };
  const uintptr_t wb = base(written), ob = base(other);
  if (wb == 0 || ob == 0) return;  // no memory (meta, fake): nothing to share
  const auto [a0, a1] = byte_span(written);  // ≥ 0: offsets inside each storage
  const auto [b0, b1] = byte_span(other);
  const uintptr_t w0 = wb + static_cast<uintptr_t>(a0), w1 = wb + static_cast<uintptr_t>(a1);
  const uintptr_t o0 = ob + static_cast<uintptr_t>(b0), o1 = ob + static_cast<uintptr_t>(b1);
  TORCH_CHECK(w1 < o0 || o1 < w0,
              msg(op, ": ", name, " shares memory with the taps it writes (they are written "
                  "before it is read): pass a copy"));
}

// write_taps_ reads inputs and downs while it writes taps: none may share taps' memory.
inline void check_no_overlap(const at::Tensor& taps, at::TensorList inputs,
                             at::TensorList downs,
                             const char* op = "dtl_kernels::write_taps_") {
  for (const at::Tensor& t : inputs) check_not_sharing(op, "an input", taps, t);
  for (const at::Tensor& t : downs) check_not_sharing(op, "a down", taps, t);
}

}  // namespace dtl
