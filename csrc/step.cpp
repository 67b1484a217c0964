// side_step: one call (and one autograd node) per add-back of the side network.
//
//   taps_out = taps with columns [first_col, first_col + Σ r_j) set to inputs[j] · downs[j]ᵀ
//   out      = side op (y, taps_out, ups, conv_weight)           (kernel: 0 compiled, 1 Triton)
//
// The taps of the blocks since the previous add-back are computed here, in one call, instead
// of one Python-level matmul and buffer write per block: the host time of a DTL forward and
// backward is dominated by such small calls (benchmarks/bench_host.py). `taps` is the stage's
// (B, N, K) buffer whose columns of blocks not tapped yet are zero (dtl_kernels/csn.py), so
// every add-back of a stage runs the kernel on the same shapes.
//
// Gradients (G = ∂L/∂out, G_T = ∂L/∂taps_out, t_j = inputs[j] · downs[j]ᵀ):
//   ∂y = G;  (∂T', ∂U, ∂w) = side_backward(G, taps_out, ups, w);  ∂T = ∂T' + G_T
//   ∂downs[j] = ∂T[:, :, cols_j]ᵀ · inputs[j];  ∂inputs[j] = ∂T[:, :, cols_j] · downs[j]
//   ∂taps = ∂T with cols_j zeroed (those columns of `taps` are overwritten).
// The taps are computed in the dtype of `taps` (bfloat16 under autocast, as a matmul there
// is); `save_dtype` keeps inputs that need no gradient in that dtype for ∂downs (the
// trunk_dtype memory option, dtl_kernels/memory.py).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <atomic>
#include <optional>
#include <vector>

#include "any_tensor.h"
#include "side_checks.h"

namespace dtl {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const std::optional<at::Tensor>&, int64_t, int64_t, int64_t, double);
using BackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    int64_t, int64_t, int64_t, double);

// The side op's kernels: 0 = the compiled ones (CPU / CUDA by device), 1 = Triton's (registered
// from Python by dtl_kernels/ops/triton_side.py).
const char* forward_name(int64_t kernel) {
  return kernel == 1 ? "dtl_kernels::triton_side_forward" : "dtl_kernels::side_forward";
}
const char* backward_name(int64_t kernel) {
  return kernel == 1 ? "dtl_kernels::triton_side_backward" : "dtl_kernels::side_backward";
}

// Looked up once per kernel (Triton's ops exist only once their Python module is imported:
// until then the lookup throws, and a static whose initialiser throws is tried again on the
// next call). Function-local statics, so that threads calling with the GIL released never
// race on the lookup.
template <class Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}
c10::TypedOperatorHandle<ForwardSig> forward_op(int64_t kernel) {
  if (kernel == 1) {
    static const auto triton = find_op<ForwardSig>(forward_name(1));
    return triton;
  }
  static const auto compiled = find_op<ForwardSig>(forward_name(0));
  return compiled;
}
c10::TypedOperatorHandle<BackwardSig> backward_op(int64_t kernel) {
  if (kernel == 1) {
    static const auto triton = find_op<BackwardSig>(backward_name(1));
    return triton;
  }
  static const auto compiled = find_op<BackwardSig>(backward_name(0));
  return compiled;
}

// What the kernels run on: taps / ups / conv in y's dtype.
at::Tensor as_dtype(const at::Tensor& t, at::ScalarType dt) {
  return t.scalar_type() == dt ? t : t.to(dt);
}
std::optional<at::Tensor> as_dtype(const std::optional<at::Tensor>& t, at::ScalarType dt) {
  if (!t.has_value()) return t;
  return as_dtype(*t, dt);
}

c10::TypedOperatorHandle<void(at::Tensor&, at::TensorList, at::TensorList, int64_t)>
write_taps_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("dtl_kernels::write_taps_", "")
          .typed<void(at::Tensor&, at::TensorList, at::TensorList, int64_t)>();
  return op;
}

// write_taps_ for every device (CPU has its own loop, cpu/taps.cpp): a matmul in the taps'
// dtype per block. Into contiguous taps the matmul writes the block's columns in place: they
// are a (B·N, r) matrix with row stride K, which a GEMM takes as its output as it is (one
// launch per tap, not a matmul and a copy: the host issues twelve per ViT forward).
void write_taps_generic(at::Tensor& taps, at::TensorList inputs, at::TensorList downs,
                        int64_t first_col) {
  check_taps_inputs(taps, inputs, downs, first_col);
  check_no_overlap(taps, inputs, downs);
  const at::ScalarType tdt = taps.scalar_type();
  const bool in_place = taps.is_contiguous() && taps.numel() > 0;
  const int64_t rows = taps.size(0) * taps.size(1);  // checked: every input is (B, N, d_j)
  int64_t col = first_col;
  for (size_t j = 0; j < inputs.size(); ++j) {
    const int64_t r = downs[j].size(0);
    const at::Tensor z = as_dtype(inputs[j], tdt).reshape({rows, inputs[j].size(2)});
    const at::Tensor a_t = as_dtype(downs[j], tdt).t();
    at::Tensor cols = taps.narrow(2, col, r);
    if (in_place) {
      at::Tensor out = cols.view({rows, r});  // strides (K, 1)
      at::mm_out(out, z, a_t);
    } else {  // the same product (mm_out: in the taps' dtype under autocast too), then copied
      at::Tensor out = at::empty({rows, r}, taps.options());
      at::mm_out(out, z, a_t);
      cols.copy_(out.view(cols.sizes()));
    }
    col += r;
  }
}

// The dtype the kernels get the taps and ups in: theirs where the kernels take it beside y
// (16-bit taps beside a float32 y: the autocast mix, every kernel), else y's.
at::ScalarType side_dtype(const at::Tensor& y, const at::Tensor& taps, int64_t kernel) {
  (void)kernel;  // CPU, CUDA C++ and Triton all take the mix
  return side_dtypes_ok(y.scalar_type(), taps.scalar_type()) ? taps.scalar_type()
                                                             : y.scalar_type();
}

// Every tensor dense and strided: a sparse or nested one would fail inside ATen (or in
// autograd's set-up, before any check of ours) with a message that names nothing here.
// Checked in the ops themselves (inference_mode skips the autograd kernels) and, before
// autograd's set-up, in side_step's recording path: a few key-bit reads.
void check_all_strided(const char* op, const at::Tensor& y, const at::Tensor& taps,
                       at::TensorList inputs, at::TensorList downs, const at::Tensor& ups,
                       const std::optional<at::Tensor>& conv,
                       const std::optional<at::Tensor>& next_down) {
  check_strided(op, "y", y);
  check_strided(op, "taps", taps);
  for (size_t j = 0; j < inputs.size(); ++j)
    check_strided(op, "inputs", inputs[j], static_cast<int64_t>(j));
  for (size_t j = 0; j < downs.size(); ++j)
    check_strided(op, "downs", downs[j], static_cast<int64_t>(j));
  check_strided(op, "ups", ups);
  if (conv.has_value()) check_strided(op, "conv_weight", *conv);
  if (next_down.has_value()) check_strided(op, "next_down", *next_down);
}

// Forward-mode AD has no formula here: a tangent on any argument is refused, not dropped.
void refuse_forward_ad(const char* op, const at::Tensor& y, const at::Tensor& taps,
                       at::TensorList inputs, at::TensorList downs, const at::Tensor& ups,
                       const std::optional<at::Tensor>& conv,
                       const std::optional<at::Tensor>& next_down) {
  const bool dual = any_tensor([](const at::Tensor& t) { return t._fw_grad(0).defined(); }, y,
                               taps, inputs, downs, ups, conv, next_down);
  TORCH_CHECK(!dual, op, ": forward-mode AD (a dual tensor) is not supported");
}

// Where side_step_'s next tap goes: the column after the pending taps' ones. Everything it
// depends on is checked here, before anything is written (write_taps_ checks the pending
// taps only when there are some) and before any sum that could overflow.
int64_t next_tap_column(const char* op, const at::Tensor& y, const at::Tensor& taps,
                        at::TensorList inputs, at::TensorList downs, int64_t first_col,
                        const at::Tensor& next_down) {
  TORCH_CHECK(y.dim() == 3, msg(op, ": y must be (B, N, d), got shape ", y.sizes()));
  const int64_t col = check_taps_inputs(taps, inputs, downs, first_col, op);
  const int64_t left = taps.size(2) - col;
  TORCH_CHECK(next_down.dim() == 2 && next_down.size(0) >= 1 &&
                  next_down.size(1) == y.size(2) && next_down.size(0) <= left,
              msg(op, ": next_down must be (r, d) with d = ", y.size(2), " and 1 ≤ r ≤ ", left,
                  " (the taps' columns left), got ", next_down.sizes()));
  check_floating(op, "next_down", next_down);
  TORCH_CHECK(next_down.device() == taps.device(),
              msg(op, ": next_down is on ", next_down.device(), ", the taps on ", taps.device()));
  return col;
}

// Whether Triton's side op is registered (Python registers it once, for good): looked up
// until it is, then remembered (a lookup per step would be host time).
bool triton_registered() {
  static std::atomic<bool> found{false};
  if (found.load(std::memory_order_relaxed)) return true;
  if (!c10::Dispatcher::singleton().findSchema({forward_name(1), ""})) return false;
  found.store(true, std::memory_order_relaxed);
  return true;
}

// Whether the compiled side op has a CPU / CUDA kernel (its modules register them once they
// load, for good): looked up until found, then remembered.
bool compiled_kernel_for(bool cuda) {
  static std::atomic<bool> found[2] = {false, false};
  if (found[cuda].load(std::memory_order_relaxed)) return true;
  if (!forward_op(0).hasKernelForDispatchKey(cuda ? c10::DispatchKey::CUDA
                                                  : c10::DispatchKey::CPU))
    return false;
  found[cuda].store(true, std::memory_order_relaxed);
  return true;
}

// side_step_ writes the caller's taps before its side op runs: what that op would refuse is
// refused first, so that a refused step leaves them as they were. Its checks (dtypes aside:
// the step hands it taps and ups in one dtype, the conv in y's) with the limits of the
// kernels it runs, and Triton's op registered. The op checks again (a few hundred ns).
// Triton's launchability (CPU tensors only under its interpreter) is checked here too,
// for callers of the op itself (Python checks it where the step is bound, dtl_kernels/ops/
// step.py).
void check_side_op_first(const char* op, const at::Tensor& y, const at::Tensor& taps,
                         const at::Tensor& ups, const std::optional<at::Tensor>& conv,
                         int64_t grid_h, int64_t grid_w, int64_t num_prefix, double beta,
                         int64_t kernel) {
  TORCH_CHECK(kernel == 0 || kernel == 1, msg(op, ": kernel must be 0 or 1, got ", kernel));
  check_floating(op, "y", y);
  for (const at::Tensor* t : {&taps, &ups, conv.has_value() ? &*conv : nullptr}) {
    if (t == nullptr) continue;
    TORCH_CHECK(t->device() == y.device(),
                msg(op, ": taps, ups and conv_weight must be on y's device ", y.device(),
                    ", got ", t->device()));
  }
  const bool cuda = y.device().type() == c10::kCUDA;
  if (kernel == 0) {  // the compiled kernels: built for this device?
    TORCH_CHECK((cuda || y.device().type() == c10::kCPU) && compiled_kernel_for(cuda),
                msg(op, ": no compiled side-op kernel for ", y.device(),
                    " tensors in this build (CUDA needs the CUDA extension)"));
  }
  const SideLimits& lim = kernel == 1 ? kTritonSideLimits
                          : cuda      ? kCudaSideLimits
                                      : kCpuSideLimits;
  const char* where = kernel == 1 ? " (Triton kernel)" : cuda ? " (CUDA kernel)" : " (CPU kernel)";
  check_side_shapes(op, where, lim, y, taps, ups, conv, grid_h, grid_w, num_prefix, beta);
  TORCH_CHECK(kernel == 0 || triton_registered(),
              msg(op, ": kernel 1 runs Triton's side op, which is registered when "
                      "dtl_kernels.ops.triton_side is imported (it is not)"));
  // CPU tensors: only where Triton's interpreter defined the kernels, and then Python
  // registered the op's CPU kernel too (dtl_kernels/ops/triton_side.py)
  TORCH_CHECK(kernel == 0 || cuda ||
                  (y.device().type() == c10::kCPU &&
                   forward_op(1).hasKernelForDispatchKey(c10::DispatchKey::CPU)),
              msg(op, ": Triton's side op runs CUDA tensors (CPU ones only under its "
                      "interpreter: TRITON_INTERPRET=1 set before dtl_kernels.ops."
                      "triton_kernels is first imported), got ", y.device()));
}

// The taps written into `taps` (contiguous), then the side op on them: what both steps share.
// With next_down, the next block's tap on `out` (its input) too, into the columns after them:
// the no-grad step then saves the next block its own tap call (host time; the write moves here).
at::Tensor step_into(const char* op, const at::Tensor& y, at::Tensor& taps, at::TensorList inputs,
                     at::TensorList downs, int64_t first_col, const at::Tensor& ups,
                     const std::optional<at::Tensor>& conv, int64_t grid_h, int64_t grid_w,
                     int64_t num_prefix, double beta, int64_t kernel,
                     const std::optional<at::Tensor>& next_down) {
  TORCH_CHECK(kernel == 0 || kernel == 1, msg(op, ": kernel must be 0 or 1, got ", kernel));
  // the taps' arguments also with no pending taps (write_taps_ checks them otherwise, and
  // nothing else would read downs / first_col); ups and conv before they are cast to the
  // kernels' dtype (a complex or integer one would be cast silently)
  if (inputs.empty()) check_taps_inputs(taps, inputs, downs, first_col, op);
  check_floating(op, "ups", ups);
  if (conv.has_value()) check_floating(op, "conv_weight", *conv);
  int64_t next_col = 0;
  if (next_down.has_value())
    next_col = next_tap_column(op, y, taps, inputs, downs, first_col, *next_down);
  if (!inputs.empty()) write_taps_op().call(taps, inputs, downs, first_col);
  const at::ScalarType sdt = side_dtype(y, taps, kernel);
  at::Tensor out = forward_op(kernel).call(y, as_dtype(taps, sdt), as_dtype(ups, sdt),
                                           as_dtype(conv, y.scalar_type()), grid_h, grid_w,
                                           num_prefix, beta);
  if (next_down.has_value())
    write_taps_op().call(taps, at::TensorList(out), at::TensorList(*next_down), next_col);
  return out;
}

// The forward, without autograd (every device: it only calls other ops).
std::tuple<at::Tensor, at::Tensor> side_step_impl(
    const at::Tensor& y, const at::Tensor& taps, at::TensorList inputs, at::TensorList downs,
    int64_t first_col, const at::Tensor& ups, const std::optional<at::Tensor>& conv,
    int64_t grid_h, int64_t grid_w, int64_t num_prefix, double beta, int64_t kernel,
    std::optional<at::ScalarType> save_dtype) {
  // what autograd keeps for ∂downs (no effect on values): a floating dtype the kernels
  // compute in, or ∂downs would come from inputs rounded to integers (or to float8's 3 bits)
  const auto saved = save_dtype.value_or(at::kFloat);
  TORCH_CHECK(is_kernel_float(saved),
              msg("dtl_kernels::side_step: save_dtype must be a floating dtype (float32, "
                  "float64, float16 or bfloat16), got ", saved));
  // also here: inference_mode skips the autograd kernel, which checks this first
  check_all_strided("dtl_kernels::side_step", y, taps, inputs, downs, ups, conv, std::nullopt);
  at::Tensor taps_out = taps.clone(at::MemoryFormat::Contiguous);
  at::Tensor out = step_into("dtl_kernels::side_step", y, taps_out, inputs, downs, first_col,
                             ups, conv, grid_h, grid_w, num_prefix, beta, kernel, std::nullopt);
  return {out, taps_out};
}

// side_step_: the same step into the caller's taps, for passes that record no gradient (a
// no-grad forward pass copies the stage's taps once, not at every add-back).
at::Tensor side_step_inplace_impl(const at::Tensor& y, at::Tensor& taps, at::TensorList inputs,
                                  at::TensorList downs, int64_t first_col, const at::Tensor& ups,
                                  const std::optional<at::Tensor>& conv, int64_t grid_h,
                                  int64_t grid_w, int64_t num_prefix, double beta, int64_t kernel,
                                  const std::optional<at::Tensor>& next_down) {
  const char* op = "dtl_kernels::side_step_";
  check_all_strided(op, y, taps, inputs, downs, ups, conv, next_down);  // (inference_mode)
  TORCH_CHECK(taps.is_contiguous(), "dtl_kernels::side_step_: taps must be contiguous");
  // taps is written before y, ups and the rest are read: none may share its memory
  // (inputs and downs: write_taps_ checks them)
  check_not_sharing(op, "y", taps, y);
  check_not_sharing(op, "ups", taps, ups);
  if (conv.has_value()) check_not_sharing(op, "conv_weight", taps, *conv);
  if (next_down.has_value()) check_not_sharing(op, "next_down", taps, *next_down);
  check_side_op_first(op, y, taps, ups, conv, grid_h, grid_w, num_prefix, beta, kernel);
  return step_into("dtl_kernels::side_step_", y, taps, inputs, downs, first_col, ups, conv,
                   grid_h, grid_w, num_prefix, beta, kernel, next_down);
}

using InPlaceSig = at::Tensor(const at::Tensor&, at::Tensor&, at::TensorList, at::TensorList,
                              int64_t, const at::Tensor&, const std::optional<at::Tensor>&,
                              int64_t, int64_t, int64_t, double, int64_t,
                              const std::optional<at::Tensor>&);
c10::TypedOperatorHandle<InPlaceSig> inplace_op() {
  static const auto op = find_op<InPlaceSig>("dtl_kernels::side_step_");
  return op;
}

// No gradient flows through side_step_: refused where autograd would record it.
at::Tensor side_step_inplace_autograd(const at::Tensor& y, at::Tensor& taps,
                                      at::TensorList inputs, at::TensorList downs,
                                      int64_t first_col, const at::Tensor& ups,
                                      const std::optional<at::Tensor>& conv, int64_t grid_h,
                                      int64_t grid_w, int64_t num_prefix, double beta,
                                      int64_t kernel, const std::optional<at::Tensor>& next_down) {
  refuse_forward_ad("dtl_kernels::side_step_", y, taps, inputs, downs, ups, conv, next_down);
  TORCH_CHECK(!at::GradMode::is_enabled() ||
                  !any_tensor([](const at::Tensor& t) { return t.requires_grad(); }, y, taps,
                              inputs, downs, ups, conv, next_down),
              "dtl_kernels::side_step_ records no gradient: call it under no_grad / "
              "inference_mode, or use side_step");
  at::AutoDispatchBelowAutograd guard;  // next: ADInplaceOrView (the version counter)
  return inplace_op().call(y, taps, inputs, downs, first_col, ups, conv, grid_h, grid_w,
                           num_prefix, beta, kernel, next_down);
}

// A read-only argument's values where it is a negative view (the Negative-key kernels
// below read every argument through this before they redispatch without that key).
at::Tensor resolved(const at::Tensor& t) { return t.is_neg() ? t.resolve_neg() : t; }
std::optional<at::Tensor> resolved(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(resolved(*t)) : t;
}
std::vector<at::Tensor> resolved(at::TensorList ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const at::Tensor& t : ts) out.push_back(resolved(t));
  return out;
}

// A tensor with the negative bit (a view such as a conjugate's imaginary part) reaches this
// kernel before PyTorch's math-bit fallback, which would write the taps through a copy and
// then fail an internal assert on this schema (taps mutated, out returned), in every grad
// mode (the autograd kernels redispatch to it). Negative taps are refused by name; the
// other arguments are read through their resolved values. (A conjugate bit needs a complex
// tensor, which the dtype checks refuse.)
at::Tensor side_step_inplace_negative(const at::Tensor& y, at::Tensor& taps,
                                      at::TensorList inputs, at::TensorList downs,
                                      int64_t first_col, const at::Tensor& ups,
                                      const std::optional<at::Tensor>& conv, int64_t grid_h,
                                      int64_t grid_w, int64_t num_prefix, double beta,
                                      int64_t kernel,
                                      const std::optional<at::Tensor>& next_down) {
  TORCH_CHECK(!taps.is_neg(), "dtl_kernels::side_step_: taps must not be a negative view (it "
                              "is written in place): pass a plain tensor");
  c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::Negative);
  return inplace_op().call(resolved(y), taps, resolved(inputs), resolved(downs), first_col,
                           resolved(ups), resolved(conv), grid_h, grid_w, num_prefix, beta,
                           kernel, resolved(next_down));
}

// write_taps_ the same way: PyTorch's math-bit fallback handles a mutable argument only for
// an op that returns it (this one returns nothing: the fallback would read a return that
// is not there). Negative taps refused; negative inputs and downs read resolved.
void write_taps_negative(at::Tensor& taps, at::TensorList inputs, at::TensorList downs,
                         int64_t first_col) {
  TORCH_CHECK(!taps.is_neg(), "dtl_kernels::write_taps_: taps must not be a negative view (it "
                              "is written in place): pass a plain tensor");
  c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::Negative);
  write_taps_op().call(taps, resolved(inputs), resolved(downs), first_col);
}

// What ADInplaceOrView does for every in-place op: the written tensor's version counter is
// bumped, before the write, so that an inference tensor outside inference mode is refused
// untouched and autograd sees a tensor it saved change (also under inference_mode).
at::Tensor side_step_inplace_view(const at::Tensor& y, at::Tensor& taps, at::TensorList inputs,
                                  at::TensorList downs, int64_t first_col, const at::Tensor& ups,
                                  const std::optional<at::Tensor>& conv, int64_t grid_h,
                                  int64_t grid_w, int64_t num_prefix, double beta, int64_t kernel,
                                  const std::optional<at::Tensor>& next_down) {
  torch::autograd::impl::bump_version(taps);
  at::AutoDispatchBelowADInplaceOrView guard;
  return inplace_op().call(y, taps, inputs, downs, first_col, ups, conv, grid_h, grid_w,
                           num_prefix, beta, kernel, next_down);
}

// Positions in SideStep's saved "ints": n, first_col, grid, prefix, kernel, dtypes, then
// one dtype per input.
enum : int64_t {
  kSavedN, kSavedFirstCol, kSavedGridH, kSavedGridW, kSavedPrefix, kSavedKernel, kSavedYDtype,
  kSavedSideDtype, kSavedInputDtypes
};

class SideStep : public torch::autograd::Function<SideStep> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& y, const at::Tensor& taps,
                               at::TensorList inputs, at::TensorList downs, int64_t first_col,
                               const at::Tensor& ups, const std::optional<at::Tensor>& conv,
                               int64_t grid_h, int64_t grid_w, int64_t num_prefix, double beta,
                               int64_t kernel, std::optional<at::ScalarType> save_dtype,
                               bool recording) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, taps_out] = side_step_impl(y, taps, inputs, downs, first_col, ups, conv, grid_h,
                                          grid_w, num_prefix, beta, kernel, save_dtype);
    std::vector<at::Tensor> saved{taps_out, ups, conv.value_or(at::Tensor())};
    for (size_t j = 0; j < inputs.size(); ++j) {
      const at::Tensor& z = inputs[j];
      // a low-precision copy only where autograd will keep it (for ∂downs[j] only)
      const bool low = recording && save_dtype.has_value() && downs[j].requires_grad() &&
                       !z.requires_grad() && z.scalar_type() != *save_dtype;
      saved.push_back(low ? z.to(*save_dtype) : z);
    }
    for (const at::Tensor& a : downs) saved.push_back(a);
    ctx->save_for_backward(saved);
    // Two entries, not one per value: each saved_data entry is a string-keyed hash-map
    // insert here and a lookup in backward (host time per add-back; bench_host.py).
    std::vector<int64_t> ints{static_cast<int64_t>(inputs.size()), first_col, grid_h, grid_w,
                              num_prefix, kernel, static_cast<int64_t>(y.scalar_type()),
                              static_cast<int64_t>(side_dtype(y, taps_out, kernel))};
    for (const at::Tensor& z : inputs) ints.push_back(static_cast<int64_t>(z.scalar_type()));
    ctx->saved_data["ints"] = std::move(ints);  // kSaved* below name the positions
    ctx->saved_data["beta"] = beta;
    ctx->set_materialize_grads(false);  // an unused taps_out (the stage's last step) costs nothing
    return {out, taps_out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    refuse_double_backward("dtl_kernels::side_step");
    // below autograd: the kernels' backward ops have no autograd of their own to run (no
    // double backward through the side op), and Triton's would cost Python glue per call
    at::AutoDispatchBelowADInplaceOrView guard;
    const at::Tensor& g = grads[0];
    const at::Tensor& g_taps = grads[1];
    const variable_list s = ctx->get_saved_variables();
    const std::vector<int64_t> ints = ctx->saved_data["ints"].toIntVector();
    const double beta = ctx->saved_data["beta"].toDouble();
    const int64_t n = ints[kSavedN];
    const at::Tensor& taps_out = s[0];
    const at::Tensor& ups = s[1];
    std::optional<at::Tensor> conv;
    if (s[2].defined()) conv = s[2];
    const auto ydt = static_cast<at::ScalarType>(ints[kSavedYDtype]);
    const auto sdt = static_cast<at::ScalarType>(ints[kSavedSideDtype]);
    // Positions in the returned list (every forward argument) and, for needs_input_grad,
    // in the autograd edges (the defined tensor arguments only): y, taps, inputs[n], downs[n],
    // then first_col (no edge), ups, conv (an edge only when given), …
    const int64_t i_inputs = 2, i_downs = 2 + n, i_ups = 3 + 2 * n, i_conv = 4 + 2 * n;
    const int64_t e_ups = 2 + 2 * n, e_conv = 3 + 2 * n;
    variable_list out(12 + 2 * n);  // + `recording` (SideStep::forward's own argument)
    if (ctx->needs_input_grad(0)) out[0] = g;  // the residual: ∂y = G, no copy

    const bool need_w = conv.has_value() && ctx->needs_input_grad(e_conv);
    const bool need_u = ctx->needs_input_grad(e_ups);
    at::Tensor g_t;  // ∂taps_out in the taps' dtype
    if (g.defined()) {
      auto [gt, gu, gw] = backward_op(ints[kSavedKernel])
                              .call(g, as_dtype(taps_out, sdt), as_dtype(ups, sdt),
                                    as_dtype(conv, ydt), ints[kSavedGridH], ints[kSavedGridW],
                                    ints[kSavedPrefix], beta);
      g_t = as_dtype(gt, taps_out.scalar_type());
      if (need_u) out[i_ups] = as_dtype(gu, ups.scalar_type());
      if (need_w) out[i_conv] = as_dtype(gw, conv->scalar_type());
    }
    // g_t is this node's own tensor unless it is the incoming g_taps itself (no g)
    const bool own = g_t.defined();
    if (g_taps.defined()) g_t = g_t.defined() ? g_t + g_taps : g_taps;
    if (!g_t.defined()) return out;

    int64_t col = ints[kSavedFirstCol];
    const int64_t first = col;
    for (int64_t j = 0; j < n; ++j) {
      const at::Tensor& z = s[3 + j];
      const at::Tensor& a = s[3 + n + j];
      const int64_t r = a.size(0);
      const at::Tensor gj = g_t.narrow(2, col, r);  // (B, N, r)
      if (ctx->needs_input_grad(i_downs + j)) {  // edge index == position before ups
        const at::Tensor g2 = gj.reshape({-1, r});
        const at::Tensor z2 = as_dtype(z, g2.scalar_type()).reshape({-1, z.size(-1)});
        out[i_downs + j] = as_dtype(at::mm(g2.t(), z2), a.scalar_type());
      }
      if (ctx->needs_input_grad(i_inputs + j)) {
        const auto zdt = static_cast<at::ScalarType>(ints[kSavedInputDtypes + j]);
        out[i_inputs + j] = as_dtype(at::matmul(gj, as_dtype(a, gj.scalar_type())), zdt);
      }
      col += r;
    }
    if (ctx->needs_input_grad(1)) {  // the overwritten columns of `taps` get no gradient
      // in place where g_t is ours (its columns' uses above are done): one op less per step
      at::Tensor g_in = own ? g_t : g_t.clone();
      g_in.narrow(2, first, col - first).zero_();
      out[1] = g_in;
    }
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> side_step_autograd(
    const at::Tensor& y, const at::Tensor& taps, at::TensorList inputs, at::TensorList downs,
    int64_t first_col, const at::Tensor& ups, const std::optional<at::Tensor>& conv,
    int64_t grid_h, int64_t grid_w, int64_t num_prefix, double beta, int64_t kernel,
    std::optional<at::ScalarType> save_dtype) {
  refuse_forward_ad("dtl_kernels::side_step", y, taps, inputs, downs, ups, conv, std::nullopt);
  // apply() runs forward with grad mode off: whether autograd records is decided here
  const bool recording = at::GradMode::is_enabled();
  if (!recording) {  // nothing to record: skip the autograd node's set-up (host time)
    at::AutoDispatchBelowADInplaceOrView guard;
    return side_step_impl(y, taps, inputs, downs, first_col, ups, conv, grid_h, grid_w, num_prefix,
                          beta, kernel, save_dtype);
  }
  // before apply(), whose set-up reads sizes a nested tensor does not have (the op checks
  // again: inference_mode skips this kernel)
  check_all_strided("dtl_kernels::side_step", y, taps, inputs, downs, ups, conv, std::nullopt);
  variable_list r = SideStep::apply(y, taps, inputs, downs, first_col, ups, conv, grid_h, grid_w,
                                    num_prefix, beta, kernel, save_dtype, recording);
  return {r[0], r[1]};
}

// write_taps_ records no gradient either: refused where autograd would record it (the
// written taps would have no grad_fn, a saved one would change unseen).
void write_taps_autograd(at::Tensor& taps, at::TensorList inputs, at::TensorList downs,
                         int64_t first_col) {
  const bool dual = any_tensor([](const at::Tensor& t) { return t._fw_grad(0).defined(); },
                               taps, inputs, downs);
  TORCH_CHECK(!dual, "dtl_kernels::write_taps_: forward-mode AD (a dual tensor) is not supported");
  TORCH_CHECK(!at::GradMode::is_enabled() ||
                  !any_tensor([](const at::Tensor& t) { return t.requires_grad(); }, taps,
                              inputs, downs),
              "dtl_kernels::write_taps_ records no gradient: call it under no_grad / "
              "inference_mode (side_step computes taps with their gradients)");
  at::AutoDispatchBelowAutograd guard;  // next: ADInplaceOrView (the version counter)
  write_taps_op().call(taps, inputs, downs, first_col);
}

void write_taps_view(at::Tensor& taps, at::TensorList inputs, at::TensorList downs,
                     int64_t first_col) {
  torch::autograd::impl::bump_version(taps);
  at::AutoDispatchBelowADInplaceOrView guard;
  write_taps_op().call(taps, inputs, downs, first_col);
}

// Nested tensors dispatch to keys of their own, where the composite kernels above are not
// registered: these name the argument instead of the dispatcher's "Could not run" (a
// nested one reaches them under no_grad / inference_mode, past the autograd kernels).
[[noreturn]] void refuse_nested(const char* op) {
  TORCH_CHECK(false, op, ": nested tensors are not supported (every tensor must be dense)");
}

std::tuple<at::Tensor, at::Tensor> side_step_nested(
    const at::Tensor& y, const at::Tensor& taps, at::TensorList inputs, at::TensorList downs,
    int64_t, const at::Tensor& ups, const std::optional<at::Tensor>& conv, int64_t, int64_t,
    int64_t, double, int64_t, std::optional<at::ScalarType>) {
  check_all_strided("dtl_kernels::side_step", y, taps, inputs, downs, ups, conv, std::nullopt);
  refuse_nested("dtl_kernels::side_step");
}

at::Tensor side_step_inplace_nested(const at::Tensor& y, at::Tensor& taps, at::TensorList inputs,
                                    at::TensorList downs, int64_t, const at::Tensor& ups,
                                    const std::optional<at::Tensor>& conv, int64_t, int64_t,
                                    int64_t, double, int64_t,
                                    const std::optional<at::Tensor>& next_down) {
  check_all_strided("dtl_kernels::side_step_", y, taps, inputs, downs, ups, conv, next_down);
  refuse_nested("dtl_kernels::side_step_");
}

void write_taps_nested(at::Tensor& taps, at::TensorList inputs, at::TensorList downs, int64_t) {
  const char* op = "dtl_kernels::write_taps_";
  check_strided(op, "taps", taps);
  for (size_t j = 0; j < inputs.size(); ++j)
    check_strided(op, "inputs", inputs[j], static_cast<int64_t>(j));
  for (size_t j = 0; j < downs.size(); ++j)
    check_strided(op, "downs", downs[j], static_cast<int64_t>(j));
  refuse_nested(op);
}

void register_nested_refusals(torch::Library& m) {
  m.impl("side_step", &side_step_nested);
  m.impl("side_step_", &side_step_inplace_nested);
  m.impl("write_taps_", &write_taps_nested);
}

}  // namespace
}  // namespace dtl

TORCH_LIBRARY_IMPL(dtl_kernels, NestedTensorCPU, m) { dtl::register_nested_refusals(m); }
TORCH_LIBRARY_IMPL(dtl_kernels, NestedTensorCUDA, m) { dtl::register_nested_refusals(m); }

TORCH_LIBRARY_IMPL(dtl_kernels, CompositeExplicitAutograd, m) {
  m.impl("side_step", &dtl::side_step_impl);
  m.impl("side_step_", &dtl::side_step_inplace_impl);
  m.impl("write_taps_", &dtl::write_taps_generic);
}

TORCH_LIBRARY_IMPL(dtl_kernels, Autograd, m) {
  m.impl("side_step", &dtl::side_step_autograd);
  m.impl("side_step_", &dtl::side_step_inplace_autograd);
  m.impl("write_taps_", &dtl::write_taps_autograd);
}

TORCH_LIBRARY_IMPL(dtl_kernels, Negative, m) {
  m.impl("side_step_", &dtl::side_step_inplace_negative);
  m.impl("write_taps_", &dtl::write_taps_negative);
}

TORCH_LIBRARY_IMPL(dtl_kernels, ADInplaceOrView, m) {
  m.impl("side_step_", &dtl::side_step_inplace_view);
  m.impl("write_taps_", &dtl::write_taps_view);
}
