// CPU kernels of theta(x) = x * sigmoid(beta * x) and its backward.
// Vectorised with at::vec for float/double, parallel with at::parallel_for.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "../side_math.h"

namespace dtl {
namespace {

constexpr int64_t kGrain = 1 << 14;

using at::vec::Vectorized;

template <typename T>
Vectorized<T> vec_sigmoid_beta(Vectorized<T> x, T beta) {
  const Vectorized<T> one(T(1));
  return one / (one + (x * Vectorized<T>(-beta)).exp());
}

template <typename scalar_t>
void theta_forward_range(const scalar_t* x, scalar_t* y, int64_t begin, int64_t end,
                         double beta_in) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t beta = static_cast<opmath_t>(beta_in);
  int64_t i = begin;
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    using Vec = Vectorized<scalar_t>;
    for (; i + Vec::size() <= end; i += Vec::size()) {
      Vec v = Vec::loadu(x + i);
      (v * vec_sigmoid_beta(v, beta)).store(y + i);
    }
  }
  for (; i < end; ++i) y[i] = static_cast<scalar_t>(theta<opmath_t>(x[i], beta));
}

template <typename scalar_t>
void theta_backward_range(const scalar_t* g, const scalar_t* x, scalar_t* out, int64_t begin,
                          int64_t end, double beta_in) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t beta = static_cast<opmath_t>(beta_in);
  int64_t i = begin;
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    using Vec = Vectorized<scalar_t>;
    const Vec one(scalar_t(1));
    const Vec vbeta(beta);
    for (; i + Vec::size() <= end; i += Vec::size()) {
      Vec v = Vec::loadu(x + i);
      Vec s = vec_sigmoid_beta(v, beta);
      Vec d = s + vbeta * (v * s * (one - s));  // β last: no inf·0 for |x| > max/β
      (Vec::loadu(g + i) * d).store(out + i);
    }
  }
  for (; i < end; ++i) {
    out[i] = static_cast<scalar_t>(static_cast<opmath_t>(g[i]) * theta_grad<opmath_t>(x[i], beta));
  }
}

void check_input(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), "dtl_kernels::theta (CPU): ", name, " must be a CPU tensor");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "dtl_kernels::theta: ", name,
              " must be floating point, got ", x.scalar_type());
}

at::Tensor theta_cpu(const at::Tensor& x_in, double beta) {
  check_input(x_in, "x");
  at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "theta_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, x.numel(), kGrain, [&](int64_t b, int64_t e) {
      theta_forward_range(xp, yp, b, e, beta);
    });
  });
  return y;
}

at::Tensor theta_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in, double beta) {
  check_input(x_in, "x");
  check_input(grad_in, "grad");
  TORCH_CHECK(grad_in.sizes() == x_in.sizes(), "dtl_kernels::theta_backward: grad shape ",
              grad_in.sizes(), " != x shape ", x_in.sizes());
  TORCH_CHECK(grad_in.scalar_type() == x_in.scalar_type(),
              "dtl_kernels::theta_backward: grad and x dtypes differ");
  at::Tensor x = x_in.contiguous();
  at::Tensor g = grad_in.contiguous();
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "theta_bwd_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, x.numel(), kGrain, [&](int64_t b, int64_t e) {
      theta_backward_range(gp, xp, op, b, e, beta);
    });
  });
  return out;
}

}  // namespace
}  // namespace dtl

TORCH_LIBRARY_IMPL(dtl_kernels, CPU, m) {
  m.impl("theta", &dtl::theta_cpu);
  m.impl("theta_backward", &dtl::theta_backward_cpu);
}
