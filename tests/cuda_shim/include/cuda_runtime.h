// The CUDA-on-CPU shim's stand-in for <cuda_runtime.h> (tests only; see ../shim.h).
#pragma once
#include "../shim.h"
