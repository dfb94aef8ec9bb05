// The CUDA kernels of fusedclip._C: one norm launch and one scale launch per clip, for any number
// of tensors and any mix of float32 / float16 / bfloat16 / float64.
//
// Work is split into units: each chunk of the plan (at most chunk_elements elements of one
// tensor) is cut into `parts` units, chosen per plan and GPU so that there are enough units to
// keep every SM busy. Loads are 16 bytes wide (head and tail elements scalar), indices 64-bit.
//
// The norm kernel: persistent blocks claim units from an atomic counter and write one float64
// partial per unit (the value of a unit does not depend on which block computes it). The last
// block to finish (atomic ticket) reduces the partials per tensor and over tensors in a fixed
// order, computes total and coefficient on the device, writes them, and resets the ticket and
// the counter for the next launch. No floating-point atomics, so repeated runs on the same grads
// give the same bits for the same GPU model and SM count (the unit split is sized from the SM
// count; a MIG slice counts with its own), the same build and the same plan. Across SM counts or
// builds the last bits may differ: nvcc may contract `acc + x * x` into an FMA here (the CPU
// build is compiled with -ffp-contract=off).
//
// The scale kernel: every block reads the coefficient first and returns at once when it is 1 (a
// clip coefficient is never above 1, but with a grad scale folded in it can be, and then applies).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../fusedclip.h"
#include "cuda_ops.h"

// Every launch goes through this macro, so the same source also builds as host C++ against the
// CUDA-on-CPU shim of the tests (tests/cuda_shim), whose cuda_runtime.h defines it first.
#ifndef FUSEDCLIP_LAUNCH
#define FUSEDCLIP_LAUNCH(kernel, grid, block, shared_bytes, stream) kernel<<<grid, block, shared_bytes, stream>>>
#endif

namespace fusedclip {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxDevices = 64;
// Units wanted per SM before chunks are split further, and the smallest unit worth making.
constexpr int64_t kUnitsPerSm = 32;
constexpr int64_t kMinUnitElements = 4096;
// The per-tensor fold: tensors with more units than this are folded by a whole warp.
constexpr int64_t kWarpFoldUnits = 8;

// What the norm kernel folds, element by element.
enum Mode { kModeSumSq, kModeSumAbs, kModeSumPow, kModeMax, kModeMin, kModeCount };

template <int M>
struct Fold {
  static constexpr int kind = M == kModeMax ? kMax : (M == kModeMin ? kMin : (M == kModeCount ? kCount : kSumPow));
  __device__ __forceinline__ static double identity() { return acc_identity(kind); }
  // m: the norm scale M' of general p (fusedclip.h), 1.0 without one; other modes ignore it
  __device__ __forceinline__ static double element(double acc, double x, double p, double m) {
    if (M == kModeSumSq) return acc + x * x;
    if (M == kModeSumAbs) return acc + fabs(x);
    if (M == kModeSumPow) return acc + pow(fabs(x) / m, p);
    if (M == kModeCount) return acc + (x != 0.0 ? 1.0 : 0.0);
    const double a = fabs(x);
    // NaN sticks: once acc is NaN neither comparison replaces it
    if (M == kModeMax) return (a > acc || a != a) ? a : acc;
    return (a < acc || a != a) ? a : acc;
  }
  __device__ __forceinline__ static double combine(double a, double b) { return acc_combine(kind, a, b); }
};

// ---- elements and 16-byte vectors -----------------------------------------------------------------

template <int D>
struct Elem {
  static constexpr int size = D == kFloat64 ? 8 : (D == kFloat32 ? 4 : 2);
  static constexpr int per_vector = 16 / size;
};

template <int D>
__device__ __forceinline__ double load_double(const char* base, int64_t i) {
  if (D == kFloat32) return reinterpret_cast<const float*>(base)[i];
  if (D == kFloat64) return reinterpret_cast<const double*>(base)[i];
  if (D == kFloat16) return __half2float(reinterpret_cast<const __half*>(base)[i]);
  return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(base)[i]);
}

// Element k of a 16-byte vector held as four 32-bit words.
template <int D>
__device__ __forceinline__ double vector_element(const uint4& v, int k) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
  if (D == kFloat32) return __uint_as_float(w[k]);
  if (D == kFloat64) return __hiloint2double(static_cast<int>(w[2 * k + 1]), static_cast<int>(w[2 * k]));
  const uint32_t word = w[k / 2];
  const uint32_t bits = (k % 2 == 0) ? (word & 0xffffu) : (word >> 16);
  if (D == kFloat16) return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
  return __uint_as_float(bits << 16);
}

// Rounding a float (double for float64) result back to the element type, as raw bits.
template <int D>
__device__ __forceinline__ uint32_t to_bits16(float x) {
  if (D == kFloat16) return __half_as_ushort(__float2half_rn(x));
  return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}

template <int D>
__device__ __forceinline__ void store_element(char* base, int64_t i, double x) {
  if (D == kFloat32) {
    reinterpret_cast<float*>(base)[i] = static_cast<float>(x);
  } else if (D == kFloat64) {
    reinterpret_cast<double*>(base)[i] = x;
  } else {
    reinterpret_cast<unsigned short*>(base)[i] = static_cast<unsigned short>(to_bits16<D>(static_cast<float>(x)));
  }
}

// The part of a unit that can use aligned 16-byte vectors: [head, head + vectors * per_vector).
struct Split {
  int64_t head;
  int64_t vectors;
};

template <int D>
__device__ __forceinline__ Split split_unit(const char* data, int64_t n) {
  const uintptr_t address = reinterpret_cast<uintptr_t>(data);
  Split split;
  if (address % Elem<D>::size != 0) {
    split.head = n;  // not even element-aligned: all scalar
  } else {
    const int64_t head = static_cast<int64_t>(((16 - (address & 15)) & 15) / Elem<D>::size);
    split.head = head < n ? head : n;
  }
  split.vectors = (n - split.head) / Elem<D>::per_vector;
  return split;
}

// ---- units --------------------------------------------------------------------------------------

struct Unit {
  char* data;
  int64_t length;
  int dtype;
};

// Unit u is part (u % parts) of chunk (u / parts); parts are `step` elements (a multiple of 8, so
// every part keeps the alignment of its tensor).
__device__ __forceinline__ Unit resolve_unit(const Tables& tables, int64_t u, int64_t parts, int64_t step) {
  const Chunk chunk = resolve_chunk(tables, u / parts);
  const int64_t begin = (u % parts) * step;
  Unit unit;
  unit.dtype = chunk.dtype;
  unit.data = chunk.data + begin * dtype_size(chunk.dtype);
  const int64_t left = chunk.length - begin;
  unit.length = left <= 0 ? 0 : (left < step ? left : step);
  return unit;
}

// ---- reductions in a fixed order ------------------------------------------------------------------

template <int M>
__device__ __forceinline__ double warp_reduce(double v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = Fold<M>::combine(v, __shfl_down_sync(0xffffffffu, v, offset));
  return v;
}

// The block's values combined by a fixed tree; the result is valid in thread 0.
template <int M>
__device__ double block_reduce(double v, double* shared) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warp_reduce<M>(v);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? shared[lane] : Fold<M>::identity();
    v = warp_reduce<M>(v);
  }
  __syncthreads();  // shared may be reused right after
  return v;
}

template <int M, int D>
__device__ double fold_unit(const char* data, int64_t n, double p, double m) {
  double acc = Fold<M>::identity();
  const Split split = split_unit<D>(data, n);
  for (int64_t i = threadIdx.x; i < split.head; i += kThreads) acc = Fold<M>::element(acc, load_double<D>(data, i), p, m);
  const uint4* vectors = reinterpret_cast<const uint4*>(data + split.head * Elem<D>::size);
#pragma unroll 4
  for (int64_t v = threadIdx.x; v < split.vectors; v += kThreads) {
    const uint4 raw = __ldg(vectors + v);
#pragma unroll
    for (int k = 0; k < Elem<D>::per_vector; ++k) acc = Fold<M>::element(acc, vector_element<D>(raw, k), p, m);
  }
  for (int64_t i = split.head + split.vectors * Elem<D>::per_vector + threadIdx.x; i < n; i += kThreads) {
    acc = Fold<M>::element(acc, load_double<D>(data, i), p, m);
  }
  return acc;
}

struct NormParams {
  const int64_t* packed;
  int64_t num_tensors;
  int64_t num_chunks;
  int64_t chunk_elements;
  int64_t parts;
  int64_t step;
  double p;
  void* total_out;
  int total_dtype;
  double* acc_out;
  double* coef_out;
  double max_norm;
  const void* max_norm_ptr;
  int max_norm_dtype;
  const void* scale_ptr;
  int scale_dtype;
  const double* norm_scale_ptr;  // general p: the float64 norm scale M on the device, or null
  double* per_tensor_out;
  double* partials;
  unsigned int* counters;  // [0]: units claimed, [1]: blocks finished
};

// M' of fusedclip.h: the norm scale general p is taken relative to (1.0 without one, or for other modes).
template <int M>
__device__ __forceinline__ double norm_scale_of(const NormParams& params) {
  if (M != kModeSumPow || params.norm_scale_ptr == nullptr) return 1.0;
  return usable_norm_scale(*params.norm_scale_ptr);
}

__device__ double read_device_scalar(const void* address, int dtype) {
  switch (dtype) {
    case kFloat32:
      return *static_cast<const float*>(address);
    case kFloat16:
      return __half2float(*static_cast<const __half*>(address));
    case kBFloat16:
      return __bfloat162float(*static_cast<const __nv_bfloat16*>(address));
    default:
      return *static_cast<const double*>(address);
  }
}

__device__ void write_device_scalar(void* address, int dtype, double value) {
  switch (dtype) {
    case kFloat32:
      *static_cast<float*>(address) = static_cast<float>(value);
      break;
    case kFloat16:
      *static_cast<__half*>(address) = __double2half(value);  // rounded once, to nearest even
      break;
    case kBFloat16:
      *static_cast<__nv_bfloat16*>(address) = __double2bfloat16(value);
      break;
    default:
      *static_cast<double*>(address) = value;
  }
}

// Run by the last block: per-tensor accumulators, the total, the outputs, the counter reset.
// Tensors are taken in groups of 32, group g by warp g % kWarps, tensor 32 g + l by lane l; a
// lane folds its tensor's units in order, except tensors with many units, which its whole warp
// folds (lane k takes units k, k + 32, ...; then a fixed tree). Each thread adds its tensors to
// its own running total in increasing order, and a fixed tree combines the threads.
template <int M>
__device__ void finish_norm(const Tables& tables, const NormParams& params, double* shared) {
  constexpr int kind = Fold<M>::kind;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t parts = params.parts;
  const double* partials = params.partials;
  const double m = norm_scale_of<M>(params);
  // For p = 0 the total counts tensors, so its own identity and combine are the sum's.
  constexpr int total_mode = M == kModeCount ? kModeSumSq : M;
  double thread_total = Fold<total_mode>::identity();

  for (int64_t group = warp; group * 32 < tables.num_tensors; group += kWarps) {
    const int64_t t = group * 32 + lane;
    const bool valid = t < tables.num_tensors;
    int64_t first = 0, last = 0;
    if (valid) {
      first = tables.first_chunk[t] * parts;
      last = tables.first_chunk[t + 1] * parts;
    }
    double acc = Fold<M>::identity();
    const bool wide = valid && last - first > kWarpFoldUnits;
    if (valid && !wide) {
      for (int64_t u = first; u < last; ++u) acc = Fold<M>::combine(acc, __ldcg(partials + u));
    }
    unsigned int wide_lanes = __ballot_sync(0xffffffffu, wide);
    while (wide_lanes != 0) {
      const int owner = __ffs(wide_lanes) - 1;
      wide_lanes &= wide_lanes - 1;
      const int64_t begin = __shfl_sync(0xffffffffu, first, owner);
      const int64_t end = __shfl_sync(0xffffffffu, last, owner);
      double part = Fold<M>::identity();
      for (int64_t u = begin + lane; u < end; u += 32) part = Fold<M>::combine(part, __ldcg(partials + u));
      part = warp_reduce<M>(part);
      part = __shfl_sync(0xffffffffu, part, 0);
      if (lane == owner) acc = part;
    }
    if (valid) {
      const bool empty = tables.numels[t] == 0;
      if (params.per_tensor_out != nullptr) {
        // the plain product, not scaled_norm_from_acc: its logarithm fallback costs a register spill on
        // sm_90, and general-p per-tensor norms are taken from the engine's exact path anyway
        params.per_tensor_out[t] = empty ? 0.0 : norm_from_acc(kind, params.p, acc) * m;
      }
      if (!empty) thread_total = Fold<total_mode>::combine(thread_total, tensor_contribution(kind, acc));
    }
  }
  const double total_acc = block_reduce<total_mode>(thread_total, shared);
  if (threadIdx.x == 0) {
    const bool has_max_norm = params.coef_out != nullptr;
    const double max_norm =
        params.max_norm_ptr != nullptr ? read_device_scalar(params.max_norm_ptr, params.max_norm_dtype) : params.max_norm;
    const bool has_scale = params.scale_ptr != nullptr;
    const double scale = has_scale ? read_device_scalar(params.scale_ptr, params.scale_dtype) : 1.0;
    const Finished done = finish(kind, params.p, total_acc, has_max_norm, max_norm, has_scale, scale, m);
    *params.acc_out = total_acc;
    write_device_scalar(params.total_out, params.total_dtype, done.total);
    if (has_max_norm) *params.coef_out = done.coef;
    // Ready for the next launch on this workspace (kernels on a stream run in order).
    params.counters[0] = 0;
    params.counters[1] = 0;
  }
}

template <int M>
__global__ void __launch_bounds__(kThreads) norm_kernel(NormParams params) {
  __shared__ double shared[kWarps];
  __shared__ int64_t claimed;
  __shared__ bool is_last;
  const Tables tables = tables_from_packed(params.packed, params.num_tensors, params.num_chunks, params.chunk_elements);
  const int64_t units = params.num_chunks * params.parts;
  const double m = norm_scale_of<M>(params);
  for (;;) {
    if (threadIdx.x == 0) claimed = atomicAdd(params.counters, 1u);
    __syncthreads();
    const int64_t u = claimed;
    if (u >= units) break;  // every thread read `claimed` before thread 0 can change it again
    const Unit unit = resolve_unit(tables, u, params.parts, params.step);
    double acc;
    switch (unit.dtype) {
      case kFloat32:
        acc = fold_unit<M, kFloat32>(unit.data, unit.length, params.p, m);
        break;
      case kFloat16:
        acc = fold_unit<M, kFloat16>(unit.data, unit.length, params.p, m);
        break;
      case kBFloat16:
        acc = fold_unit<M, kBFloat16>(unit.data, unit.length, params.p, m);
        break;
      default:
        acc = fold_unit<M, kFloat64>(unit.data, unit.length, params.p, m);
        break;
    }
    acc = block_reduce<M>(acc, shared);  // ends with __syncthreads: safe to claim again
    if (threadIdx.x == 0) params.partials[u] = acc;
  }
  // Publish this block's partials, then take a ticket; the last block sees every partial.
  __threadfence();
  if (threadIdx.x == 0) is_last = atomicAdd(params.counters + 1, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  finish_norm<M>(tables, params, shared);
}

// ---- scale and clamp ------------------------------------------------------------------------------

struct ElementwiseParams {
  const int64_t* packed;
  int64_t num_tensors;
  int64_t num_chunks;
  int64_t chunk_elements;
  int64_t parts;
  int64_t step;
  const void* coef_ptr;  // scale: the coefficient on the device
  int coef_dtype;
  double clip_value;     // clamp
};

// What the elementwise kernel does to each element: clamp, scale by float(c), or scale by a c outside
// float's normal range (the exact product rounded once, see product_round_odd in fusedclip.h).
enum ElementwiseOp { kOpClamp, kOpScale, kOpScaleWide };

template <int kOp, int D>
__device__ __forceinline__ double apply(double x, double value, float value_f, const WideCoef& wide) {
  if (D == kFloat64) {
    if (kOp != kOpClamp) return x * value;
    return x > value ? value : (x < -value ? -value : x);
  }
  if (kOp == kOpScaleWide) return product_round_odd(x, wide);  // rounded to odd: see narrow()
  const float xf = static_cast<float>(x);  // exact: x came from a float, half or bfloat16
  if (kOp == kOpScale) return xf * value_f;
  return xf > value_f ? value_f : (xf < -value_f ? -value_f : xf);
}

// A result of apply() as the float a 16-bit element is rounded from: the wide product is rounded to odd
// at float precision, so that the one rounding to half or bfloat16 after it is the only one that counts.
template <int kOp>
__device__ __forceinline__ float narrow(double y) {
  return kOp == kOpScaleWide ? round_odd_to_float(y) : static_cast<float>(y);
}

template <int kOp, int D>
__device__ __forceinline__ void store_result(char* base, int64_t i, double y) {
  if (D == kFloat16 || D == kBFloat16) {
    reinterpret_cast<unsigned short*>(base)[i] = static_cast<unsigned short>(to_bits16<D>(narrow<kOp>(y)));
  } else {
    store_element<D>(base, i, y);
  }
}

template <int kOp, int D>
__device__ void elementwise_unit(char* data, int64_t n, double value, float value_f, const WideCoef& wide) {
  const Split split = split_unit<D>(data, n);
  for (int64_t i = threadIdx.x; i < split.head; i += kThreads) {
    store_result<kOp, D>(data, i, apply<kOp, D>(load_double<D>(data, i), value, value_f, wide));
  }
  uint4* vectors = reinterpret_cast<uint4*>(data + split.head * Elem<D>::size);
#pragma unroll 2
  for (int64_t v = threadIdx.x; v < split.vectors; v += kThreads) {
    const uint4 raw = vectors[v];
    uint32_t w[4];
    if (D == kFloat32) {
#pragma unroll
      for (int k = 0; k < 4; ++k) w[k] = __float_as_uint(static_cast<float>(apply<kOp, D>(vector_element<D>(raw, k), value, value_f, wide)));
    } else if (D == kFloat64) {
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        const double y = apply<kOp, D>(vector_element<D>(raw, k), value, value_f, wide);
        w[2 * k] = static_cast<uint32_t>(__double2loint(y));
        w[2 * k + 1] = static_cast<uint32_t>(__double2hiint(y));
      }
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const uint32_t lo = to_bits16<D>(narrow<kOp>(apply<kOp, D>(vector_element<D>(raw, 2 * k), value, value_f, wide)));
        const uint32_t hi = to_bits16<D>(narrow<kOp>(apply<kOp, D>(vector_element<D>(raw, 2 * k + 1), value, value_f, wide)));
        w[k] = lo | (hi << 16);
      }
    }
    vectors[v] = make_uint4(w[0], w[1], w[2], w[3]);
  }
  for (int64_t i = split.head + split.vectors * Elem<D>::per_vector + threadIdx.x; i < n; i += kThreads) {
    store_result<kOp, D>(data, i, apply<kOp, D>(load_double<D>(data, i), value, value_f, wide));
  }
}

template <int kOp>
__device__ void elementwise_units(const ElementwiseParams& params, double value, float value_f, const WideCoef& wide) {
  const Tables tables = tables_from_packed(params.packed, params.num_tensors, params.num_chunks, params.chunk_elements);
  const int64_t units = params.num_chunks * params.parts;
  for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
    const Unit unit = resolve_unit(tables, u, params.parts, params.step);
    switch (unit.dtype) {
      case kFloat32:
        elementwise_unit<kOp, kFloat32>(unit.data, unit.length, value, value_f, wide);
        break;
      case kFloat16:
        elementwise_unit<kOp, kFloat16>(unit.data, unit.length, value, value_f, wide);
        break;
      case kBFloat16:
        elementwise_unit<kOp, kBFloat16>(unit.data, unit.length, value, value_f, wide);
        break;
      default:
        elementwise_unit<kOp, kFloat64>(unit.data, unit.length, value, value_f, wide);
        break;
    }
  }
}

template <bool kIsScale>
__global__ void __launch_bounds__(kThreads) elementwise_kernel(ElementwiseParams params) {
  double value = params.clip_value;
  if (kIsScale) {
    value = read_device_scalar(params.coef_ptr, params.coef_dtype);
    if (value == 1.0) return;  // unclipped: nothing to write (NaN is not 1 and is applied)
  }
  const float value_f = static_cast<float>(value);
  const WideCoef wide = split_coef(value);
  if (!kIsScale) {
    elementwise_units<kOpClamp>(params, value, value_f, wide);
  } else if (coef_needs_wide(value)) {  // one scalar: the whole launch takes the same branch
    elementwise_units<kOpScaleWide>(params, value, value_f, wide);
  } else {
    elementwise_units<kOpScale>(params, value, value_f, wide);
  }
}

// ---- launch configuration -------------------------------------------------------------------------

struct DeviceInfo {
  int sms = 0;
  int norm_blocks_per_sm[6] = {0, 0, 0, 0, 0, 0};
};
DeviceInfo g_devices[kMaxDevices];

template <int M>
const void* norm_kernel_address() {
  return reinterpret_cast<const void*>(&norm_kernel<M>);
}

const void* norm_kernel_for(int mode) {
  switch (mode) {
    case kModeSumSq:
      return norm_kernel_address<kModeSumSq>();
    case kModeSumAbs:
      return norm_kernel_address<kModeSumAbs>();
    case kModeSumPow:
      return norm_kernel_address<kModeSumPow>();
    case kModeMax:
      return norm_kernel_address<kModeMax>();
    case kModeMin:
      return norm_kernel_address<kModeMin>();
    default:
      return norm_kernel_address<kModeCount>();
  }
}

int mode_for(int kind, double p) {
  switch (kind) {
    case kMax:
      return kModeMax;
    case kMin:
      return kModeMin;
    case kCount:
      return kModeCount;
    default:
      return p == 2.0 ? kModeSumSq : (p == 1.0 ? kModeSumAbs : kModeSumPow);
  }
}

const char* error_text(cudaError_t error) { return error == cudaSuccess ? nullptr : cudaGetErrorString(error); }

// Streaming multiprocessors of `device` (queried once; a plain attribute query, allowed while a
// stream is being captured).
const char* sm_count(int device, int* sms) {
  if (device < 0 || device >= kMaxDevices) return "CUDA device index out of range";
  if (g_devices[device].sms == 0) {
    int count = 0;
    const cudaError_t error = cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
    if (error != cudaSuccess) return cudaGetErrorString(error);
    g_devices[device].sms = count;
  }
  *sms = g_devices[device].sms;
  return nullptr;
}

struct Layout {
  int64_t parts;
  int64_t step;
  int64_t units;
};

Layout layout_for(int64_t num_chunks, int64_t chunk_elements, int sms) {
  const int64_t wanted = kUnitsPerSm * sms;
  int64_t parts = 1;
  if (num_chunks > 0 && num_chunks < wanted) {
    parts = (wanted + num_chunks - 1) / num_chunks;
    const int64_t most = chunk_elements / kMinUnitElements > 1 ? chunk_elements / kMinUnitElements : 1;
    if (parts > most) parts = most;
  }
  Layout layout;
  layout.parts = parts;
  const int64_t per_part = (chunk_elements + parts - 1) / parts;
  layout.step = (per_part + 7) / 8 * 8;
  layout.units = num_chunks * parts;
  return layout;
}

}  // namespace

int64_t norm_units(int device, int64_t num_chunks, int64_t chunk_elements, const char** error) {
  int sms = 0;
  *error = sm_count(device, &sms);
  if (*error != nullptr) return 0;
  return layout_for(num_chunks, chunk_elements, sms).units;
}

const char* norm(const PlanArgs& plan, const NormArgs& args) {
  if (const char* error = error_text(cudaSetDevice(plan.device))) return error;
  int sms = 0;
  if (const char* error = sm_count(plan.device, &sms)) return error;
  const Layout layout = layout_for(plan.num_chunks, plan.chunk_elements, sms);
  const int mode = mode_for(args.kind, args.p);
  int& per_sm = g_devices[plan.device].norm_blocks_per_sm[mode];
  if (per_sm == 0) {
    const cudaError_t error = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, norm_kernel_for(mode), kThreads, 0);
    if (error != cudaSuccess) return cudaGetErrorString(error);
    if (per_sm < 1) per_sm = 1;
  }
  int64_t blocks = static_cast<int64_t>(sms) * per_sm;
  if (layout.units < blocks) blocks = layout.units;
  if (blocks < 1) blocks = 1;  // no units (only empty tensors): one block still writes the results

  NormParams params;
  params.packed = plan.packed;
  params.num_tensors = plan.num_tensors;
  params.num_chunks = plan.num_chunks;
  params.chunk_elements = plan.chunk_elements;
  params.parts = layout.parts;
  params.step = layout.step;
  params.p = args.p;
  params.total_out = args.total_out;
  params.total_dtype = args.total_dtype;
  params.acc_out = args.acc_out;
  params.coef_out = args.coef_out;
  params.max_norm = args.max_norm;
  params.max_norm_ptr = args.max_norm_ptr;
  params.max_norm_dtype = args.max_norm_dtype;
  params.scale_ptr = args.scale_ptr;
  params.scale_dtype = args.scale_dtype;
  params.norm_scale_ptr = args.norm_scale_ptr;
  params.per_tensor_out = args.per_tensor_out;
  params.partials = args.partials;
  params.counters = args.ticket;

  const dim3 grid(static_cast<unsigned int>(blocks)), block(kThreads);
  cudaStream_t stream = static_cast<cudaStream_t>(plan.stream);
  switch (mode) {
    case kModeSumSq:
      FUSEDCLIP_LAUNCH(norm_kernel<kModeSumSq>, grid, block, 0, stream)(params);
      break;
    case kModeSumAbs:
      FUSEDCLIP_LAUNCH(norm_kernel<kModeSumAbs>, grid, block, 0, stream)(params);
      break;
    case kModeSumPow:
      FUSEDCLIP_LAUNCH(norm_kernel<kModeSumPow>, grid, block, 0, stream)(params);
      break;
    case kModeMax:
      FUSEDCLIP_LAUNCH(norm_kernel<kModeMax>, grid, block, 0, stream)(params);
      break;
    case kModeMin:
      FUSEDCLIP_LAUNCH(norm_kernel<kModeMin>, grid, block, 0, stream)(params);
      break;
    default:
      FUSEDCLIP_LAUNCH(norm_kernel<kModeCount>, grid, block, 0, stream)(params);
      break;
  }
  return error_text(cudaGetLastError());
}

namespace {

const char* launch_elementwise(const PlanArgs& plan, bool is_scale, const void* coef_ptr, int coef_dtype,
                               double clip_value) {
  if (const char* error = error_text(cudaSetDevice(plan.device))) return error;
  int sms = 0;
  if (const char* error = sm_count(plan.device, &sms)) return error;
  const Layout layout = layout_for(plan.num_chunks, plan.chunk_elements, sms);
  if (layout.units == 0) return nullptr;  // only empty tensors: nothing to launch for
  ElementwiseParams params;
  params.packed = plan.packed;
  params.num_tensors = plan.num_tensors;
  params.num_chunks = plan.num_chunks;
  params.chunk_elements = plan.chunk_elements;
  params.parts = layout.parts;
  params.step = layout.step;
  params.coef_ptr = coef_ptr;
  params.coef_dtype = coef_dtype;
  params.clip_value = clip_value;
  // One block per unit (the hardware balances them), capped for huge plans (blocks then loop).
  const int64_t blocks = layout.units < (1 << 20) ? layout.units : (1 << 20);
  const dim3 grid(static_cast<unsigned int>(blocks)), block(kThreads);
  cudaStream_t stream = static_cast<cudaStream_t>(plan.stream);
  if (is_scale) {
    FUSEDCLIP_LAUNCH(elementwise_kernel<true>, grid, block, 0, stream)(params);
  } else {
    FUSEDCLIP_LAUNCH(elementwise_kernel<false>, grid, block, 0, stream)(params);
  }
  return error_text(cudaGetLastError());
}

}  // namespace

const char* scale(const PlanArgs& plan, const void* coef_ptr, int coef_dtype) {
  return launch_elementwise(plan, true, coef_ptr, coef_dtype, 0.0);
}

const char* clamp(const PlanArgs& plan, double clip_value) {
  return launch_elementwise(plan, false, nullptr, kFloat64, clip_value);
}

int device_count(const char** error) {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  *error = status == cudaSuccess ? nullptr : cudaGetErrorString(status);
  return status == cudaSuccess ? count : 0;
}

}  // namespace cuda
}  // namespace fusedclip
