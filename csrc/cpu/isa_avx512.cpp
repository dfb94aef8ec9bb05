// The chunk loops for x86-64 CPUs with AVX-512 F/BW/DQ/VL (x86-64-v4: Skylake-SP, Ice Lake, Zen 4
// and later), plus AVX2, FMA and F16C. setup.py compiles this file alone with the matching -m flags;
// dispatch.cpp calls it only after checking the CPU (and the OS's support for its registers) at
// run time.
#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512DQ__) || !defined(__AVX512VL__) || !defined(__F16C__)
#error "compile isa_avx512.cpp with -mavx512f -mavx512bw -mavx512dq -mavx512vl -mavx2 -mfma -mf16c"
#endif
#define FC_ISA_GETTER avx512_kernels
#define FC_ISA_NAME "avx512"
#include "chunk_kernels_impl.h"
