// The side-op kernels for float y with bfloat16 or half taps / ups, the autocast mix (see
// side_cuda.cuh); a translation unit of its own so that nvcc builds it beside side_f32.cu.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "side_cuda.cuh"

namespace dtl::cuda_side {
DTL_SIDE_CUDA_INSTANTIATE(float, c10::BFloat16)
DTL_SIDE_CUDA_INSTANTIATE(float, c10::Half)
}  // namespace dtl::cuda_side
