// The side-op kernels for float y with bfloat16 taps / ups, the autocast mix (see
// side_cuda.cuh); each mix a translation unit of its own (with half: side_f32_f16.cu) so
// that nvcc builds them side by side (together they took 1.8x the next longest file).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "side_cuda.cuh"

namespace dtl::cuda_side {
DTL_SIDE_CUDA_INSTANTIATE(float, c10::BFloat16)
}  // namespace dtl::cuda_side
