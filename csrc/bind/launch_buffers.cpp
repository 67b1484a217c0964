// The outputs and temporaries of the Triton launchers (dtl_kernels/ops/triton_side.py),
// allocated in one call per launcher; part of dtl_kernels._C_bind (module.cpp).
//
// Why: every `torch.empty_like(...)` / `torch.zeros(...)` a Python launcher makes parses its
// arguments through torch's generic Python argument parser, about 1 µs of host time each on
// the CI's CPU; the backward launcher makes five such calls per add-back. Here the same
// tensors come from at::empty / at::zeros behind one METH_FASTCALL entry. What is allocated
// (shapes, dtypes, which buffers are zeroed) is decided by the launcher; these functions
// only carry it out, so the Python fallback (triton_side._*_buffers_py, used where _C_bind
// is not built) and this file allocate the same tensors (tests/test_launch_buffers.py).
#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/object_ptr.h>

#include <ATen/ATen.h>

#include <initializer_list>

#include "bind.h"

namespace {

const at::Tensor& tensor_at(PyObject* const* args, Py_ssize_t j, const char* fn,
                            const char* name) {
  TORCH_CHECK_TYPE(THPVariable_Check(args[j]), fn, ": ", name, " must be a Tensor, got ",
                   Py_TYPE(args[j])->tp_name);
  return THPVariable_Unpack(args[j]);
}

int64_t size_at(PyObject* const* args, Py_ssize_t j, const char* fn, const char* name) {
  TORCH_CHECK_TYPE(PyLong_Check(args[j]) && !PyBool_Check(args[j]), fn, ": ", name,
                   " must be an int, got ", Py_TYPE(args[j])->tp_name);
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(args[j], &overflow);
  if (v == -1 && PyErr_Occurred()) throw python_error();
  TORCH_CHECK_VALUE(overflow == 0 && v >= 0, fn, ": ", name,
                    " must be a size in 0..2^63-1, got another int");
  return static_cast<int64_t>(v);
}

// The launchers accumulate in float32 (float64 for float64 tensors): nothing else is an
// accumulator (a uint8 or complex one would allocate a buffer the kernels misread).
at::ScalarType dtype_at(PyObject* const* args, Py_ssize_t j, const char* fn) {
  TORCH_CHECK_TYPE(THPDtype_Check(args[j]), fn, ": the accumulator dtype must be a torch.dtype");
  const at::ScalarType acc = reinterpret_cast<THPDtype*>(args[j])->scalar_type;
  TORCH_CHECK_VALUE(acc == at::kFloat || acc == at::kDouble, fn,
                    ": the accumulator dtype must be torch.float32 or torch.float64, got ", acc);
  return acc;
}

at::Tensor empty_contiguous(const at::Tensor& like) {
  return at::empty(like.sizes(), like.options().memory_format(c10::MemoryFormat::Contiguous));
}

PyObject* tuple_of(std::initializer_list<at::Tensor> tensors) {
  THPObjectPtr out(PyTuple_New(static_cast<Py_ssize_t>(tensors.size())));
  if (!out) throw python_error();
  Py_ssize_t j = 0;
  for (const at::Tensor& t : tensors) {
    PyObject* obj = THPVariable_Wrap(t);
    if (obj == nullptr) throw python_error();
    PyTuple_SET_ITEM(out.get(), j++, obj);  // steals the reference
  }
  return out.release();
}

}  // namespace

namespace dtl_bind {

// forward_buffers(y, scratch_numel, acc_dtype) -> (out, scratch): out like y, contiguous;
// scratch an acc_dtype vector of scratch_numel elements on y's device (empty if 0).
PyObject* forward_buffers(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  constexpr const char* fn = "forward_buffers";
  TORCH_CHECK_TYPE(nargs == 3, fn, "(y, scratch_numel, acc_dtype) takes 3 arguments, got ",
                   nargs);
  const at::Tensor& y = tensor_at(args, 0, fn, "y");
  const int64_t scratch_numel = size_at(args, 1, fn, "scratch_numel");
  const at::ScalarType acc = dtype_at(args, 2, fn);
  at::Tensor out = empty_contiguous(y);
  at::Tensor scratch = at::empty({scratch_numel}, y.options().dtype(acc));
  return tuple_of({out, scratch});
  END_HANDLE_TH_ERRORS
}

// backward_buffers(grad_out, taps, ups, conv_weight, zero_taps, buf_numel, tbuf_start,
// acc_dtype) -> (grad_taps, grad_ups, grad_conv, buf, tbuf): grad_taps / grad_ups /
// grad_conv like taps / ups / conv_weight, contiguous (grad_taps zeroed if zero_taps;
// grad_conv an empty vector of grad_out's options where conv_weight is None); buf a zeroed
// acc_dtype vector of buf_numel elements on grad_out's device, tbuf its tail from tbuf_start.
PyObject* backward_buffers(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  constexpr const char* fn = "backward_buffers";
  TORCH_CHECK_TYPE(nargs == 8, fn, "(grad_out, taps, ups, conv_weight, zero_taps, buf_numel, "
                   "tbuf_start, acc_dtype) takes 8 arguments, got ", nargs);
  const at::Tensor& grad_out = tensor_at(args, 0, fn, "grad_out");
  const at::Tensor& taps = tensor_at(args, 1, fn, "taps");
  const at::Tensor& ups = tensor_at(args, 2, fn, "ups");
  const bool has_conv = args[3] != Py_None;
  TORCH_CHECK_TYPE(PyBool_Check(args[4]), fn, ": zero_taps must be a bool");
  const bool zero_taps = args[4] == Py_True;
  const int64_t buf_numel = size_at(args, 5, fn, "buf_numel");
  const int64_t tbuf_start = size_at(args, 6, fn, "tbuf_start");
  TORCH_CHECK_VALUE(tbuf_start <= buf_numel, fn, ": tbuf_start ", tbuf_start,
                    " is past the buffer's ", buf_numel, " elements");
  const at::ScalarType acc = dtype_at(args, 7, fn);
  at::Tensor grad_taps = empty_contiguous(taps);
  if (zero_taps) grad_taps.zero_();
  at::Tensor grad_ups = empty_contiguous(ups);
  at::Tensor grad_conv = has_conv ? empty_contiguous(tensor_at(args, 3, fn, "conv_weight"))
                                  : at::empty({0}, grad_out.options());
  at::Tensor buf = at::zeros({buf_numel}, grad_out.options().dtype(acc));
  at::Tensor tbuf = tbuf_start == 0 ? buf : buf.slice(0, tbuf_start);
  return tuple_of({grad_taps, grad_ups, grad_conv, buf, tbuf});
  END_HANDLE_TH_ERRORS
}

}  // namespace dtl_bind
