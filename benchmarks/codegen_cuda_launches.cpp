// Which CUDA kernels the side op launches for one shape, with their grids and dynamic
// shared memory: the GPU's own plan (side_plan.h) and launch sequence (side_launch.h), built
// as host code with the emulation of tests/cuda_emu, launching nothing. Used by
// benchmarks/codegen_check.py (no GPU needed).
//
//   codegen_cuda_launches B N D K ks P H W dtype sms smem_limit
//       dtype: f32 | bf16 | f16 | f64. Prints one line per launch (forward, then backward):
//       "<mangled kernel symbol> <dynamic smem bytes> <grid x> <grid y> <threads>"
// The symbol is the kernel's own (dladdr; build with -rdynamic): the same mangled name the
// cubin has, so the caller joins these lines with ptxas' report by name.
#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "emu_prelude.h"
#include "side_launch.h"

using namespace dtl::cuda_side;

namespace {

struct RecordLaunch {
  template <typename Kernel, typename... Args>
  void operator()(Kernel kernel, dim3 grid, size_t smem, const Args&...) const {
    Dl_info info{};
    const char* name = "?";
    if (dladdr(reinterpret_cast<void*>(kernel), &info) && info.dli_sname) name = info.dli_sname;
    std::printf("%s %zu %u %u %d\n", name, smem, grid.x, grid.y, kThreads);
  }
};

template <typename scalar_t>
int run(char** argv) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = std::atoll(argv[1]), N = std::atoll(argv[2]), D = std::atoll(argv[3]);
  const int K = std::atoi(argv[4]), ks = std::atoi(argv[5]), P = std::atoi(argv[6]);
  const int H = std::atoi(argv[7]), W = std::atoi(argv[8]), sms = std::atoi(argv[10]);
  const size_t limit = size_t(std::atoll(argv[11]));
  // as side.cu's plan_for: the prefix counts only for DTL+
  const Plan p = make_plan(B, N, D, K, ks, ks ? P : 0, H, W, sizeof(scalar_t), sizeof(acc_t),
                           sms, limit);
  if (max_smem(p) > limit) {
    std::fprintf(stderr, "the plan needs %zu bytes of shared memory\n", max_smem(p));
    return 2;
  }
  SideArgs<scalar_t> a{};  // pointers stay null: nothing is launched
  run_side_forward(p, a, RecordLaunch{});
  run_side_backward(p, a, static_cast<scalar_t*>(nullptr), static_cast<scalar_t*>(nullptr),
                    RecordLaunch{});
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 12) {
    std::fprintf(stderr, "usage: %s B N D K ks P H W dtype sms smem_limit\n", argv[0]);
    return 1;
  }
  const std::string dt = argv[9];
  if (dt == "f32") return run<float>(argv);
  if (dt == "f64") return run<double>(argv);
  if (dt == "bf16") return run<c10::BFloat16>(argv);
  if (dt == "f16") return run<c10::Half>(argv);
  std::fprintf(stderr, "unknown dtype %s\n", dt.c_str());
  return 1;
}
