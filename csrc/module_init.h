// A bare Python module entry point: the extensions hold only TORCH_LIBRARY
// registrations, which run when the shared object is loaded by `import`.
#pragma once

#include <Python.h>

#define DTL_PYTHON_MODULE(name)                                              \
  extern "C" PyMODINIT_FUNC PyInit_##name(void) {                            \
    static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, #name,           \
                                     "dtl_kernels compiled ops", -1, nullptr}; \
    return PyModule_Create(&def);                                            \
  }
