// The GPU launcher of the side-op kernels, instantiated once per dtype in side_<dtype>.cu
// (separate translation units: nvcc builds them in parallel).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include "side_launch.h"

namespace dtl::cuda_side {

struct GpuLaunch {
  cudaStream_t stream;
  template <typename Kernel, typename... Args>
  void operator()(Kernel kernel, dim3 grid, size_t smem, const Args&... args) const {
    if (smem > 48 * 1024)  // dynamic shared memory above 48 KiB needs an opt-in per kernel
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem)));
    kernel<<<grid, kThreads, smem, stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

template <typename scalar_t, typename side_t>
void launch_side_forward(const Plan& p, const SideArgs<scalar_t, side_t>& a, cudaStream_t stream) {
  run_side_forward(p, a, GpuLaunch{stream});
}

template <typename scalar_t, typename side_t>
void launch_side_backward(const Plan& p, const SideArgs<scalar_t, side_t>& a, side_t* grad_ups,
                          scalar_t* grad_conv, cudaStream_t stream) {
  run_side_backward(p, a, grad_ups, grad_conv, GpuLaunch{stream});
}

}  // namespace dtl::cuda_side

// Inside namespace dtl::cuda_side: y / out in T, taps / ups in S.
#define DTL_SIDE_CUDA_INSTANTIATE(T, S)                                                        \
  template void launch_side_forward<T, S>(const Plan&, const SideArgs<T, S>&, cudaStream_t);  \
  template void launch_side_backward<T, S>(const Plan&, const SideArgs<T, S>&, S*, T*,        \
                                           cudaStream_t);
