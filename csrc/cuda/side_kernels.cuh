// Device code of the fused side op (SPEC §2); launched by side.cu as side_plan.h plans it.
//
//   out = y + mix(h),  h = T·Uᵀ,  mix = θ (DTL; prefix rows of DTL+) or, on the H×W patch
//   grid, the depthwise k×k "same" convolution of θ(h) (DTL+);  θ(x) = x·σ(βx).
//   Backward, G = ∂L/∂out:  D = G (rows) or gᵀ(G) (patch grid: Σ_ab w[ab]·G[p − s_ab]);
//   S = θ'(h) ⊙ D;  ∂T = S·U;  ∂U = Sᵀ·T;  ∂w[ab] = Σ_p θ(h[p]) ⊙ G[p − s_ab].
//
// h is never stored: each block rebuilds the BM × BD tile it needs from the taps. The three
// small products (h = T·Uᵀ, ∂T = S·U, ∂U = Sᵀ·T) read shared memory. With 16-bit taps / ups
// (sm_80+) all three run on tensor cores (mma.sync m16n8k16, fp32 sums), h in the forward
// and in its rebuild by the backward alike; otherwise on CUDA cores as 4×4 register micro
// tiles (gemm_accumulate: two 4-wide shared loads per 16 FMAs) in the opmath type (fp32;
// fp64 for fp64). Every summation order is fixed: results are bit-identical run to run, and no
// reduction uses atomics.
//
// Shared-memory layouts (acc_t; "ld" = padded row length):
//   T_s  [k][row]   taps of the tile, for h          T2_s [row][k]   taps, for ∂U (and for
//                                                    h in the ∂U kernels, but the rows
//                                                    one's on CUDA cores where it fits T_s)
//   U_s  [k][ch]    ups of the chunk, for h          U2_s [ch][k]    ups, for ∂T
//   A_s / G_s [pos][ch]  θ(h) (forward) / G (backward) of a tile plus its halo
//   S_s  [ch][row] (∂T kernels) or [row][ch] (∂U kernels)
// This file is included by side.cu and, unchanged, by the CPU emulation in tests/cuda_emu.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "../side_math.h"
#include "side_plan.h"

#ifndef DTL_SMEM
#define DTL_SMEM(name) extern __shared__ __align__(32) unsigned char name[]
#endif

namespace dtl::cuda_side {

template <typename T, int N>
struct alignas(N * sizeof(T)) Vec {
  T v[N];
};

// scalar_t: y, out, G, w; side_t: taps, ups, grad_taps — scalar_t itself, or bfloat16 /
// half beside a float y (the autocast mix). Everything is computed in opmath(scalar_t).
template <typename scalar_t, typename side_t = scalar_t>
struct SideArgs {
  const scalar_t* y;  // (B, N, D) block output (forward) or ∂L/∂out (backward), unit channel stride
  int64_t y_sb, y_sn;
  const side_t* taps;  // (B, N, K), unit last stride
  int64_t t_sb, t_sn;
  const side_t* ups;    // (D, K) contiguous
  const scalar_t* w;    // (D, ks·ks) contiguous, or null
  scalar_t* out;        // forward: (B, N, D) contiguous
  side_t* grad_taps;    // backward: (B, N, K) contiguous
  at::opmath_type<scalar_t>* part_ups;  // backward: (slots, D, K)
  at::opmath_type<scalar_t>* part_w;    // backward: (conv slots, D, ks·ks)
  int64_t B, N, D;
  int K, Kp, P, H, W;
  double beta;
  bool vec;  // y / G rows allow aligned 4-channel vector access (D % 4 == 0, aligned)
};

// -- small helpers -------------------------------------------------------------------------

template <int N, typename acc_t, typename scalar_t>
__device__ __forceinline__ void load_ch(const scalar_t* row, int64_t c, int64_t D, bool vec,
                                        acc_t (&v)[N]) {
  if (vec && c + N <= D) {
    const Vec<scalar_t, N> q = *reinterpret_cast<const Vec<scalar_t, N>*>(row + c);
#pragma unroll
    for (int j = 0; j < N; ++j) v[j] = static_cast<acc_t>(q.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) v[j] = c + j < D ? static_cast<acc_t>(row[c + j]) : acc_t(0);
  }
}

template <int N, typename acc_t, typename scalar_t>
__device__ __forceinline__ void store_ch(scalar_t* row, int64_t c, int64_t D, bool vec,
                                         const acc_t (&v)[N]) {
  if (vec && c + N <= D) {
    Vec<scalar_t, N> q;
#pragma unroll
    for (int j = 0; j < N; ++j) q.v[j] = static_cast<scalar_t>(v[j]);
    *reinterpret_cast<Vec<scalar_t, N>*>(row + c) = q;
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j)
      if (c + j < D) row[c + j] = static_cast<scalar_t>(v[j]);
  }
}

template <typename acc_t>
__device__ __forceinline__ Vec<acc_t, 4> lds4(const acc_t* p) {
  return *reinterpret_cast<const Vec<acc_t, 4>*>(p);
}

// Which token a tile row is. Rows mode: rows r0 + i of the B·rpb selected rows (the first
// rpb tokens of every image). Grid mode: position i of an hh×hw window of image b's patch
// grid whose corner is (oi0, oj0); positions off the grid are not rows (taps read as 0).
// Rows mode counts in 32 bits (the host checks B·N < 2^31): a 64-bit division costs ~5×
// more and runs once per staged element.
struct RowsMap {
  int64_t r0, total, rpb;
  __device__ __forceinline__ bool at(int i, int64_t& b, int64_t& n) const {
    const int r = int(r0) + i;
    if (r >= int(total)) return false;
    const int bb = r / int(rpb);
    b = bb;
    n = r - bb * int(rpb);
    return true;
  }
};

struct GridMap {
  int64_t b;
  int oi0, oj0, hh, hw, H, W, P;
  __device__ __forceinline__ bool at(int i, int64_t& bb, int64_t& n) const {
    if (i >= hh * hw) return false;
    const int gi = oi0 + i / hw, gj = oj0 + i % hw;
    if (gi < 0 || gi >= H || gj < 0 || gj >= W) return false;
    bb = b;
    n = P + int64_t(gi) * W + gj;
    return true;
  }
};

// U_s[k][j] = U[c0 + j][k] (ld ldu), zero past D.
template <typename acc_t, typename scalar_t>
__device__ void stage_ups_kc(acc_t* U_s, int ldu, const scalar_t* ups, int64_t c0, int bd,
                             int64_t D, int K) {
  for (int i = threadIdx.x; i < bd * K; i += kThreads) {
    const int j = i / K, k = i - j * K;
    U_s[k * ldu + j] = c0 + j < D ? static_cast<acc_t>(ups[(c0 + j) * K + k]) : acc_t(0);
  }
}

// U2_s[j][k] = U[c0 + j][k] (ld Kp), zero past D and past K.
template <typename acc_t, typename scalar_t>
__device__ void stage_ups_ck(acc_t* U2_s, int Kp, const scalar_t* ups, int64_t c0, int bd,
                             int64_t D, int K) {
  for (int i = threadIdx.x; i < bd * Kp; i += kThreads) {
    const int j = i / Kp, k = i - j * Kp;
    U2_s[i] = (c0 + j < D && k < K) ? static_cast<acc_t>(ups[(c0 + j) * K + k]) : acc_t(0);
  }
}

// w_s[ab][j] = w[c0 + j][ab] (ld bd), zero past D.
template <typename acc_t, typename scalar_t>
__device__ void stage_conv(acc_t* w_s, const scalar_t* w, int64_t c0, int bd, int64_t D, int kk) {
  for (int i = threadIdx.x; i < bd * kk; i += kThreads) {
    const int j = i / kk, ab = i - j * kk;
    w_s[ab * bd + j] = c0 + j < D ? static_cast<acc_t>(w[(c0 + j) * kk + ab]) : acc_t(0);
  }
}

// Taps of rows 0..bm-1 of `map`: T_s[k][i] (ld ldt) if T_s, T2_s[i][k] (ld Kp, zero past K)
// if T2_s.
template <typename acc_t, typename scalar_t, typename side_t, typename Map>
__device__ void stage_taps(acc_t* T_s, int ldt, acc_t* T2_s, int Kp, const SideArgs<scalar_t, side_t>& a,
                           const Map& map, int bm) {
  for (int idx = threadIdx.x; idx < bm * Kp; idx += kThreads) {
    const int i = idx / Kp, k = idx - i * Kp;
    int64_t b, n;
    acc_t v = 0;
    if (k < a.K && map.at(i, b, n)) v = static_cast<acc_t>(a.taps[b * a.t_sb + n * a.t_sn + k]);
    if (T_s != nullptr && k < a.K) T_s[k * ldt + i] = v;
    if (T2_s != nullptr) T2_s[idx] = v;
  }
}

// A (channels) tile of G rows of `map` into G_s[pos][ch] (ld bd), zero off the grid / past D.
template <typename acc_t, typename scalar_t, typename side_t, typename Map>
__device__ void stage_rows_ch(acc_t* G_s, const SideArgs<scalar_t, side_t>& a, const Map& map, int npos,
                              int64_t c0, int bd) {
  const int quads = bd / 4;
  for (int idx = threadIdx.x; idx < npos * quads; idx += kThreads) {
    const int i = idx / quads, q = idx - i * quads;
    int64_t b, n;
    acc_t v[4] = {0, 0, 0, 0};
    if (map.at(i, b, n)) load_ch<4>(a.y + b * a.y_sb + n * a.y_sn, c0 + 4 * q, a.D, a.vec, v);
    *reinterpret_cast<Vec<acc_t, 4>*>(G_s + i * bd + 4 * q) = Vec<acc_t, 4>{{v[0], v[1], v[2], v[3]}};
  }
}

// -- the micro-tiled product -----------------------------------------------------------------
// OUT (M×N, both multiples of 4) = Σ_{s<S} A[s·lda + m] · B[s·ldb + n]. Micro tile t covers
// rows 4·(t / (N/4)) … +3 and columns 4·(t % (N/4)) … +3 (n fastest: a warp's global accesses
// of the epilogue follow the channels). With fewer micro tiles than threads, `groups` threads
// share a tile, each summing a contiguous part of s; combine_groups adds their results in
// group order (deterministic).
struct Gemm {
  int M, N, S, tiles, groups;
  __device__ Gemm(int m, int n, int s) : M(m), N(n), S(s) {
    tiles = (m / 4) * (n / 4);
    groups = tiles >= kThreads ? 1 : kThreads / tiles;
  }
  __device__ int group() const { return groups == 1 ? 0 : threadIdx.x / tiles; }
  __device__ int tile(int u) const {
    return groups == 1 ? threadIdx.x + u * kThreads : (u == 0 ? threadIdx.x % tiles : tiles);
  }
  __device__ int m0(int t) const { return 4 * (t / (N / 4)); }
  __device__ int n0(int t) const { return 4 * (t % (N / 4)); }
};

template <int U, typename acc_t>
__device__ __forceinline__ void zero_tiles(acc_t (&acc)[U][4][4]) {
#pragma unroll
  for (int u = 0; u < U; ++u)
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[u][i][j] = 0;
}

template <int U, typename acc_t>
__device__ void gemm_accumulate(const acc_t* A, int lda, const acc_t* B, int ldb, const Gemm& g,
                                acc_t (&acc)[U][4][4]) {
  const int grp = g.group();
  if (grp >= g.groups) return;
  const int s0 = int(int64_t(g.S) * grp / g.groups), s1 = int(int64_t(g.S) * (grp + 1) / g.groups);
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int t = g.tile(u);
    if (t >= g.tiles) continue;
    const acc_t* pa = A + g.m0(t);
    const acc_t* pb = B + g.n0(t);
#pragma unroll 4
    for (int s = s0; s < s1; ++s) {
      const Vec<acc_t, 4> x = lds4(pa + s * lda), z = lds4(pb + s * ldb);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[u][i][j] += x.v[i] * z.v[j];
    }
  }
}

// gemm_accumulate with A stored [m][s] (ld lda, a multiple of 4) instead of [s][m]: h rebuilt
// from the taps copy [row][k] that the ∂U product reads too (micro_h<true>). Four s per
// step (four 16-byte loads of A, four of B) keeps gemm_accumulate's loads per FMA, and each
// sum still runs in s order. With N = 32 (the ∂U tiles) the 8 threads of a quarter warp
// share m0, so A's loads are broadcasts.
template <int U, typename acc_t>
__device__ void gemm_accumulate_ms(const acc_t* A, int lda, const acc_t* B, int ldb, const Gemm& g,
                                   acc_t (&acc)[U][4][4]) {
  const int grp = g.group();
  if (grp >= g.groups) return;
  const int quads = (g.S + 3) / 4;  // the groups split s in whole quads (aligned loads)
  const int s0 = 4 * int(int64_t(quads) * grp / g.groups);
  const int s1q = 4 * int(int64_t(quads) * (grp + 1) / g.groups), s1 = s1q < g.S ? s1q : g.S;
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int t = g.tile(u);
    if (t >= g.tiles) continue;
    const acc_t* pa = A + g.m0(t) * lda;
    const acc_t* pb = B + g.n0(t);
    int s = s0;
    for (; s + 4 <= s1; s += 4) {
      Vec<acc_t, 4> x[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) x[i] = lds4(pa + i * lda + s);
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const Vec<acc_t, 4> z = lds4(pb + (s + c) * ldb);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[u][i][j] += x[i].v[c] * z.v[j];
      }
    }
    for (; s < s1; ++s) {  // K not a multiple of 4
      const Vec<acc_t, 4> z = lds4(pb + s * ldb);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[u][i][j] += pa[i * lda + s] * z.v[j];
    }
  }
}

// out[m·ldo + n] += the groups' sums, group 0 first; out must be zero (or hold a running
// total). Every thread of the block must call it.
template <int U, typename acc_t>
__device__ void combine_groups(const Gemm& g, const acc_t (&acc)[U][4][4], acc_t* out, int ldo) {
  for (int grp = 0; grp < g.groups; ++grp) {
    if (g.group() == grp) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int t = g.tile(u);
        if (t >= g.tiles) continue;
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) out[(g.m0(t) + i) * ldo + g.n0(t) + j] += acc[u][i][j];
      }
    }
    __syncthreads();
  }
}

// -- the reduction products of the backward on tensor cores ---------------------------------
// ∂T = S·U and ∂U = Sᵀ·T are long reductions (over d, over rows) into a narrow K: with
// 16-bit taps / ups they run on mma.sync m16n8k16 (sm_80+), S rounded to the taps' dtype as
// the operands of a 16-bit matmul are, sums in fp32. Same contract as gemm_accumulate +
// combine_groups: OUT (M × N) = Σ_{s<S} A[s·lda + m] · B[s·ldb + n], with M and S multiples
// of 16 (every plan's tiles are) and N a multiple of 4; columns past N read as 0.

#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800) || defined(DTL_EMU_NO_MMA)  // (or emulating that)
constexpr bool kMmaBuilt = false;  // no bf16 mma.sync before sm_80: the CUDA-core product
#else
constexpr bool kMmaBuilt = true;
#endif
constexpr int kWarps = kThreads / 32;

// Two floats rounded to mma_t (bf16 / half) in one register, the first in the low half.
template <typename mma_t>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  return uint32_t(mma_t(lo).x) | (uint32_t(mma_t(hi).x) << 16);
}

// d += A·B for the warp (fragments as PTX lays them out for m16n8k16).
template <typename mma_t>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4],
                                          const uint32_t (&b)[2]) {
#if defined(DTL_CUDA_EMULATION)
  emu::mma_m16n8k16<mma_t>(d, a, b);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<mma_t, c10::BFloat16>)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

#if defined(DTL_CUDA_EMULATION)
#define DTL_TRAP() std::abort()
#elif defined(__CUDA_ARCH__)
#define DTL_TRAP() __trap()
#else
#define DTL_TRAP() ((void)0)
#endif

// Warp w owns the 16×8 output tiles w, w + kWarps, … (at most U); with fewer tiles than
// warps, `groups` warps share a tile, each summing a contiguous share of S (whole 16-steps),
// and combine() adds their sums in group order: deterministic, like combine_groups.
// MaxM bounds M (the plans' tiles: ∂T ≤ 64 rows, ∂U 32 channels), so that U — and the
// accumulator registers, U × 4 — cover M / 16 × kMaxK / 8 tiles and no more.
template <typename mma_t, int MaxM>
struct MmaProduct {
  static constexpr int U = ((MaxM / 16) * (kMaxK / 8) + kWarps - 1) / kWarps;
  int N, tn, tiles, groups, k0, k1;
  float c[U][4];
  __device__ MmaProduct(int m, int n, int s) : N(n) {
    tn = (n + 7) / 8;
    tiles = (m / 16) * tn;
    if (m > MaxM || n > kMaxK || m % 16 || s % 16) DTL_TRAP();  // a plan outside these bounds
    groups = tiles >= kWarps ? 1 : kWarps / tiles;
    const int steps = s / 16, grp = group();
    k0 = steps * grp / groups;
    k1 = steps * (grp + 1) / groups;
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int i = 0; i < 4; ++i) c[u][i] = 0.f;
  }
  __device__ int warp() const { return int(threadIdx.x) / 32; }
  __device__ int group() const { return groups == 1 ? 0 : warp() / tiles; }
  __device__ int tile(int u) const {
    return groups == 1 ? warp() + u * kWarps : (u == 0 ? warp() % tiles : tiles);
  }

  // Every lane of a warp takes the same branches (warp-uniform), as mma.sync requires.
  __device__ void accumulate(const float* A, int lda, const float* B, int ldb) {
    if (group() >= groups) return;
    const int lane = int(threadIdx.x) % 32, g = lane / 4, t2 = 2 * (lane % 4);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int tl = tile(u);
      if (tl >= tiles) break;
      const int m = 16 * (tl / tn) + g, n = 8 * (tl % tn) + g;
      for (int ks = k0; ks < k1; ++ks) {
        const float* pa = A + (16 * ks + t2) * lda + m;
        uint32_t a[4];
        a[0] = pack2<mma_t>(pa[0], pa[lda]);
        a[1] = pack2<mma_t>(pa[8], pa[lda + 8]);
        a[2] = pack2<mma_t>(pa[8 * lda], pa[9 * lda]);
        a[3] = pack2<mma_t>(pa[8 * lda + 8], pa[9 * lda + 8]);
        uint32_t b[2] = {0u, 0u};
        if (n < N) {
          const float* pb = B + (16 * ks + t2) * ldb + n;
          b[0] = pack2<mma_t>(pb[0], pb[ldb]);
          b[1] = pack2<mma_t>(pb[8 * ldb], pb[9 * ldb]);
        }
        mma_16816<mma_t>(c[u], a, b);
      }
    }
  }

  // out[m·ldo + n] += the sums, group 0 first; every thread of the block must call it.
  __device__ void combine(float* out, int ldo) const {
    const int lane = int(threadIdx.x) % 32, g = lane / 4, t2 = 2 * (lane % 4);
    for (int grp = 0; grp < groups; ++grp) {
      if (group() == grp) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int tl = tile(u);
          if (tl >= tiles) break;
          const int m = 16 * (tl / tn) + g, n = 8 * (tl % tn) + t2;
#pragma unroll
          for (int i = 0; i < 4; ++i)
            if (n + (i & 1) < N) out[(m + 8 * (i >> 1)) * ldo + n + (i & 1)] += c[u][i];
        }
      }
      __syncthreads();
    }
  }
};

// The CUDA-core product (4×4 micro tiles, see gemm_accumulate) behind the same interface;
// MaxM bounds M as for MmaProduct, so a thread holds only the micro tiles M × kMaxK needs
// (∂U: one, which keeps the conv ∂U kernel within 128 registers).
template <typename acc_t, int MaxM>
struct CoreProduct {
  static constexpr int U = ((MaxM / 4) * (kMaxK / 4) + kThreads - 1) / kThreads;
  Gemm g;
  acc_t acc[U][4][4];
  __device__ CoreProduct(int m, int n, int s) : g(m, n, s) {
    if (m > MaxM || n > kMaxK) DTL_TRAP();  // a plan outside these bounds
    zero_tiles(acc);
  }
  __device__ void accumulate(const acc_t* A, int lda, const acc_t* B, int ldb) {
    gemm_accumulate(A, lda, B, ldb, g, acc);
  }
  __device__ void combine(acc_t* out, int ldo) const { combine_groups(g, acc, out, ldo); }
};

template <typename T>
constexpr bool kSixteenBit = std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

// Products run on tensor cores for 16-bit taps / ups (fp32 sums), on CUDA cores otherwise.
template <typename acc_t, typename side_t>
constexpr bool kTensorCores = kMmaBuilt && kSixteenBit<side_t> && std::is_same_v<acc_t, float>;

// The backward's reduction product for these dtypes, with at most MaxM output rows.
template <typename acc_t, typename side_t, int MaxM>
using Product = std::conditional_t<kTensorCores<acc_t, side_t>, MmaProduct<side_t, MaxM>,
                                   CoreProduct<acc_t, MaxM>>;
constexpr int kDtMaxRows = 64;      // ∂T products: M = the tile's rows (plans: 16 … 64)
constexpr int kDuMaxChannels = 32;  // ∂U products: M = the chunk's channels (plans: 32)

// -- h on tensor cores (forward, and its rebuild in the backward) ---------------------------
// h = T·Uᵀ of an M × N tile (taps T_s[k][row], or T_s[row][k] where kTapsRK; ups U_s[k][ch];
// K ≤ kMaxK zero-padded to 16) for 16-bit taps / ups: exact 16-bit operands (staged from
// 16-bit values), fp32 sums.
// Warp w owns the consecutive 16×8 tiles w·U … w·U + U − 1, n fastest: with the plans' tiles
// (M·N = 4096, N ≤ 256) they share one row strip, so A's fragment is loaded once per k-step
// and a warp's epilogue runs along contiguous channels. Every element's sum runs over the
// same k-steps in the same order whatever the tile, in the forward and in the backward's
// rebuild. [row][k] taps need an even ld and zeros in columns K … ld − 1 (stage_taps writes
// them): a fragment's pair (k, k + 1) is then one 8-byte load, and with ld ≡ 8 or 24
// (mod 32) — K = 24, 72 — a half warp's pairs fall in distinct banks. The CUDA-core micro
// tile stays for fp32 and fp64 taps.
template <int U>
struct MmaTiles {
  int tn, tiles;
  __device__ MmaTiles(int m, int n) : tn(n / 8), tiles((m / 16) * (n / 8)) {
    if (m % 16 || n % 8 || tiles > U * kWarps) DTL_TRAP();  // a plan outside these bounds
  }
  // f(u, half, row, ch) for the pairs (row, ch), (row, ch + 1) the thread's tile u holds:
  // accumulator registers 2·half and 2·half + 1.
  template <typename F>
  __device__ void each(F&& f) const {
    const int lane = int(threadIdx.x) % 32, g = lane / 4, t2 = 2 * (lane % 4);
    const int first = (int(threadIdx.x) / 32) * U;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int tl = first + u;
      if (tl >= tiles) break;
      const int r = 16 * (tl / tn) + g, ch = 8 * (tl % tn) + t2;
      f(u, 0, r, ch);
      f(u, 1, r + 8, ch);
    }
  }
};

constexpr int kMmaHTiles = 4;  // 16×8 tiles of h per warp: U of MmaH and of the G prefetch

template <typename mma_t, bool kTapsRK = false, int U = kMmaHTiles>
struct MmaH {
  MmaTiles<U> lay;
  float c[U][4];
  __device__ MmaH(const float* T_s, int ldt, const float* U_s, int ldu, int m, int n, int K)
      : lay(m, n) {
    const int lane = int(threadIdx.x) % 32, g = lane / 4, t2 = 2 * (lane % 4);
    const int first = (int(threadIdx.x) / 32) * U;
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int i = 0; i < 4; ++i) c[u][i] = 0.f;
    // taps (k, r) and (k + 1, r) packed (k even); zero past K, where the rows / columns
    // belong to other arrays or are padding
    const auto t_pair = [=](int k, int r) -> uint32_t {
      if constexpr (kTapsRK) {
        if (k >= K) return 0u;
        const Vec<float, 2> p = *reinterpret_cast<const Vec<float, 2>*>(T_s + r * ldt + k);
        return pack2<mma_t>(p.v[0], p.v[1]);
      } else {
        return pack2<mma_t>(k < K ? T_s[k * ldt + r] : 0.f, k + 1 < K ? T_s[(k + 1) * ldt + r] : 0.f);
      }
    };
    const auto u_at = [=](int k, int ch) { return k < K ? U_s[k * ldu + ch] : 0.f; };
    for (int k0 = 0; k0 < K; k0 += 16) {
      const int k = k0 + t2;
      int strip = -1;
      uint32_t a[4];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int tl = first + u;
        if (tl >= lay.tiles) break;
        if (tl / lay.tn != strip) {  // warp-uniform
          strip = tl / lay.tn;
          const int r = 16 * strip + g;
          a[0] = t_pair(k, r);
          a[1] = t_pair(k, r + 8);
          a[2] = t_pair(k + 8, r);
          a[3] = t_pair(k + 8, r + 8);
        }
        const int col = 8 * (tl % lay.tn) + g;
        const uint32_t b[2] = {pack2<mma_t>(u_at(k, col), u_at(k + 1, col)),
                               pack2<mma_t>(u_at(k + 8, col), u_at(k + 9, col))};
        mma_16816<mma_t>(c[u], a, b);
      }
    }
  }
  // f(u, half, row, ch, h0, h1): h at (row, ch) and (row, ch + 1) for each pair the thread
  // holds (see MmaTiles::each).
  template <typename F>
  __device__ void pairs(F&& f) const {
    lay.each([&](int u, int half, int r, int ch) { f(u, half, r, ch, c[u][2 * half], c[u][2 * half + 1]); });
  }
  // f(row, ch, h0, h1)
  template <typename F>
  __device__ void each(F&& f) const {
    pairs([&](int, int, int r, int ch, float h0, float h1) { f(r, ch, h0, h1); });
  }
};

template <typename acc_t>
__device__ void zero_smem(acc_t* p, int n) {
  for (int i = threadIdx.x; i < n; i += kThreads) p[i] = 0;
}

// h = T·Uᵀ for the thread's 4×4 micro tile of a bm × bd tile (taps T_s[k][row], or
// T_s[row][k] where kTapsRK: the conv ∂U kernel's one copy, and the rows ∂U's where its plan
// has no room for a [k][row] copy; ups U_s[k][ch]); returns the product's plan, whose
// tile(0) / m0 / n0 place the micro tile.
template <bool kTapsRK = false, typename acc_t, typename scalar_t, typename side_t>
__device__ Gemm micro_h(const SideArgs<scalar_t, side_t>& a, const acc_t* T_s, int ldt, const acc_t* U_s,
                        int ldu, int bm, int bd, acc_t (&h)[1][4][4]) {
  const Gemm g(bm, bd, a.K);
  zero_tiles(h);
  if constexpr (kTapsRK)
    gemm_accumulate_ms(T_s, ldt, U_s, ldu, g, h);
  else
    gemm_accumulate(T_s, ldt, U_s, ldu, g, h);
  return g;
}

// G (or y) of the thread's micro tile, 4 rows × 4 channels from c0 + n0, zero off the rows.
template <typename acc_t, typename scalar_t, typename side_t, typename Map>
__device__ void load_micro_tile(const SideArgs<scalar_t, side_t>& a, const Map& map, const Gemm& g,
                                int64_t c0, acc_t (&v)[4][4]) {
  const int t = g.tile(0);
  for (int i = 0; i < 4; ++i) {
    int64_t b, n;
    for (int j = 0; j < 4; ++j) v[i][j] = 0;
    if (map.at(g.m0(t) + i, b, n))
      load_ch<4>(a.y + b * a.y_sb + n * a.y_sn, c0 + g.n0(t), a.D, a.vec, v[i]);
  }
}

// The same for the pairs a thread holds in MmaH's accumulators: v[u][2·half + {0, 1}].
template <typename acc_t, typename scalar_t, typename side_t, typename Map>
__device__ void load_mma_pairs(const SideArgs<scalar_t, side_t>& a, const Map& map,
                               const MmaTiles<kMmaHTiles>& lay, int64_t c0, acc_t (&v)[kMmaHTiles][4]) {
  lay.each([&](int u, int half, int r, int ch) {
    int64_t b, n;
    acc_t q[2] = {0, 0};
    if (map.at(r, b, n)) load_ch<2>(a.y + b * a.y_sb + n * a.y_sn, c0 + ch, a.D, a.vec, q);
    v[u][2 * half] = q[0];
    v[u][2 * half + 1] = q[1];
  });
}

// G of the thread's elements of h for the step at channel c0, in the layout the step's h
// will have: the micro tile (CUDA cores) or the mma pairs (tensor cores). Issued before the
// step's staging so the loads are in flight meanwhile.
template <typename acc_t, typename scalar_t, typename side_t, typename Map>
__device__ void load_h_layout(const SideArgs<scalar_t, side_t>& a, const Map& map, int bm, int bd,
                              int64_t c0, acc_t (&v)[4][4]) {
  if constexpr (kTensorCores<acc_t, side_t>)
    load_mma_pairs(a, map, MmaTiles<kMmaHTiles>(bm, bd), c0, v);
  else
    load_micro_tile(a, map, Gemm(bm, bd, a.K), c0, v);
}

// -- depthwise k×k on a tile in shared memory -----------------------------------------------
// For each output (oi, oj) of a th×tw tile and each channel j < bd:
//   v = Σ_{a,b<KS} wk[a][b][j] · src[((oi + a)·sw + oj + b)·bd + j]
// with wk = w (FLIP false) or w rotated by 180° (FLIP true: the transposed convolution).
// Each thread handles VC channels × RO outputs down a column, sliding over the window rows,
// and hands every result to emit(oi, oj, j, v[VC]).
template <int KS>
struct ConvShape {
  static constexpr int VC = KS <= 3 ? 4 : (KS <= 5 ? 2 : 1);  // weights in registers: ≤ 50
  static constexpr int RO = 4;
};

template <int KS, bool FLIP, typename acc_t, typename Emit>
__device__ void conv_tile(const acc_t* src, int sw, int sh, const acc_t* w_s, int bd, int th,
                          int tw, Emit emit) {
  constexpr int VC = ConvShape<KS>::VC, RO = ConvShape<KS>::RO;
  const int groups = bd / VC, blocks = (th + RO - 1) / RO;
  for (int item = threadIdx.x; item < groups * tw * blocks; item += kThreads) {
    const int cg = item % groups, rest = item / groups;
    const int oj = rest % tw, i0 = (rest / tw) * RO;
    const int j0 = cg * VC;
    acc_t wk[KS][KS][VC];
#pragma unroll
    for (int x = 0; x < KS; ++x)
#pragma unroll
      for (int z = 0; z < KS; ++z)
#pragma unroll
        for (int v = 0; v < VC; ++v) {
          const int ab = FLIP ? (KS - 1 - x) * KS + (KS - 1 - z) : x * KS + z;
          wk[x][z][v] = w_s[ab * bd + j0 + v];
        }
    acc_t acc[RO][VC];
#pragma unroll
    for (int o = 0; o < RO; ++o)
#pragma unroll
      for (int v = 0; v < VC; ++v) acc[o][v] = 0;
#pragma unroll
    for (int wr = 0; wr < RO + KS - 1; ++wr) {
      const int r = i0 + wr;
      if (r >= sh) break;
      acc_t row[KS][VC];
#pragma unroll
      for (int z = 0; z < KS; ++z)
#pragma unroll
        for (int v = 0; v < VC; ++v) row[z][v] = src[(r * sw + oj + z) * bd + j0 + v];
#pragma unroll
      for (int x = 0; x < KS; ++x) {
        const int o = wr - x;  // output row (in the block) that window row x of r feeds
        if (o < 0 || o >= RO) continue;
#pragma unroll
        for (int z = 0; z < KS; ++z)
#pragma unroll
          for (int v = 0; v < VC; ++v) acc[o][v] += wk[x][z][v] * row[z][v];
      }
    }
#pragma unroll
    for (int o = 0; o < RO; ++o)
      if (i0 + o < th) emit(i0 + o, oj, j0, acc[o]);
  }
}

// Tile `tile` of `tiles` in image b: corner and size (clipped at the grid's edge).
struct TileAt {
  int64_t b;
  int ti0, tj0, th, tw;
};
__device__ __forceinline__ TileAt tile_at(int64_t tile, const Tiles& t, int H, int W) {
  TileAt r;
  const int64_t per = int64_t(t.rows) * t.cols;
  r.b = tile / per;
  const int tt = int(tile - r.b * per);
  r.ti0 = (tt / t.cols) * t.th;
  r.tj0 = (tt % t.cols) * t.tw;
  r.th = t.th < H - r.ti0 ? t.th : H - r.ti0;
  r.tw = t.tw < W - r.tj0 ? t.tw : W - r.tj0;
  return r;
}

// =========================================================================================
// Forward
// =========================================================================================

// Rows (DTL, or the prefix rows of DTL+): out = y + θ(h) for the bm × bd tile (bx, by) of
// the rows' grid (cdiv(rows, bm), cdiv(D, bd)).
template <typename scalar_t, typename side_t>
__device__ __forceinline__ void fwd_rows_tile(const SideArgs<scalar_t, side_t>& a, int64_t rpb,
                                              int bm, int bd, int64_t bx, int64_t by) {
  using acc_t = at::opmath_type<scalar_t>;
  DTL_SMEM(smem_raw);
  const int ldt = bm + kPad, ldu = bd + kPad;
  acc_t* T_s = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* U_s = T_s + a.K * ldt;
  const RowsMap map{bx * bm, a.B * rpb, rpb};
  const int64_t c0 = by * bd;
  stage_ups_kc(U_s, ldu, a.ups, c0, bd, a.D, a.K);
  stage_taps(T_s, ldt, static_cast<acc_t*>(nullptr), a.Kp, a, map, bm);
  __syncthreads();
  const acc_t beta = static_cast<acc_t>(a.beta);
  if constexpr (kTensorCores<acc_t, side_t>) {
    const MmaH<side_t> h(T_s, ldt, U_s, ldu, bm, bd, a.K);
    h.each([&](int r, int ch, float h0, float h1) {
      int64_t b, n;
      if (!map.at(r, b, n)) return;
      acc_t v[2];
      load_ch<2>(a.y + b * a.y_sb + n * a.y_sn, c0 + ch, a.D, a.vec, v);
      v[0] += theta<acc_t>(h0, beta);
      v[1] += theta<acc_t>(h1, beta);
      store_ch<2>(a.out + (b * a.N + n) * a.D, c0 + ch, a.D, a.vec, v);
    });
    return;
  }
  acc_t h[1][4][4];
  const Gemm g = micro_h(a, T_s, ldt, U_s, ldu, bm, bd, h);
  const int t = g.tile(0);
  const int64_t c = c0 + g.n0(t);
  for (int i = 0; i < 4; ++i) {
    int64_t b, n;
    if (!map.at(g.m0(t) + i, b, n)) break;
    acc_t v[4];
    load_ch<4>(a.y + b * a.y_sb + n * a.y_sn, c, a.D, a.vec, v);
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] += theta<acc_t>(h[0][i][j], beta);
    store_ch<4>(a.out + (b * a.N + n) * a.D, c, a.D, a.vec, v);
  }
}

// grid (cdiv(rows, bm), cdiv(D, bd)).
template <typename scalar_t, typename side_t>
__global__ void __launch_bounds__(kThreads)
    fwd_rows_kernel(const SideArgs<scalar_t, side_t> a, int64_t rpb, int bm, int bd) {
  fwd_rows_tile(a, rpb, bm, bd, int64_t(blockIdx.x), int64_t(blockIdx.y));
}

// With 16-bit taps / ups the conv forward also runs DTL+'s prefix rows (one launch fewer),
// compiled for 3 blocks per SM (≤ 85 registers: what it reaches without them, no spills);
// float32 / float64 taps keep the rows launch (their rows code would spill under that bound).
// Host and device agree on it for every architecture (tensor cores or not).
template <typename scalar_t, typename side_t>
constexpr bool kFoldPrefixRows = kSixteenBit<side_t> && std::is_same_v<at::opmath_type<scalar_t>, float>;
template <typename scalar_t, typename side_t>
constexpr int kFwdConvBlocks = kFoldPrefixRows<scalar_t, side_t> && kMmaBuilt ? 3 : 0;  // (below
// sm_80 the CUDA-core h of the folded rows spilled 4 B under that bound; a device-only choice)

// Patch grid of DTL+: out[p] = y[p] + Σ_ab w[ab]·θ(h[p + s_ab]). One block per spatial tile
// and chunk of bd channels: θ(h) of the tile plus its halo (zero off the grid) is built in
// shared memory in passes of bm positions, then convolved. grid (row_blocks + B·tiles,
// cdiv(D, bd)): where kFoldPrefixRows, the first row_blocks blocks are the prefix rows'
// (rpb per image, bm × bd tiles): they start first and add no tail.
template <typename scalar_t, typename side_t, int KS>
__global__ void __launch_bounds__(kThreads, kFwdConvBlocks<scalar_t, side_t>)
    fwd_conv_kernel(const SideArgs<scalar_t, side_t> a, const Tiles tiles, int bm, int bd,
                    int64_t rpb, int64_t row_blocks) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (kFoldPrefixRows<scalar_t, side_t>) {
    if (int64_t(blockIdx.x) < row_blocks) {  // block-uniform
      fwd_rows_tile(a, rpb, bm, bd, int64_t(blockIdx.x), int64_t(blockIdx.y));
      return;
    }
  } else if (row_blocks != 0) {
    DTL_TRAP();  // a launch that disagrees with kFoldPrefixRows
  }
  DTL_SMEM(smem_raw);
  const int ldt = bm + kPad, ldu = bd + kPad, pad = same_pad_before(KS);
  const TileAt tl = tile_at(int64_t(blockIdx.x) - row_blocks, tiles, a.H, a.W);
  const int hh = tl.th + KS - 1, hw = tl.tw + KS - 1;
  acc_t* T_s = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* U_s = T_s + a.K * ldt;
  acc_t* w_s = U_s + a.K * ldu;
  acc_t* A_s = w_s + KS * KS * bd;  // [hh·hw][bd]
  const int64_t c0 = int64_t(blockIdx.y) * bd;
  stage_ups_kc(U_s, ldu, a.ups, c0, bd, a.D, a.K);
  stage_conv(w_s, a.w, c0, bd, a.D, KS * KS);
  const GridMap halo{tl.b, tl.ti0 - pad, tl.tj0 - pad, hh, hw, a.H, a.W, a.P};
  const acc_t beta = static_cast<acc_t>(a.beta);
  for (int p0 = 0; p0 < hh * hw; p0 += bm) {
    __syncthreads();  // T_s of the previous pass is no longer read
    // taps of halo positions p0 … p0 + bm − 1 (a shifted view of the halo map)
    for (int idx = threadIdx.x; idx < bm * a.K; idx += kThreads) {
      const int i = idx / a.K, k = idx - i * a.K;
      int64_t b, n;
      acc_t v = 0;
      if (halo.at(p0 + i, b, n)) v = static_cast<acc_t>(a.taps[b * a.t_sb + n * a.t_sn + k]);
      T_s[k * ldt + i] = v;
    }
    __syncthreads();
    if constexpr (kTensorCores<acc_t, side_t>) {
      const MmaH<side_t> h(T_s, ldt, U_s, ldu, bm, bd, a.K);
      h.each([&](int r, int ch, float h0, float h1) {
        if (p0 + r < hh * hw)  // θ(0) = 0 off the grid
          *reinterpret_cast<Vec<acc_t, 2>*>(A_s + (p0 + r) * bd + ch) =
              Vec<acc_t, 2>{{theta<acc_t>(h0, beta), theta<acc_t>(h1, beta)}};
      });
      continue;
    }
    acc_t h[1][4][4];
    const Gemm g = micro_h(a, T_s, ldt, U_s, ldu, bm, bd, h);
    const int t = g.tile(0);
    for (int i = 0; i < 4; ++i) {
      const int pos = p0 + g.m0(t) + i;
      if (pos >= hh * hw) break;
      Vec<acc_t, 4> v;
#pragma unroll
      for (int j = 0; j < 4; ++j) v.v[j] = theta<acc_t>(h[0][i][j], beta);  // θ(0) = 0 off grid
      *reinterpret_cast<Vec<acc_t, 4>*>(A_s + pos * bd + g.n0(t)) = v;
    }
  }
  __syncthreads();
  constexpr int VC = ConvShape<KS>::VC;
  conv_tile<KS, false>(A_s, hw, hh, w_s, bd, tl.th, tl.tw,
                       [&](int oi, int oj, int j0, const acc_t (&v)[VC]) {
                         const int64_t n = a.P + int64_t(tl.ti0 + oi) * a.W + tl.tj0 + oj;
                         acc_t o[VC];
                         load_ch<VC>(a.y + tl.b * a.y_sb + n * a.y_sn, c0 + j0, a.D, a.vec, o);
#pragma unroll
                         for (int x = 0; x < VC; ++x) o[x] += v[x];
                         store_ch<VC>(a.out + (tl.b * a.N + n) * a.D, c0 + j0, a.D, a.vec, o);
                       });
}

// =========================================================================================
// Backward, ∂T: a block covers all D channels of its rows (steps of bd), so ∂T = S·U is
// summed on chip: no partial buffer.
// =========================================================================================

// S of one step for the rows of `map` into S_s[ch][row] (ld lds). D at (row, channel) is
// dval(i, j, row, channel), (i, j) the element's index in load_h_layout's v.
template <typename acc_t, typename scalar_t, typename side_t, typename DVal>
__device__ void rows_S_ck(const SideArgs<scalar_t, side_t>& a, const acc_t* T_s, int ldt, const acc_t* U_s,
                          int ldu, int bm, int bd, acc_t* S_s, int lds, DVal dval) {
  if constexpr (kTensorCores<acc_t, side_t>) {
    const MmaH<side_t> h(T_s, ldt, U_s, ldu, bm, bd, a.K);
    const float beta = static_cast<float>(a.beta);
    h.pairs([&](int u, int half, int r, int ch, float h0, float h1) {
      S_s[ch * lds + r] = theta_grad<float>(h0, beta) * dval(u, 2 * half, r, ch);
      S_s[(ch + 1) * lds + r] = theta_grad<float>(h1, beta) * dval(u, 2 * half + 1, r, ch + 1);
    });
    return;
  }
  acc_t h[1][4][4];
  const Gemm g = micro_h(a, T_s, ldt, U_s, ldu, bm, bd, h);
  const acc_t beta = static_cast<acc_t>(a.beta);
  const int t = g.tile(0);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    Vec<acc_t, 4> s;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const acc_t d = dval(i, j, g.m0(t) + i, g.n0(t) + j);
      s.v[i] = theta_grad<acc_t>(h[0][i][j], beta) * d;
    }
    *reinterpret_cast<Vec<acc_t, 4>*>(S_s + (g.n0(t) + j) * lds + g.m0(t)) = s;
  }
}

// Write ∂T of the tile: sums in dT_s[row][k] (ld Kp).
template <typename acc_t, typename scalar_t, typename side_t, typename Map>
__device__ void write_grad_taps(const SideArgs<scalar_t, side_t>& a, const acc_t* dT_s, const Map& map,
                                int bm) {
  for (int idx = threadIdx.x; idx < bm * a.K; idx += kThreads) {
    const int i = idx / a.K, k = idx - i * a.K;
    int64_t b, n;
    if (map.at(i, b, n)) a.grad_taps[(b * a.N + n) * a.K + k] = static_cast<side_t>(dT_s[i * a.Kp + k]);
  }
}

// Rows: S = θ'(h)·G. grid (cdiv(rows, bm)).
template <typename scalar_t, typename side_t>
__global__ void __launch_bounds__(kThreads)
    dt_rows_kernel(const SideArgs<scalar_t, side_t> a, int64_t rpb, int bm, int bd) {
  using acc_t = at::opmath_type<scalar_t>;
  DTL_SMEM(smem_raw);
  const int ldt = bm + kPad, ldu = bd + kPad, lds = bm + kPad;
  acc_t* T_s = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* U_s = T_s + a.K * ldt;
  acc_t* U2_s = U_s + a.K * ldu;
  acc_t* S_s = U2_s + bd * a.Kp;
  acc_t* dT_s = T_s;  // [bm][Kp] after the loop, over the buffers it no longer reads
  const RowsMap map{int64_t(blockIdx.x) * bm, a.B * rpb, rpb};
  stage_taps(T_s, ldt, static_cast<acc_t*>(nullptr), a.Kp, a, map, bm);
  Product<acc_t, side_t, kDtMaxRows> dt(bm, a.Kp, bd);
  for (int64_t c0 = 0; c0 < a.D; c0 += bd) {
    acc_t gv[4][4];  // G at the thread's elements of h, in flight while U is staged
    load_h_layout(a, map, bm, bd, c0, gv);
    __syncthreads();  // the previous step's U_s / U2_s / S_s are no longer read
    stage_ups_kc(U_s, ldu, a.ups, c0, bd, a.D, a.K);
    stage_ups_ck(U2_s, a.Kp, a.ups, c0, bd, a.D, a.K);
    __syncthreads();
    rows_S_ck(a, T_s, ldt, U_s, ldu, bm, bd, S_s, lds,
              [&](int i, int j, int, int) { return gv[i][j]; });
    __syncthreads();
    dt.accumulate(S_s, lds, U2_s, a.Kp);
  }
  __syncthreads();
  zero_smem(dT_s, bm * a.Kp);
  __syncthreads();
  dt.combine(dT_s, a.Kp);
  write_grad_taps(a, dT_s, map, bm);
}

// Blocks per SM the conv backward kernels (∂T; ∂U / ∂w) are compiled for (0: no bound
// asked): 2 (≤ 128 registers), met without spills (k = 3, 5: codegen.csv). Without it the
// tensor-core fragments take ~160 registers in ∂T, and the float32 ∂U took 155–168 while
// its CUDA-core product held two micro tiles (one now). None for float64, which would
// spill under the cap.
template <typename scalar_t>
constexpr int kConvBwdBlocks = sizeof(at::opmath_type<scalar_t>) == 8 ? 0 : 2;

// Patch grid: D = gᵀ(G) from the tile's G halo. grid (B·tiles).
template <typename scalar_t, typename side_t, int KS>
__global__ void __launch_bounds__(kThreads, kConvBwdBlocks<scalar_t>)
    dt_conv_kernel(const SideArgs<scalar_t, side_t> a, const Tiles tiles, int bm, int bd) {
  using acc_t = at::opmath_type<scalar_t>;
  DTL_SMEM(smem_raw);
  const int ldt = bm + kPad, ldu = bd + kPad, lds = bm + kPad, back = KS - 1 - same_pad_before(KS);
  const TileAt tl = tile_at(blockIdx.x, tiles, a.H, a.W);
  const int gh = tl.th + KS - 1, gw = tl.tw + KS - 1;
  acc_t* T_s = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* U_s = T_s + a.K * ldt;
  acc_t* U2_s = U_s + a.K * ldu;
  acc_t* w_s = U2_s + bd * a.Kp;
  acc_t* G_s = w_s + KS * KS * bd;  // [gh·gw][bd]
  acc_t* S_s = G_s + gh * gw * bd;  // [bd][lds]: D, then S
  acc_t* dT_s = T_s;                // [bm][Kp] after the loop, over the buffers it no longer reads
  const GridMap own{tl.b, tl.ti0, tl.tj0, tl.th, tl.tw, a.H, a.W, a.P};
  const GridMap halo{tl.b, tl.ti0 - back, tl.tj0 - back, gh, gw, a.H, a.W, a.P};
  stage_taps(T_s, ldt, static_cast<acc_t*>(nullptr), a.Kp, a, own, bm);
  Product<acc_t, side_t, kDtMaxRows> dt(bm, a.Kp, bd);
  constexpr int VC = ConvShape<KS>::VC;
  for (int64_t c0 = 0; c0 < a.D; c0 += bd) {
    __syncthreads();
    stage_ups_kc(U_s, ldu, a.ups, c0, bd, a.D, a.K);
    stage_ups_ck(U2_s, a.Kp, a.ups, c0, bd, a.D, a.K);
    stage_conv(w_s, a.w, c0, bd, a.D, KS * KS);
    stage_rows_ch(G_s, a, halo, gh * gw, c0, bd);
    for (int i = threadIdx.x; i < bd * lds; i += kThreads) S_s[i] = 0;  // rows past th·tw
    __syncthreads();
    conv_tile<KS, true>(G_s, gw, gh, w_s, bd, tl.th, tl.tw,
                        [&](int oi, int oj, int j0, const acc_t (&v)[VC]) {
                          for (int x = 0; x < VC; ++x) S_s[(j0 + x) * lds + oi * tl.tw + oj] = v[x];
                        });
    __syncthreads();
    // S = θ'(h)·D in place: each element is read and written by the same thread
    rows_S_ck(a, T_s, ldt, U_s, ldu, bm, bd, S_s, lds,
              [&](int, int, int row, int ch) { return S_s[ch * lds + row]; });
    __syncthreads();
    dt.accumulate(S_s, lds, U2_s, a.Kp);
  }
  __syncthreads();
  zero_smem(dT_s, bm * a.Kp);
  __syncthreads();
  dt.combine(dT_s, a.Kp);
  write_grad_taps(a, dT_s, own, bm);
}

// =========================================================================================
// Backward, ∂U and ∂w: block (g, chunk) walks the tiles g, g + G, … for bd channels and
// writes its fp32 partial sums to slot `slot0 + g`; sum_partials_kernel adds the slots in
// order.
// =========================================================================================

// S (and θ(h) when A_s) of a tile into S_s[row][ch] (ld lds) / A_s[row][ch] (ld bd); D as
// for rows_S_ck. The taps: T2_s[row][k] (ld Kp), and T_s[k][row] (ld ldt) where the kernel
// stages that copy too (kHasKR; CUDA cores only: tensor cores read T2_s).
template <bool kHasKR, typename acc_t, typename scalar_t, typename side_t, typename DVal>
__device__ void rows_S_rc(const SideArgs<scalar_t, side_t>& a, const acc_t* T_s, int ldt, const acc_t* T2_s,
                          const acc_t* U_s, int ldu, int bm, int bd, acc_t* S_s, int lds, acc_t* A_s,
                          DVal dval) {
  if constexpr (kTensorCores<acc_t, side_t>) {
    const MmaH<side_t, true> h(T2_s, a.Kp, U_s, ldu, bm, bd, a.K);
    const float beta = static_cast<float>(a.beta);
    h.pairs([&](int u, int half, int r, int ch, float h0, float h1) {
      *reinterpret_cast<Vec<float, 2>*>(S_s + r * lds + ch) =
          Vec<float, 2>{{theta_grad<float>(h0, beta) * dval(u, 2 * half, r, ch),
                         theta_grad<float>(h1, beta) * dval(u, 2 * half + 1, r, ch + 1)}};
      if (A_s != nullptr)
        *reinterpret_cast<Vec<float, 2>*>(A_s + r * bd + ch) =
            Vec<float, 2>{{theta<float>(h0, beta), theta<float>(h1, beta)}};
    });
    return;
  }
  acc_t h[1][4][4];
  const Gemm g = kHasKR ? micro_h<false>(a, T_s, ldt, U_s, ldu, bm, bd, h)
                        : micro_h<true>(a, T2_s, a.Kp, U_s, ldu, bm, bd, h);
  const acc_t beta = static_cast<acc_t>(a.beta);
  const int t = g.tile(0);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    Vec<acc_t, 4> s, th;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const acc_t d = dval(i, j, g.m0(t) + i, g.n0(t) + j);
      s.v[j] = theta_grad<acc_t>(h[0][i][j], beta) * d;
      th.v[j] = theta<acc_t>(h[0][i][j], beta);
    }
    *reinterpret_cast<Vec<acc_t, 4>*>(S_s + (g.m0(t) + i) * lds + g.n0(t)) = s;
    if (A_s != nullptr) *reinterpret_cast<Vec<acc_t, 4>*>(A_s + (g.m0(t) + i) * bd + g.n0(t)) = th;
  }
}

// out_s[ch][k] (ld Kp) → part_ups[slot][c0 + ch][k]
template <typename acc_t, typename scalar_t, typename side_t>
__device__ void write_part_ups(const SideArgs<scalar_t, side_t>& a, const acc_t* out_s, int64_t slot,
                               int64_t c0, int bd) {
  for (int idx = threadIdx.x; idx < bd * a.K; idx += kThreads) {
    const int j = idx / a.K, k = idx - j * a.K;
    if (c0 + j < a.D) a.part_ups[(slot * a.D + c0 + j) * a.K + k] = out_s[j * a.Kp + k];
  }
}

// Rows: ∂U partial of rows tiles g, g + G, …. grid (G, cdiv(D, bd)). KR: the plan gave room
// for a [k][row] copy of the taps (Plan::du_rows_kr), from which the CUDA-core h takes fewer
// registers than from T2_s (80 vs 105 in fp32); tensor cores read T2_s and leave it unused.
template <typename scalar_t, typename side_t, bool KR>
__global__ void __launch_bounds__(kThreads)
    du_rows_kernel(const SideArgs<scalar_t, side_t> a, int64_t rpb, int bm, int bd, int64_t slot0) {
  using acc_t = at::opmath_type<scalar_t>;
  DTL_SMEM(smem_raw);
  constexpr bool kHasKR = KR && !kTensorCores<acc_t, side_t>;
  const int ldt = bm + kPad, ldu = bd + kPad, lds = bd + kPad;
  acc_t* U_s = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* T_s = U_s + a.K * ldu;                    // [k][row] where KR
  acc_t* T2_s = T_s + (KR ? a.K * ldt : 0);        // [bm][Kp]
  acc_t* S_s = T2_s + bm * a.Kp;
  acc_t* out_s = U_s;  // [bd][Kp] after the loop, over the buffers it no longer reads
  const int64_t c0 = int64_t(blockIdx.y) * bd, total = a.B * rpb;
  stage_ups_kc(U_s, ldu, a.ups, c0, bd, a.D, a.K);
  Product<acc_t, side_t, kDuMaxChannels> du(bd, a.Kp, bm);
  acc_t* Th_s = kHasKR ? T_s : nullptr;
  for (int64_t tile = blockIdx.x; tile * bm < total; tile += gridDim.x) {
    const RowsMap map{tile * bm, total, rpb};
    acc_t gv[4][4];  // G at the thread's elements of h, in flight while the taps are staged
    load_h_layout(a, map, bm, bd, c0, gv);
    __syncthreads();
    stage_taps(Th_s, ldt, T2_s, a.Kp, a, map, bm);
    __syncthreads();
    rows_S_rc<kHasKR>(a, Th_s, ldt, T2_s, U_s, ldu, bm, bd, S_s, lds, static_cast<acc_t*>(nullptr),
              [&](int i, int j, int, int) { return gv[i][j]; });
    __syncthreads();
    du.accumulate(S_s, lds, T2_s, a.Kp);  // Σ_rows S[row][ch]·T[row][k]
  }
  __syncthreads();
  zero_smem(out_s, bd * a.Kp);
  __syncthreads();
  du.combine(out_s, a.Kp);
  write_part_ups(a, out_s, slot0 + blockIdx.x, c0, bd);
}

// Patch grid: ∂U and ∂w partials of conv tiles g, g + G, …. grid (G, cdiv(D, bd)).
template <typename scalar_t, typename side_t, int KS>
__global__ void __launch_bounds__(kThreads, kConvBwdBlocks<scalar_t>)
    du_conv_kernel(const SideArgs<scalar_t, side_t> a, const Tiles tiles, int bm, int bd) {
  using acc_t = at::opmath_type<scalar_t>;
  DTL_SMEM(smem_raw);
  constexpr int kk = KS * KS;
  const int ldu = bd + kPad, lds = bd + kPad, back = KS - 1 - same_pad_before(KS);
  const int mgh = tiles.th + KS - 1, mgw = tiles.tw + KS - 1;  // largest halo
  acc_t* U_s = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* w_s = U_s + a.K * ldu;
  acc_t* T2_s = w_s + kk * bd;        // [bm][Kp]: the product's operand, and h's
  acc_t* G_s = T2_s + bm * a.Kp;      // [gh·gw][bd]
  acc_t* S_s = G_s + mgh * mgw * bd;  // [bm][lds]: D, then S
  acc_t* A_s = S_s + bm * lds;        // [bm][bd]: θ(h)
  // after the loop, over the buffers it no longer reads:
  acc_t* out_s = U_s;                 // [bd][Kp]
  acc_t* wout_s = out_s + bd * a.Kp;  // [bd][kk]
  const int64_t c0 = int64_t(blockIdx.y) * bd;
  stage_ups_kc(U_s, ldu, a.ups, c0, bd, a.D, a.K);
  stage_conv(w_s, a.w, c0, bd, a.D, kk);
  Product<acc_t, side_t, kDuMaxChannels> du(bd, a.Kp, bm);
  // ∂w: item (channel quad q, window row x) sums over its group's share of the positions
  const int quads = bd / 4, items = quads * KS;
  const int wgroups = items >= kThreads ? 1 : kThreads / items;
  const int witem = threadIdx.x % items, wgrp = threadIdx.x / items;
  const int wq = witem % quads, wx = witem / quads;
  acc_t dw[KS][4];
  for (int z = 0; z < KS; ++z)
    for (int v = 0; v < 4; ++v) dw[z][v] = 0;
  constexpr int VC = ConvShape<KS>::VC;
  const int64_t ntiles = a.B * tiles.rows * tiles.cols;
  for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    const TileAt tl = tile_at(tile, tiles, a.H, a.W);
    const int gh = tl.th + KS - 1, gw = tl.tw + KS - 1, np = tl.th * tl.tw;
    const GridMap own{tl.b, tl.ti0, tl.tj0, tl.th, tl.tw, a.H, a.W, a.P};
    const GridMap halo{tl.b, tl.ti0 - back, tl.tj0 - back, gh, gw, a.H, a.W, a.P};
    __syncthreads();
    stage_taps(static_cast<acc_t*>(nullptr), 0, T2_s, a.Kp, a, own, bm);
    stage_rows_ch(G_s, a, halo, gh * gw, c0, bd);
    for (int i = threadIdx.x; i < bm * lds; i += kThreads) S_s[i] = 0;
    __syncthreads();
    conv_tile<KS, true>(G_s, gw, gh, w_s, bd, tl.th, tl.tw,
                        [&](int oi, int oj, int j0, const acc_t (&v)[VC]) {
                          for (int x = 0; x < VC; ++x) S_s[(oi * tl.tw + oj) * lds + j0 + x] = v[x];
                        });
    __syncthreads();
    rows_S_rc<false>(a, static_cast<const acc_t*>(nullptr), 0, T2_s, U_s, ldu, bm, bd, S_s, lds, A_s,
              [&](int, int, int row, int ch) { return S_s[row * lds + ch]; });
    __syncthreads();
    du.accumulate(S_s, lds, T2_s, a.Kp);
    // ∂w[ab] += Σ_p θ(h[p])·G[p − s_ab]: G[p − s_ab] is G_s at (oi + KS−1−a, oj + KS−1−b)
    if (wgrp < wgroups) {
      const int p0 = np * wgrp / wgroups, p1 = np * (wgrp + 1) / wgroups;
      for (int p = p0; p < p1; ++p) {
        const int oi = p / tl.tw, oj = p - oi * tl.tw;
        const Vec<acc_t, 4> th = lds4(A_s + p * bd + 4 * wq);
        const acc_t* grow = G_s + ((oi + KS - 1 - wx) * gw + oj + KS - 1) * bd + 4 * wq;
#pragma unroll
        for (int z = 0; z < KS; ++z) {
          const Vec<acc_t, 4> gv = lds4(grow - z * bd);
#pragma unroll
          for (int v = 0; v < 4; ++v) dw[z][v] += th.v[v] * gv.v[v];
        }
      }
    }
  }
  __syncthreads();
  zero_smem(out_s, bd * a.Kp + bd * kk);
  __syncthreads();
  du.combine(out_s, a.Kp);
  for (int grp = 0; grp < wgroups; ++grp) {  // ∂w partials, group 0 first
    if (wgrp == grp)
      for (int z = 0; z < KS; ++z)
        for (int v = 0; v < 4; ++v) wout_s[(4 * wq + v) * kk + wx * KS + z] += dw[z][v];
    __syncthreads();
  }
  write_part_ups(a, out_s, blockIdx.x, c0, bd);
  for (int idx = threadIdx.x; idx < bd * kk; idx += kThreads) {
    const int j = idx / kk, ab = idx - j * kk;
    if (c0 + j < a.D) a.part_w[(int64_t(blockIdx.x) * a.D + c0 + j) * kk + ab] = wout_s[idx];
  }
}

// out[j] = Σ_{s < slots} part[s·m + j], in slot order, cast to the output dtype.
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

}  // namespace dtl::cuda_side
