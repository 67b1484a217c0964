// The side-op kernels for float (see side_cuda.cuh; float y with 16-bit taps: side_f32_bf16.cu,
// side_f32_f16.cu).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "side_cuda.cuh"

namespace dtl::cuda_side {
DTL_SIDE_CUDA_INSTANTIATE(float, float)
}  // namespace dtl::cuda_side
