// Run-time choice of the chunk loops: the best instruction set the running CPU supports.
#include <cstring>

#include "chunk_kernels.h"

namespace fusedclip {
namespace cpu {
namespace {

bool cpu_has_avx2() {
#if defined(FUSEDCLIP_HAVE_AVX2) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  // The OS must also save the AVX registers (checked by __builtin_cpu_supports via XGETBV).
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(FUSEDCLIP_HAVE_AVX2) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  // libgcc sets these only when the OS saves the ZMM and mask registers too (XGETBV).
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

struct Registry {
  ChunkKernels tables[3];
  const char* names[3];
  int count = 0;
  int active = 0;

  Registry() {
    tables[count] = base_kernels();
    names[count++] = "base";
#if defined(FUSEDCLIP_HAVE_AVX2)
    if (cpu_has_avx2()) {
      tables[count] = avx2_kernels();
      names[count++] = "avx2";
    }
    if (cpu_has_avx512()) {
      tables[count] = avx512_kernels();
      names[count++] = "avx512";
    }
#endif
    active = count - 1;
  }
};

Registry& registry() {
  static Registry instance;
  return instance;
}

}  // namespace

const ChunkKernels& active_kernels() {
  Registry& r = registry();
  return r.tables[r.active];
}

const char* const* supported_isas(int* count) {
  Registry& r = registry();
  *count = r.count;
  return r.names;
}

bool select_isa(const char* name) {
  Registry& r = registry();
  for (int i = 0; i < r.count; ++i) {
    if (std::strcmp(r.names[i], name) == 0) {
      r.active = i;
      return true;
    }
  }
  return false;
}

}  // namespace cpu
}  // namespace fusedclip
