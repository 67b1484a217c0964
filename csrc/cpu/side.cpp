// CPU kernels of the fused side op (see dtl_kernels/ops/compiled_side.py for the math):
//
//   side_forward : out = y + mix(h),  h = taps · upsᵀ rebuilt on the fly, never stored
//   side_backward: S = θ'(h) ⊙ (gᵀ(G) on patch rows | G on prefix rows / DTL)
//                  grad_taps = S · ups, grad_ups = Sᵀ · taps, grad_conv = Σ corr(θ(h), G)
//
// Work is split into tasks (unit, channel chunk). A unit is one image for DTL+ (the conv
// needs the image's whole grid) and a block of rows for DTL. A task rebuilds h for the
// unit's rows × a chunk of CH channels in a thread-local tile (kTileBytes*) and finishes
// everything there: θ, the depthwise conv, the residual add (forward), or S and its three
// reductions (backward). DTL skips the tile where it can (full-width chunks; 16-bit y / G
// converted in the registers): the forward writes y + θ(h) from the registers, the
// backward reads G in place. Where the taps and ups are bf16, h may be rebuilt from bf16
// pairs with AVX512-BF16 (bf16_dot.h). Global memory sees: y read once, out written once,
// taps read (forward); G read once, grad_taps written once, taps read (backward).
//
// Determinism: every task writes its own fp32 partial sums (grad_ups, grad_conv per
// unit; grad_taps per channel group when a unit's channels are split), which are then
// summed in a fixed order. The split depends on the shapes only, never on the thread
// count, so gradients are bit-identical from run to run (and across thread counts).

#include "vec_capability.h"  // first: before any ATen header

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <optional>
#include <vector>

#include "../side_checks.h"
#include "../side_math.h"
#include "bf16_dot.h"

namespace dtl {
namespace {

using at::vec::Vectorized;

// Thread-local rows × CH tiles: forward keeps one, backward four (h/S, G, θ(h), gᵀ(G)).
constexpr int64_t kTileBytesFwd = 256 * 1024;
constexpr int64_t kTileBytesBwd = 96 * 1024;
constexpr int64_t kMaxChunk = 512;   // channels per DTL+ task at most
constexpr int64_t kMaxWidth = 2048;  // DTL forward: whole rows up to this width
constexpr int64_t kRowBlock = 256;   // rows per unit for the DTL backward (no grid)
constexpr int64_t kTargetTasks = 32;       // backward: split channels below this many units

// ---------------------------------------------------------------------------------------
// Vector math (compute dtype acc_t: float, or double for double I/O)
// ---------------------------------------------------------------------------------------
template <typename acc_t>
inline Vectorized<acc_t> vec_sigmoid_beta(Vectorized<acc_t> x, Vectorized<acc_t> beta) {
  using Vec = Vectorized<acc_t>;
  // exp(-βx) with its argument clamped where exp is already inf (or 0): σ then saturates to
  // exactly 0 (or 1), as the scalar side_math.h does; a smaller clamp would leave σ ~1e-35,
  // which β·(h·σ·(1 − σ)) turns into a wrong θ' for very large β.
  const Vec lim(std::is_same_v<acc_t, float> ? acc_t(100) : acc_t(800));
  Vec u = at::vec::minimum(at::vec::maximum(Vec(acc_t(0)) - beta * x, Vec(acc_t(0)) - lim), lim);
  Vec e;
  if constexpr (std::is_same_v<acc_t, float>) {
    e = u.exp_u20();
  } else {
    e = u.exp();
  }
  return Vec(acc_t(1)) / (Vec(acc_t(1)) + e);
}

// In place: x ← θ'(x); th ← θ(x) (when th is not null).
template <typename acc_t>
void theta_grad_tile(acc_t* x, acc_t* th, int64_t n, acc_t beta) {
  using Vec = Vectorized<acc_t>;
  const Vec vb(beta);
  const Vec one(acc_t(1));
  for (int64_t i = 0; i < n; i += Vec::size()) {
    Vec v = Vec::loadu(x + i);
    Vec s = vec_sigmoid_beta(v, vb);
    if (th != nullptr) (v * s).store(th + i);
    (s + vb * (v * s * (one - s))).store(x + i);  // β last: see side_math.h
  }
}

// ---------------------------------------------------------------------------------------
// Tiles: loads with conversion to acc_t, stores with the residual add
// ---------------------------------------------------------------------------------------
// dst (nr × ld) ← src rows (stride sstride), first w columns; columns w…ld are zeroed.
template <typename scalar_t, typename acc_t>
void load_tile(const scalar_t* src, int64_t sstride, int64_t nr, int64_t w, int64_t ld,
               acc_t* dst) {
  for (int64_t n = 0; n < nr; ++n) {
    const scalar_t* s = src + n * sstride;
    acc_t* d = dst + n * ld;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      std::memcpy(d, s, sizeof(acc_t) * w);
    } else {
      for (int64_t i = 0; i < w; ++i) d[i] = static_cast<acc_t>(s[i]);
    }
    for (int64_t i = w; i < ld; ++i) d[i] = acc_t(0);
  }
}

// out[0:w] = y[0:w] + r[0:w] (computed in acc_t, stored in scalar_t).
template <typename scalar_t, typename acc_t>
inline void store_add_row(const scalar_t* y, const acc_t* r, scalar_t* out, int64_t w) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    using Vec = Vectorized<acc_t>;
    int64_t i = 0;
    for (; i + Vec::size() <= w; i += Vec::size()) {
      (Vec::loadu(y + i) + Vec::loadu(r + i)).store(out + i);
    }
    if (i < w) (Vec::loadu(y + i, w - i) + Vec::loadu(r + i, w - i)).store(out + i, w - i);
  } else {
    for (int64_t i = 0; i < w; ++i) {
      out[i] = static_cast<scalar_t>(static_cast<acc_t>(y[i]) + r[i]);
    }
  }
}

// One vector of T values at p as acc_t (16-bit ones widened, exactly).
template <typename acc_t, typename T>
inline Vectorized<acc_t> load_acc(const T* p) {
  if constexpr (std::is_same_v<T, acc_t>) {
    return Vectorized<acc_t>::loadu(p);
  } else {
    Vectorized<float> v;
    at::vec::load_to_float<T>(p, v);
    return v;
  }
}

// v stored at p as T (16-bit: rounded to nearest even, as a scalar cast rounds).
template <typename T, typename acc_t>
inline void store_acc(Vectorized<acc_t> v, T* p) {
  if constexpr (std::is_same_v<T, acc_t>) {
    v.store(p);
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    __m256i packed;
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      packed = at::vec::cvtfp32_bf16(__m512(v));
    } else {
      packed = at::vec::cvtfp32_fp16(__m512(v));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), packed);
#else
    at::vec::convert_from_float<T>(v, v).store(p, Vectorized<acc_t>::size());
#endif
  }
}

// ---------------------------------------------------------------------------------------
// h = T · Uᵀ for nr rows × CH channels, with a fused epilogue
// ---------------------------------------------------------------------------------------
enum class Epilogue {
  kH,         // H ← h
  kTheta,     // H ← θ(h)
  kSGrad,     // H ← θ'(h) ⊙ G — S of DTL
  kAddTheta,  // H ← G + θ(h) — DTL's forward, G = y and H = out in place
};
// H and G are acc_t tiles, or y / out / G in place in their own dtype (kAddTheta, kSGrad).

template <typename acc_t, Epilogue E, typename g_t>
inline Vectorized<acc_t> finish(Vectorized<acc_t> h, Vectorized<acc_t> vb, const g_t* g) {
  using Vec = Vectorized<acc_t>;
  if constexpr (E == Epilogue::kH) {
    return h;
  } else if constexpr (E == Epilogue::kTheta) {
    return h * vec_sigmoid_beta(h, vb);
  } else if constexpr (E == Epilogue::kAddTheta) {
    return load_acc<acc_t>(g) + h * vec_sigmoid_beta(h, vb);
  } else {
    const Vec s = vec_sigmoid_beta(h, vb);
    return (s + vb * (h * s * (Vec(acc_t(1)) - s))) * load_acc<acc_t>(g);  // β last
  }
}

// RB rows × NV vectors of channels at column c: every load of Uᵀ serves RB rows.
template <typename acc_t, Epilogue E, int64_t RB, int64_t NV, typename h_t, typename g_t>
inline void rebuild_block(const acc_t* T, int64_t ldt, int64_t K, const acc_t* ut, int64_t dpad,
                          int64_t ldh, int64_t ldg, int64_t c, h_t* H, const g_t* G,
                          acc_t beta) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  Vec a[RB][NV];
  for (int64_t r = 0; r < RB; ++r)
    for (int64_t i = 0; i < NV; ++i) a[r][i] = Vec(acc_t(0));
  for (int64_t k = 0; k < K; ++k) {
    Vec u[NV];
    for (int64_t i = 0; i < NV; ++i) u[i] = Vec::loadu(ut + k * dpad + c + i * V);
    for (int64_t r = 0; r < RB; ++r) {
      const Vec tk(T[r * ldt + k]);
      for (int64_t i = 0; i < NV; ++i) a[r][i] = at::vec::fmadd(tk, u[i], a[r][i]);
    }
  }
  const Vec vb(beta);
  for (int64_t r = 0; r < RB; ++r)
    for (int64_t i = 0; i < NV; ++i) {
      const int64_t col = c + i * V;
      store_acc(finish<acc_t, E>(a[r][i], vb, G + r * ldg + col), H + r * ldh + col);
    }
}

// Calls block.template operator()<RB, NV>(n, c) for the blocks of nr rows × CH channels:
// channel blocks outer (4, then 2, then 1 vectors wide), so a block's slice of Uᵀ (K × NV
// vectors) stays in L1 while all rows pass, 4 rows at a time, then single rows.
template <int64_t V, typename Block>
inline void for_blocks(int64_t nr, int64_t CH, const Block& block) {
  int64_t c = 0;
  const auto rows = [&]<int64_t NV>() {
    int64_t n = 0;
    for (; n + 4 <= nr; n += 4) block.template operator()<4, NV>(n, c);
    for (; n < nr; ++n) block.template operator()<1, NV>(n, c);
  };
  for (; c + 4 * V <= CH; c += 4 * V) rows.template operator()<4>();  // 16 accumulators
  for (; c + 2 * V <= CH; c += 2 * V) rows.template operator()<2>();
  for (; c < CH; c += V) rows.template operator()<1>();
}

// T: nr × K (row stride ldt), ut: Uᵀ at this chunk's first channel (row stride dpad),
// H and G (G read by kSGrad, kAddTheta only): nr × CH, rows ldh / ldg apart.
template <typename acc_t, Epilogue E, typename h_t, typename g_t>
void rebuild_h(const acc_t* T, int64_t ldt, int64_t nr, int64_t K, const acc_t* ut,
               int64_t dpad, int64_t CH, h_t* H, acc_t beta, const g_t* G, int64_t ldh,
               int64_t ldg) {
  for_blocks<Vectorized<acc_t>::size()>(nr, CH, [&]<int64_t RB, int64_t NV>(int64_t n, int64_t c) {
    rebuild_block<acc_t, E, RB, NV>(T + n * ldt, ldt, K, ut, dpad, ldh, ldg, c, H + n * ldh,
                                    G + n * ldg, beta);
  });
}

#if DTL_BF16_DOT
// rebuild_block from bf16 pairs (bf16_dot.h): T2 (rows kh words apart) and Uᵀ's pairs ut2
// (kh × dpad words) hold taps / ups k = 2q and 2q + 1 in a word's low and high half; one
// vdpbf16ps adds both products of a pair into each fp32 lane.
template <Epilogue E, int64_t RB, int64_t NV, typename h_t, typename g_t>
DTL_BF16_DOT_TARGET void rebuild_block_pairs(const uint32_t* T2, int64_t kh,
                                             const uint32_t* ut2, int64_t dpad, int64_t ldh,
                                             int64_t ldg, int64_t c, h_t* H, const g_t* G,
                                             float beta) {
  using Vec = Vectorized<float>;
  constexpr int64_t V = Vec::size();
  __m512 a[RB][NV];
  for (int64_t r = 0; r < RB; ++r)
    for (int64_t i = 0; i < NV; ++i) a[r][i] = _mm512_setzero_ps();
  for (int64_t q = 0; q < kh; ++q) {
    __m512bh u[NV];
    for (int64_t i = 0; i < NV; ++i)
      u[i] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(ut2 + q * dpad + c + i * V));
    for (int64_t r = 0; r < RB; ++r) {
      const auto tq = reinterpret_cast<__m512bh>(_mm512_set1_epi32(int(T2[r * kh + q])));
      for (int64_t i = 0; i < NV; ++i) a[r][i] = _mm512_dpbf16_ps(a[r][i], tq, u[i]);
    }
  }
  const Vec vb(beta);
  for (int64_t r = 0; r < RB; ++r)
    for (int64_t i = 0; i < NV; ++i) {
      const int64_t col = c + i * V;
      store_acc(finish<float, E>(Vec(a[r][i]), vb, G + r * ldg + col), H + r * ldh + col);
    }
}
#endif

// out[0:CH] = Σ_j w_j[0:CH] * a_j[0:CH] over m (w, a) pointer pairs.
template <typename acc_t>
inline void gather_sum(const acc_t* const* wp, const acc_t* const* ap, int64_t m, int64_t CH,
                       acc_t* out) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  int64_t c = 0;
  for (; c + 4 * V <= CH; c += 4 * V) {
    Vec a0(acc_t(0)), a1(acc_t(0)), a2(acc_t(0)), a3(acc_t(0));
    for (int64_t j = 0; j < m; ++j) {
      const acc_t* w = wp[j] + c;
      const acc_t* a = ap[j] + c;
      a0 = at::vec::fmadd(Vec::loadu(w), Vec::loadu(a), a0);
      a1 = at::vec::fmadd(Vec::loadu(w + V), Vec::loadu(a + V), a1);
      a2 = at::vec::fmadd(Vec::loadu(w + 2 * V), Vec::loadu(a + 2 * V), a2);
      a3 = at::vec::fmadd(Vec::loadu(w + 3 * V), Vec::loadu(a + 3 * V), a3);
    }
    a0.store(out + c);
    a1.store(out + c + V);
    a2.store(out + c + 2 * V);
    a3.store(out + c + 3 * V);
  }
  for (; c < CH; c += V) {
    Vec a(acc_t(0));
    for (int64_t j = 0; j < m; ++j) {
      a = at::vec::fmadd(Vec::loadu(wp[j] + c), Vec::loadu(ap[j] + c), a);
    }
    a.store(out + c);
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// grad_taps_rows' 32-column block at G / U where the taps end 17 to 24 columns in (ViT's
// K = 24): one 512-bit vector and a 256-bit half, not two vectors, whose second would
// carry 8 padded lanes — a quarter of the block's work on CPUs that split 512-bit
// operations in two. The same sums in the same order (bit for bit).
template <int64_t RB>
inline void grad_taps_block_24(const float* S, int64_t lds, const float* U, int64_t Kp, int64_t w,
                               float* G) {
  __m512 a[RB];
  __m256 b[RB];
  for (int64_t r = 0; r < RB; ++r) {
    a[r] = _mm512_loadu_ps(G + r * Kp);
    b[r] = _mm256_loadu_ps(G + r * Kp + 16);
  }
  for (int64_t c = 0; c < w; ++c) {
    const __m512 u0 = _mm512_loadu_ps(U + c * Kp);
    const __m256 u1 = _mm256_loadu_ps(U + c * Kp + 16);
    for (int64_t r = 0; r < RB; ++r) {
      const __m512 sv = _mm512_set1_ps(S[r * lds + c]);
      a[r] = _mm512_fmadd_ps(sv, u0, a[r]);
      b[r] = _mm256_fmadd_ps(_mm512_castps512_ps256(sv), u1, b[r]);
    }
  }
  for (int64_t r = 0; r < RB; ++r) {
    _mm512_storeu_ps(G + r * Kp, a[r]);
    _mm256_storeu_ps(G + r * Kp + 16, b[r]);
  }
}
#endif

// G[r][0:Kp] += Σ_{c<w} S[r][c] · U[c][0:Kp] for RB rows: every load of U serves RB rows,
// and RB × (vectors per block) independent accumulators hide the FMA latency. Columns
// K…Kp are padding, never read.
template <typename acc_t, int64_t RB>
inline void grad_taps_rows(const acc_t* S, int64_t lds, const acc_t* U, int64_t K, int64_t Kp,
                           int64_t w, acc_t* G) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  int64_t kv = 0;
  for (; kv + 2 * V <= Kp; kv += 2 * V) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<acc_t, float>) {
      if (K - kv > V && K - kv <= V + 8) {
        grad_taps_block_24<RB>(S, lds, U + kv, Kp, w, G + kv);
        continue;
      }
    }
#endif
    Vec a[RB][2];
    for (int64_t r = 0; r < RB; ++r) {
      a[r][0] = Vec::loadu(G + r * Kp + kv);
      a[r][1] = Vec::loadu(G + r * Kp + kv + V);
    }
    for (int64_t c = 0; c < w; ++c) {
      const Vec u0 = Vec::loadu(U + c * Kp + kv), u1 = Vec::loadu(U + c * Kp + kv + V);
      for (int64_t r = 0; r < RB; ++r) {
        const Vec sv(S[r * lds + c]);
        a[r][0] = at::vec::fmadd(sv, u0, a[r][0]);
        a[r][1] = at::vec::fmadd(sv, u1, a[r][1]);
      }
    }
    for (int64_t r = 0; r < RB; ++r) {
      a[r][0].store(G + r * Kp + kv);
      a[r][1].store(G + r * Kp + kv + V);
    }
  }
  for (; kv < Kp; kv += V) {
    Vec a[RB];
    for (int64_t r = 0; r < RB; ++r) a[r] = Vec::loadu(G + r * Kp + kv);
    for (int64_t c = 0; c < w; ++c) {
      const Vec u0 = Vec::loadu(U + c * Kp + kv);
      for (int64_t r = 0; r < RB; ++r) a[r] = at::vec::fmadd(Vec(S[r * lds + c]), u0, a[r]);
    }
    for (int64_t r = 0; r < RB; ++r) a[r].store(G + r * Kp + kv);
  }
}

// ---------------------------------------------------------------------------------------
// Plan: shapes, tiling and packed parameters
// ---------------------------------------------------------------------------------------
struct Plan {
  int64_t B, N, d, K;
  bool conv;
  int64_t k, kk, gh, gw, P, pad_t, pad_l;
  int64_t rows, unit_rows, units;
  int64_t CH, nchunks, dpad, Kp, kh;  // kh: bf16 pairs of taps a row (bf16_dot.h)

  int64_t unit_begin(int64_t u) const { return u * unit_rows; }
  int64_t unit_size(int64_t u) const { return std::min(unit_rows, rows - u * unit_rows); }
};

// Tiling. DTL+: one unit per image, channel chunks as wide as the tile allows. DTL
// forward: blocks of whole rows (contiguous streams of y and out). DTL backward: blocks of
// kRowBlock rows (few per-unit partials of grad_ups), channel chunks.
template <typename acc_t>
Plan make_plan(const at::Tensor& y, const at::Tensor& taps, const std::optional<at::Tensor>& conv,
               int64_t gh, int64_t gw, int64_t P, bool backward) {
  constexpr int64_t V = Vectorized<acc_t>::size();
  Plan p;
  p.B = y.size(0);
  p.N = y.size(1);
  p.d = y.size(2);
  p.K = taps.size(2);
  p.conv = conv.has_value();
  p.k = p.conv ? conv->size(2) : 0;
  p.kk = p.k * p.k;
  p.gh = gh;
  p.gw = gw;
  p.P = p.conv ? P : 0;
  p.pad_t = same_pad_before(p.k);
  p.pad_l = p.pad_t;
  p.rows = p.B * p.N;
  const int64_t tile = (backward ? kTileBytesBwd : kTileBytesFwd) / int64_t(sizeof(acc_t));
  const int64_t dvec = (p.d + V - 1) / V * V;
  const int64_t rows1 = std::max<int64_t>(p.rows, 1);
  if (p.conv) {
    p.unit_rows = p.N;
  } else if (!backward) {
    const int64_t width = std::min(dvec, kMaxWidth);
    p.unit_rows = std::clamp<int64_t>(tile / width, 8, kRowBlock);
  } else {
    p.unit_rows = kRowBlock;
  }
  p.unit_rows = std::min(p.unit_rows, rows1);
  p.units = p.rows == 0 ? 0 : (p.rows + p.unit_rows - 1) / p.unit_rows;
  const int64_t fit = tile / std::max<int64_t>(p.unit_rows, 1);
  const int64_t max_chunk = (!p.conv && !backward) ? kMaxWidth : kMaxChunk;
  p.CH = std::clamp<int64_t>(fit / V * V, V, std::max<int64_t>(max_chunk, V));
  p.CH = std::min(p.CH, dvec);
  p.nchunks = (p.d + p.CH - 1) / p.CH;
  p.dpad = p.nchunks * p.CH;
  const int64_t kq = std::max<int64_t>(V, 8);
  p.Kp = (p.K + kq - 1) / kq * kq;
  p.kh = (p.K + 1) / 2;
  return p;
}

// Whether a DTL chunk `w` channels wide reads y / G and writes out in place (no tile; 16-bit
// values converted in the registers): the chunk as wide as the plan's.
bool chunk_in_place(const Plan& p, int64_t w) { return !p.conv && w == p.CH; }

// Whether every chunk does (d a multiple of the chunk width): no tile is needed at all.
bool rows_in_place(const Plan& p) { return chunk_in_place(p, p.CH) && p.d % p.CH == 0; }

// A row-major (rows × cols) parameter in acc_t, zero-padded to a (rows_to × cols_to) layout,
// transposed (cols × rows_to) when `transpose`: the layouts the tile loops read.
// Runs on every call (the parameters change between calls), so its loops are written for
// the compiler: contiguous writes, no per-element branch.
template <typename scalar_t, typename acc_t>
std::vector<acc_t> pack(const at::Tensor& t, int64_t rows, int64_t cols, int64_t rows_to,
                        int64_t cols_to, bool transpose) {
  std::vector<acc_t> out(rows_to * cols_to, acc_t(0));
  const scalar_t* src = t.const_data_ptr<scalar_t>();
  acc_t* dst = out.data();
  if (transpose) {
    for (int64_t c = 0; c < cols; ++c, dst += rows_to)
      for (int64_t r = 0; r < rows; ++r) dst[r] = static_cast<acc_t>(src[r * cols + c]);
  } else {
    for (int64_t r = 0; r < rows; ++r, dst += cols_to)
      for (int64_t c = 0; c < cols; ++c) dst[c] = static_cast<acc_t>(src[r * cols + c]);
  }
  return out;
}

// Uᵀ (K × dpad), U (dpad × Kp) and the conv weight (d, 1, k, k) as (k·k × dpad).
template <typename scalar_t, typename acc_t>
std::vector<acc_t> pack_ups_t(const at::Tensor& ups, const Plan& p) {
  return pack<scalar_t, acc_t>(ups, p.d, p.K, p.dpad, p.K, true);
}
template <typename scalar_t, typename acc_t>
std::vector<acc_t> pack_ups(const at::Tensor& ups, const Plan& p) {
  return pack<scalar_t, acc_t>(ups, p.d, p.K, p.dpad, p.Kp, false);
}
template <typename scalar_t, typename acc_t>
std::vector<acc_t> pack_conv(const at::Tensor& w, const Plan& p) {
  return pack<scalar_t, acc_t>(w, p.d, p.kk, p.dpad, p.kk, true);
}

// Whether the h rebuild takes bf16 pairs (bf16_dot.h): bf16 taps and ups, float32 math.
template <typename side_t, typename acc_t>
bool rebuild_pairs() {
  return std::is_same_v<side_t, c10::BFloat16> && std::is_same_v<acc_t, float> &&
         bf16_dot_active();
}

// Uᵀ as bf16 pairs: kh × dpad words, word (q, c) = U[c][2q] | U[c][2q + 1] << 16 (zero past
// K and d). Only called where rebuild_pairs() (ups in bf16).
std::vector<uint32_t> pack_pairs_t(const at::Tensor& ups, const Plan& p) {
  std::vector<uint32_t> out(p.kh * p.dpad, 0u);
  const c10::BFloat16* src = ups.const_data_ptr<c10::BFloat16>();
  for (int64_t c = 0; c < p.d; ++c)
    for (int64_t k = 0; k < p.K; ++k)
      out[(k / 2) * p.dpad + c] |= uint32_t(src[c * p.K + k].x) << (16 * (k & 1));
  return out;
}

// One unit's taps as a thread's h rebuild reads them, beside Uᵀ packed to match: acc_t rows
// `ld` apart (ut: K × dpad), or, where rebuild_pairs(), bf16 pairs (kh words a row; ut2:
// pack_pairs_t). `keep_rows`: the acc_t rows are loaded in either case (the backward's
// ∂U reads them).
template <typename side_t, typename acc_t>
class TapsTile {
 public:
  TapsTile(const Plan& p, int64_t ld, const acc_t* ut, const uint32_t* ut2, bool keep_rows)
      : p_(p), ld_(ld), ut_(ut), ut2_(ut2), rows_(keep_rows || ut2 == nullptr),
        t_(rows_ ? p.unit_rows * ld : 0), t2_(ut2 != nullptr ? p.unit_rows * p.kh : 0) {}

  // Rows [row0, row0 + nr) of the taps tp (B·N × K).
  void load(const side_t* tp, int64_t row0, int64_t nr) {
    if (rows_) load_tile(tp + row0 * p_.K, p_.K, nr, p_.K, ld_, t_.data());
    if constexpr (std::is_same_v<side_t, c10::BFloat16>) {
      if (ut2_ == nullptr) return;
      for (int64_t n = 0; n < nr; ++n) {
        const c10::BFloat16* src = tp + (row0 + n) * p_.K;
        uint32_t* dst = t2_.data() + n * p_.kh;
        for (int64_t q = 0; q < p_.kh; ++q) {
          const uint32_t hi = 2 * q + 1 < p_.K ? uint32_t(src[2 * q + 1].x) : 0u;
          dst[q] = uint32_t(src[2 * q].x) | hi << 16;
        }
      }
    }
  }

  const acc_t* rows() const { return t_.data(); }

  // The h rebuild (epilogue E) of the loaded rows' first nr × the chunk at channel c0, into
  // H; G for kSGrad / kAddTheta. Rows ldh / ldg apart (default CH: a tile).
  template <Epilogue E, typename h_t, typename g_t = h_t>
  void rebuild(int64_t nr, int64_t c0, h_t* H, acc_t beta = acc_t(0), const g_t* G = nullptr,
               int64_t ldh = 0, int64_t ldg = 0) const {
    if (ldh == 0) ldh = p_.CH;
    if (ldg == 0) ldg = ldh;
    if constexpr (std::is_same_v<h_t, g_t>) {
      if (G == nullptr) G = H;  // unused by the kH / kTheta epilogues
    }
#if DTL_BF16_DOT
    if constexpr (std::is_same_v<side_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
      if (ut2_ != nullptr) {
        const uint32_t *t2 = t2_.data(), *ut2 = ut2_ + c0;
        const int64_t kh = p_.kh, dpad = p_.dpad;
        for_blocks<Vectorized<float>::size()>(
            nr, p_.CH, [&]<int64_t RB, int64_t NV>(int64_t n, int64_t c) {
              rebuild_block_pairs<E, RB, NV>(t2 + n * kh, kh, ut2, dpad, ldh, ldg, c,
                                             H + n * ldh, G + n * ldg, beta);
            });
        return;
      }
    }
#endif
    rebuild_h<acc_t, E>(t_.data(), ld_, nr, p_.K, ut_ + c0, p_.dpad, p_.CH, H, beta, G, ldh,
                        ldg);
  }

 private:
  const Plan& p_;
  int64_t ld_;
  const acc_t* ut_;
  const uint32_t* ut2_;  // null: the acc_t path
  bool rows_;
  std::vector<acc_t> t_;
  std::vector<uint32_t> t2_;
};

// ---------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------
template <typename scalar_t, typename side_t>
void side_forward_impl(const at::Tensor& y, const at::Tensor& taps, const at::Tensor& ups,
                       const std::optional<at::Tensor>& conv, const Plan& p, double beta_in,
                       at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t beta = static_cast<acc_t>(beta_in);
  const bool pairs = rebuild_pairs<side_t, acc_t>();
  const std::vector<acc_t> ut = pairs ? std::vector<acc_t>() : pack_ups_t<side_t, acc_t>(ups, p);
  const std::vector<uint32_t> ut2 = pairs ? pack_pairs_t(ups, p) : std::vector<uint32_t>();
  const std::vector<acc_t> wt = p.conv ? pack_conv<scalar_t, acc_t>(*conv, p) : std::vector<acc_t>();
  const scalar_t* yp = y.const_data_ptr<scalar_t>();
  const side_t* tp = taps.const_data_ptr<side_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const bool in_place = rows_in_place(p);

  at::parallel_for(0, p.units * p.nchunks, 1, [&](int64_t begin, int64_t end) {
    // no θ(h) tile where every chunk takes the fused path below (0.26 MB at ViT-B's shape)
    TapsTile<side_t, acc_t> tb(p, p.K, ut.data(), pairs ? ut2.data() : nullptr, false);
    std::vector<acc_t> act(in_place ? 0 : p.unit_rows * p.CH), tmp(p.CH);
    std::vector<const acc_t*> wp(p.kk), ap(p.kk);
    int64_t loaded_unit = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t u = task / p.nchunks, j = task % p.nchunks;
      const int64_t row0 = p.unit_begin(u), nr = p.unit_size(u);
      const int64_t c0 = j * p.CH, w = std::min(p.CH, p.d - c0);
      if (u != loaded_unit) {
        tb.load(tp, row0, nr);
        loaded_unit = u;
      }
      const scalar_t* yu = yp + row0 * p.d + c0;
      scalar_t* ou = op + row0 * p.d + c0;
      // DTL, a full-width chunk: out = y + θ(h) straight from the registers (no θ(h) tile
      // written and read back: a quarter of the forward's time)
      if (chunk_in_place(p, w)) {  // (every chunk where in_place)
        tb.template rebuild<Epilogue::kAddTheta>(nr, c0, ou, beta, yu, p.d);
        continue;
      }
      tb.template rebuild<Epilogue::kTheta>(nr, c0, act.data(), beta);
      const int64_t direct = p.conv ? p.P : nr;  // rows that get θ(h) only
      for (int64_t n = 0; n < direct; ++n) {
        store_add_row(yu + n * p.d, act.data() + n * p.CH, ou + n * p.d, w);
      }
      if (!p.conv) continue;
      const acc_t* patches = act.data() + p.P * p.CH;
      for (int64_t py = 0; py < p.gh; ++py) {
        const int64_t dy0 = std::max<int64_t>(0, p.pad_t - py);
        const int64_t dy1 = std::min<int64_t>(p.k, p.gh + p.pad_t - py);
        for (int64_t px = 0; px < p.gw; ++px) {
          const int64_t dx0 = std::max<int64_t>(0, p.pad_l - px);
          const int64_t dx1 = std::min<int64_t>(p.k, p.gw + p.pad_l - px);
          int64_t m = 0;
          for (int64_t dy = dy0; dy < dy1; ++dy) {
            for (int64_t dx = dx0; dx < dx1; ++dx) {
              const int64_t q = (py + dy - p.pad_t) * p.gw + (px + dx - p.pad_l);
              wp[m] = wt.data() + (dy * p.k + dx) * p.dpad + c0;
              ap[m] = patches + q * p.CH;
              ++m;
            }
          }
          gather_sum(wp.data(), ap.data(), m, p.CH, tmp.data());
          const int64_t n = p.P + py * p.gw + px;
          store_add_row(yu + n * p.d, tmp.data(), ou + n * p.d, w);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------
template <typename scalar_t, typename side_t>
void side_backward_impl(const at::Tensor& g, const at::Tensor& taps, const at::Tensor& ups,
                        const std::optional<at::Tensor>& conv, const Plan& p, double beta_in,
                        at::Tensor& grad_taps, at::Tensor& grad_ups, at::Tensor& grad_conv) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const acc_t beta = static_cast<acc_t>(beta_in);
  const std::vector<acc_t> up = pack_ups<side_t, acc_t>(ups, p);
  const bool pairs = rebuild_pairs<side_t, acc_t>();
  const std::vector<acc_t> ut = pairs ? std::vector<acc_t>() : pack_ups_t<side_t, acc_t>(ups, p);
  const std::vector<uint32_t> ut2 = pairs ? pack_pairs_t(ups, p) : std::vector<uint32_t>();
  const std::vector<acc_t> wt = p.conv ? pack_conv<scalar_t, acc_t>(*conv, p) : std::vector<acc_t>();
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  const side_t* tp = taps.const_data_ptr<side_t>();

  // Channel groups per unit (shape-only choice, so results never depend on threads).
  const int64_t groups = std::min<int64_t>(
      p.nchunks, std::max<int64_t>(1, (kTargetTasks + p.units - 1) / std::max<int64_t>(p.units, 1)));
  const int64_t chunks_per_group = (p.nchunks + groups - 1) / groups;
  // Per-task fp32 partials, summed in a fixed order below. grad_ups' and grad_taps' are
  // written whole by the tasks (every unit × chunk × column a sum reads), so they are not
  // zeroed first (2.4 + 1.6 MB at ViT-B's shape); grad_conv's are added to.
  std::unique_ptr<acc_t[]> gu_part(new acc_t[p.units * p.Kp * p.dpad]);
  std::vector<acc_t> gw_part(p.conv ? p.units * p.kk * p.dpad : 0, acc_t(0));
  std::unique_ptr<acc_t[]> gt_part(new acc_t[groups > 1 ? groups * p.rows * p.Kp : 0]);
  side_t* gtp = grad_taps.mutable_data_ptr<side_t>();
  const bool in_place = rows_in_place(p);

  at::parallel_for(0, p.units * groups, 1, [&](int64_t begin, int64_t end) {
    const int64_t R = p.unit_rows;
    // (the taps' acc_t rows, Kp apart, also for ∂U)
    TapsTile<side_t, acc_t> tb(p, p.Kp, ut.data(), pairs ? ut2.data() : nullptr, true);
    std::vector<acc_t> hb(R * p.CH), gb(in_place ? 0 : R * p.CH), gt_acc(R * p.Kp);
    std::vector<acc_t> tmp(p.CH);
    std::vector<acc_t> th(p.conv ? R * p.CH : 0), gtr(p.conv ? R * p.CH : 0);
    std::vector<const acc_t*> wp(p.kk), ap(p.kk);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t u = task / groups, grp = task % groups;
      const int64_t row0 = p.unit_begin(u), nr = p.unit_size(u);
      tb.load(tp, row0, nr);
      std::fill(gt_acc.begin(), gt_acc.end(), acc_t(0));
      const int64_t j0 = grp * chunks_per_group;
      const int64_t j1 = std::min(p.nchunks, j0 + chunks_per_group);
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t c0 = j * p.CH, w = std::min(p.CH, p.d - c0);
        // DTL reads G in place where it can (its tile copy was a fifth of the backward at
        // the ViT-B shape); every chunk where in_place, which allocated no G tile
        const bool g_in_place = chunk_in_place(p, w);
        if (!g_in_place) load_tile(gp + row0 * p.d + c0, p.d, nr, w, p.CH, gb.data());
        if (!p.conv) {
          // DTL: S = θ'(h) ⊙ G straight from the h rebuild.
          if (g_in_place) {
            tb.template rebuild<Epilogue::kSGrad>(nr, c0, hb.data(), beta, gp + row0 * p.d + c0,
                                                  p.CH, p.d);
          } else {
            tb.template rebuild<Epilogue::kSGrad>(nr, c0, hb.data(), beta, gb.data());
          }
        } else {
          tb.template rebuild<Epilogue::kH>(nr, c0, hb.data());
          // hb ← θ'(h); th ← θ(h) (for grad_conv)
          theta_grad_tile(hb.data(), th.data(), nr * p.CH, beta);
        }
        if (p.conv) {
          const acc_t* thp = th.data() + p.P * p.CH;
          const acc_t* gpatch = gb.data() + p.P * p.CH;
          // grad_conv[t][c] = Σ_p θ(h)[p + off_t][c] · G[p][c] over outputs p whose tap
          // t lands inside the grid.
          acc_t* gw_u = gw_part.data() + u * p.kk * p.dpad + c0;
          for (int64_t dy = 0; dy < p.k; ++dy) {
            const int64_t py0 = std::max<int64_t>(0, p.pad_t - dy);
            const int64_t py1 = std::min<int64_t>(p.gh, p.gh + p.pad_t - dy);
            for (int64_t dx = 0; dx < p.k; ++dx) {
              const int64_t px0 = std::max<int64_t>(0, p.pad_l - dx);
              const int64_t px1 = std::min<int64_t>(p.gw, p.gw + p.pad_l - dx);
              acc_t* dst = gw_u + (dy * p.k + dx) * p.dpad;
              for (int64_t c = 0; c < p.CH; c += V) {
                // two independent chains (even / odd px) hide the FMA latency
                Vec a0(acc_t(0)), a1(acc_t(0));
                for (int64_t py = py0; py < py1; ++py) {
                  const acc_t* grow = gpatch + (py * p.gw) * p.CH + c;
                  const acc_t* trow = thp + ((py + dy - p.pad_t) * p.gw + dx - p.pad_l) * p.CH + c;
                  int64_t px = px0;
                  for (; px + 2 <= px1; px += 2) {
                    a0 = at::vec::fmadd(Vec::loadu(trow + px * p.CH), Vec::loadu(grow + px * p.CH), a0);
                    a1 = at::vec::fmadd(Vec::loadu(trow + (px + 1) * p.CH),
                                        Vec::loadu(grow + (px + 1) * p.CH), a1);
                  }
                  if (px < px1) {
                    a0 = at::vec::fmadd(Vec::loadu(trow + px * p.CH), Vec::loadu(grow + px * p.CH), a0);
                  }
                }
                (Vec::loadu(dst + c) + (a0 + a1)).store(dst + c);
              }
            }
          }
          // gᵀ(G)[q] = Σ_t w_t · G[q − off_t]: the convolution's transpose (gather form).
          std::memcpy(gtr.data(), gb.data(), sizeof(acc_t) * p.P * p.CH);
          acc_t* gtpatch = gtr.data() + p.P * p.CH;
          for (int64_t qy = 0; qy < p.gh; ++qy) {
            const int64_t dy0 = std::max<int64_t>(0, qy + p.pad_t - p.gh + 1);
            const int64_t dy1 = std::min<int64_t>(p.k, qy + p.pad_t + 1);
            for (int64_t qx = 0; qx < p.gw; ++qx) {
              const int64_t dx0 = std::max<int64_t>(0, qx + p.pad_l - p.gw + 1);
              const int64_t dx1 = std::min<int64_t>(p.k, qx + p.pad_l + 1);
              int64_t m = 0;
              for (int64_t dy = dy0; dy < dy1; ++dy) {
                for (int64_t dx = dx0; dx < dx1; ++dx) {
                  const int64_t pidx = (qy - dy + p.pad_t) * p.gw + (qx - dx + p.pad_l);
                  wp[m] = wt.data() + (dy * p.k + dx) * p.dpad + c0;
                  ap[m] = gpatch + pidx * p.CH;
                  ++m;
                }
              }
              gather_sum(wp.data(), ap.data(), m, p.CH, gtpatch + (qy * p.gw + qx) * p.CH);
            }
          }
          // S = θ'(h) ⊙ G' (in hb), G' = gᵀ(G) on patch rows, G on prefix rows
          for (int64_t i = 0; i < nr * p.CH; i += V) {
            (Vec::loadu(hb.data() + i) * Vec::loadu(gtr.data() + i)).store(hb.data() + i);
          }
        }
        const acc_t* S = hb.data();
        // grad_ups partial: [k][c] = Σ_n S[n][c] · T[n][k], 8 columns k at a time.
        acc_t* gu_u = gu_part.get() + u * p.Kp * p.dpad + c0;
        for (int64_t c = 0; c < p.CH; c += V) {
          for (int64_t k = 0; k < p.K; k += 8) {
            Vec a[8];
            for (int i = 0; i < 8; ++i) a[i] = Vec(acc_t(0));
            for (int64_t n = 0; n < nr; ++n) {
              const Vec s = Vec::loadu(S + n * p.CH + c);
              const acc_t* t = tb.rows() + n * p.Kp + k;
              for (int i = 0; i < 8; ++i) a[i] = at::vec::fmadd(s, Vec(t[i]), a[i]);
            }
            for (int i = 0; i < 8; ++i) a[i].store(gu_u + (k + i) * p.dpad + c);
          }
        }
        // grad_taps (this group's channels): gt_acc[n][:] += Σ_c S[n][c] · U[c][:].
        const acc_t* upc = up.data() + c0 * p.Kp;
        int64_t n = 0;
        for (; n + 4 <= nr; n += 4) {
          grad_taps_rows<acc_t, 4>(S + n * p.CH, p.CH, upc, p.K, p.Kp, w,
                                   gt_acc.data() + n * p.Kp);
        }
        for (; n < nr; ++n) {
          grad_taps_rows<acc_t, 1>(S + n * p.CH, p.CH, upc, p.K, p.Kp, w,
                                   gt_acc.data() + n * p.Kp);
        }
      }
      if (groups == 1) {
        for (int64_t n = 0; n < nr; ++n)
          for (int64_t k = 0; k < p.K; ++k)
            gtp[(row0 + n) * p.K + k] = static_cast<side_t>(gt_acc[n * p.Kp + k]);
      } else {
        std::memcpy(gt_part.get() + (grp * p.rows + row0) * p.Kp, gt_acc.data(),
                    sizeof(acc_t) * nr * p.Kp);
      }
    }
  });

  // Fixed-order reductions of the partials.
  if (groups > 1) {
    at::parallel_for(0, p.rows, 256, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r)
        for (int64_t k = 0; k < p.K; ++k) {
          acc_t s(0);
          for (int64_t grp = 0; grp < groups; ++grp) s += gt_part[(grp * p.rows + r) * p.Kp + k];
          gtp[r * p.K + k] = static_cast<side_t>(s);
        }
    });
  }
  side_t* gup = grad_ups.mutable_data_ptr<side_t>();
  // V channels at a time: contiguous loads of the partials (the same sums, in the same order)
  at::parallel_for(0, p.dpad / V, 4, [&](int64_t b, int64_t e) {
    acc_t sums[V];
    for (int64_t cv = b; cv < e; ++cv) {
      const int64_t c0 = cv * V, cn = std::min<int64_t>(V, p.d - c0);
      for (int64_t k = 0; k < p.K; ++k) {
        Vec s(acc_t(0));
        for (int64_t u = 0; u < p.units; ++u)
          s = s + Vec::loadu(gu_part.get() + (u * p.Kp + k) * p.dpad + c0);
        s.store(sums);
        for (int64_t i = 0; i < cn; ++i) gup[(c0 + i) * p.K + k] = static_cast<side_t>(sums[i]);
      }
    }
  });
  if (p.conv) {
    scalar_t* gwp = grad_conv.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < p.d; ++c)
      for (int64_t t = 0; t < p.kk; ++t) {
        acc_t s(0);
        for (int64_t u = 0; u < p.units; ++u) s += gw_part[(u * p.kk + t) * p.dpad + c];
        gwp[c * p.kk + t] = static_cast<scalar_t>(s);
      }
  }
}


at::Tensor side_forward_cpu(const at::Tensor& y_in, const at::Tensor& taps_in,
                            const at::Tensor& ups_in, const std::optional<at::Tensor>& conv_in,
                            int64_t grid_h, int64_t grid_w, int64_t num_prefix, double beta) {
  check_side_inputs("dtl_kernels::side_forward", c10::DeviceType::CPU, kCpuSideLimits, y_in,
                    taps_in, ups_in, conv_in, grid_h, grid_w, num_prefix, beta);
  const at::Tensor y = y_in.contiguous(), taps = taps_in.contiguous(), ups = ups_in.contiguous();
  std::optional<at::Tensor> conv;
  if (conv_in.has_value()) conv = conv_in->contiguous();
  at::Tensor out = at::empty(y.sizes(), y.options());
  if (out.numel() == 0) return out;
  with_host_alloc_named("dtl_kernels::side_forward", [&] {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "side_forward_cpu",
                                    [&] {
                                      using acc_t = at::opmath_type<scalar_t>;
                                      const Plan p = make_plan<acc_t>(y, taps, conv, grid_h,
                                                                      grid_w, num_prefix, false);
                                      with_side_type<scalar_t>(taps.scalar_type(), [&](auto tag) {
                                        side_forward_impl<scalar_t, decltype(tag)>(
                                            y, taps, ups, conv, p, beta, out);
                                      });
                                    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> side_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& taps_in, const at::Tensor& ups_in,
    const std::optional<at::Tensor>& conv_in, int64_t grid_h, int64_t grid_w, int64_t num_prefix,
    double beta) {
  check_side_inputs("dtl_kernels::side_backward", c10::DeviceType::CPU, kCpuSideLimits, grad_in,
                    taps_in, ups_in, conv_in, grid_h, grid_w, num_prefix, beta);
  const at::Tensor g = grad_in.contiguous(), taps = taps_in.contiguous(),
                   ups = ups_in.contiguous();
  std::optional<at::Tensor> conv;
  if (conv_in.has_value()) conv = conv_in->contiguous();
  // every element is written below (the fixed-order reductions): no zero fill, one op less
  at::Tensor grad_taps = at::empty(taps.sizes(), taps.options());
  at::Tensor grad_ups = at::empty(ups.sizes(), ups.options());
  at::Tensor grad_conv =
      conv.has_value() ? at::empty(conv->sizes(), conv->options()) : at::empty({0}, ups.options());
  if (g.numel() == 0) return {grad_taps.zero_(), grad_ups.zero_(), grad_conv.zero_()};
  with_host_alloc_named("dtl_kernels::side_backward", [&] {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "side_backward_cpu",
                                    [&] {
                                      using acc_t = at::opmath_type<scalar_t>;
                                      const Plan p = make_plan<acc_t>(g, taps, conv, grid_h,
                                                                      grid_w, num_prefix, true);
                                      with_side_type<scalar_t>(taps.scalar_type(), [&](auto tag) {
                                        side_backward_impl<scalar_t, decltype(tag)>(
                                            g, taps, ups, conv, p, beta, grad_taps, grad_ups,
                                            grad_conv);
                                      });
                                    });
  });
  return {grad_taps, grad_ups, grad_conv};
}

}  // namespace
}  // namespace dtl

TORCH_LIBRARY_IMPL(dtl_kernels, CPU, m) {
  m.impl("side_forward", &dtl::side_forward_cpu);
  m.impl("side_backward", &dtl::side_backward_cpu);
}
