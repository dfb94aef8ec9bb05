// Kernels that test the CUDA-on-CPU shim itself (tests/test_cuda_emulated.py): the warp
// intrinsics' results, per-block shared memory, atomics across concurrently running blocks,
// seeded schedules, and that each kind of divergence or misalignment is reported. Built with the
// shim like kernels.cu; never part of the product.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <string>

#define SELFTEST_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

// out[t * 8 + k]: lane values of the warp intrinsics, for the test to compare with its own model.
__global__ void warp_intrinsics(int64_t* out, int width) {
  const int t = threadIdx.x, lane = t % 32;
  const int64_t v = 1000 + t;
  int64_t* o = out + t * 8;
  o[0] = __shfl_sync(0xffffffffu, v, (lane * 7 + 3) % 32, width);
  o[1] = __shfl_down_sync(0xffffffffu, v, 5, width);
  o[2] = __shfl_up_sync(0xffffffffu, v, 3, width);
  o[3] = __shfl_xor_sync(0xffffffffu, v, 6, width);
  o[4] = __ballot_sync(0xffffffffu, lane % 3 == 0);
  o[5] = __any_sync(0xffffffffu, t == 37);
  o[6] = __all_sync(0xffffffffu, lane < 31);
  // two half-warp groups, each with its own mask
  o[7] = __shfl_sync(0x0000ffffu << (lane & 16), static_cast<double>(v) / 2, lane / 16 * 16 + 1) * 2;
}

// Every block writes its index into shared memory, meets other blocks' atomics, and reads it back.
__global__ void shared_per_block(unsigned int* counter, unsigned int* mismatches) {
  __shared__ unsigned int mine;
  __shared__ unsigned int values[256];
  if (threadIdx.x == 0) mine = blockIdx.x;
  values[threadIdx.x] = blockIdx.x * 1000u + threadIdx.x;
  __syncthreads();
  for (int i = 0; i < 4; ++i) atomicAdd(counter, 1u);  // scheduling points while other blocks run
  __threadfence();
  __syncthreads();
  const unsigned int next = (threadIdx.x + 1) % blockDim.x;
  if (mine != blockIdx.x || values[next] != blockIdx.x * 1000u + next) {
    atomicAdd(mismatches, 1u);
  }
}

__global__ void atomics(unsigned int* add, unsigned int* inc, unsigned long long* cas_sum, int* maximum) {
  atomicAdd(add, 1u);
  atomicInc(inc, 99u);  // wraps to 0 after 99
  unsigned long long old = *cas_sum, seen;
  do {
    seen = old;
    old = atomicCAS(cas_sum, seen, seen + threadIdx.x + 1);
  } while (old != seen);
  atomicMax(maximum, static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x));
}

// The order in which a single block's threads pass an atomic: the schedule.
__global__ void schedule_order(unsigned int* ticket, unsigned int* order) {
  const unsigned int mine = atomicAdd(ticket, 1u);
  order[mine] = threadIdx.x;
}

// Bugs the shim must report.
__global__ void ballot_by_some_lanes(unsigned int* out) {
  if (threadIdx.x % 32 < 16) out[threadIdx.x] = __ballot_sync(0xffffffffu, 1);
}
__global__ void syncthreads_in_a_branch(unsigned int* out) {
  if (threadIdx.x < 128) __syncthreads();
  out[threadIdx.x] = 1;
}
__global__ void shuffle_against_ballot(unsigned int* out) {
  if (threadIdx.x % 2 == 0) {
    out[threadIdx.x] = __shfl_sync(0xffffffffu, threadIdx.x, 0);
  } else {
    out[threadIdx.x] = __ballot_sync(0xffffffffu, 1);
  }
}
__global__ void exit_before_syncthreads(unsigned int* out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}
__global__ void mask_without_own_lane(unsigned int* out) {
  out[threadIdx.x] = __shfl_sync(threadIdx.x % 32 == 1 ? 0x1u : 0xffffffffu, threadIdx.x, 0);
}
__global__ void shuffle_from_lane_outside_mask(unsigned int* out) {
  out[threadIdx.x] = __shfl_sync(0x0000ffffu << (threadIdx.x & 16), threadIdx.x, 20);
}
__global__ void misaligned_vector_load(const unsigned char* data, unsigned int* out) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(data + 4));
  out[threadIdx.x] = v.x;
}
__global__ void well_behaved(unsigned int* out) {
  unsigned int v = __shfl_down_sync(0xffffffffu, threadIdx.x, 1);
  __syncthreads();
  out[threadIdx.x] = v + __ballot_sync(0xffffffffu, 1);
}

template <class... P, class... A>
const char* run(void (*kernel)(P...), const char* name, unsigned int blocks, unsigned int threads, A... args) {
  cuda_shim::make_launcher(kernel, dim3(blocks), dim3(threads), 0, nullptr, name)(args...);
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

int report(const char* error, char* out, int size) {
  if (error == nullptr) return 0;
  snprintf(out, static_cast<size_t>(size), "%s", error);
  return 1;
}

}  // namespace

// Runs self-test `name` on emulated device `device`; returns 0 on a clean launch, else 1 with the
// shim's message in `error`. Buffers are the test's (sizes as the kernels above use them).
SELFTEST_EXPORT int cuda_shim_selftest(const char* name, int device, int64_t a, int64_t b, int64_t c, int64_t d,
                                       int64_t width, char* error, int error_size) {
  if (cudaSetDevice(device) != cudaSuccess) return report("bad device", error, error_size);
  const std::string which(name);
  auto u32 = [](int64_t address) { return reinterpret_cast<unsigned int*>(static_cast<uintptr_t>(address)); };
  const char* result = "unknown self-test";
  if (which == "warp_intrinsics") {
    result = run(warp_intrinsics, "warp_intrinsics", 1, 64, reinterpret_cast<int64_t*>(a), static_cast<int>(width));
  } else if (which == "shared_per_block") {
    result = run(shared_per_block, "shared_per_block", 64, 256, u32(a), u32(b));
  } else if (which == "atomics") {
    result = run(atomics, "atomics", 64, 256, u32(a), u32(b), reinterpret_cast<unsigned long long*>(c),
                 reinterpret_cast<int*>(d));
  } else if (which == "schedule_order") {
    result = run(schedule_order, "schedule_order", 1, 256, u32(a), u32(b));
  } else if (which == "ballot_by_some_lanes") {
    result = run(ballot_by_some_lanes, "ballot_by_some_lanes", 2, 256, u32(a));
  } else if (which == "syncthreads_in_a_branch") {
    result = run(syncthreads_in_a_branch, "syncthreads_in_a_branch", 2, 256, u32(a));
  } else if (which == "shuffle_against_ballot") {
    result = run(shuffle_against_ballot, "shuffle_against_ballot", 2, 256, u32(a));
  } else if (which == "exit_before_syncthreads") {
    result = run(exit_before_syncthreads, "exit_before_syncthreads", 2, 256, u32(a));
  } else if (which == "mask_without_own_lane") {
    result = run(mask_without_own_lane, "mask_without_own_lane", 1, 64, u32(a));
  } else if (which == "shuffle_from_lane_outside_mask") {
    result = run(shuffle_from_lane_outside_mask, "shuffle_from_lane_outside_mask", 1, 32, u32(a));
  } else if (which == "misaligned_vector_load") {
    result = run(misaligned_vector_load, "misaligned_vector_load", 1, 32, reinterpret_cast<const unsigned char*>(a),
                 u32(b));
  } else if (which == "well_behaved") {
    result = run(well_behaved, "well_behaved", 8, 256, u32(a));
  }
  return report(result, error, error_size);
}
