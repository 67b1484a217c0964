// Launch plan of the CUDA side-op kernels (side_kernels.cuh): tile sizes, grids, shared
// memory and the number of partial-sum slots. Plain C++ (no CUDA), so the host entry points
// (side.cu) and the CPU emulation of the kernels (tests/cuda_emu) launch exactly alike.
//
// Every kernel computes h = T·Uᵀ for a tile of BM rows × BD channels with BM·BD = 4096
// (one 4×4 micro tile per thread of 256; with 16-bit taps four 16×8 mma tiles per warp, so
// BM is a multiple of 16). Tiles:
//   forward, rows (DTL; prefix rows of DTL+)   BM 64 rows,   BD 64 channels
//   forward, conv (patch grid of DTL+)         up to 14×14 outputs of one image + halo,
//                                               θ(h) of the halo built in passes of 128,
//                                               BD 32 channels; with 16-bit taps the
//                                               prefix rows in the same launch, as
//                                               BM 128 × BD 32 row tiles (in its smem)
//   backward ∂T (a block covers ALL of d for its rows, so ∂T is reduced on chip):
//                                   rows       BM 16 or 32 rows (≥ ~3 blocks per SM),
//                                              BD 256 or 128 channels per step
//                                   conv       ≤ 64 outputs of one image, BD 64
//   backward ∂U / ∂w (row groups × channel chunks; each block walks the tiles
//                                   g, g + G, … and writes its own fp32 partial slot):
//                                   rows       BM 128, BD 32;  conv  ≤ 128 outputs, BD 32
// The slot count G fills the GPU twice, with all partials within max(kTempFloor,
// kTempShare × y's bytes) — the temporaries rule the Triton backward follows too.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace dtl::cuda_side {

constexpr int kThreads = 256;
constexpr int kMaxK = 128;       // widest taps
constexpr int kMaxKS = 7;        // largest conv
constexpr int kPad = 4;          // shared-memory row padding (elements): quads stay aligned
constexpr double kTempFloor = 4.0 * 1024 * 1024;  // ∂U / ∂w partials may always take 4 MiB,
constexpr double kTempShare = 0.25;               // or a quarter of y's bytes if that is more

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round4(int64_t x) { return (x + 3) / 4 * 4; }

// Spatial tiles of an H×W grid: th×tw outputs each, rows×cols of them per image.
struct Tiles {
  int th = 0, tw = 0, rows = 0, cols = 0;
  int64_t per_image() const { return int64_t(rows) * cols; }
};

// The fewest, most even tiles with sides ≤ max_side, area ≤ max_area and a halo (k − 1
// around) of ≤ max_halo positions.
inline Tiles make_tiles(int H, int W, int ks, int max_side, int max_area, int max_halo) {
  int nr = int(cdiv(H, max_side)), nc = int(cdiv(W, max_side));
  for (;;) {
    const int th = int(cdiv(H, nr)), tw = int(cdiv(W, nc));
    const bool fits = th * tw <= max_area && (th + ks - 1) * (tw + ks - 1) <= max_halo;
    if (fits || (th == 1 && tw == 1)) return Tiles{th, tw, nr, nc};
    if (th >= tw && th > 1) ++nr; else ++nc;
  }
}

struct Plan {
  // problem
  int64_t B = 0, N = 0, D = 0;
  int K = 0, Kp = 0, ks = 0, P = 0, H = 0, W = 0;
  size_t acc_size = 4, io_size = 4;
  // forward
  int fr_bm = 64, fr_bd = 64;
  int fc_bm = 128, fc_bd = 32;
  Tiles fc;
  // backward
  int ar_bm = 32, ar_bd = 128;
  int ac_bm = 64, ac_bd = 64;
  int br_bm = 128, br_bd = 32;
  bool du_rows_kr = true;  // room for the rows ∂U's second ([k][row]) taps copy
  int bc_bm = 128, bc_bd = 32;
  Tiles bc;  // ≤ 64 outputs: ∂T (conv)
  Tiles bu;  // ≤ 128 outputs: ∂U / ∂w (conv)
  int64_t slots_conv = 0, slots_rows = 0;  // partial slots of ∂U (conv tiles, then rows)

  int64_t rows_per_image() const { return ks ? P : N; }  // rows of the rows kernels
  int64_t total_rows() const { return B * rows_per_image(); }
  int64_t slots() const { return slots_conv + slots_rows; }

  size_t smem_fwd_rows() const { return acc_size * (size_t(K) * (fr_bm + kPad) + size_t(K) * (fr_bd + kPad)); }
  size_t smem_fwd_conv() const {
    const size_t halo = size_t(fc.th + ks - 1) * (fc.tw + ks - 1);
    return acc_size * (size_t(K) * (fc_bm + kPad) + size_t(K) * (fc_bd + kPad) +
                       size_t(ks) * ks * fc_bd + halo * fc_bd);
  }
  // The ∂T kernels and the conv ∂U kernel stage their results (∂T; ∂U / ∂w partials) after
  // the tile loop over the loop's buffers, so they need the larger of the two: that keeps
  // Swin-B stage 3 (K = 72) at 2 blocks per SM.
  size_t smem_dt_rows() const {
    const size_t loop = size_t(K) * (ar_bm + kPad) + size_t(K) * (ar_bd + kPad) +
                        size_t(ar_bd) * Kp + size_t(ar_bd) * (ar_bm + kPad);
    return acc_size * std::max(loop, size_t(ar_bm) * Kp);
  }
  size_t smem_dt_conv() const {
    const size_t halo = size_t(bc.th + ks - 1) * (bc.tw + ks - 1);
    const size_t loop = size_t(K) * (ac_bm + kPad) + size_t(K) * (ac_bd + kPad) + size_t(ac_bd) * Kp +
                        size_t(ks) * ks * ac_bd + halo * ac_bd + size_t(ac_bd) * (ac_bm + kPad);
    return acc_size * std::max(loop, size_t(ac_bm) * Kp);
  }
  size_t smem_du_rows() const {
    const size_t loop = size_t(K) * (br_bd + kPad) + (du_rows_kr ? size_t(K) * (br_bm + kPad) : 0) +
                        size_t(br_bm) * Kp + size_t(br_bm) * (br_bd + kPad);
    return acc_size * std::max(loop, size_t(br_bd) * Kp);
  }
  // The conv ∂U keeps one copy of the taps, [row][k]: its product's operand, and h's.
  size_t smem_du_conv() const {
    const size_t halo = size_t(bu.th + ks - 1) * (bu.tw + ks - 1);
    const size_t loop = size_t(K) * (bc_bd + kPad) + size_t(ks) * ks * bc_bd + size_t(bc_bm) * Kp +
                        halo * bc_bd + size_t(bc_bm) * (bc_bd + kPad) + size_t(bc_bm) * bc_bd;
    return acc_size * std::max(loop, size_t(bc_bd) * Kp + size_t(bc_bd) * ks * ks);
  }
};

// The largest dynamic shared memory any kernel the plan launches asks for (the rows kernels
// run only where there are rows: not for DTL+ without prefix tokens, e.g. Swin).
inline size_t max_smem(const Plan& p) {
  size_t m = 0;
  if (p.total_rows() > 0)
    m = std::max(p.smem_fwd_rows(), std::max(p.smem_dt_rows(), p.smem_du_rows()));
  if (p.ks) m = std::max(m, std::max(p.smem_fwd_conv(), std::max(p.smem_dt_conv(), p.smem_du_conv())));
  return m;
}

// sms: multiprocessors of the device (sizes the partial-sum slots); smem_limit: the most
// dynamic shared memory a block may use. Tiles shrink until every kernel fits; when even
// the smallest do not (K = 128 in float64), max_smem(plan) > smem_limit and the caller
// raises.
inline Plan make_plan(int64_t B, int64_t N, int64_t D, int K, int ks, int P, int H, int W,
                      size_t io_size, size_t acc_size, int sms, size_t smem_limit) {
  Plan p;
  p.B = B, p.N = N, p.D = D, p.K = K, p.Kp = int(round4(K)), p.ks = ks, p.P = P, p.H = H,
  p.W = W, p.io_size = io_size, p.acc_size = acc_size;
  // ∂T of rows: a block covers all of d, so thin tiles make enough blocks
  if (cdiv(p.total_rows(), 32) < 3 * int64_t(sms)) p.ar_bm = 16, p.ar_bd = 256;
  if (p.smem_dt_rows() > smem_limit) p.ar_bm = 64, p.ar_bd = 64;  // wide K in float64
  if (p.smem_du_rows() > smem_limit) p.du_rows_kr = false;         // wide K on a small device
  if (ks) {
    // forward: whole 14×14 grids (ViT-B/16, Swin stages 3-4) in one tile; the halo of θ(h)
    // (32 channels) within ~64 KB of shared memory
    p.fc = make_tiles(H, W, ks, 14, 14 * 14, int((64 * 1024) / (acc_size * p.fc_bd)));
    for (int side = 12; p.smem_fwd_conv() > smem_limit && side >= 1; side -= 2)
      p.fc = make_tiles(H, W, ks, side, side * side, 1 << 30);
    // backward: ≤ 64 outputs per tile, so a ViT-B batch gives > 1 block per SM
    p.bc = make_tiles(H, W, ks, 8, p.ac_bm, 1 << 30);
    for (int side = 6; p.smem_dt_conv() > smem_limit && side >= 1; side -= 2)
      p.bc = make_tiles(H, W, ks, side, side * side, 1 << 30);
    p.bu = make_tiles(H, W, ks, 14, p.bc_bm, 1 << 30);
    for (int side = 8; p.smem_du_conv() > smem_limit && side >= 1; side -= 2)
      p.bu = make_tiles(H, W, ks, side, side * side, 1 << 30);
  }
  // ∂U / ∂w partial slots: enough blocks to fill the GPU twice, partials within
  // max(kTempFloor, kTempShare·y)
  const double y_bytes = double(B) * N * D * io_size;
  const double slot_bytes = double(D) * (K + ks * ks) * acc_size;
  const double temp_bytes = std::max(kTempFloor, kTempShare * y_bytes);
  const int64_t budget = std::max<int64_t>(1, int64_t(temp_bytes / slot_bytes));
  const int64_t conv_tiles = ks ? B * p.bu.per_image() : 0;
  const int64_t row_tiles = cdiv(p.total_rows(), p.br_bm);
  const int64_t want = std::max<int64_t>(1, cdiv(2 * int64_t(sms), cdiv(D, p.bc_bd)));
  const int64_t total = std::min(budget, want);
  if (conv_tiles && row_tiles) {  // prefix rows are few: one slot unless there is room
    p.slots_rows = std::min<int64_t>(row_tiles, std::max<int64_t>(1, total / 8));
    p.slots_conv = std::min<int64_t>(conv_tiles, std::max<int64_t>(1, total - p.slots_rows));
  } else if (conv_tiles) {
    p.slots_conv = std::min<int64_t>(conv_tiles, total);
  } else {
    p.slots_rows = std::min<int64_t>(row_tiles, total);
  }
  return p;
}

}  // namespace dtl::cuda_side
