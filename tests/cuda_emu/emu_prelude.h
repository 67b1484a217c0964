// Host emulation of the few CUDA built-ins the side-op kernels (csrc/cuda/side_kernels.cuh)
// use, so their device code can be checked on a machine without a GPU
// (tests/test_side_cuda.py): one std::thread per CUDA thread, std::barrier for
// __syncthreads, a per-block buffer of poisoned bytes (NaN in every float type) for the
// dynamic shared memory. Blocks run one after another.
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
struct AlignedDelete {
  void operator()(unsigned char* p) const { ::operator delete[](p, std::align_val_t(64)); }
};
template <typename F>
void launch(dim3 grid, dim3 block, size_t smem, F&& body) {
  gDim = grid;
  bDim = block;
  const unsigned nthreads = block.x * block.y * block.z;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        // 64-byte aligned like a GPU's shared window; 0xFF bytes read as NaN
        std::unique_ptr<unsigned char[], AlignedDelete> shared(
            new (std::align_val_t(64)) unsigned char[smem + 64]);
        std::memset(shared.get(), 0xFF, smem + 64);
        std::barrier<> barrier(nthreads);
        std::vector<std::thread> ts;
        for (unsigned t = 0; t < nthreads; ++t) {
          ts.emplace_back([&, t] {
            tIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            bIdx = dim3(bx, by, bz);
            smem_ptr = shared.get();
            bar = &barrier;
            body();
          });
        }
        for (auto& th : ts) th.join();
      }
}
}  // namespace emu
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
#define __launch_bounds__(x)
#define __align__(x)
#define DTL_SMEM(name) unsigned char* name = emu::smem_ptr
