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

template <typename scalar_t>
void launch_side_forward(const Plan& p, const SideArgs<scalar_t>& a, cudaStream_t stream) {
  run_side_forward(p, a, GpuLaunch{stream});
}

template <typename scalar_t>
void launch_side_backward(const Plan& p, const SideArgs<scalar_t>& a, scalar_t* grad_ups,
                          scalar_t* grad_conv, cudaStream_t stream) {
  run_side_backward(p, a, grad_ups, grad_conv, GpuLaunch{stream});
}

}  // namespace dtl::cuda_side

// Inside namespace dtl::cuda_side.
#define DTL_SIDE_CUDA_INSTANTIATE(T)                                                     \
  template void launch_side_forward<T>(const Plan&, const SideArgs<T>&, cudaStream_t);  \
  template void launch_side_backward<T>(const Plan&, const SideArgs<T>&, T*, T*, cudaStream_t);
