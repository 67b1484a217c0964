// Include first in every CPU kernel file (before any ATen header): picks the widest at::vec
// implementation the compiler targets (the variant's -m flags, or -march=native); the vector
// exp comes from the Sleef symbols libtorch_cpu exports.
#pragma once

#if !defined(CPU_CAPABILITY)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__AVX512VL__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif
#endif
