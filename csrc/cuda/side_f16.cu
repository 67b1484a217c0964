// The side-op kernels for c10::Half (see side_cuda.cuh).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "side_cuda.cuh"

namespace dtl::cuda_side {
DTL_SIDE_CUDA_INSTANTIATE(c10::Half, c10::Half)
}  // namespace dtl::cuda_side
