// CPU kernel of write_taps_ (schema in ../ops.cpp, generic version in ../step.cpp):
//
//   taps[:, :, c_j : c_j + r_j] = inputs[j] · downs[j]ᵀ     c_j = first_col + Σ_{i<j} r_i
//
// computed as a matmul in the taps' dtype would (inputs and downs rounded to it, products
// summed in float / double). One short loop instead of ATen's matmul + copy per block: the
// side network's taps are rank-r (r ≈ 2–8) products whose host-side call chain costs more
// than their arithmetic at the batch sizes where the host is the bottleneck.
#include "vec_capability.h"  // first: before any ATen header

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <c10/util/safe_numerics.h>

#include <vector>

#include "../side_checks.h"

namespace dtl {
namespace {

using at::vec::Vectorized;

// r · dp, dp = d rounded up to whole vectors of v: what one block's packed copy of its down
// holds, checked (an expanded, stride-0 down can be huge; d first: d + v - 1 overflows for d
// near 2^63). write_taps_cpu checks every block with the widest v before the first is written.
int64_t check_packed_size(int64_t r, int64_t d, int64_t v) {
  int64_t packed = 0;
  TORCH_CHECK(d <= (int64_t{1} << 40) && r >= 1 &&
                  !c10::mul_overflows(r, (d + v - 1) / v * v, &packed) &&
                  packed <= (int64_t{1} << 40),
              msg("dtl_kernels::write_taps_: a down of ", r, " x ", d, " is too large"));
  return packed;
}

// One block's taps: rows of z (any strides) times the r rows of a, into r columns of taps.
template <typename t_t, typename z_t>
void taps_of_block(at::Tensor& taps, const at::Tensor& z, const at::Tensor& a_in, int64_t col) {
  using acc_t = at::opmath_type<t_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t n_tok = taps.size(1), k_cols = taps.size(2), rows = taps.size(0) * n_tok;
  const int64_t d = z.size(2), r = a_in.size(0);
  // a rounded to the taps' dtype, as acc_t rows zero-padded to a whole number of vectors;
  // read in its own dtype and strides (no conversion op per block: host time, see above)
  const int64_t packed_size = check_packed_size(r, d, V), dp = packed_size / r;
  std::vector<acc_t> packed(packed_size, acc_t(0));
  const int64_t sk = a_in.stride(0), sd = a_in.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a_in.scalar_type(), "write_taps_a", [&] {
    const scalar_t* ap = a_in.const_data_ptr<scalar_t>();
    for (int64_t k = 0; k < r; ++k)
      for (int64_t c = 0; c < d; ++c)
        packed[k * dp + c] = static_cast<acc_t>(static_cast<t_t>(ap[k * sk + c * sd]));
  });
  const z_t* zp = z.const_data_ptr<z_t>();
  const int64_t sb = z.stride(0), sn = z.stride(1), sc = z.stride(2);
  t_t* tp = taps.mutable_data_ptr<t_t>();
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> zr(dp, acc_t(0));
    for (int64_t row = begin; row < end; ++row) {
      const z_t* src = zp + (row / n_tok) * sb + (row % n_tok) * sn;
      for (int64_t c = 0; c < d; ++c)  // rounded to the taps' dtype first, as a matmul in it
        zr[c] = static_cast<acc_t>(static_cast<t_t>(src[c * sc]));
      for (int64_t k = 0; k < r; ++k) {
        Vec s0(acc_t(0)), s1(acc_t(0));
        const acc_t* ak = packed.data() + k * dp;
        int64_t c = 0;
        for (; c + 2 * V <= dp; c += 2 * V) {
          s0 = at::vec::fmadd(Vec::loadu(zr.data() + c), Vec::loadu(ak + c), s0);
          s1 = at::vec::fmadd(Vec::loadu(zr.data() + c + V), Vec::loadu(ak + c + V), s1);
        }
        if (c < dp) s0 = at::vec::fmadd(Vec::loadu(zr.data() + c), Vec::loadu(ak + c), s0);
        const acc_t dot = at::vec::vec_reduce_all<acc_t>(
            [](Vec& x, Vec& y) { return x + y; }, s0 + s1);
        tp[row * k_cols + col + k] = static_cast<t_t>(dot);
      }
    }
  });
}

void write_taps_cpu(at::Tensor& taps, at::TensorList inputs, at::TensorList downs,
                    int64_t first_col) {
  check_taps_inputs(taps, inputs, downs, first_col);
  TORCH_CHECK(taps.is_contiguous(), "dtl_kernels::write_taps_: taps must be contiguous");
  check_no_overlap(taps, inputs, downs);
  if (taps.numel() == 0) return;  // no rows to write: nothing packed either
  for (size_t j = 0; j < downs.size(); ++j)  // every block's before the first is written
    check_packed_size(downs[j].size(0), downs[j].size(1), 16);  // 16: the widest vector
  int64_t col = first_col;
  for (size_t j = 0; j < inputs.size(); ++j) {
    const at::Tensor& z = inputs[j];
    with_host_alloc_named("dtl_kernels::write_taps_", [&] {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, taps.scalar_type(), "write_taps",
                                      [&] {
        using t_t = scalar_t;
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "write_taps_z",
                                        [&] { taps_of_block<t_t, scalar_t>(taps, z, downs[j], col); });
      });
    });
    col += downs[j].size(0);
  }
}

}  // namespace
}  // namespace dtl

TORCH_LIBRARY_IMPL(dtl_kernels, CPU, m) {
  m.impl("write_taps_", &dtl::write_taps_cpu);
}
