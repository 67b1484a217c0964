// The side-op kernels for double (see side_cuda.cuh).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "side_cuda.cuh"

namespace dtl::cuda_side {
DTL_SIDE_CUDA_INSTANTIATE(double, double)
}  // namespace dtl::cuda_side
