// Runs the kernels of csrc/cuda/side_kernels.cuh under the host emulation (emu_prelude.h),
// with the GPU's plan (side_plan.h) and launch sequence (side_launch.h), on inputs from a file.
//
//   driver IN OUT    IN: int64 B N D K k P H W sms dtype smem, float64 beta, then float32
//                    y, taps, ups, w, grad (contiguous); OUT: float64 out, grad_taps,
//                    grad_ups, grad_conv. dtype: 0 float32, 1 float64, 2 float16, 3 bfloat16;
//                    4 / 5: float32 y with bfloat16 / float16 taps and ups (the autocast mix).
//                    smem: the device's shared memory per block (bytes; 0: an H100's 227 KB).
//                    Exit 4, with a message, where the plan does not fit it (side.cu raises).
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <type_traits>

#include "emu_prelude.h"
#include "side_launch.h"

using namespace dtl::cuda_side;

namespace {

template <typename T>
std::vector<T> read_vec(std::ifstream& f, size_t n) {
  std::vector<T> v(n);
  f.read(reinterpret_cast<char*>(v.data()), n * sizeof(T));
  return v;
}

template <typename T>
std::vector<T> cast_vec(const std::vector<float>& v) {
  std::vector<T> o(v.size());
  for (size_t i = 0; i < v.size(); ++i) o[i] = static_cast<T>(v[i]);
  return o;
}

template <typename T>
void write_vec(std::ofstream& o, const std::vector<T>& v) {
  for (const T& x : v) {
    double d;  // exact for every dtype
    if constexpr (std::is_same_v<T, double>) d = x; else d = static_cast<float>(x);
    o.write(reinterpret_cast<const char*>(&d), sizeof(double));
  }
}

// Runs a kernel on the emulated GPU (side_launch.h's launcher interface).
struct EmuLaunch {
  template <typename Kernel, typename... Args>
  void operator()(Kernel kernel, dim3 grid, size_t smem, const Args&... args) const {
    emu::launch(grid, dim3(kThreads), smem, [&] { kernel(args...); });
  }
};

template <typename scalar_t, typename side_t = scalar_t>
void run(const std::vector<int64_t>& hdr, double beta, std::vector<std::vector<float>>& in,
         std::ofstream& o) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = hdr[0], N = hdr[1], D = hdr[2], K = hdr[3], ks = hdr[4], P = hdr[5];
  const int64_t H = hdr[6], W = hdr[7], sms = hdr[8], kk = ks * ks;
  auto y = cast_vec<scalar_t>(in[0]);
  auto taps = cast_vec<side_t>(in[1]), ups = cast_vec<side_t>(in[2]);
  auto w = cast_vec<scalar_t>(in[3]);
  auto g = cast_vec<scalar_t>(in[4]);
  const size_t limit = hdr[10] > 0 ? size_t(hdr[10]) : size_t(227 * 1024);
  const Plan p = make_plan(B, N, D, int(K), int(ks), int(ks ? P : 0), int(H), int(W),
                           sizeof(scalar_t), sizeof(acc_t), int(sms), limit);
  if (max_smem(p) > limit) {
    std::fprintf(stderr, "the plan needs %zu bytes of shared memory, the device has %zu\n",
                 max_smem(p), limit);
    std::exit(4);
  }
  SideArgs<scalar_t, side_t> a{};
  a.y = y.data(), a.y_sb = N * D, a.y_sn = D;
  a.taps = taps.data(), a.t_sb = N * K, a.t_sn = K;
  a.ups = ups.data(), a.w = ks ? w.data() : nullptr;
  a.B = B, a.N = N, a.D = D, a.K = int(K), a.Kp = p.Kp, a.P = p.P, a.H = int(H), a.W = int(W);
  a.beta = beta;
  a.vec = D % 4 == 0;
  // forward (side_forward_cuda)
  std::vector<scalar_t> out(B * N * D, static_cast<scalar_t>(NAN));
  a.out = out.data();
  run_side_forward(p, a, EmuLaunch{});
  // backward (side_backward_cuda), G in place of y
  a.y = g.data();
  std::vector<side_t> gt(B * N * K, static_cast<side_t>(NAN)), gu(D * K);
  std::vector<scalar_t> gc(D * kk);
  std::vector<acc_t> pu(p.slots() * D * K, NAN), pw(ks ? p.slots_conv * D * kk : 0, NAN);
  a.grad_taps = gt.data(), a.part_ups = pu.data(), a.part_w = ks ? pw.data() : nullptr;
  run_side_backward(p, a, gu.data(), ks ? gc.data() : nullptr, EmuLaunch{});
  write_vec(o, out);
  write_vec(o, gt);
  write_vec(o, gu);
  write_vec(o, gc);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  std::ifstream f(argv[1], std::ios::binary);
  const auto hdr = read_vec<int64_t>(f, 11);
  const double beta = read_vec<double>(f, 1)[0];
  const int64_t B = hdr[0], N = hdr[1], D = hdr[2], K = hdr[3], kk = hdr[4] * hdr[4];
  std::vector<std::vector<float>> in;
  for (int64_t n : {B * N * D, B * N * K, D * K, D * kk, B * N * D})
    in.push_back(read_vec<float>(f, n));
  std::ofstream o(argv[2], std::ios::binary);
  switch (hdr[9]) {
    case 0: run<float>(hdr, beta, in, o); break;
    case 1: run<double>(hdr, beta, in, o); break;
    case 2: run<c10::Half>(hdr, beta, in, o); break;
    case 3: run<c10::BFloat16>(hdr, beta, in, o); break;
    case 4: run<float, c10::BFloat16>(hdr, beta, in, o); break;
    case 5: run<float, c10::Half>(hdr, beta, in, o); break;
    default: return 3;
  }
  return 0;
}
