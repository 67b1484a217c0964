// Schemas of every compiled op. Backends register implementations in their own files
// (cpu/*.cpp, cuda/*.cu); autograd and fake (meta) kernels are registered in Python
// (dtl_kernels/ops/), next to the code that documents the gradient.
#include <torch/library.h>

TORCH_LIBRARY(dtl_kernels, m) {
  // Fused side op (see dtl_kernels/ops/side.py for the math):
  //   out = y + mix(taps @ ups^T)   with mix = theta (DTL) or depthwise conv of theta on
  //   the patch grid, prefix tokens theta only (DTL+; conv_weight given).
  // y: (B, N, d), taps: (B, N, K), ups: (d, K), conv_weight: (d, 1, k, k) or None,
  // grid_h * grid_w == N - num_prefix when conv_weight is given.
  m.def(
      "side_forward(Tensor y, Tensor taps, Tensor ups, Tensor? conv_weight, int grid_h, "
      "int grid_w, int num_prefix, float beta) -> Tensor");
  // Gradients of side_forward w.r.t. taps (B, N, K), ups (d, K) and conv_weight
  // (d, 1, k, k; an empty tensor when conv_weight is None). grad_y == grad_out.
  m.def(
      "side_backward(Tensor grad_out, Tensor taps, Tensor ups, Tensor? conv_weight, "
      "int grid_h, int grid_w, int num_prefix, float beta) -> (Tensor, Tensor, Tensor)");
}
