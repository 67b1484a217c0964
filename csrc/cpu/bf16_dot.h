// AVX512-BF16's dot product of bf16 pairs (vdpbf16ps) for the CPU kernels' h rebuild where
// the taps and ups are bf16 (autocast's mix, all-bf16): each fp32 lane adds the products
// of a pair of bf16 values in one instruction, twice the multiply-adds per instruction of
// the float32 path, which converts the bf16 values to float32 first. Products of bf16
// values are exact in float32, so h differs from the float32 path only in the order of
// its additions (each pair's odd product, then its even one, each rounded) and in that the
// instruction treats inputs and results below FLT_MIN (1.2e-38) as zero.
//
// Built into the AVX-512 variant (or a -march=native build with AVX-512) with the
// instruction enabled per function, and used only where the CPU has it (checked at run
// time), so that the variant still runs on AVX-512 CPUs without it.
#pragma once

#include <strings.h>

#include <cstdlib>
#include <cstring>

// Compilers known to take the intrinsics, the per-function target and the run-time check
// (GCC 12 is what builds it here); others build the float32 path only.
#if defined(__clang__)
#define DTL_BF16_DOT_COMPILER (__clang_major__ >= 14)
#elif defined(__GNUC__)
#define DTL_BF16_DOT_COMPILER (__GNUC__ >= 12)
#else
#define DTL_BF16_DOT_COMPILER 0
#endif

#if defined(CPU_CAPABILITY_AVX512) && defined(__x86_64__) && DTL_BF16_DOT_COMPILER
#define DTL_BF16_DOT 1
#define DTL_BF16_DOT_TARGET __attribute__((target("avx512bf16")))
#include <immintrin.h>
#else
#define DTL_BF16_DOT 0
#define DTL_BF16_DOT_TARGET
#endif

namespace dtl {

// Whether the kernels rebuild h with vdpbf16ps: built in, the CPU (and OS) runs it, and
// DTL_KERNELS_CPU_BF16_DOT is not 0 / false / no / off (any case, spaces around ignored;
// read once, at the first call). Hidden: one flag per extension module, not shared with
// another that defines it.
__attribute__((visibility("hidden"))) inline bool bf16_dot_active() {
#if DTL_BF16_DOT
  static const bool on = [] {
    const char* env = std::getenv("DTL_KERNELS_CPU_BF16_DOT");
    if (env != nullptr) {
      while (*env == ' ' || *env == '\t') ++env;
      size_t n = std::strlen(env);
      while (n > 0 && (env[n - 1] == ' ' || env[n - 1] == '\t' || env[n - 1] == '\n')) --n;
      static const char* const kOff[] = {"0", "false", "no", "off"};
      for (const char* off : kOff)
        if (n == std::strlen(off) && strncasecmp(env, off, n) == 0) return false;
    }
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") != 0;
  }();
  return on;
#else
  return false;
#endif
}

}  // namespace dtl
