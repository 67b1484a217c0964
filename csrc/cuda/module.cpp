#include "../module_init.h"

DTL_PYTHON_MODULE(_C_cuda)
