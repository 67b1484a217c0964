// Host emulation of the few CUDA built-ins the side-op kernels (csrc/cuda/side_kernels.cuh)
// use, so their device code can be checked on a machine without a GPU
// (tests/test_side_cuda.py): one std::thread per CUDA thread, std::barrier for
// __syncthreads, a buffer of poisoned bytes (NaN in every float type), poisoned again for
// every block, for the dynamic shared memory. Blocks run one after another.
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <new>
#include <thread>
#include <vector>

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3() = default;
  dim3(unsigned a, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
namespace emu {
inline thread_local dim3 tIdx, bIdx;
inline dim3 bDim, gDim;
inline thread_local unsigned char* smem_ptr = nullptr;
inline thread_local std::barrier<>* bar = nullptr;
inline void sync() { bar->arrive_and_wait(); }
// A warp's registers, exchanged for warp-collective instructions (mma.sync)
struct Warp {
  std::barrier<> bar{32};
  uint32_t a[32][4], b[32][2];
};
inline thread_local Warp* warp = nullptr;
inline thread_local unsigned lane = 0;
struct AlignedDelete {
  void operator()(unsigned char* p) const { ::operator delete[](p, std::align_val_t(64)); }
};
template <typename F>
void launch(dim3 grid, dim3 block, size_t smem, F&& body) {
  gDim = grid;
  bDim = block;
  const unsigned nthreads = block.x * block.y * block.z;
  const unsigned long long blocks = 1ull * grid.x * grid.y * grid.z;
  // 64-byte aligned like a GPU's shared window, exactly the bytes asked for (an
  // AddressSanitizer build sees any access past them); 0xFF bytes read as NaN
  const size_t bytes = smem > 0 ? smem : 1;
  std::unique_ptr<unsigned char[], AlignedDelete> shared(
      new (std::align_val_t(64)) unsigned char[bytes]);
  auto poison = [&]() noexcept { std::memset(shared.get(), 0xFF, bytes); };
  poison();
  // The blocks run one after another on the same threads (starting threads per block cost
  // more than the kernels): the last thread to finish a block poisons the window again.
  std::barrier<> barrier(nthreads);
  std::barrier<decltype(poison)> block_done(nthreads, poison);
  std::vector<std::unique_ptr<Warp>> warps((nthreads + 31) / 32);
  for (auto& w : warps) w = std::make_unique<Warp>();
  std::vector<std::thread> ts;
  for (unsigned t = 0; t < nthreads; ++t) {
    ts.emplace_back([&, t] {
      tIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      smem_ptr = shared.get();
      bar = &barrier;
      warp = warps[t / 32].get();
      lane = t % 32;
      for (unsigned long long b = 0; b < blocks; ++b) {  // x fastest, as a GPU numbers them
        bIdx = dim3(b % grid.x, (b / grid.x) % grid.y, b / (1ull * grid.x * grid.y));
        body();
        block_done.arrive_and_wait();
      }
    });
  }
  for (auto& th : ts) th.join();
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: d += A·B for the warp, every lane
// passing its fragment registers as PTX lays them out ("Matrix Fragments for mma.m16n8k16
// with floating point type"; g = lane / 4, t = lane % 4): A (16×16, row) a[r] holds
// (row g + 8·(r & 1), cols 2t + 8·(r >> 1) + {0, 1}); B (16×8, col) b[r] holds
// (rows 2t + 8r + {0, 1}, col g); C / D (16×8) d[i] is (row g + 8·(i >> 1), col 2t + (i & 1)).
// Products of the 16-bit values are exact in float; they are summed in k order (the
// hardware's order and internal rounding are its own).
template <typename mma_t>
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  for (int r = 0; r < 4; ++r) warp->a[lane][r] = a[r];
  for (int r = 0; r < 2; ++r) warp->b[lane][r] = b[r];
  warp->bar.arrive_and_wait();
  const auto value = [](uint32_t reg, int half) {
    mma_t v;
    v.x = static_cast<uint16_t>(reg >> (16 * half));
    return static_cast<float>(v);
  };
  float A[16][16], B[16][8];
  for (unsigned l = 0; l < 32; ++l) {
    const unsigned g = l / 4, t = l % 4;
    for (int r = 0; r < 4; ++r)
      for (int h = 0; h < 2; ++h) A[g + 8 * (r & 1)][2 * t + 8 * (r >> 1) + h] = value(warp->a[l][r], h);
    for (int r = 0; r < 2; ++r)
      for (int h = 0; h < 2; ++h) B[2 * t + 8 * r + h][g] = value(warp->b[l][r], h);
  }
  const unsigned g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const unsigned m = g + 8 * (i >> 1), n = 2 * t + (i & 1);
    float s = 0;
    for (int k = 0; k < 16; ++k) s += A[m][k] * B[k][n];
    d[i] += s;
  }
  warp->bar.arrive_and_wait();  // no lane overwrites the exchange before all have read it
}
}  // namespace emu
#define DTL_CUDA_EMULATION 1
#define threadIdx emu::tIdx
#define blockIdx emu::bIdx
#define blockDim emu::bDim
#define gridDim emu::gDim
#define __syncthreads() emu::sync()
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(x)
#define DTL_SMEM(name) unsigned char* name = emu::smem_ptr
