// The kernel contract shared by the CPU and CUDA kernels of fusedclip._C.
//
// The extension sees no torch types: Python passes the address of the plan's packed int64 table
// buffer (see fusedclip/plan.py, KernelTables), element counts, dtype codes and raw addresses of
// the output tensors it allocated. Everything here compiles for the host and, under nvcc, for the
// device, so both backends compute the total norm and the clip coefficient with the same code.
//
// Semantics (the Python side documents the same in fusedclip/backends/kernel_base.py):
//  * accumulator: finite p != 0: sum of |x|^p in double; inf: max |x|; -inf: min |x| (both
//    NaN-propagating); 0: number of tensors holding an element != 0 (NaN counts). The CPU kernels
//    sum p = 1, 2 over float/half/bfloat16 data in float blocks of 256 elements added into the
//    double sum, with blocks float cannot sum exactly enough redone in double
//    (cpu/chunk_kernels_impl.h): at least float accumulation, as the API promises, at memory speed.
//  * total: accumulator (p = 1, inf, -inf, 0), its square root (p = 2) or its 1/p power; times |s|
//    when a grad scale s is given (not for p = 0).
//  * coefficient: r = max_norm / (total + 1e-6); c = r > 1 ? 1 : r (NaN propagates); times s.
//  * scale: nothing to do when c == 1; otherwise x = round(float(x) * float(c)) (double for fp64).
//    (A clip coefficient is never above 1, but with a grad scale folded in it can be.)
//  * clamp: x > v ? v : (x < -v ? -v : x), computed in float (double for fp64), NaN stays NaN.
#pragma once

#include <cstdint>
#include <cstring>

// Every function here has internal linkage (static): the CPU kernels are compiled several times
// with different instruction sets, and a shared inline copy picked by the linker could carry
// instructions the running CPU lacks.
#if defined(__CUDACC__)
#define FC_HD static __host__ __device__ __forceinline__
#define FC_SQRT(x) sqrt(x)
#define FC_POW(x, y) pow(x, y)
#if defined(__CUDA_ARCH__)
#define FC_INF (__longlong_as_double(0x7ff0000000000000LL))
#else
#define FC_INF (__builtin_inf())
#endif
#else
#define FC_HD static inline
#define FC_SQRT(x) __builtin_sqrt(x)
#define FC_POW(x, y) __builtin_pow(x, y)
#define FC_INF (__builtin_inf())
#endif
#define FC_HOST static inline

namespace fusedclip {

// dtype codes (fusedclip.plan.DTYPE_CODES)
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };
// norm kinds (fusedclip.norm_type.NormKind)
enum NormKind : int { kSumPow = 0, kMax = 1, kMin = 2, kCount = 3 };

constexpr double kClipEps = 1e-6;

FC_HD int dtype_size(int code) { return code == kFloat64 ? 8 : (code == kFloat32 ? 4 : 2); }
FC_HD bool valid_dtype(int64_t code) { return code >= 0 && code <= 3; }

// Read-only view of the plan's tables: the packed buffer holds, in this order,
// addresses[T], numels[T], dtype_codes[T], first_chunk[T + 1], chunk_tensor[C], chunk_start[C].
struct Tables {
  const int64_t* addresses;
  const int64_t* numels;
  const int64_t* dtype_codes;
  const int64_t* first_chunk;
  const int64_t* chunk_tensor;
  const int64_t* chunk_start;
  int64_t num_tensors;
  int64_t num_chunks;
  int64_t chunk_elements;
};

FC_HD Tables tables_from_packed(const int64_t* packed, int64_t t, int64_t c, int64_t chunk_elements) {
  Tables tables;
  tables.addresses = packed;
  tables.numels = packed + t;
  tables.dtype_codes = packed + 2 * t;
  tables.first_chunk = packed + 3 * t;
  tables.chunk_tensor = packed + 4 * t + 1;
  tables.chunk_start = packed + 4 * t + 1 + c;
  tables.num_tensors = t;
  tables.num_chunks = c;
  tables.chunk_elements = chunk_elements;
  return tables;
}

// One chunk resolved against the tensor table.
struct Chunk {
  char* data;      // first element of the chunk
  int64_t length;  // elements in the chunk (<= chunk_elements)
  int dtype;       // dtype code of the chunk's tensor
};

FC_HD Chunk resolve_chunk(const Tables& tables, int64_t chunk) {
  const int64_t tensor = tables.chunk_tensor[chunk];
  const int64_t start = tables.chunk_start[chunk];
  const int dtype = static_cast<int>(tables.dtype_codes[tensor]);
  const int64_t left = tables.numels[tensor] - start;
  Chunk result;
  result.dtype = dtype;
  result.length = left < tables.chunk_elements ? left : tables.chunk_elements;
  result.data = reinterpret_cast<char*>(static_cast<uintptr_t>(tables.addresses[tensor])) + start * dtype_size(dtype);
  return result;
}

// ---- accumulator algebra ------------------------------------------------------------------------

// The identity of the reduction (what an empty chunk or tensor contributes).
FC_HD double acc_identity(int kind) { return kind == kMin ? FC_INF : 0.0; }

FC_HD bool is_nan(double x) { return x != x; }

// Combine two partial accumulators of one tensor (NaN-propagating for max and min).
FC_HD double acc_combine(int kind, double a, double b) {
  switch (kind) {
    case kMax:
      return (is_nan(a) || is_nan(b)) ? a + b : (a > b ? a : b);
    case kMin:
      return (is_nan(a) || is_nan(b)) ? a + b : (a < b ? a : b);
    default:
      return a + b;
  }
}

// A tensor's own norm from its accumulator (for p = 0: its count of non-zero elements).
//
// For other p, pow(acc, 1/p) alone is off by several ulps for large or small acc (1/p is rounded,
// and that error is multiplied by |ln acc|); one Newton step on t^p = acc removes it.
FC_HD double norm_from_acc(int kind, double p, double acc) {
  if (kind != kSumPow || p == 1.0) return acc;
  if (p == 2.0) return FC_SQRT(acc);
  const double root = FC_POW(acc, 1.0 / p);
  if (!(acc >= 2.2250738585072014e-308 && acc <= 1.7976931348623157e308) || !(root > 0.0 && root < FC_INF)) {
    return root;  // zero, subnormal, inf or NaN: nothing to refine
  }
  const double ratio = acc / FC_POW(root, p);  // about 1; (root * (1 + e))^p = acc for e = (ratio - 1) / p
  if (!(ratio > 0.5 && ratio < 2.0)) return root;
  return root * (1.0 + (ratio - 1.0) / p);
}

// What one tensor adds to the total accumulator (for p = 0: 1 when it holds a non-zero element).
FC_HD double tensor_contribution(int kind, double tensor_acc) {
  return kind == kCount ? (tensor_acc != 0.0 ? 1.0 : 0.0) : tensor_acc;
}

// The total norm and the clip coefficient from the total accumulator.
struct Finished {
  double total;  // unrounded total norm (times |grad_scale|)
  double coef;   // clip coefficient (times grad_scale)
};

FC_HD Finished finish(int kind, double p, double acc, bool has_max_norm, double max_norm, bool has_scale,
                      double scale) {
  Finished out;
  out.total = norm_from_acc(kind, p, acc);
  if (has_scale && kind != kCount) out.total *= (scale < 0 ? -scale : scale);
  out.coef = 1.0;
  if (has_max_norm) {
    const double r = max_norm / (out.total + kClipEps);
    out.coef = r > 1.0 ? 1.0 : r;  // NaN stays NaN
    if (has_scale) out.coef *= scale;
  }
  return out;
}

// ---- scalar conversions (host side; the CUDA kernels use cuda_fp16.h / cuda_bf16.h) --------------
#if !defined(__CUDA_ARCH__)

FC_HOST uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
FC_HOST float bits_float(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

FC_HOST float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

// Round to nearest even; NaN becomes the canonical quiet NaN (as c10::BFloat16 does).
FC_HOST uint16_t float_to_bf16(float f) {
  if (f != f) return 0x7fc0;
  const uint32_t u = float_bits(f);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

FC_HOST float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1f) return bits_float(sign | 0x7f800000u | (mantissa << 13));  // inf, NaN
  if (exponent != 0) return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  // zero or subnormal: mantissa * 2^-24, exact in float
  const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
  return sign ? -magnitude : magnitude;
}

// Round to nearest even (with overflow to inf and gradual underflow), NaN stays NaN.
FC_HOST uint16_t float_to_half(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) return sign | (a > 0x7f800000u ? (0x7e00u | ((a >> 13) & 0x3ffu)) : 0x7c00u);
  if (a >= 0x477ff000u) return sign | 0x7c00u;  // rounds to >= 65520: inf
  if (a >= 0x38800000u) {                      // normal half
    const uint32_t rounded = a + 0xfffu + ((a >> 13) & 1u);
    return sign | static_cast<uint16_t>((rounded - 0x38000000u) >> 13);
  }
  // subnormal half (or zero): value / 2^-24, rounded to nearest even by the FPU in float
  const float scaled = bits_float(a) * 16777216.0f;  // exact: a power-of-two scaling
  const float nearest = __builtin_nearbyintf(scaled);  // default rounding mode: ties to even
  return sign | static_cast<uint16_t>(nearest);
}

// double -> float rounded to odd: a float with enough extra bits that a second rounding to
// bf16/fp16 gives the correctly rounded (rounded-once) result.
FC_HOST float double_to_float_round_odd(double d) {
  float f = static_cast<float>(d);
  if (d != d || static_cast<double>(f) == d) return f;
  // truncate toward zero, then set the sticky (lowest) bit
  uint32_t u = float_bits(f);
  const double back = static_cast<double>(f);
  if ((back < 0 ? -back : back) > (d < 0 ? -d : d)) u -= 1;  // f rounded away from zero: step back
  return bits_float(u | 1u);
}

FC_HOST uint16_t double_to_bf16(double d) { return float_to_bf16(double_to_float_round_odd(d)); }
FC_HOST uint16_t double_to_half(double d) { return float_to_half(double_to_float_round_odd(d)); }

// Read a 0-d value of a float dtype from host memory.
FC_HOST double read_scalar(const void* address, int dtype) {
  switch (dtype) {
    case kFloat32: {
      float v;
      memcpy(&v, address, 4);
      return v;
    }
    case kFloat16: {
      uint16_t v;
      memcpy(&v, address, 2);
      return half_to_float(v);
    }
    case kBFloat16: {
      uint16_t v;
      memcpy(&v, address, 2);
      return bf16_to_float(v);
    }
    default: {
      double v;
      memcpy(&v, address, 8);
      return v;
    }
  }
}

// Write a double rounded once to a float dtype into host memory.
FC_HOST void write_scalar(void* address, int dtype, double value) {
  switch (dtype) {
    case kFloat32: {
      const float v = static_cast<float>(value);
      memcpy(address, &v, 4);
      return;
    }
    case kFloat16: {
      const uint16_t v = double_to_half(value);
      memcpy(address, &v, 2);
      return;
    }
    case kBFloat16: {
      const uint16_t v = double_to_bf16(value);
      memcpy(address, &v, 2);
      return;
    }
    default:
      memcpy(address, &value, 8);
  }
}

#endif  // !__CUDA_ARCH__

}  // namespace fusedclip
