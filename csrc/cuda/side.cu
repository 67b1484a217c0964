// Host side of the CUDA side op: input checks (side_checks.h), the launch plan
// (side_plan.h) and the launches of the kernels in side_kernels.cuh.
//
// forward:  fwd_rows (DTL, or DTL+'s prefix rows) and fwd_conv (DTL+'s patch grid).
// backward: dt_rows / dt_conv write ∂T (each block covers all of d for its rows: no partial
//           buffer); du_conv / du_rows write fp32 partial sums of ∂U (and ∂w) per row group
//           into a few slots (within max(4 MiB, 0.25 × y's bytes)), which sum_partials adds
//           in order.
// Everything runs on the current stream of the inputs' device; results are deterministic.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "../side_checks.h"
#include "side_kernels.cuh"

namespace dtl::cuda_side {
// Defined in side_cuda.cuh, instantiated per dtype pair in side_<dtype>.cu.
template <typename scalar_t, typename side_t>
void launch_side_forward(const Plan& p, const SideArgs<scalar_t, side_t>& a, cudaStream_t stream);
template <typename scalar_t, typename side_t>
void launch_side_backward(const Plan& p, const SideArgs<scalar_t, side_t>& a, side_t* grad_ups,
                          scalar_t* grad_conv, cudaStream_t stream);
}  // namespace dtl::cuda_side

namespace dtl {
namespace {

using namespace cuda_side;


// A view with unit stride in the last dimension (copies only when it has another one).
at::Tensor unit_last(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

bool aligned4(const void* p, size_t elem) {
  return reinterpret_cast<uintptr_t>(p) % (4 * elem) == 0;
}

struct Problem {
  int64_t B, N, D, K, ks;
};

template <typename scalar_t, typename side_t>
SideArgs<scalar_t, side_t> make_args(const at::Tensor& y, const at::Tensor& taps,
                                     const at::Tensor& ups, const at::Tensor& w, const Plan& p,
                                     double beta) {
  SideArgs<scalar_t, side_t> a{};
  a.y = y.const_data_ptr<scalar_t>();
  a.y_sb = y.stride(0), a.y_sn = y.stride(1);
  a.taps = taps.const_data_ptr<side_t>();
  a.t_sb = taps.stride(0), a.t_sn = taps.stride(1);
  a.ups = ups.const_data_ptr<side_t>();
  a.w = w.defined() ? w.const_data_ptr<scalar_t>() : nullptr;
  a.B = p.B, a.N = p.N, a.D = p.D;
  a.K = p.K, a.Kp = p.Kp, a.P = p.P, a.H = p.H, a.W = p.W;
  a.beta = beta;
  a.vec = p.D % 4 == 0 && aligned4(a.y, sizeof(scalar_t)) && a.y_sb % 4 == 0 && a.y_sn % 4 == 0;
  return a;
}

Plan plan_for(const char* op, const Problem& q, int64_t P, int64_t gh, int64_t gw,
              size_t io_size, size_t acc_size) {
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  const size_t limit = prop->sharedMemPerBlockOptin;
  const Plan p = make_plan(q.B, q.N, q.D, int(q.K), int(q.ks), int(P), int(gh), int(gw), io_size,
                           acc_size, prop->multiProcessorCount, limit);
  TORCH_CHECK(max_smem(p) <= limit,
              msg(op, " (CUDA): K = ", q.K, " taps in this dtype need ", max_smem(p),
                  " bytes of shared memory per block, the device has ", limit,
                  " (use float32 / bfloat16, or fewer taps)"));
  return p;
}

at::Tensor side_forward_cuda(const at::Tensor& y_in, const at::Tensor& taps_in,
                             const at::Tensor& ups_in, const std::optional<at::Tensor>& conv_weight,
                             int64_t grid_h, int64_t grid_w, int64_t num_prefix, double beta) {
  const char* op = "dtl_kernels::side_forward";
  const int64_t ks = check_side_inputs(op, c10::DeviceType::CUDA, kCudaSideLimits, y_in, taps_in,
                                       ups_in, conv_weight, grid_h, grid_w, num_prefix, beta);
  const c10::cuda::CUDAGuard guard(y_in.device());
  const Problem q{y_in.size(0), y_in.size(1), y_in.size(2), taps_in.size(2), ks};
  at::Tensor out = at::empty({q.B, q.N, q.D}, y_in.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const at::Tensor y = unit_last(y_in), taps = unit_last(taps_in), ups = ups_in.contiguous();
  const at::Tensor w = ks ? conv_weight->reshape({q.D, ks * ks}).contiguous() : at::Tensor();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "side_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Plan p = plan_for(op, q, ks ? num_prefix : 0, grid_h, grid_w, sizeof(scalar_t),
                            sizeof(acc_t));
    with_side_type<scalar_t>(taps.scalar_type(), [&](auto tag) {
      using side_t = decltype(tag);
      SideArgs<scalar_t, side_t> a = make_args<scalar_t, side_t>(y, taps, ups, w, p, beta);
      a.out = out.mutable_data_ptr<scalar_t>();
      launch_side_forward(p, a, stream);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> side_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& taps_in, const at::Tensor& ups_in,
    const std::optional<at::Tensor>& conv_weight, int64_t grid_h, int64_t grid_w,
    int64_t num_prefix, double beta) {
  const char* op = "dtl_kernels::side_backward";
  const int64_t ks = check_side_inputs(op, c10::DeviceType::CUDA, kCudaSideLimits, grad_in, taps_in,
                                       ups_in, conv_weight, grid_h, grid_w, num_prefix, beta);
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const Problem q{grad_in.size(0), grad_in.size(1), grad_in.size(2), taps_in.size(2), ks};
  const int64_t kk = ks * ks;
  const auto contiguous = at::MemoryFormat::Contiguous;
  at::Tensor grad_taps = at::empty({q.B, q.N, q.K}, taps_in.options().memory_format(contiguous));
  at::Tensor grad_ups = at::empty({q.D, q.K}, ups_in.options().memory_format(contiguous));
  at::Tensor grad_conv =
      ks ? at::empty({q.D, 1, ks, ks}, conv_weight->options().memory_format(contiguous))
         : at::empty({0}, grad_in.options());
  if (q.B * q.N == 0 || q.D == 0) {
    grad_taps.zero_();
    grad_ups.zero_();
    grad_conv.zero_();
    return {grad_taps, grad_ups, grad_conv};
  }
  const at::Tensor g = unit_last(grad_in), taps = unit_last(taps_in), ups = ups_in.contiguous();
  const at::Tensor w = ks ? conv_weight->reshape({q.D, kk}).contiguous() : at::Tensor();
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto acc_type = g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "side_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Plan p = plan_for(op, q, ks ? num_prefix : 0, grid_h, grid_w, sizeof(scalar_t),
                            sizeof(acc_t));
    const auto acc_opts = g.options().dtype(acc_type);
    at::Tensor part_ups = at::empty({p.slots(), q.D, q.K}, acc_opts);
    at::Tensor part_w = at::empty({ks ? p.slots_conv : 0, q.D, kk}, acc_opts);
    with_side_type<scalar_t>(taps.scalar_type(), [&](auto tag) {
      using side_t = decltype(tag);
      SideArgs<scalar_t, side_t> a = make_args<scalar_t, side_t>(g, taps, ups, w, p, beta);
      a.grad_taps = grad_taps.mutable_data_ptr<side_t>();
      a.part_ups = part_ups.mutable_data_ptr<acc_t>();
      a.part_w = ks ? part_w.mutable_data_ptr<acc_t>() : nullptr;
      launch_side_backward(p, a, grad_ups.mutable_data_ptr<side_t>(),
                           ks ? grad_conv.mutable_data_ptr<scalar_t>() : nullptr, stream);
    });
  });
  return {grad_taps, grad_ups, grad_conv};
}

}  // namespace
}  // namespace dtl

TORCH_LIBRARY_IMPL(dtl_kernels, CUDA, m) {
  m.impl("side_forward", &dtl::side_forward_cuda);
  m.impl("side_backward", &dtl::side_backward_cuda);
}
