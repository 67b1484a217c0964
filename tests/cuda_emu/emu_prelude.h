// Host emulation of the few CUDA built-ins the side-op kernels of csrc/cuda/side.cu use, so
// their device code can be checked on a machine without a GPU (tests/test_side_cuda.py):
// one std::thread per CUDA thread, std::barrier for __syncthreads, a per-block buffer of
// poisoned bytes for the dynamic shared memory. Blocks run one after another.
#pragma once
#include <barrier>
#include <cstdint>
#include <functional>
#include <thread>
#include <vector>
#include <cstring>
#include <cstdio>
#include <cmath>
#include <algorithm>
#include <ATen/OpMathType.h>
#include <c10/util/Half.h>
#include <c10/util/BFloat16.h>
struct dim3 { unsigned x = 1, y = 1, z = 1; dim3() = default; dim3(unsigned a, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
namespace emu {
inline thread_local dim3 tIdx, bIdx;
inline dim3 bDim, gDim;
inline thread_local unsigned char* smem_ptr = nullptr;
inline thread_local std::barrier<>* bar = nullptr;
inline void sync() { bar->arrive_and_wait(); }
template <typename F>
void launch(dim3 grid, dim3 block, size_t smem, F&& body) {
  gDim = grid; bDim = block;
  const unsigned nthreads = block.x * block.y * block.z;
  for (unsigned bz = 0; bz < grid.z; ++bz)
  for (unsigned by = 0; by < grid.y; ++by)
  for (unsigned bx = 0; bx < grid.x; ++bx) {
    std::vector<unsigned char> shared(smem + 64, 0xCD);  // poison: catches reads of unset smem
    std::barrier<> barrier(nthreads);
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < nthreads; ++t) {
      ts.emplace_back([&, t] {
        tIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
        bIdx = dim3(bx, by, bz);
        smem_ptr = shared.data();
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
#define __restrict__ __restrict
#define __launch_bounds__(x)
#define __align__(x)
