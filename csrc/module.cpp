#include "module_init.h"

// _C: the op schemas (ops.cpp), their autograd (autograd.cpp) and the step (step.cpp), built
// once; the CPU kernels are in _C_cpu* (one module per instruction-set variant), the CUDA
// kernels in _C_cuda.
DTL_PYTHON_MODULE(_C)
