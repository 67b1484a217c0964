// Direct Python entries to the dispatcher ops dtl_kernels::side_step and side_step_ (its
// no-grad, in-place form); part of dtl_kernels._C_bind (module.cpp).
//
// Why: `torch.ops.dtl_kernels.side_step.default(...)` matches its arguments against the op's
// schema through the JIT's generic converter (every list element, every optional, boxed into
// IValues); per add-back that costs about as much host time as the op itself. This entry
// converts the thirteen positional arguments by hand and calls a typed handle of the same op,
// so dispatch (autograd, autocast, Python modes, fake tensors, every backend) is unchanged.
//
// What it does not do: anything but the plain case. When a tensor argument is a subclass
// (which may have __torch_function__; fake tensors), a torch-function mode is active, or a
// scalar is not a plain Python int / float (numpy scalars, 0-dim tensors, bools, SymInts,
// ints beyond 64 bits), it returns NotImplemented and the caller uses torch.ops, which
// converts or refuses them as it always has. The caller also uses torch.ops while
// torch.compile traces (it cannot see into this function).
#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/utils/object_ptr.h>
#include <torch/csrc/autograd/python_variable.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/SmallVector.h>

#include <optional>
#include <tuple>

#include "bind.h"

namespace {

using StepSignature = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList, int64_t,
    const at::Tensor&, const std::optional<at::Tensor>&, int64_t, int64_t, int64_t, double,
    int64_t, std::optional<at::ScalarType>);
using InPlaceSignature = at::Tensor(const at::Tensor&, at::Tensor&, at::TensorList,
                                    at::TensorList, int64_t, const at::Tensor&,
                                    const std::optional<at::Tensor>&, int64_t, int64_t, int64_t,
                                    double, int64_t, const std::optional<at::Tensor>&);

constexpr Py_ssize_t kShared = 12;  // y, taps, inputs, downs, first_col, ups, conv_weight,
                                    // grid_h, grid_w, num_prefix, beta, kernel (+ side_step's
                                    // save_dtype, or side_step_'s optional next_down)

// The ops' typed handles, looked up once (the CPU extension registers the schemas at import).
const c10::TypedOperatorHandle<StepSignature>& step_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("dtl_kernels::side_step", "")
                             .typed<StepSignature>();
  return op;
}
const c10::TypedOperatorHandle<InPlaceSignature>& inplace_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("dtl_kernels::side_step_", "")
                             .typed<InPlaceSignature>();
  return op;
}

struct UseTorchOps {};  // not the plain case: torch.ops takes it

// A tensor argument: a plain Tensor or Parameter (any subclass goes to torch.ops).
const at::Tensor& tensor_arg(PyObject* obj) {
  if (!THPVariable_CheckExact(obj)) throw UseTorchOps{};
  return THPVariable_Unpack(obj);
}

void tensor_list_arg(PyObject* obj, c10::SmallVector<at::Tensor, 8>& out) {
  if (!PyList_CheckExact(obj) && !PyTuple_CheckExact(obj)) throw UseTorchOps{};
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(obj);
  PyObject** items = PySequence_Fast_ITEMS(obj);
  out.reserve(static_cast<size_t>(n));
  for (Py_ssize_t j = 0; j < n; ++j) out.push_back(tensor_arg(items[j]));
}

int64_t int_arg(PyObject* obj) {
  if (!PyLong_CheckExact(obj)) throw UseTorchOps{};  // also rules out bool
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
  if (overflow != 0) throw UseTorchOps{};
  return static_cast<int64_t>(v);
}

double float_arg(PyObject* obj) {
  if (PyFloat_CheckExact(obj)) return PyFloat_AS_DOUBLE(obj);
  if (!PyLong_CheckExact(obj)) throw UseTorchOps{};
  const double v = PyLong_AsDouble(obj);
  if (v == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();  // too large for a double: let torch.ops say so
    throw UseTorchOps{};
  }
  return v;
}

// The twelve arguments both ops share, converted (UseTorchOps where one is not plain).
struct SharedArgs {
  const at::Tensor* y;
  const at::Tensor* taps;
  c10::SmallVector<at::Tensor, 8> inputs, downs;
  int64_t first_col;
  const at::Tensor* ups;
  std::optional<at::Tensor> conv;
  int64_t grid_h, grid_w, num_prefix;
  double beta;
  int64_t kernel;
};

void shared_args(PyObject* const* args, SharedArgs& a) {
  if (at::impl::torch_function_mode_enabled()) throw UseTorchOps{};
  a.y = &tensor_arg(args[0]);
  a.taps = &tensor_arg(args[1]);
  tensor_list_arg(args[2], a.inputs);
  tensor_list_arg(args[3], a.downs);
  a.first_col = int_arg(args[4]);
  a.ups = &tensor_arg(args[5]);
  if (args[6] != Py_None) a.conv = tensor_arg(args[6]);
  a.grid_h = int_arg(args[7]);
  a.grid_w = int_arg(args[8]);
  a.num_prefix = int_arg(args[9]);
  a.beta = float_arg(args[10]);
  a.kernel = int_arg(args[11]);
}

}  // namespace

namespace dtl_bind {

PyObject* side_step(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == kShared + 1, "side_step takes ", kShared + 1,
                   " positional arguments, got ", nargs);
  try {
    SharedArgs a;
    shared_args(args, a);
    std::optional<at::ScalarType> save_dtype;
    if (args[kShared] != Py_None) {
      if (!THPDtype_Check(args[kShared])) throw UseTorchOps{};
      save_dtype = reinterpret_cast<THPDtype*>(args[kShared])->scalar_type;
    }
    std::tuple<at::Tensor, at::Tensor> got;
    {
      pybind11::gil_scoped_release no_gil;  // as torch.ops does; Python callbacks retake it
      got = step_op().call(*a.y, *a.taps, a.inputs, a.downs, a.first_col, *a.ups, a.conv,
                           a.grid_h, a.grid_w, a.num_prefix, a.beta, a.kernel, save_dtype);
    }
    THPObjectPtr out(PyTuple_New(2));
    if (!out) throw python_error();
    for (int j = 0; j < 2; ++j) {
      PyObject* t = THPVariable_Wrap(std::move(j == 0 ? std::get<0>(got) : std::get<1>(got)));
      if (t == nullptr) throw python_error();
      PyTuple_SET_ITEM(out.get(), j, t);  // steals the reference
    }
    return out.release();
  } catch (const UseTorchOps&) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  END_HANDLE_TH_ERRORS
}

PyObject* side_step_inplace(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == kShared || nargs == kShared + 1, "side_step_ takes ", kShared,
                   " or ", kShared + 1, " positional arguments, got ", nargs);
  try {
    SharedArgs a;
    shared_args(args, a);
    std::optional<at::Tensor> next_down;
    if (nargs > kShared && args[kShared] != Py_None) next_down = tensor_arg(args[kShared]);
    at::Tensor taps = *a.taps;  // the same tensor (a handle): written in place
    at::Tensor got;
    {
      pybind11::gil_scoped_release no_gil;
      got = inplace_op().call(*a.y, taps, a.inputs, a.downs, a.first_col, *a.ups, a.conv,
                              a.grid_h, a.grid_w, a.num_prefix, a.beta, a.kernel, next_down);
    }
    return THPVariable_Wrap(std::move(got));
  } catch (const UseTorchOps&) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  END_HANDLE_TH_ERRORS
}

}  // namespace dtl_bind
