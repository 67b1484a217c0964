// The CUDA extension's Python module. Importing it runs the TORCH_LIBRARY registrations of
// the CUDA kernels; it also answers which shapes those kernels take, from the same launch
// plan they use (side_plan.h), so Python never copies the kernels' limits.
#include <Python.h>

#include "side_plan.h"

namespace {

// plan_fits(B, N, D, K, ks, P, H, W, io_size, acc_size, sms, smem_limit) -> bool
PyObject* plan_fits(PyObject*, PyObject* args) {
  long long B, N, D, io, acc, smem;
  int K, ks, P, H, W, sms;
  if (!PyArg_ParseTuple(args, "LLLiiiiiLLiL", &B, &N, &D, &K, &ks, &P, &H, &W, &io, &acc, &sms,
                        &smem))
    return nullptr;
  using namespace dtl::cuda_side;
  if (K < 1 || K > kMaxK || ks < 0 || ks > kMaxKS || B < 0 || N < 0 || D < 0 || io <= 0 ||
      acc <= 0 || sms < 1 || smem <= 0)
    Py_RETURN_FALSE;
  const Plan p = make_plan(B, N, D, K, ks, P, H, W, size_t(io), size_t(acc), sms, size_t(smem));
  if (max_smem(p) <= size_t(smem)) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

PyMethodDef methods[] = {
    {"plan_fits", plan_fits, METH_VARARGS,
     "plan_fits(B, N, D, K, ks, P, H, W, io_size, acc_size, sms, smem_limit): whether the CUDA "
     "side-op kernels take this shape on a device with `sms` multiprocessors and "
     "`smem_limit` bytes of opt-in shared memory per block"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", "dtl_kernels CUDA ops", -1, methods};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C_cuda(void) {
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
  PyModule_AddIntConstant(m, "MAX_K", dtl::cuda_side::kMaxK);
  PyModule_AddIntConstant(m, "MAX_KSIZE", dtl::cuda_side::kMaxKS);
  return m;
}
