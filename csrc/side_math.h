// Per-element math of the Compact Side Network, shared by the CPU and CUDA kernels so
// the two backends cannot drift apart. Everything is computed in float (or double when
// the I/O dtype is double): callers cast low-precision inputs up before calling.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define DTL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DTL_HOST_DEVICE inline
#endif

namespace dtl {

// sigma(beta * x), written so that neither branch overflows for large |beta * x|.
template <typename T>
DTL_HOST_DEVICE T sigmoid_beta(T x, T beta) {
  T u = beta * x;
  if (u >= T(0)) {
    T e = std::exp(-u);
    return T(1) / (T(1) + e);
  }
  T e = std::exp(u);
  return e / (T(1) + e);
}

// theta(x) = x * sigma(beta * x), the high-beta Swish.
template <typename T>
DTL_HOST_DEVICE T theta(T x, T beta) {
  return x * sigmoid_beta(x, beta);
}

// theta'(x) = s + beta * x * s * (1 - s) with s = sigma(beta * x). beta multiplies last:
// for |x| > max/beta, (beta * x) would be inf and inf * 0 = NaN where sigma saturates.
template <typename T>
DTL_HOST_DEVICE T theta_grad(T x, T beta) {
  T s = sigmoid_beta(x, beta);
  return s + beta * (x * s * (T(1) - s));
}

}  // namespace dtl

// --- fused side op (csrc/cpu/side.cpp, csrc/cuda/side.cu) ---------------------------------
namespace dtl {

// Leading (top / left) padding of PyTorch's padding="same" for a stride-1, k-tap
// convolution: the total k - 1 is split with the extra one at the end (bottom / right),
// so output p reads inputs p - same_pad_before(k) … p - same_pad_before(k) + k - 1.
DTL_HOST_DEVICE int same_pad_before(int k) { return (k - 1) / 2; }

}  // namespace dtl
