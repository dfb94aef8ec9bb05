// A CUDA-on-CPU shim for the tests: enough of the CUDA language and runtime to build
// csrc/cuda/kernels.cu as host C++ and run its kernels on CPU memory.
//
// Each CUDA thread is a cooperative fiber; a block's fibers run on one OS thread, blocks run
// concurrently on a few OS threads (so atomics, fences and the last-block logic meet real
// concurrency), and within a block a seeded random scheduler picks the next fiber at every
// __syncthreads(), warp intrinsic, atomic and fence. __syncthreads() and the warp intrinsics are
// counting barriers that check that every thread (every lane of the mask) arrives at the same
// kind of barrier; a thread that skips one, exits early or calls a different one is reported as
// a launch error, never a hang. __shared__ is `static thread_local`: one copy per OS thread, and
// an OS thread runs one block at a time, so one copy per running block.
//
// Not part of the product: only tests/cuda_shim/builder.py compiles this.
#pragma once

#include <math.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define __restrict__ __restrict

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned int x, y;
};
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return uint4{x, y, z, w}; }
inline uint2 make_uint2(unsigned int x, unsigned int y) { return uint2{x, y}; }

// ---- runtime API ------------------------------------------------------------------------------

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorNoDevice = 100,
  cudaErrorLaunchFailure = 719,
};
typedef cudaError_t cudaError;
enum cudaDeviceAttr : int { cudaDevAttrMaxThreadsPerBlock = 1, cudaDevAttrMultiProcessorCount = 16 };
struct CUstream_st;
typedef CUstream_st* cudaStream_t;

extern "C" {
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t error);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device);
cudaError_t cudaDeviceSynchronize();
}
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void* kernel, int block_size,
                                                          size_t dynamic_shared_bytes);
template <class F>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, F* kernel, int block_size,
                                                          size_t dynamic_shared_bytes) {
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, reinterpret_cast<const void*>(kernel), block_size,
                                                       dynamic_shared_bytes);
}

namespace cuda_shim {

// What threadIdx, blockIdx, blockDim and gridDim read: the running fiber's coordinates.
struct Coords {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};
extern __thread const Coords* t_coords;

// ---- device intrinsics with scheduling (runtime.cpp) -----------------------------------------
enum WarpKind : int { kShflIdx = 1, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll, kSyncWarp };
void syncthreads(unsigned int line);
uint64_t warp_op(WarpKind kind, unsigned int mask, uint64_t value, int64_t param, int width, unsigned int line);
void maybe_yield();                                   // a scheduling point: atomics and fences
void misaligned(const void* address, size_t alignment, const char* what, unsigned int line);  // reports

template <class T>
inline uint64_t to_bits(T value) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a type wider than 64 bits");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  return bits;
}
template <class T>
inline T from_bits(uint64_t bits) {
  T value;
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

// ---- launches -----------------------------------------------------------------------------------
void launch(void (*body)(void*), void* context, dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
            const char* name);

template <class... P>
struct Launcher {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t shared_bytes;
  cudaStream_t stream;
  const char* name;

  template <class... A>
  void operator()(A&&... args) const {
    // The arguments are converted to the parameter types once, as a launch copies them; every
    // thread then receives its own copy.
    std::tuple<typename std::decay<P>::type...> params(std::forward<A>(args)...);
    struct Context {
      void (*kernel)(P...);
      std::tuple<typename std::decay<P>::type...>* params;
    } context{kernel, &params};
    launch(
        [](void* raw) {
          Context* c = static_cast<Context*>(raw);
          std::apply(c->kernel, *c->params);
        },
        &context, grid, block, shared_bytes, stream, name);
  }
};

template <class... P>
Launcher<P...> make_launcher(void (*kernel)(P...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
                             const char* name) {
  return Launcher<P...>{kernel, grid, block, shared_bytes, stream, name};
}

}  // namespace cuda_shim

#define FUSEDCLIP_LAUNCH(kernel, grid, block, shared_bytes, stream) \
  ::cuda_shim::make_launcher(kernel, grid, block, shared_bytes, stream, #kernel)

#define threadIdx (::cuda_shim::t_coords->thread_idx)
#define blockIdx (::cuda_shim::t_coords->block_idx)
#define blockDim (::cuda_shim::t_coords->block_dim)
#define gridDim (::cuda_shim::t_coords->grid_dim)
constexpr int warpSize = 32;

// ---- barriers and warp intrinsics ------------------------------------------------------------------

inline void __syncthreads(unsigned int line = __builtin_LINE()) { ::cuda_shim::syncthreads(line); }
inline void __syncwarp(unsigned int mask = 0xffffffffu, unsigned int line = __builtin_LINE()) {
  ::cuda_shim::warp_op(::cuda_shim::kSyncWarp, mask, 0, 0, 32, line);
}

template <class T>
inline T __shfl_sync(unsigned int mask, T var, int src_lane, int width = 32, unsigned int line = __builtin_LINE()) {
  return ::cuda_shim::from_bits<T>(
      ::cuda_shim::warp_op(::cuda_shim::kShflIdx, mask, ::cuda_shim::to_bits(var), src_lane, width, line));
}
template <class T>
inline T __shfl_up_sync(unsigned int mask, T var, unsigned int delta, int width = 32,
                        unsigned int line = __builtin_LINE()) {
  return ::cuda_shim::from_bits<T>(
      ::cuda_shim::warp_op(::cuda_shim::kShflUp, mask, ::cuda_shim::to_bits(var), delta, width, line));
}
template <class T>
inline T __shfl_down_sync(unsigned int mask, T var, unsigned int delta, int width = 32,
                          unsigned int line = __builtin_LINE()) {
  return ::cuda_shim::from_bits<T>(
      ::cuda_shim::warp_op(::cuda_shim::kShflDown, mask, ::cuda_shim::to_bits(var), delta, width, line));
}
template <class T>
inline T __shfl_xor_sync(unsigned int mask, T var, int lane_mask, int width = 32,
                         unsigned int line = __builtin_LINE()) {
  return ::cuda_shim::from_bits<T>(
      ::cuda_shim::warp_op(::cuda_shim::kShflXor, mask, ::cuda_shim::to_bits(var), lane_mask, width, line));
}
inline unsigned int __ballot_sync(unsigned int mask, int predicate, unsigned int line = __builtin_LINE()) {
  return static_cast<unsigned int>(::cuda_shim::warp_op(::cuda_shim::kBallot, mask, predicate != 0, 0, 32, line));
}
inline int __any_sync(unsigned int mask, int predicate, unsigned int line = __builtin_LINE()) {
  return static_cast<int>(::cuda_shim::warp_op(::cuda_shim::kAny, mask, predicate != 0, 0, 32, line));
}
inline int __all_sync(unsigned int mask, int predicate, unsigned int line = __builtin_LINE()) {
  return static_cast<int>(::cuda_shim::warp_op(::cuda_shim::kAll, mask, predicate != 0, 0, 32, line));
}
inline unsigned int __activemask() { return 0xffffffffu; }  // the shim has no partial warps

// ---- memory ---------------------------------------------------------------------------------------

// Global loads through the read-only / L2 paths: plain loads, checked for natural alignment (a
// misaligned vector load faults on a GPU).
template <class T>
inline T __ldg(const T* address, unsigned int line = __builtin_LINE()) {
  if (reinterpret_cast<uintptr_t>(address) % alignof(T) != 0) {
    ::cuda_shim::misaligned(address, alignof(T), "__ldg", line);
  }
  return *address;
}
template <class T>
inline T __ldcg(const T* address, unsigned int line = __builtin_LINE()) {
  if (reinterpret_cast<uintptr_t>(address) % alignof(T) != 0) {
    ::cuda_shim::misaligned(address, alignof(T), "__ldcg", line);
  }
  T value;
  __atomic_load(address, &value, __ATOMIC_RELAXED);  // written by other blocks (threads) before a fence
  return value;
}
inline void __threadfence() {
  ::cuda_shim::maybe_yield();
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
}
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// Atomics: relaxed read-modify-writes on plain memory (as on the GPU), each a scheduling point.
template <class T>
inline T atomicAdd(T* address, T value) {
  ::cuda_shim::maybe_yield();
  return __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
}
template <class T>
inline T atomicSub(T* address, T value) {
  ::cuda_shim::maybe_yield();
  return __atomic_fetch_sub(address, value, __ATOMIC_RELAXED);
}
template <class T>
inline T atomicExch(T* address, T value) {
  ::cuda_shim::maybe_yield();
  return __atomic_exchange_n(address, value, __ATOMIC_RELAXED);
}
template <class T>
inline T atomicMax(T* address, T value) {
  ::cuda_shim::maybe_yield();
  T old = __atomic_load_n(address, __ATOMIC_RELAXED);
  while (old < value && !__atomic_compare_exchange_n(address, &old, value, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
template <class T>
inline T atomicMin(T* address, T value) {
  ::cuda_shim::maybe_yield();
  T old = __atomic_load_n(address, __ATOMIC_RELAXED);
  while (value < old && !__atomic_compare_exchange_n(address, &old, value, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
template <class T>
inline T atomicCAS(T* address, T compare, T value) {
  ::cuda_shim::maybe_yield();
  __atomic_compare_exchange_n(address, &compare, value, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return compare;  // the old value either way
}
inline unsigned int atomicInc(unsigned int* address, unsigned int limit) {
  ::cuda_shim::maybe_yield();
  unsigned int old = __atomic_load_n(address, __ATOMIC_RELAXED);
  while (!__atomic_compare_exchange_n(address, &old, old >= limit ? 0u : old + 1u, true, __ATOMIC_RELAXED,
                                      __ATOMIC_RELAXED)) {
  }
  return old;
}

// ---- bit casts and integer intrinsics --------------------------------------------------------------

inline float __uint_as_float(unsigned int bits) { return ::cuda_shim::from_bits<float>(bits); }
inline float __int_as_float(int bits) { return ::cuda_shim::from_bits<float>(static_cast<unsigned int>(bits)); }
inline unsigned int __float_as_uint(float x) { return static_cast<unsigned int>(::cuda_shim::to_bits(x)); }
inline int __float_as_int(float x) { return static_cast<int>(::cuda_shim::to_bits(x)); }
inline double __longlong_as_double(long long bits) {
  return ::cuda_shim::from_bits<double>(static_cast<uint64_t>(bits));
}
inline long long __double_as_longlong(double x) { return static_cast<long long>(::cuda_shim::to_bits(x)); }
inline double __hiloint2double(int hi, int lo) {
  return ::cuda_shim::from_bits<double>((static_cast<uint64_t>(static_cast<uint32_t>(hi)) << 32) |
                                        static_cast<uint32_t>(lo));
}
inline int __double2hiint(double x) { return static_cast<int>(static_cast<uint32_t>(::cuda_shim::to_bits(x) >> 32)); }
inline int __double2loint(double x) { return static_cast<int>(static_cast<uint32_t>(::cuda_shim::to_bits(x))); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned int>(x)); }
