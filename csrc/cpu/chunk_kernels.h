// The per-chunk loops of the CPU backend, one table of them per instruction set.
//
// chunk_kernels_impl.h is compiled once per instruction set (isa_base.cpp, isa_avx2.cpp,
// isa_avx512.cpp) and the best table the running CPU supports is chosen at run time
// (dispatch.cpp): portable binaries without -march=native. Every table produces the same bits:
// each chunk is reduced into 16 logical double lanes in the same order whatever the vector width.
#pragma once

#include <cstdint>

#include "../fusedclip.h"

namespace fusedclip {
namespace cpu {

struct ChunkKernels {
  const char* isa;  // name of the instruction set the loops were compiled for
  // partials[c] = the accumulator of chunk c, for c in [begin, end); general p sums (|x| / norm_scale)^p
  // (norm_scale: M' of fusedclip.h, 1.0 without a norm scale)
  void (*norm)(const Tables& tables, int64_t begin, int64_t end, int kind, double p, double norm_scale,
               double* partials);
  // x = round(x * coef) over chunks [begin, end) (see fusedclip.h for coefficients outside float's range)
  void (*scale)(const Tables& tables, int64_t begin, int64_t end, double coef);
  // x = clamp(x, -clip_value, clip_value) over chunks [begin, end)
  void (*clamp)(const Tables& tables, int64_t begin, int64_t end, double clip_value);
};

ChunkKernels base_kernels();
#if defined(FUSEDCLIP_HAVE_AVX2)
ChunkKernels avx2_kernels();
ChunkKernels avx512_kernels();
#endif

// The table in use: the best one this CPU supports, unless lowered with select_isa.
const ChunkKernels& active_kernels();
// Names of the tables this CPU can run, best last.
const char* const* supported_isas(int* count);
// Use the named table ("base", "avx2", "avx512"); returns false when this CPU or build cannot run it.
bool select_isa(const char* name);

}  // namespace cpu
}  // namespace fusedclip
