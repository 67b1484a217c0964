// The CPU / CUDA kernels of ops whose implementation is a Python launcher (Triton's:
// dtl_kernels/ops/triton_side.py), as a lean bridge from the dispatcher to Python.
//
// Why: a Python function registered with torch.library is called through the boxed path —
// every argument boxed into an IValue, converted to a Python object by the JIT's generic
// converter, the result parsed back — about 6–8 µs of host time per call here, paid by every
// add-back of the Triton backend (side_step calls its forward, side_step's backward its
// backward; benchmarks/bench_host.py). This bridge wraps the eight arguments of the side-op
// schema by hand and calls the launcher with one vectorcall.
//
// The launcher gets what torch.library would hand it (tensors, None or a tensor, three ints,
// a float), then a ninth argument torch.library does not give: `key`, a bytes object that
// holds each tensor's layout, sizes, strides, dtype and device, the conv's presence, the
// ints and β's bits -- so that two calls with equal keys differ only in what a launch plan
// does not depend on (the data, where it lies, requires_grad). The launcher caches what it
// plans per key (a bytes lookup instead of a key built from a dozen tensor attributes in
// Python); a launcher registered here takes nine arguments. Its Python
// exception reaches the caller unchanged (persisted, so that a C++ caller on another
// thread can rethrow it). Stricter on results than torch.library: anything but a Tensor
// (forward) or a tuple of three Tensors (backward) is refused by name.
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/object_ptr.h>
#include <torch/csrc/utils/pybind.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>

#include "bind.h"

namespace {

[[noreturn]] void throw_python_error() {
  python_error err;
  err.persist();  // the exception set by the failed call, kept for whichever thread rethrows
  throw err;
}

PyObject* checked(PyObject* obj) {
  if (obj == nullptr) throw_python_error();
  return obj;
}

// The call's key (see the top of the file). 64-bit fields in a fixed order, each count
// before what it counts, so that equal bytes mean equal calls: a tag of the op (forward /
// backward), per tensor its layout, rank, sizes, strides (strided tensors), dtype and
// device, then the conv's (after a marker for None or not), the ints and β's bit
// pattern.
class KeyWriter {
 public:
  void put(int64_t v) { bytes_.append(reinterpret_cast<const char*>(&v), sizeof v); }
  void put(const at::Tensor& t) {  // the layout first: it says whether strides follow
    put(static_cast<int64_t>(t.layout()));
    put(t.dim());
    for (const int64_t s : t.sizes()) put(s);
    if (t.layout() == c10::kStrided) {
      for (const int64_t s : t.strides()) put(s);
    }
    put(static_cast<int64_t>(t.scalar_type()));
    put(static_cast<int64_t>(t.device().type()));
    put(static_cast<int64_t>(t.device().index()));
  }
  PyObject* bytes() const { return PyBytes_FromStringAndSize(bytes_.data(), bytes_.size()); }

 private:
  std::string bytes_;
};

PyObject* call_key(bool forward, const at::Tensor& first, const at::Tensor& taps,
                   const at::Tensor& ups, const std::optional<at::Tensor>& conv, int64_t grid_h,
                   int64_t grid_w, int64_t num_prefix, double beta) {
  KeyWriter key;
  key.put(forward ? 1 : 2);
  key.put(first);
  key.put(taps);
  key.put(ups);
  const bool has_conv = conv.has_value() && conv->defined();  // undefined: None, as wrapped
  key.put(has_conv ? 1 : 0);
  if (has_conv) key.put(*conv);
  key.put(grid_h);
  key.put(grid_w);
  key.put(num_prefix);
  int64_t beta_bits = 0;
  static_assert(sizeof beta_bits == sizeof beta, "β is a 64-bit double");
  std::memcpy(&beta_bits, &beta, sizeof beta);
  key.put(beta_bits);
  return key.bytes();
}

// launcher(first, taps, ups, conv_weight, grid_h, grid_w, num_prefix, beta, key), the GIL
// held.
THPObjectPtr call_launcher(PyObject* launcher, bool forward, const at::Tensor& first,
                           const at::Tensor& taps, const at::Tensor& ups,
                           const std::optional<at::Tensor>& conv, int64_t grid_h,
                           int64_t grid_w, int64_t num_prefix, double beta) {
  constexpr size_t kArgs = 9;
  THPObjectPtr owned[kArgs];
  owned[0] = checked(THPVariable_Wrap(first));
  owned[1] = checked(THPVariable_Wrap(taps));
  owned[2] = checked(THPVariable_Wrap(ups));
  if (conv.has_value()) {
    owned[3] = checked(THPVariable_Wrap(*conv));
  } else {
    Py_INCREF(Py_None);
    owned[3] = Py_None;
  }
  owned[4] = checked(PyLong_FromLongLong(grid_h));
  owned[5] = checked(PyLong_FromLongLong(grid_w));
  owned[6] = checked(PyLong_FromLongLong(num_prefix));
  owned[7] = checked(PyFloat_FromDouble(beta));
  owned[8] = checked(call_key(forward, first, taps, ups, conv, grid_h, grid_w, num_prefix, beta));
  PyObject* args[kArgs];
  for (size_t j = 0; j < kArgs; ++j) args[j] = owned[j].get();
  return THPObjectPtr(checked(PyObject_Vectorcall(launcher, args, kArgs, nullptr)));
}

at::Tensor tensor_result(PyObject* obj, const std::string& op, const char* what) {
  TORCH_CHECK_TYPE(THPVariable_Check(obj), "dtl_kernels::", op, ": its launcher returned ",
                   Py_TYPE(obj)->tp_name, " for ", what, ", not a Tensor");
  return THPVariable_Unpack(obj);
}

// The kernels keep a reference to their launcher that is never released: a call may be in
// flight (its launcher running, the GIL let go) when the launchers are registered again.
auto forward_kernel(PyObject* launcher, std::string op) {
  return [launcher, op](const at::Tensor& y, const at::Tensor& taps, const at::Tensor& ups,
                        const std::optional<at::Tensor>& conv, int64_t grid_h, int64_t grid_w,
                        int64_t num_prefix, double beta) -> at::Tensor {
    pybind11::gil_scoped_acquire gil;
    THPObjectPtr out =
        call_launcher(launcher, true, y, taps, ups, conv, grid_h, grid_w, num_prefix, beta);
    return tensor_result(out.get(), op, "the output");
  };
}

auto backward_kernel(PyObject* launcher, std::string op) {
  return [launcher, op](const at::Tensor& grad_out, const at::Tensor& taps,
                        const at::Tensor& ups, const std::optional<at::Tensor>& conv,
                        int64_t grid_h, int64_t grid_w, int64_t num_prefix, double beta)
             -> std::tuple<at::Tensor, at::Tensor, at::Tensor> {
    pybind11::gil_scoped_acquire gil;
    THPObjectPtr out = call_launcher(launcher, false, grad_out, taps, ups, conv, grid_h, grid_w,
                                     num_prefix, beta);
    TORCH_CHECK_TYPE(PyTuple_Check(out.get()) && PyTuple_GET_SIZE(out.get()) == 3,
                     "dtl_kernels::", op, ": its launcher must return a tuple of three tensors, "
                     "got ", Py_TYPE(out.get())->tp_name);
    return {tensor_result(PyTuple_GET_ITEM(out.get(), 0), op, "grad_taps"),
            tensor_result(PyTuple_GET_ITEM(out.get(), 1), op, "grad_ups"),
            tensor_result(PyTuple_GET_ITEM(out.get(), 2), op, "grad_conv")};
  };
}

// An op name of the dtl_kernels namespace, unqualified.
std::string op_name(PyObject* obj) {
  TORCH_CHECK_TYPE(PyUnicode_Check(obj), "register_launchers: op names must be str");
  const char* s = PyUnicode_AsUTF8(obj);
  if (s == nullptr) throw_python_error();
  const std::string name(s);
  TORCH_CHECK_VALUE(!name.empty() && name.find(':') == std::string::npos &&
                        name.find('.') == std::string::npos,
                    "register_launchers: expected an unqualified op name, got '", name, "'");
  return name;
}

}  // namespace

namespace dtl_bind {

PyObject* register_launchers(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 4 || nargs == 5,
                   "register_launchers(forward_op, forward, backward_op, backward, cpu=True) "
                   "takes 4 or 5 arguments, got ", nargs);
  TORCH_CHECK_TYPE(nargs == 4 || PyBool_Check(args[4]),
                   "register_launchers: cpu must be a bool");
  // cpu: the launchers also take CPU tensors (Triton's interpreter); else CUDA only, and a
  // CPU call is refused by the dispatcher (and by side_step_ before it writes the taps)
  const bool cpu = nargs == 4 || args[4] == Py_True;
  const std::string fwd_op = op_name(args[0]), bwd_op = op_name(args[2]);
  TORCH_CHECK_VALUE(fwd_op != bwd_op, "register_launchers: the forward and backward ops must "
                    "differ, got '", fwd_op, "' twice");
  TORCH_CHECK_TYPE(PyCallable_Check(args[1]) && PyCallable_Check(args[3]),
                   "register_launchers: the launchers must be callable");
  // One Library per (forward, backward) pair, never destroyed but to register the same pair
  // again (a reloaded module): its kernels go, the new ones come.
  static std::mutex mutex;
  static std::map<std::string, std::pair<std::string, std::unique_ptr<torch::Library>>> pairs;
  std::lock_guard<std::mutex> lock(mutex);
  for (const std::string* op : {&fwd_op, &bwd_op}) {
    const auto it = pairs.find(*op);
    TORCH_CHECK(it == pairs.end() || it->second.first == fwd_op + "/" + bwd_op,
                "register_launchers: ", *op, " already has a launcher (registered as part of ",
                it == pairs.end() ? "" : it->second.first, ")");
  }
  for (const std::string* op : {&fwd_op, &bwd_op}) {  // a kernel from elsewhere stays
    if (pairs.count(*op)) continue;
    const auto handle = c10::Dispatcher::singleton().findSchema({"dtl_kernels::" + *op, ""});
    TORCH_CHECK(!handle || !(handle->hasKernelForDispatchKey(c10::DispatchKey::CPU) ||
                             handle->hasKernelForDispatchKey(c10::DispatchKey::CUDA)),
                "register_launchers: dtl_kernels::", *op, " already has a kernel of its own "
                "(a launcher is registered for an op that has none)");
  }
  const auto old = pairs.find(fwd_op);
  if (old != pairs.end()) {
    old->second.second.reset();  // its kernels deregistered
    pairs.erase(bwd_op);
    pairs.erase(old);
  }
  // All or nothing: a registration that throws (e.g. a schema that does not match the
  // kernels' signature) takes the ones before it with it, as the Library is destroyed.
  auto lib = std::make_unique<torch::Library>(torch::Library::IMPL, "dtl_kernels", std::nullopt,
                                              __FILE__, __LINE__);
  for (const c10::DispatchKey key : {c10::DispatchKey::CPU, c10::DispatchKey::CUDA}) {
    if (key == c10::DispatchKey::CPU && !cpu) continue;
    lib->impl(fwd_op.c_str(), torch::dispatch(key, forward_kernel(args[1], fwd_op)));
    lib->impl(bwd_op.c_str(), torch::dispatch(key, backward_kernel(args[3], bwd_op)));
  }
  Py_INCREF(args[1]);
  Py_INCREF(args[3]);
  const std::string pair = fwd_op + "/" + bwd_op;
  pairs.emplace(bwd_op, std::make_pair(pair, nullptr));
  pairs.emplace(fwd_op, std::make_pair(pair, std::move(lib)));
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

}  // namespace dtl_bind
