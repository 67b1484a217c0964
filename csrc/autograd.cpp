// Autograd of the compiled side op, in C++ for every device (the kernels are registered per
// device in cpu/ and cuda/). Written here rather than with torch.library.register_autograd
// in Python: the Python glue cost ~28 µs of host time per add-back in a training step, this
// one ~2 µs (benchmarks/bench_host.py). The gradient (SPEC §2) is documented beside the
// kernels in dtl_kernels/ops/compiled_side.py:
//
//   ∂y = G (the residual: passed through, no copy); ∂T, ∂U, ∂w from side_backward.
//
// Autograd keeps only taps, ups and conv_weight (h is rebuilt in backward, y is not needed).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>

#include "any_tensor.h"
#include "side_checks.h"

namespace dtl {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_forward(const at::Tensor& y, const at::Tensor& taps, const at::Tensor& ups,
                        const std::optional<at::Tensor>& conv, int64_t grid_h, int64_t grid_w,
                        int64_t num_prefix, double beta) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dtl_kernels::side_forward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, int64_t, int64_t,
                                         int64_t, double)>();
  return op.call(y, taps, ups, conv, grid_h, grid_w, num_prefix, beta);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_backward(
    const at::Tensor& grad, const at::Tensor& taps, const at::Tensor& ups,
    const std::optional<at::Tensor>& conv, int64_t grid_h, int64_t grid_w, int64_t num_prefix,
    double beta) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dtl_kernels::side_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const std::optional<at::Tensor>&, int64_t, int64_t, int64_t, double)>();
  return op.call(grad, taps, ups, conv, grid_h, grid_w, num_prefix, beta);
}

class SideForward : public torch::autograd::Function<SideForward> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& y, const at::Tensor& taps,
                            const at::Tensor& ups, const std::optional<at::Tensor>& conv,
                            int64_t grid_h, int64_t grid_w, int64_t num_prefix, double beta) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out = call_forward(y, taps, ups, conv, grid_h, grid_w, num_prefix, beta);
    ctx->save_for_backward({taps, ups, conv.value_or(at::Tensor())});
    ctx->saved_data["grid_h"] = grid_h;
    ctx->saved_data["grid_w"] = grid_w;
    ctx->saved_data["num_prefix"] = num_prefix;
    ctx->saved_data["beta"] = beta;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    refuse_double_backward("dtl_kernels::side_forward");
    const at::Tensor& g = grads[0];
    const variable_list saved = ctx->get_saved_variables();
    const bool has_conv = saved[2].defined();
    const bool need_t = ctx->needs_input_grad(1), need_u = ctx->needs_input_grad(2);
    const bool need_w = has_conv && ctx->needs_input_grad(3);
    at::Tensor gt, gu, gw;
    if (need_t || need_u || need_w) {
      std::optional<at::Tensor> conv;
      if (has_conv) conv = saved[2];
      std::tie(gt, gu, gw) = call_backward(
          g, saved[0], saved[1], conv, ctx->saved_data["grid_h"].toInt(),
          ctx->saved_data["grid_w"].toInt(), ctx->saved_data["num_prefix"].toInt(),
          ctx->saved_data["beta"].toDouble());
    }
    return {ctx->needs_input_grad(0) ? g : at::Tensor(),
            need_t ? gt : at::Tensor(),
            need_u ? gu : at::Tensor(),
            need_w ? gw : at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor()};
  }
};

at::Tensor side_forward_autograd(const at::Tensor& y, const at::Tensor& taps, const at::Tensor& ups,
                                 const std::optional<at::Tensor>& conv, int64_t grid_h,
                                 int64_t grid_w, int64_t num_prefix, double beta) {
  // Nothing to record (no grad mode, or no input that requires grad) and no forward-mode
  // tangent: the kernel itself, without the autograd node that apply() would set up and drop
  // (host time of every no-grad call). A tangent still goes to apply(), which refuses it.
  const bool record =
      at::GradMode::is_enabled() &&
      any_tensor([](const at::Tensor& t) { return t.requires_grad(); }, y, taps, ups, conv);
  if (!record &&
      !any_tensor([](const at::Tensor& t) { return t._fw_grad(0).defined(); }, y, taps, ups,
                  conv)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_forward(y, taps, ups, conv, grid_h, grid_w, num_prefix, beta);
  }
  return SideForward::apply(y, taps, ups, conv, grid_h, grid_w, num_prefix, beta);
}

// side_backward is side_forward's gradient, not differentiable itself: without this kernel
// the dispatcher's fallthrough let autograd see no node (a derivative through it came out
// None, with a warning) and forward-mode AD a zero tangent. Refused by name instead, as
// side_forward's double backward is.
std::tuple<at::Tensor, at::Tensor, at::Tensor> side_backward_autograd(
    const at::Tensor& grad, const at::Tensor& taps, const at::Tensor& ups,
    const std::optional<at::Tensor>& conv, int64_t grid_h, int64_t grid_w, int64_t num_prefix,
    double beta) {
  const auto dual = [](const at::Tensor& t) { return t._fw_grad(0).defined(); };
  TORCH_CHECK(!any_tensor(dual, grad, taps, ups, conv),
              "dtl_kernels::side_backward: forward-mode AD (a dual tensor) is not supported");
  TORCH_CHECK(!at::GradMode::is_enabled() ||
                  !any_tensor([](const at::Tensor& t) { return t.requires_grad(); }, grad,
                              taps, ups, conv),
              "dtl_kernels::side_backward: its gradients are not differentiable (call it under "
              "no_grad, or differentiate side_forward once)");
  at::AutoDispatchBelowADInplaceOrView guard;
  return call_backward(grad, taps, ups, conv, grid_h, grid_w, num_prefix, beta);
}

}  // namespace
}  // namespace dtl

TORCH_LIBRARY_IMPL(dtl_kernels, Autograd, m) {
  m.impl("side_forward", &dtl::side_forward_autograd);
  m.impl("side_backward", &dtl::side_backward_autograd);
}
