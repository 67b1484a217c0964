#include <Python.h>

#include "vec_capability.h"  // first: the variant's vector width (bf16_dot.h keys on it)
#include "bf16_dot.h"

// One module per instruction-set variant (setup.py): _C_cpu, _C_cpu_avx2, _C_cpu_avx512. Its
// kernels register at load (TORCH_LIBRARY_IMPL); the module itself answers one question.
#ifndef DTL_CPU_MODULE
#define DTL_CPU_MODULE _C_cpu
#endif
#define DTL_CPU_STRINGIFY_(x) #x
#define DTL_CPU_STRINGIFY(x) DTL_CPU_STRINGIFY_(x)
#define DTL_CPU_INIT_(name) PyInit_##name
#define DTL_CPU_INIT(name) DTL_CPU_INIT_(name)

namespace {

PyObject* bf16_dot(PyObject* /*module*/, PyObject* /*unused*/) {
  return PyBool_FromLong(dtl::bf16_dot_active() ? 1 : 0);
}

PyObject* bf16_dot_built(PyObject* /*module*/, PyObject* /*unused*/) {
  return PyBool_FromLong(DTL_BF16_DOT);
}

PyMethodDef methods[] = {
    {"bf16_dot_built", bf16_dot_built, METH_NOARGS,
     "Whether this variant was compiled with the AVX512-BF16 kernels (the AVX-512 variant, "
     "by a compiler bf16_dot.h knows to take them)."},
    {"bf16_dot", bf16_dot, METH_NOARGS,
     "Whether the kernels rebuild h from bf16 taps and ups with AVX512-BF16's vdpbf16ps "
     "(csrc/cpu/bf16_dot.h): built into this variant, run by this CPU, and not turned off "
     "by DTL_KERNELS_CPU_BF16_DOT=0."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyMODINIT_FUNC DTL_CPU_INIT(DTL_CPU_MODULE)(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, DTL_CPU_STRINGIFY(DTL_CPU_MODULE),
                                   "dtl_kernels CPU kernels (one instruction-set variant)", -1,
                                   methods};
  return PyModule_Create(&def);
}
