// dtl_kernels._C_bind: direct Python entries to the compiled ops (step_binding.cpp), the
// bridge from the dispatcher to Python kernel launchers (launcher_bridge.cpp) and those
// launchers' allocations (launch_buffers.cpp). Links Python;
// the kernels' own extensions (_C*, _C_cuda) do not.
#include "bind.h"

namespace {

template <class F>
PyCFunction fastcall(F f) {
  return reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(f));
}

PyMethodDef kMethods[] = {
    {"side_step", fastcall(&dtl_bind::side_step), METH_FASTCALL,
     "dtl_kernels::side_step's thirteen arguments, positionally; "
     "NotImplemented unless every argument is plainly typed."},
    {"side_step_", fastcall(&dtl_bind::side_step_inplace), METH_FASTCALL,
     "dtl_kernels::side_step_'s twelve or thirteen arguments, positionally; "
     "NotImplemented unless every argument is plainly typed."},
    {"register_launchers", fastcall(&dtl_bind::register_launchers), METH_FASTCALL,
     "register_launchers(forward_op, forward, backward_op, backward): the Python launchers "
     "become the CPU and CUDA kernels of two ops with the side-op schema (once per op); "
     "each is called with the op's eight arguments and the call's key (bytes)."},
    {"forward_buffers", fastcall(&dtl_bind::forward_buffers), METH_FASTCALL,
     "forward_buffers(y, scratch_numel, acc_dtype) -> (out, scratch): a Triton forward "
     "launcher's output and scratch in one call."},
    {"backward_buffers", fastcall(&dtl_bind::backward_buffers), METH_FASTCALL,
     "backward_buffers(grad_out, taps, ups, conv_weight, zero_taps, buf_numel, tbuf_start, "
     "acc_dtype) -> (grad_taps, grad_ups, grad_conv, buf, tbuf): a Triton backward "
     "launcher's outputs and zeroed accumulator in one call."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C_bind(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C_bind",
                                   "dtl_kernels: direct entries to the compiled ops", -1,
                                   kMethods};
  return PyModule_Create(&def);
}
