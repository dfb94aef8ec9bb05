// The CUDA-on-CPU shim's stand-in for <cuda_fp16.h> (tests only; see ../shim_half.h).
#pragma once
#include "../shim_half.h"
