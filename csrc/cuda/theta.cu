// CUDA kernels of theta(x) = x * sigmoid(beta * x) and its backward: one thread per
// element (grid-stride), fp32 math, I/O in the tensor's dtype, current stream.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../side_math.h"

namespace dtl {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void theta_forward_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                                     int64_t n, float beta) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    y[i] = static_cast<scalar_t>(theta<opmath_t>(static_cast<opmath_t>(x[i]), opmath_t(beta)));
  }
}

template <typename scalar_t>
__global__ void theta_backward_kernel(const scalar_t* __restrict__ g,
                                      const scalar_t* __restrict__ x,
                                      scalar_t* __restrict__ out, int64_t n, float beta) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    opmath_t d = theta_grad<opmath_t>(static_cast<opmath_t>(x[i]), opmath_t(beta));
    out[i] = static_cast<scalar_t>(static_cast<opmath_t>(g[i]) * d);
  }
}

int blocks_for(int64_t n) {
  int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(b, 1), 65535));
}

void check_input(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), "dtl_kernels::theta (CUDA): ", name, " must be a CUDA tensor");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "dtl_kernels::theta: ", name,
              " must be floating point, got ", x.scalar_type());
}

at::Tensor theta_cuda(const at::Tensor& x_in, double beta) {
  check_input(x_in, "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return y;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "theta_cuda", [&] {
    theta_forward_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), n, static_cast<float>(beta));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

at::Tensor theta_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in, double beta) {
  check_input(x_in, "x");
  check_input(grad_in, "grad");
  TORCH_CHECK(grad_in.sizes() == x_in.sizes(), "dtl_kernels::theta_backward: grad shape ",
              grad_in.sizes(), " != x shape ", x_in.sizes());
  TORCH_CHECK(grad_in.scalar_type() == x_in.scalar_type(),
              "dtl_kernels::theta_backward: grad and x dtypes differ");
  TORCH_CHECK(grad_in.device() == x_in.device(), "dtl_kernels::theta_backward: devices differ");
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = x_in.contiguous();
  at::Tensor g = grad_in.contiguous();
  at::Tensor out = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "theta_bwd_cuda", [&] {
    theta_backward_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), n, static_cast<float>(beta));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace dtl

TORCH_LIBRARY_IMPL(dtl_kernels, CUDA, m) {
  m.impl("theta", &dtl::theta_cuda);
  m.impl("theta_backward", &dtl::theta_backward_cuda);
}
