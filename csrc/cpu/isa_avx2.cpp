// The chunk loops for x86-64 CPUs with AVX2, FMA and F16C (x86-64-v3: Haswell, Zen and later).
// setup.py compiles this file alone with -mavx2 -mfma -mf16c; dispatch.cpp calls it only after
// checking the CPU at run time.
#if !defined(__AVX2__) || !defined(__F16C__)
#error "compile isa_avx2.cpp with -mavx2 -mfma -mf16c"
#endif
#define FC_ISA_GETTER avx2_kernels
#define FC_ISA_NAME "avx2"
#include "chunk_kernels_impl.h"
