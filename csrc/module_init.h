// A bare Python module entry point: the extensions hold only TORCH_LIBRARY
// registrations, which run when the shared object is loaded by `import`.
#pragma once

#include <Python.h>

// DTL_PYTHON_MODULE(NAME) defines PyInit_NAME; NAME may itself be a macro. (The CPU
// kernels' variant modules define their own, with a method: csrc/cpu/module.cpp.)
#define DTL_PYTHON_MODULE(name) DTL_PYTHON_MODULE_(name)
#define DTL_STRINGIFY_(x) #x
#define DTL_PYTHON_MODULE_(name)                                             \
  extern "C" PyMODINIT_FUNC PyInit_##name(void) {                            \
    static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, DTL_STRINGIFY_(name), \
                                     "dtl_kernels compiled ops", -1, nullptr}; \
    return PyModule_Create(&def);                                            \
  }
