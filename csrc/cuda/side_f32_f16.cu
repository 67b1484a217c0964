// The side-op kernels for float y with half taps / ups, the autocast mix (see side_cuda.cuh;
// with bfloat16: side_f32_bf16.cu).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "side_cuda.cuh"

namespace dtl::cuda_side {
DTL_SIDE_CUDA_INSTANTIATE(float, c10::Half)
}  // namespace dtl::cuda_side
