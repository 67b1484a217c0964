// Schemas of every compiled op. Backends register implementations in their own files
// (cpu/*.cpp, cuda/*.cu), autograd in autograd.cpp (one for every device); fake (meta)
// kernels are registered in Python (dtl_kernels/ops/contract.py).
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
  // One add-back step of the side network (step.cpp): the taps inputs[j] · downs[j]^T written
  // into columns first_col… of a copy of taps (B, N, K), then the side op on it with kernel
  // 0 (side_forward) or 1 (triton_side_forward). Returns (out, the new taps).
  m.def(
      "side_step(Tensor y, Tensor taps, Tensor[] inputs, Tensor[] downs, int first_col, "
      "Tensor ups, Tensor? conv_weight, int grid_h, int grid_w, int num_prefix, float beta, "
      "int kernel, ScalarType? save_dtype=None) -> (Tensor, Tensor)");
  // side_step without autograd, writing the new taps into `taps` itself (contiguous; the
  // caller's own per-pass buffer) instead of a copy: the step of a no-grad forward pass.
  // With next_down (r', d), also the next block's tap on the result: out · next_down^T
  // into the r' columns after the ones just written (out is that block's input). Returns out.
  m.def(
      "side_step_(Tensor y, Tensor(a!) taps, Tensor[] inputs, Tensor[] downs, int first_col, "
      "Tensor ups, Tensor? conv_weight, int grid_h, int grid_w, int num_prefix, float beta, "
      "int kernel, Tensor? next_down=None) -> Tensor");
  // taps[:, :, c_j : c_j + r_j] = inputs[j] @ downs[j]^T in the taps' dtype, c_0 = first_col
  // (step.cpp for every device, cpu/taps.cpp for CPU tensors).
  m.def("write_taps_(Tensor(a!) taps, Tensor[] inputs, Tensor[] downs, int first_col) -> ()");
}
