// The launch sequence of the side-op kernels, written once for the GPU (side_cuda.cuh) and
// for the CPU emulation of the kernels (tests/cuda_emu): `launch(kernel, grid, smem, args…)`
// starts `kernel` on a grid of kThreads-thread blocks with `smem` bytes of dynamic shared
// memory.
#pragma once

#include <type_traits>

#include "side_kernels.cuh"

namespace dtl::cuda_side {

// Calls f(std::integral_constant<int, KS>{}) for the runtime conv size ks in 1..kMaxKS.
template <typename F>
void with_ks(int ks, F&& f) {
  switch (ks) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: break;  // the host checks reject other sizes first
  }
}

// out = y + mix(T·Uᵀ): rows (DTL, or DTL+'s prefix rows), then DTL+'s patch grid — with
// 16-bit taps in one launch (kFoldPrefixRows).
template <typename scalar_t, typename side_t, typename Launch>
void run_side_forward(const Plan& p, const SideArgs<scalar_t, side_t>& a, Launch&& launch) {
  constexpr bool fold = kFoldPrefixRows<scalar_t, side_t>;
  if (p.total_rows() > 0 && !(p.ks && fold))
    launch(fwd_rows_kernel<scalar_t, side_t>,
           dim3(unsigned(cdiv(p.total_rows(), p.fr_bm)), unsigned(cdiv(p.D, p.fr_bd))),
           p.smem_fwd_rows(), a, p.rows_per_image(), p.fr_bm, p.fr_bd);
  if (!p.ks) return;
  const int64_t row_blocks = fold ? cdiv(p.total_rows(), p.fc_bm) : 0;  // in fc's tiles
  with_ks(p.ks, [&](auto KS) {
    launch(fwd_conv_kernel<scalar_t, side_t, KS.value>,
           dim3(unsigned(row_blocks + p.B * p.fc.per_image()), unsigned(cdiv(p.D, p.fc_bd))),
           p.smem_fwd_conv(), a, p.fc, p.fc_bm, p.fc_bd, p.rows_per_image(), row_blocks);
  });
}

// ∂T into a.grad_taps; ∂U (∂w) partials into a.part_ups (a.part_w), then summed in slot
// order into grad_ups (grad_conv).
template <typename scalar_t, typename side_t, typename Launch>
void run_side_backward(const Plan& p, const SideArgs<scalar_t, side_t>& a, side_t* grad_ups,
                       scalar_t* grad_conv, Launch&& launch) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rpb = p.rows_per_image();
  if (p.total_rows() > 0) {
    launch(dt_rows_kernel<scalar_t, side_t>, dim3(unsigned(cdiv(p.total_rows(), p.ar_bm))),
           p.smem_dt_rows(), a, rpb, p.ar_bm, p.ar_bd);
    const dim3 grid(unsigned(p.slots_rows), unsigned(cdiv(p.D, p.br_bd)));
    if (p.du_rows_kr)
      launch(du_rows_kernel<scalar_t, side_t, true>, grid, p.smem_du_rows(), a, rpb, p.br_bm,
             p.br_bd, p.slots_conv);
    else
      launch(du_rows_kernel<scalar_t, side_t, false>, grid, p.smem_du_rows(), a, rpb, p.br_bm,
             p.br_bd, p.slots_conv);
  }
  if (p.ks)
    with_ks(p.ks, [&](auto KS) {
      launch(dt_conv_kernel<scalar_t, side_t, KS.value>, dim3(unsigned(p.B * p.bc.per_image())),
             p.smem_dt_conv(), a, p.bc, p.ac_bm, p.ac_bd);
      launch(du_conv_kernel<scalar_t, side_t, KS.value>,
             dim3(unsigned(p.slots_conv), unsigned(cdiv(p.D, p.bc_bd))), p.smem_du_conv(), a,
             p.bu, p.bc_bm, p.bc_bd);
    });
  const auto sum = [&](const acc_t* part, auto* out, int64_t slots, int64_t m) {
    using out_t = std::remove_pointer_t<decltype(out)>;
    if (m > 0)
      launch(sum_partials_kernel<acc_t, out_t>,
             dim3(unsigned(std::min<int64_t>(cdiv(m, kThreads), 65535))), size_t(0), part, out,
             slots, m);
  };
  sum(a.part_ups, grad_ups, p.slots(), p.D * p.K);
  if (p.ks) sum(a.part_w, grad_conv, p.slots_conv, p.D * p.ks * p.ks);
}

}  // namespace dtl::cuda_side
