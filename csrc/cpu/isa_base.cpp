// The chunk loops for any CPU: compiled without instruction-set flags (plain C++).
#define FC_ISA_GETTER base_kernels
#define FC_ISA_NAME "base"
#include "chunk_kernels_impl.h"
