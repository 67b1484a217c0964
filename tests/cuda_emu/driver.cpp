// Runs the kernels of csrc/cuda/side.cu under the host emulation (emu_prelude.h), with
// the launch configuration of its host functions mirrored here, on inputs from a file.
//
//   driver IN OUT    IN: int64 B N D K k P H W sms dtype, float64 beta, then float32
//                    y, taps, ups, w, grad (contiguous); OUT: float64 out, grad_taps,
//                    grad_ups, grad_conv. dtype: 0 float32, 1 float64, 2 float16, 3 bfloat16.
//
// side_kernels_emu.h is cut from csrc/cuda/side.cu by the test (the kernels, unchanged).
#include <fstream>

#include "side_kernels_emu.h"

using namespace dtl::emu_kernels;

namespace {

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

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
    double v;  // exact for every dtype
    if constexpr (std::is_same_v<T, double>) v = x; else v = static_cast<float>(x);
    o.write(reinterpret_cast<const char*>(&v), sizeof(double));
  }
}

template <typename scalar_t>
void run(const std::vector<int64_t>& hdr, double beta, std::vector<std::vector<float>>& in,
         std::ofstream& o) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = hdr[0], N = hdr[1], D = hdr[2], K = hdr[3], ksize = hdr[4], P = hdr[5];
  const int64_t gh = hdr[6], gw = hdr[7], sms = hdr[8], kk = ksize * ksize;
  auto y = cast_vec<scalar_t>(in[0]), taps = cast_vec<scalar_t>(in[1]);
  auto ups = cast_vec<scalar_t>(in[2]), w = cast_vec<scalar_t>(in[3]);
  auto g = cast_vec<scalar_t>(in[4]);
  std::vector<scalar_t> out(B * N * D, static_cast<scalar_t>(NAN));
  const dim3 block(kBD, kTY);
  const int64_t dchunks = cdiv(D, kBD);
  // side_forward_cuda
  const int64_t rows = ksize ? P : N;
  if (rows > 0) {
    const size_t smem = sizeof(acc_t) * (K * kPitch + kBM * K);
    emu::launch(dim3(cdiv(B * rows, kBM), dchunks), block, smem, [&] {
      side_rows_fwd_kernel<scalar_t>(y.data(), N * D, D, taps.data(), N * K, K, ups.data(),
                                     out.data(), B, rows, N, D, int(K), beta);
    });
  }
  if (ksize) {
    const int64_t halo = kTile + ksize - 1, tiles_w = cdiv(gw, kTile);
    const int64_t tiles = cdiv(gh, kTile) * tiles_w;
    const size_t smem = sizeof(acc_t) * kPitch * (K + kk + halo * halo);
    emu::launch(dim3(B * tiles, dchunks), block, smem, [&] {
      side_conv_fwd_kernel<scalar_t>(y.data(), N * D, D, taps.data(), N * K, K, ups.data(),
                                     w.data(), out.data(), N, D, int(K), int(P), int(gh),
                                     int(gw), int(ksize), int(tiles_w), int(tiles), beta);
    });
  }
  // side_backward_cuda
  const int64_t tiles_per_image = cdiv(N, kBM), total = B * tiles_per_image;
  const int64_t slots = std::max<int64_t>(1, std::min<int64_t>(total, (4 * sms) / dchunks));
  std::vector<acc_t> pt(dchunks * B * N * K, NAN), pu(slots * D * K, NAN);
  std::vector<acc_t> pw(ksize ? slots * D * kk : 0, NAN);
  {
    const size_t smem = sizeof(acc_t) * (K * kPitch + kk * kPitch + kBM * K + 2 * kBM * kPitch);
    emu::launch(dim3(slots, dchunks), block, smem, [&] {
      side_bwd_kernel<scalar_t>(g.data(), N * D, D, taps.data(), N * K, K, ups.data(),
                                ksize ? w.data() : nullptr, pt.data(), pu.data(),
                                ksize ? pw.data() : nullptr, B, N, D, int(K), int(P), int(gh),
                                int(gw), int(ksize), tiles_per_image, beta);
    });
  }
  std::vector<scalar_t> gt(B * N * K), gu(D * K), gc(D * kk);
  auto sum = [&](std::vector<acc_t>& part, std::vector<scalar_t>& res, int64_t n_slots) {
    const int64_t m = res.size();
    if (m == 0) return;
    emu::launch(dim3(std::min<int64_t>(cdiv(m, 256), 65535)), dim3(256), 0, [&] {
      sum_partials_kernel<acc_t, scalar_t>(part.data(), res.data(), n_slots, m);
    });
  };
  sum(pt, gt, dchunks);
  sum(pu, gu, slots);
  if (ksize) sum(pw, gc, slots);
  write_vec(o, out);
  write_vec(o, gt);
  write_vec(o, gu);
  write_vec(o, gc);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  std::ifstream f(argv[1], std::ios::binary);
  const auto hdr = read_vec<int64_t>(f, 10);
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
    default: return 3;
  }
  return 0;
}
