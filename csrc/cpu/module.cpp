#include "../module_init.h"

// one module per instruction-set variant (setup.py): _C_cpu, _C_cpu_avx2, _C_cpu_avx512
#ifndef DTL_CPU_MODULE
#define DTL_CPU_MODULE _C_cpu
#endif
DTL_PYTHON_MODULE(DTL_CPU_MODULE)
