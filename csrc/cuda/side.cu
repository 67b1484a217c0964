// CUDA kernels of the fused side op (SPEC §2):
//
//   out = y + mix(T·Uᵀ),   mix = θ (DTL)  or  θ on prefix rows and depthwise k×k "same"
//                          conv of θ on the H×W patch grid (DTL+),   θ(x) = x·σ(βx).
//
// y (B, N, d), taps T (B, N, K), ups U (d, K), conv_weight w (d, 1, k, k) or None.
// h = T·Uᵀ is never stored: every kernel rebuilds the tile of h it needs from the K-wide
// taps (K ≤ kMaxK) and a channel chunk of U staged in shared memory.
//
// Backward, with G = ∂L/∂out, s_ab = (a − pad, b − pad), pad = (k − 1) / 2:
//   ∂L/∂y = G;  D = G on prefix rows and for DTL;  D[q] = Σ_ab w[:,ab]·G[q − s_ab] on patch
//   rows (gᵀ: the transposed conv);  S = θ'(h) ⊙ D;  ∂L/∂T = S·U;  ∂L/∂U = Sᵀ·T;
//   ∂L/∂w[:,ab] = Σ_p θ(h[p]) ⊙ G[p − s_ab] (over batch and grid).
// Reductions over rows (∂L/∂U, ∂L/∂w) and over channel chunks (∂L/∂T) are deterministic:
// a fixed launch grid, each block accumulating fp32 partials of its own tiles in a fixed
// order and writing them to its own slot; a second kernel sums the slots in order. No atomics.
//
// Math in at::opmath_type (float; double for double I/O), stores in the I/O dtype, the
// current stream, per-element math from side_math.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "../side_math.h"

namespace dtl {
namespace {

constexpr int kBD = 32;          // channels per block: threadIdx.x, one warp wide
constexpr int kTY = 8;           // threadIdx.y
constexpr int kThreads = kBD * kTY;
constexpr int kBM = 32;          // token rows per row tile
constexpr int kPitch = kBD + 1;  // shared-memory pitch of [*][kBD] arrays: no bank conflicts
constexpr int kTile = 8;         // the conv forward writes kTile × kTile grid positions
constexpr int kMaxK = 128;       // widest taps (K = blocks · r) supported
constexpr int kMaxKSize = 7;     // largest conv supported
// ∂L/∂U and ∂L/∂w accumulators per thread: thread (x, y) owns channel x and the taps
// columns k = y + kTY·j (conv taps ab = y + kTY·j).
constexpr int kUpsSlots = kMaxK / kTY;
constexpr int kConvSlots = (kMaxKSize * kMaxKSize + kTY - 1) / kTY;

// ---------------------------------------------------------------------------------------
// Forward, row-wise: out[b, n, c] = y[b, n, c] + θ(Σ_k T[b, n, k]·U[c, k]) for the rows
// n < rows_per_batch of every image: all rows (DTL) or the prefix rows (DTL+).
// grid: (cdiv(B · rows_per_batch, kBM), cdiv(d, kBD)); block: (kBD, kTY).
// ---------------------------------------------------------------------------------------
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) side_rows_fwd_kernel(
    const scalar_t* __restrict__ y, int64_t y_sb, int64_t y_sn,     // (B, N, d), channel stride 1
    const scalar_t* __restrict__ taps, int64_t t_sb, int64_t t_sn,  // (B, N, K), k stride 1
    const scalar_t* __restrict__ ups,                                // (d, K) contiguous
    scalar_t* __restrict__ out,                                      // (B, N, d) contiguous
    int64_t batch, int64_t rows_per_batch, int64_t N, int64_t D, int K, double beta) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* u_s = reinterpret_cast<acc_t*>(smem_raw);  // [K][kPitch]: Uᵀ of this channel chunk
  acc_t* t_s = u_s + K * kPitch;                     // [kBM][K]: the taps of this row tile
  const int cl = threadIdx.x;
  const int tid = threadIdx.y * kBD + cl;
  const int64_t c0 = int64_t(blockIdx.y) * kBD;
  const int64_t c = c0 + cl;
  const int64_t total = batch * rows_per_batch;
  const int64_t r0 = int64_t(blockIdx.x) * kBM;

  for (int i = tid; i < K * kBD; i += kThreads) {
    const int k = i / kBD, j = i % kBD;
    u_s[k * kPitch + j] = c0 + j < D ? acc_t(ups[(c0 + j) * K + k]) : acc_t(0);
  }
  for (int i = tid; i < kBM * K; i += kThreads) {
    const int rl = i / K, k = i % K;
    const int64_t r = r0 + rl;
    acc_t v = 0;
    if (r < total) {
      const int64_t b = r / rows_per_batch, n = r % rows_per_batch;
      v = acc_t(taps[b * t_sb + n * t_sn + k]);
    }
    t_s[rl * K + k] = v;
  }
  __syncthreads();
  if (c >= D) return;
  const acc_t beta_ = static_cast<acc_t>(beta);  // β cast to the compute type here
  for (int rl = threadIdx.y; rl < kBM; rl += kTY) {
    const int64_t r = r0 + rl;
    if (r >= total) break;
    const int64_t b = r / rows_per_batch, n = r % rows_per_batch;
    acc_t h = 0;
    for (int k = 0; k < K; ++k) h += t_s[rl * K + k] * u_s[k * kPitch + cl];
    const acc_t v = acc_t(y[b * y_sb + n * y_sn + c]) + theta<acc_t>(h, beta_);
    out[(b * N + n) * D + c] = static_cast<scalar_t>(v);
  }
}

// ---------------------------------------------------------------------------------------
// Forward, patch rows of DTL+: out[b, P + q, c] = y + Σ_ab w[c, ab]·θ(h[b, P + q + s_ab, c]).
// One block per kTile × kTile tile of the grid and kBD channels; θ(h) of the tile and its
// halo ((kTile + k − 1)² positions, zero outside the grid) is built once in shared memory.
// grid: (B · tiles_h · tiles_w, cdiv(d, kBD)); block: (kBD, kTY).
// ---------------------------------------------------------------------------------------
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) side_conv_fwd_kernel(
    const scalar_t* __restrict__ y, int64_t y_sb, int64_t y_sn,     // (B, N, d), channel stride 1
    const scalar_t* __restrict__ taps, int64_t t_sb, int64_t t_sn,  // (B, N, K), k stride 1
    const scalar_t* __restrict__ ups,                                // (d, K) contiguous
    const scalar_t* __restrict__ w,                                  // (d, k·k) contiguous
    scalar_t* __restrict__ out,                                      // (B, N, d) contiguous
    int64_t N, int64_t D, int K, int num_prefix, int grid_h, int grid_w, int ksize, int tiles_w,
    int tiles_per_image, double beta) {
  using acc_t = at::opmath_type<scalar_t>;
  const int halo = kTile + ksize - 1;
  const int kk = ksize * ksize;
  const int pad = same_pad_before(ksize);
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* u_s = reinterpret_cast<acc_t*>(smem_raw);  // [K][kPitch]
  acc_t* w_s = u_s + K * kPitch;                     // [kk][kPitch]
  acc_t* a_s = w_s + kk * kPitch;                    // [halo²][kPitch]: θ(h) on tile + halo
  const int cl = threadIdx.x;
  const int tid = threadIdx.y * kBD + cl;
  const int64_t c0 = int64_t(blockIdx.y) * kBD;
  const int64_t c = c0 + cl;
  const int64_t b = blockIdx.x / tiles_per_image;
  const int tile = blockIdx.x % tiles_per_image;
  const int ti0 = (tile / tiles_w) * kTile, tj0 = (tile % tiles_w) * kTile;

  for (int i = tid; i < K * kBD; i += kThreads) {
    const int k = i / kBD, j = i % kBD;
    u_s[k * kPitch + j] = c0 + j < D ? acc_t(ups[(c0 + j) * K + k]) : acc_t(0);
  }
  for (int i = tid; i < kk * kBD; i += kThreads) {
    const int ab = i / kBD, j = i % kBD;
    w_s[ab * kPitch + j] = c0 + j < D ? acc_t(w[(c0 + j) * kk + ab]) : acc_t(0);
  }
  __syncthreads();
  const acc_t beta_ = static_cast<acc_t>(beta);  // β cast to the compute type here
  for (int pos = threadIdx.y; pos < halo * halo; pos += kTY) {
    const int gi = ti0 - pad + pos / halo, gj = tj0 - pad + pos % halo;
    acc_t a = 0;
    if (c < D && gi >= 0 && gi < grid_h && gj >= 0 && gj < grid_w) {
      // the whole warp reads the same taps row: one broadcast load per k
      const scalar_t* t = taps + b * t_sb + (num_prefix + int64_t(gi) * grid_w + gj) * t_sn;
      acc_t h = 0;
      for (int k = 0; k < K; ++k) h += acc_t(t[k]) * u_s[k * kPitch + cl];
      a = theta<acc_t>(h, beta_);
    }
    a_s[pos * kPitch + cl] = a;
  }
  __syncthreads();
  if (c >= D) return;
  for (int o = threadIdx.y; o < kTile * kTile; o += kTY) {
    const int oi = o / kTile, oj = o % kTile;
    const int gi = ti0 + oi, gj = tj0 + oj;
    if (gi >= grid_h || gj >= grid_w) continue;
    acc_t acc = 0;
    for (int a = 0; a < ksize; ++a)
      for (int bb = 0; bb < ksize; ++bb)
        acc += w_s[(a * ksize + bb) * kPitch + cl] * a_s[((oi + a) * halo + oj + bb) * kPitch + cl];
    const int64_t n = num_prefix + int64_t(gi) * grid_w + gj;
    out[(b * N + n) * D + c] = static_cast<scalar_t>(acc_t(y[b * y_sb + n * y_sn + c]) + acc);
  }
}

// ---------------------------------------------------------------------------------------
// Backward. grid: (P, cdiv(d, kBD)); block (kBD, kTY). Block (p, dc) walks the row tiles
// p, p + P, … (kBM rows of one image each); per tile it stages T, builds S = θ'(h) ⊙ D and
// θ(h) in shared memory, writes the chunk's ∂L/∂T partial for those rows and accumulates
// its own ∂L/∂U and ∂L/∂w partials in registers. Partials are in acc_t.
// ---------------------------------------------------------------------------------------
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) side_bwd_kernel(
    const scalar_t* __restrict__ g, int64_t g_sb, int64_t g_sn,     // (B, N, d) ∂L/∂out
    const scalar_t* __restrict__ taps, int64_t t_sb, int64_t t_sn,  // (B, N, K)
    const scalar_t* __restrict__ ups,                                // (d, K) contiguous
    const scalar_t* __restrict__ w,                                  // (d, k·k) or nullptr
    at::opmath_type<scalar_t>* __restrict__ part_taps,  // (n_dchunks, B·N, K)
    at::opmath_type<scalar_t>* __restrict__ part_ups,   // (P, d, K)
    at::opmath_type<scalar_t>* __restrict__ part_w,     // (P, d, k·k) or nullptr
    int64_t batch, int64_t N, int64_t D, int K, int num_prefix, int grid_h, int grid_w,
    int ksize, int64_t tiles_per_image, double beta) {
  using acc_t = at::opmath_type<scalar_t>;
  const int kk = ksize * ksize;
  const int pad = ksize > 0 ? same_pad_before(ksize) : 0;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* u_s = reinterpret_cast<acc_t*>(smem_raw);  // [K][kPitch]
  acc_t* w_s = u_s + K * kPitch;                     // [kk][kPitch]
  acc_t* t_s = w_s + kk * kPitch;                    // [kBM][K]
  acc_t* s_s = t_s + kBM * K;                        // [kBM][kPitch]: S
  acc_t* a_s = s_s + kBM * kPitch;                   // [kBM][kPitch]: θ(h)
  const int cl = threadIdx.x;
  const int tid = threadIdx.y * kBD + cl;
  const int64_t c0 = int64_t(blockIdx.y) * kBD;
  const int64_t c = c0 + cl;
  const acc_t beta_ = static_cast<acc_t>(beta);  // β cast to the compute type here

  for (int i = tid; i < K * kBD; i += kThreads) {
    const int k = i / kBD, j = i % kBD;
    u_s[k * kPitch + j] = c0 + j < D ? acc_t(ups[(c0 + j) * K + k]) : acc_t(0);
  }
  for (int i = tid; i < kk * kBD; i += kThreads) {
    const int ab = i / kBD, j = i % kBD;
    w_s[ab * kPitch + j] = c0 + j < D ? acc_t(w[(c0 + j) * kk + ab]) : acc_t(0);
  }
  acc_t acc_u[kUpsSlots];
  acc_t acc_w[kConvSlots];
#pragma unroll
  for (int j = 0; j < kUpsSlots; ++j) acc_u[j] = 0;
#pragma unroll
  for (int j = 0; j < kConvSlots; ++j) acc_w[j] = 0;

  const int64_t total_tiles = batch * tiles_per_image;
  for (int64_t tile = blockIdx.x; tile < total_tiles; tile += gridDim.x) {
    const int64_t b = tile / tiles_per_image;
    const int64_t n0 = (tile % tiles_per_image) * kBM;
    const scalar_t* g_b = g + b * g_sb;
    __syncthreads();  // the previous tile's shared memory is no longer read
    for (int i = tid; i < kBM * K; i += kThreads) {
      const int rl = i / K, k = i % K;
      t_s[rl * K + k] = n0 + rl < N ? acc_t(taps[b * t_sb + (n0 + rl) * t_sn + k]) : acc_t(0);
    }
    __syncthreads();
    // S and θ(h) of the tile; zero on rows past N and channels past d.
    for (int rl = threadIdx.y; rl < kBM; rl += kTY) {
      const int64_t n = n0 + rl;
      acc_t s = 0, a = 0;
      if (n < N && c < D) {
        acc_t h = 0;
        for (int k = 0; k < K; ++k) h += t_s[rl * K + k] * u_s[k * kPitch + cl];
        acc_t dmix;
        if (ksize > 0 && n >= num_prefix) {  // gᵀ(G): the transposed conv, gathered
          const int p = int(n - num_prefix), pi = p / grid_w, pj = p % grid_w;
          dmix = 0;
          for (int ai = 0; ai < ksize; ++ai) {
            const int qi = pi - (ai - pad);
            if (qi < 0 || qi >= grid_h) continue;
            for (int bj = 0; bj < ksize; ++bj) {
              const int qj = pj - (bj - pad);
              if (qj < 0 || qj >= grid_w) continue;
              const int64_t q = num_prefix + int64_t(qi) * grid_w + qj;
              dmix += w_s[(ai * ksize + bj) * kPitch + cl] * acc_t(g_b[q * g_sn + c]);
            }
          }
        } else {
          dmix = acc_t(g_b[n * g_sn + c]);
        }
        s = theta_grad<acc_t>(h, beta_) * dmix;
        a = theta<acc_t>(h, beta_);
      }
      s_s[rl * kPitch + cl] = s;
      a_s[rl * kPitch + cl] = a;
    }
    __syncthreads();
    // ∂L/∂T partial of this channel chunk: (row, k) pairs, Σ over the chunk's channels.
    for (int i = tid; i < kBM * K; i += kThreads) {
      const int rl = i / K, k = i % K;
      const int64_t n = n0 + rl;
      if (n >= N) continue;
      acc_t v = 0;
#pragma unroll 8
      for (int j = 0; j < kBD; ++j) v += s_s[rl * kPitch + j] * u_s[k * kPitch + j];
      part_taps[((int64_t(blockIdx.y) * batch + b) * N + n) * K + k] = v;
    }
    // ∂L/∂U partial: Σ over the tile's rows of S[:, c]·T[:, k]; thread owns (cl, k = y + kTY·j).
#pragma unroll
    for (int j = 0; j < kUpsSlots; ++j) {
      const int k = threadIdx.y + kTY * j;
      if (k < K) {
        acc_t v = 0;
        for (int rl = 0; rl < kBM; ++rl) v += s_s[rl * kPitch + cl] * t_s[rl * K + k];
        acc_u[j] += v;
      }
    }
    // ∂L/∂w partial: Σ_p θ(h[p, c])·G[p − s_ab, c] over the tile's patch rows.
    if (ksize > 0 && c < D) {
#pragma unroll
      for (int j = 0; j < kConvSlots; ++j) {
        const int ab = threadIdx.y + kTY * j;
        if (ab < kk) {
          const int si = ab / ksize - pad, sj = ab % ksize - pad;
          acc_t v = 0;
          for (int rl = 0; rl < kBM; ++rl) {
            const int64_t n = n0 + rl;
            if (n >= N) break;
            if (n < num_prefix) continue;
            const int p = int(n - num_prefix), qi = p / grid_w - si, qj = p % grid_w - sj;
            if (qi < 0 || qi >= grid_h || qj < 0 || qj >= grid_w) continue;
            const int64_t q = num_prefix + int64_t(qi) * grid_w + qj;
            v += a_s[rl * kPitch + cl] * acc_t(g_b[q * g_sn + c]);
          }
          acc_w[j] += v;
        }
      }
    }
  }
  if (c >= D) return;
  const int64_t slot = int64_t(blockIdx.x) * D + c;
#pragma unroll
  for (int j = 0; j < kUpsSlots; ++j) {
    const int k = threadIdx.y + kTY * j;
    if (k < K) part_ups[slot * K + k] = acc_u[j];
  }
  if (ksize > 0) {
#pragma unroll
    for (int j = 0; j < kConvSlots; ++j) {
      const int ab = threadIdx.y + kTY * j;
      if (ab < kk) part_w[slot * kk + ab] = acc_w[j];
    }
  }
}

// out[j] = Σ_p part[p, j] in a fixed order, cast to the output dtype.
template <typename acc_t, typename out_t>
__global__ void sum_partials_kernel(const acc_t* __restrict__ part, out_t* __restrict__ out,
                                    int64_t slots, int64_t m) {
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < m;
       j += int64_t(gridDim.x) * blockDim.x) {
    acc_t s = 0;
    for (int64_t p = 0; p < slots; ++p) s += part[p * m + j];
    out[j] = static_cast<out_t>(s);
  }
}

// ---------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Checks every input; returns the conv size k (0 for DTL).
int64_t check_inputs(const char* op, const at::Tensor& y, const at::Tensor& taps,
                     const at::Tensor& ups, const std::optional<at::Tensor>& conv_weight,
                     int64_t grid_h, int64_t grid_w, int64_t num_prefix, double beta) {
  const char* names[] = {"y/grad_out", "taps", "ups", "conv_weight"};
  const at::Tensor* ts[] = {&y, &taps, &ups, conv_weight ? &*conv_weight : nullptr};
  TORCH_CHECK(y.defined(), op, ": y/grad_out is undefined");
  const auto dt = y.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, op,
              " (CUDA): dtype must be float32, float16, bfloat16 or float64, got ", dt);
  for (int i = 0; i < 4; ++i) {
    if (ts[i] == nullptr) continue;
    const at::Tensor& t = *ts[i];
    TORCH_CHECK(t.defined(), op, ": ", names[i], " is undefined");
    TORCH_CHECK(t.is_cuda(), op, " (CUDA kernel): ", names[i], " must be a CUDA tensor, got ",
                t.device());
    TORCH_CHECK(t.device() == y.device(), op, ": ", names[i], " is on ", t.device(),
                " but y/grad_out is on ", y.device());
    TORCH_CHECK(t.scalar_type() == dt, op, ": ", names[i], " has dtype ", t.scalar_type(),
                " but y/grad_out has ", dt, " (all inputs must share one dtype)");
  }
  TORCH_CHECK(y.dim() == 3, op, ": y/grad_out must be (B, N, d), got shape ", y.sizes());
  TORCH_CHECK(taps.dim() == 3, op, ": taps must be (B, N, K), got shape ", taps.sizes());
  TORCH_CHECK(ups.dim() == 2, op, ": ups must be (d, K), got shape ", ups.sizes());
  TORCH_CHECK(taps.size(0) == y.size(0) && taps.size(1) == y.size(1), op, ": taps ",
              taps.sizes(), " do not match y ", y.sizes(), " in (B, N)");
  TORCH_CHECK(ups.size(0) == y.size(2), op, ": ups has ", ups.size(0), " rows but d = ", y.size(2));
  TORCH_CHECK(ups.size(1) == taps.size(2), op, ": ups has ", ups.size(1),
              " columns but taps have K = ", taps.size(2));
  TORCH_CHECK(taps.size(2) >= 1 && taps.size(2) <= kMaxK, op, " (CUDA): taps need 1 <= K <= ",
              kMaxK, " columns, got ", taps.size(2));
  TORCH_CHECK(std::isfinite(beta), op, ": beta must be finite, got ", beta);
  TORCH_CHECK(num_prefix >= 0, op, ": num_prefix must be >= 0, got ", num_prefix);
  TORCH_CHECK(y.size(0) * y.size(1) < (int64_t(1) << 31) / kBM, op, ": too many rows");
  if (!conv_weight) return 0;
  const at::Tensor& w = *conv_weight;
  const int64_t k = w.dim() == 4 ? w.size(3) : -1;
  TORCH_CHECK(w.dim() == 4 && w.size(0) == y.size(2) && w.size(1) == 1 && w.size(2) == k, op,
              ": conv_weight must be (d, 1, k, k) with d = ", y.size(2), ", got ", w.sizes());
  TORCH_CHECK(k >= 1 && k <= kMaxKSize, op, " (CUDA): conv size must be 1..", kMaxKSize, ", got ",
              k);
  TORCH_CHECK(grid_h >= 1 && grid_w >= 1, op, ": grid must be positive, got ", grid_h, "x",
              grid_w);
  TORCH_CHECK(num_prefix <= y.size(1) && grid_h * grid_w == y.size(1) - num_prefix, op, ": ",
              y.size(1), " tokens do not hold ", num_prefix, " prefix tokens plus a ", grid_h, "x",
              grid_w, " patch grid");
  return k;
}

// A view with unit stride in the last dimension (copies only when it has another one).
at::Tensor unit_last(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// Dynamic shared memory above the 48 KiB default needs an opt-in per kernel.
template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes, const char* op) {
  if (bytes <= 48 * 1024) return;
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(bytes <= prop->sharedMemPerBlockOptin, op, ": needs ", bytes,
              " bytes of shared memory per block, the device has ", prop->sharedMemPerBlockOptin,
              " (use fewer taps K or a smaller conv)");
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
}

at::Tensor side_forward_cuda(const at::Tensor& y_in, const at::Tensor& taps_in,
                             const at::Tensor& ups_in, const std::optional<at::Tensor>& conv_weight,
                             int64_t grid_h, int64_t grid_w, int64_t num_prefix, double beta) {
  const char* op = "dtl_kernels::side_forward";
  const int64_t ksize =
      check_inputs(op, y_in, taps_in, ups_in, conv_weight, grid_h, grid_w, num_prefix, beta);
  const c10::cuda::CUDAGuard guard(y_in.device());
  const int64_t B = y_in.size(0), N = y_in.size(1), D = y_in.size(2), K = taps_in.size(2);
  at::Tensor out = at::empty({B, N, D}, y_in.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const at::Tensor y = unit_last(y_in), taps = unit_last(taps_in), ups = ups_in.contiguous();
  const at::Tensor w = ksize ? conv_weight->reshape({D, ksize * ksize}).contiguous() : at::Tensor();
  auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 block(kBD, kTY);
  const int64_t dchunks = cdiv(D, kBD);
  TORCH_CHECK(dchunks <= 65535, op, ": d = ", D, " is too large");
  const auto dtype = y.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "side_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t rows = ksize ? num_prefix : N;  // rows that get θ(h) only
    if (rows > 0) {
      const size_t smem = sizeof(acc_t) * (K * kPitch + kBM * K);
      auto kernel = side_rows_fwd_kernel<scalar_t>;
      allow_smem(kernel, smem, op);
      const dim3 grid(static_cast<unsigned>(cdiv(B * rows, kBM)), static_cast<unsigned>(dchunks));
      kernel<<<grid, block, smem, stream>>>(
          y.const_data_ptr<scalar_t>(), y.stride(0), y.stride(1), taps.const_data_ptr<scalar_t>(),
          taps.stride(0), taps.stride(1), ups.const_data_ptr<scalar_t>(),
          out.mutable_data_ptr<scalar_t>(), B, rows, N, D, static_cast<int>(K),
          beta);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (ksize) {
      const int64_t halo = kTile + ksize - 1;
      const int64_t tiles_w = cdiv(grid_w, kTile), tiles = cdiv(grid_h, kTile) * tiles_w;
      TORCH_CHECK(B * tiles < (int64_t(1) << 31), op, ": too many grid tiles");
      const size_t smem = sizeof(acc_t) * kPitch * (K + ksize * ksize + halo * halo);
      auto kernel = side_conv_fwd_kernel<scalar_t>;
      allow_smem(kernel, smem, op);
      const dim3 grid(static_cast<unsigned>(B * tiles), static_cast<unsigned>(dchunks));
      kernel<<<grid, block, smem, stream>>>(
          y.const_data_ptr<scalar_t>(), y.stride(0), y.stride(1), taps.const_data_ptr<scalar_t>(),
          taps.stride(0), taps.stride(1), ups.const_data_ptr<scalar_t>(),
          w.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), N, D,
          static_cast<int>(K), static_cast<int>(num_prefix), static_cast<int>(grid_h),
          static_cast<int>(grid_w), static_cast<int>(ksize), static_cast<int>(tiles_w),
          static_cast<int>(tiles), beta);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

template <typename acc_t, typename out_t>
void sum_partials(const at::Tensor& part, at::Tensor& out, int64_t slots, cudaStream_t stream) {
  const int64_t m = out.numel();
  if (m == 0) return;
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>(cdiv(m, threads), 65535));
  sum_partials_kernel<acc_t, out_t><<<blocks, threads, 0, stream>>>(
      part.const_data_ptr<acc_t>(), out.mutable_data_ptr<out_t>(), slots, m);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> side_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& taps_in, const at::Tensor& ups_in,
    const std::optional<at::Tensor>& conv_weight, int64_t grid_h, int64_t grid_w,
    int64_t num_prefix, double beta) {
  const char* op = "dtl_kernels::side_backward";
  const int64_t ksize =
      check_inputs(op, grad_in, taps_in, ups_in, conv_weight, grid_h, grid_w, num_prefix, beta);
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const int64_t B = grad_in.size(0), N = grad_in.size(1), D = grad_in.size(2), K = taps_in.size(2);
  const int64_t kk = ksize * ksize;
  const auto contiguous = at::MemoryFormat::Contiguous;
  at::Tensor grad_taps = at::empty({B, N, K}, taps_in.options().memory_format(contiguous));
  at::Tensor grad_ups = at::empty({D, K}, ups_in.options().memory_format(contiguous));
  at::Tensor grad_conv =
      ksize ? at::empty({D, 1, ksize, ksize}, conv_weight->options().memory_format(contiguous))
            : at::empty({0}, grad_in.options());
  if (B * N == 0 || D == 0) {
    grad_taps.zero_();
    grad_ups.zero_();
    grad_conv.zero_();
    return {grad_taps, grad_ups, grad_conv};
  }
  const at::Tensor g = unit_last(grad_in), taps = unit_last(taps_in), ups = ups_in.contiguous();
  const at::Tensor w = ksize ? conv_weight->reshape({D, kk}).contiguous() : at::Tensor();
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t dchunks = cdiv(D, kBD);
  TORCH_CHECK(dchunks <= 65535, op, ": d = ", D, " is too large");
  const int64_t tiles_per_image = cdiv(N, kBM);
  const int64_t total_tiles = B * tiles_per_image;
  // A fixed number of block rows per device: a few waves, and small partials. Each block
  // walks its tiles in a fixed order, so the result does not depend on scheduling.
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t slots = std::max<int64_t>(1, std::min<int64_t>(total_tiles, (4 * sms) / dchunks));
  const auto acc_type = grad_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_opts = grad_in.options().dtype(acc_type);
  at::Tensor part_taps = at::empty({dchunks, B * N, K}, acc_opts);
  at::Tensor part_ups = at::empty({slots, D, K}, acc_opts);
  at::Tensor part_w = at::empty({ksize ? slots : 0, D, kk}, acc_opts);
  const auto dtype = g.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "side_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t smem = sizeof(acc_t) * (K * kPitch + kk * kPitch + kBM * K + 2 * kBM * kPitch);
    auto kernel = side_bwd_kernel<scalar_t>;
    allow_smem(kernel, smem, op);
    const dim3 grid(static_cast<unsigned>(slots), static_cast<unsigned>(dchunks));
    kernel<<<grid, dim3(kBD, kTY), smem, stream>>>(
        g.const_data_ptr<scalar_t>(), g.stride(0), g.stride(1), taps.const_data_ptr<scalar_t>(),
        taps.stride(0), taps.stride(1), ups.const_data_ptr<scalar_t>(),
        ksize ? w.const_data_ptr<scalar_t>() : nullptr, part_taps.mutable_data_ptr<acc_t>(),
        part_ups.mutable_data_ptr<acc_t>(), ksize ? part_w.mutable_data_ptr<acc_t>() : nullptr, B,
        N, D, static_cast<int>(K), static_cast<int>(num_prefix), static_cast<int>(grid_h),
        static_cast<int>(grid_w), static_cast<int>(ksize), tiles_per_image,
        beta);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sum_partials<acc_t, scalar_t>(part_taps, grad_taps, dchunks, stream);
    sum_partials<acc_t, scalar_t>(part_ups, grad_ups, slots, stream);
    if (ksize) sum_partials<acc_t, scalar_t>(part_w, grad_conv, slots, stream);
  });
  return {grad_taps, grad_ups, grad_conv};
}

}  // namespace
}  // namespace dtl

TORCH_LIBRARY_IMPL(dtl_kernels, CUDA, m) {
  m.impl("side_forward", &dtl::side_forward_cuda);
  m.impl("side_backward", &dtl::side_backward_cuda);
}
