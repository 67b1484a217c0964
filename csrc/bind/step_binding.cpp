// dtl_kernels._C_bind: a direct Python entry to the dispatcher op dtl_kernels::side_step.
//
// Why: `torch.ops.dtl_kernels.side_step.default(...)` matches its arguments against the op's
// schema through the JIT's generic converter (every list element, every optional, boxed into
// IValues); per add-back that costs about as much host time as the op itself. This entry
// converts the thirteen positional arguments by hand and calls a typed handle of the same op,
// so dispatch (autograd, autocast, Python modes, fake tensors, every backend) is unchanged.
//
// What it does not do: __torch_function__. When any tensor argument is a subclass (which may
// have one) or a torch-function mode is active, it returns NotImplemented and the caller uses
// torch.ops, which handles them. The caller also uses torch.ops while torch.compile traces (it cannot see into
// this function). Bad arguments raise TypeError / ValueError naming the argument.
#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/SmallVector.h>

#include <optional>
#include <tuple>


namespace {

using StepSignature = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList, int64_t,
    const at::Tensor&, const std::optional<at::Tensor>&, int64_t, int64_t, int64_t, double,
    int64_t, std::optional<at::ScalarType>);

constexpr Py_ssize_t kArgs = 13;
const char* const kNames[kArgs] = {"y", "taps", "inputs", "downs", "first_col", "ups",
                                   "conv_weight", "grid_h", "grid_w", "num_prefix", "beta",
                                   "kernel", "save_dtype"};

// The op's typed handle, looked up once (the CPU extension registers the schema at import).
const c10::TypedOperatorHandle<StepSignature>& step_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("dtl_kernels::side_step", "")
                             .typed<StepSignature>();
  return op;
}

struct NeedsTorchFunction {};  // an argument asks for __torch_function__: use torch.ops

// A tensor argument: a plain Tensor or Parameter. Any subclass (its __torch_function__,
// fake tensors) goes to torch.ops, which knows them all.
const at::Tensor& tensor_arg(PyObject* obj, Py_ssize_t i) {
  if (THPVariable_CheckExact(obj)) return THPVariable_Unpack(obj);
  TORCH_CHECK_TYPE(THPVariable_Check(obj), "side_step: ", kNames[i], " must be a Tensor, not ",
                   Py_TYPE(obj)->tp_name);
  throw NeedsTorchFunction{};
}

void tensor_list_arg(PyObject* obj, Py_ssize_t i, c10::SmallVector<at::Tensor, 8>& out) {
  TORCH_CHECK_TYPE(PyList_Check(obj) || PyTuple_Check(obj), "side_step: ", kNames[i],
                   " must be a list of Tensors, not ", Py_TYPE(obj)->tp_name);
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(obj);
  PyObject** items = PySequence_Fast_ITEMS(obj);
  out.reserve(static_cast<size_t>(n));
  for (Py_ssize_t j = 0; j < n; ++j) out.push_back(tensor_arg(items[j], i));
}

int64_t int_arg(PyObject* obj, Py_ssize_t i) {
  TORCH_CHECK_TYPE(PyLong_Check(obj) && !PyBool_Check(obj), "side_step: ", kNames[i],
                   " must be an int, not ", Py_TYPE(obj)->tp_name);
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
  TORCH_CHECK_VALUE(overflow == 0, "side_step: ", kNames[i], " does not fit in 64 bits");
  return static_cast<int64_t>(v);
}

double float_arg(PyObject* obj, Py_ssize_t i) {
  TORCH_CHECK_TYPE(PyFloat_Check(obj) || (PyLong_Check(obj) && !PyBool_Check(obj)),
                   "side_step: ", kNames[i], " must be a float, not ", Py_TYPE(obj)->tp_name);
  const double v = PyFloat_AsDouble(obj);
  if (v == -1.0 && PyErr_Occurred()) throw python_error();
  return v;
}

PyObject* side_step(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == kArgs, "side_step takes ", kArgs, " positional arguments, got ",
                   nargs);
  try {
    if (at::impl::torch_function_mode_enabled()) throw NeedsTorchFunction{};
    const at::Tensor& y = tensor_arg(args[0], 0);
    const at::Tensor& taps = tensor_arg(args[1], 1);
    c10::SmallVector<at::Tensor, 8> inputs, downs;
    tensor_list_arg(args[2], 2, inputs);
    tensor_list_arg(args[3], 3, downs);
    const int64_t first_col = int_arg(args[4], 4);
    const at::Tensor& ups = tensor_arg(args[5], 5);
    std::optional<at::Tensor> conv;
    if (args[6] != Py_None) conv = tensor_arg(args[6], 6);
    const int64_t grid_h = int_arg(args[7], 7), grid_w = int_arg(args[8], 8);
    const int64_t num_prefix = int_arg(args[9], 9);
    const double beta = float_arg(args[10], 10);
    const int64_t kernel = int_arg(args[11], 11);
    std::optional<at::ScalarType> save_dtype;
    if (args[12] != Py_None) {
      TORCH_CHECK_TYPE(THPDtype_Check(args[12]),
                       "side_step: save_dtype must be a torch.dtype or None, not ",
                       Py_TYPE(args[12])->tp_name);
      save_dtype = reinterpret_cast<THPDtype*>(args[12])->scalar_type;
    }
    std::tuple<at::Tensor, at::Tensor> got;
    {
      pybind11::gil_scoped_release no_gil;  // as torch.ops does; Python callbacks retake it
      got = step_op().call(y, taps, inputs, downs, first_col, ups, conv, grid_h, grid_w,
                           num_prefix, beta, kernel, save_dtype);
    }
    PyObject* out = PyTuple_New(2);
    if (out == nullptr) throw python_error();
    PyTuple_SET_ITEM(out, 0, THPVariable_Wrap(std::move(std::get<0>(got))));
    PyTuple_SET_ITEM(out, 1, THPVariable_Wrap(std::move(std::get<1>(got))));
    return out;
  } catch (const NeedsTorchFunction&) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  END_HANDLE_TH_ERRORS
}

PyMethodDef kMethods[] = {
    {"side_step", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&side_step)),
     METH_FASTCALL, "dtl_kernels::side_step's thirteen arguments, positionally; "
                    "NotImplemented when an argument needs __torch_function__."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C_bind(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C_bind",
                                   "dtl_kernels: direct entries to the compiled ops", -1,
                                   kMethods};
  return PyModule_Create(&def);
}
