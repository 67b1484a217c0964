// dtl_kernels._C_bind's entries (METH_FASTCALL functions; module.cpp lists them).
#pragma once

#include <Python.h>

namespace dtl_bind {

// step_binding.cpp: dtl_kernels::side_step / side_step_ called with their positional
// arguments, or NotImplemented where an argument is not plainly typed.
PyObject* side_step(PyObject* module, PyObject* const* args, Py_ssize_t nargs);
PyObject* side_step_inplace(PyObject* module, PyObject* const* args, Py_ssize_t nargs);

// launcher_bridge.cpp: registers Python launchers as the CPU / CUDA kernels of ops with the
// side-op schema, called through a lean C++ bridge instead of torch.library's boxed one.
PyObject* register_launchers(PyObject* module, PyObject* const* args, Py_ssize_t nargs);

// launch_buffers.cpp: the Triton launchers' outputs and temporaries, one call per launcher.
PyObject* forward_buffers(PyObject* module, PyObject* const* args, Py_ssize_t nargs);
PyObject* backward_buffers(PyObject* module, PyObject* const* args, Py_ssize_t nargs);

}  // namespace dtl_bind
