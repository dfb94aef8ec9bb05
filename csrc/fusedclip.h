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
//  * general p (p not 0, 1, 2, +-inf) with a norm scale M (a float64 the kernels read; the engine
//    passes max |x| over all grads, or min |x| for p < 0, so nothing overflows or underflows):
//    the accumulator is sum of (|x| / M')^p with M' = usable_norm_scale(M) (M itself when
//    0 < M < inf, else 1, which leaves zero, inf and NaN cases exactly as unscaled); every
//    norm formed from it (total, per-tensor) is M' times its 1/p power. Without a norm scale M' = 1.
//  * total: accumulator (p = 1, inf, -inf, 0), its square root (p = 2) or M' times its 1/p power;
//    times |s| when a grad scale s is given (not for p = 0).
//  * coefficient: r = max_norm / (total + 1e-6); c = r > 1 ? 1 : r (NaN propagates); times s.
//  * scale: nothing to do when c == 1; float64 grads: x = round(x * c). Other grads: when c is 0,
//    inf, NaN or a normal float (2^-126 <= |c| <= FLT_MAX): x = round(float(x) * float(c)) (torch's
//    result); otherwise (c below float's normal range, or above it) float(c) would lose bits or
//    overflow, and x = round_once(x * c): see product_round_odd. (A clip coefficient is never above
//    1, but with a grad scale folded in it can be.)
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
#define FC_LOG(x) log(x)
#define FC_EXP(x) exp(x)
#if defined(__CUDA_ARCH__)
#define FC_INF (__longlong_as_double(0x7ff0000000000000LL))
#else
#define FC_INF (__builtin_inf())
#endif
#else
#define FC_HD static inline
#define FC_SQRT(x) __builtin_sqrt(x)
#define FC_POW(x, y) __builtin_pow(x, y)
#define FC_LOG(x) __builtin_log(x)
#define FC_EXP(x) __builtin_exp(x)
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

// A norm from an accumulator taken relative to the norm scale M' (1.0 without one): M' times
// norm_from_acc. For tiny |p| the root alone can leave float64's range (3^1000) while the norm does
// not: there it is taken through logarithms (a relative error of about |ln(norm)| ulps, where the
// product would be inf or 0).
FC_HD double scaled_norm_from_acc(int kind, double p, double acc, double norm_scale) {
  const double root = norm_from_acc(kind, p, acc);
  const bool lost = (root == 0.0 || root == FC_INF) && acc > 0.0 && acc < FC_INF;
  if (kind == kSumPow && lost) return FC_EXP(FC_LOG(acc) / p + FC_LOG(norm_scale));
  return root * norm_scale;
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

// The scale general-p accumulators are taken relative to (see the top of this file).
FC_HD double usable_norm_scale(double m) { return (m > 0.0 && m < FC_INF) ? m : 1.0; }

// `norm_scale` is M' (usable_norm_scale of the norm scale; 1.0 without one).
FC_HD Finished finish(int kind, double p, double acc, bool has_max_norm, double max_norm, bool has_scale,
                      double scale, double norm_scale) {
  Finished out;
  out.total = scaled_norm_from_acc(kind, p, acc, norm_scale);
  if (has_scale && kind != kCount) out.total *= (scale < 0 ? -scale : scale);
  out.coef = 1.0;
  if (has_max_norm) {
    const double r = max_norm / (out.total + kClipEps);
    out.coef = r > 1.0 ? 1.0 : r;  // NaN stays NaN
    if (has_scale) out.coef *= scale;
  }
  return out;
}

// ---- applying a coefficient that is not a normal float ------------------------------------------------
//
// A float, half or bfloat16 grad is scaled in float: x * float(c), rounded to the grad's dtype. That is
// torch's result, and within an ulp of the exact x * c, as long as c is a normal float. Below float's
// normal range (2^-126, e.g. a small max_norm against grads near 3e38) float(c) keeps only the bits
// above 2^-149: up to 16% wrong at 1e-44, and 0 below 1.4e-45 (above FLT_MAX it becomes inf). For
// such c (one scalar: the whole pass takes one branch) the product is formed in double instead.
// A plain double product rounds twice (to 53 bits, then to the grad's precision), which can miss the
// correctly rounded result when the first rounding lands on a midpoint of the second. So the product
// is formed exactly and rounded to odd (product_round_odd): rounding that once more to float, half
// or bfloat16 (<= 24 bits, at least 2 bits fewer) gives exactly round(x * c), the exact product of
// x and the double c rounded once, for every result, subnormal or overflowing included.

constexpr double kFloatMinNormal = 1.1754943508222875e-38;  // 2^-126
constexpr double kFloatMax = 3.4028234663852886e+38;

// True when c cannot be applied as float(c): finite, non-zero and outside float's normal range.
FC_HD bool coef_needs_wide(double c) {
  const double a = c < 0.0 ? -c : c;
  return a > 0.0 && (a < kFloatMinNormal || (a > kFloatMax && a < FC_INF));
}

FC_HD int64_t double_to_bits(double x) {
#if defined(__CUDA_ARCH__)
  return __double_as_longlong(x);
#else
  int64_t u;
  memcpy(&u, &x, 8);
  return u;
#endif
}
FC_HD double bits_to_double(int64_t u) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(u);
#else
  double x;
  memcpy(&x, &u, 8);
  return x;
#endif
}
FC_HD uint32_t f32_to_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  memcpy(&u, &x, 4);
  return u;
#endif
}
FC_HD float bits_to_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  memcpy(&x, &u, 4);
  return x;
#endif
}

// c split as hi + lo (exactly): hi keeps c's top 24 significant bits, lo (< 2^-23 |c|) the other 29.
struct WideCoef {
  double c, hi, lo;
};
FC_HD WideCoef split_coef(double c) {
  WideCoef k;
  k.c = c;
  k.hi = bits_to_double(double_to_bits(c) & ~((static_cast<int64_t>(1) << 29) - 1));
  k.lo = c - k.hi;  // exact
  return k;
}

// x * c rounded to odd at double precision, for x with at most 24 significant bits (a float, half or
// bfloat16 value). What is exact: a = x * hi (24 + 24 bits) and b = x * lo (24 + 29 bits) are exact
// products, so x * c = a + b exactly; s = a + b rounded, and t = b - (s - a) is its exact error
// (Fast2Sum: |a| >= |b|). When t != 0 the result is s truncated toward zero with its last bit set:
// the round-to-odd of x * c. All of this holds unless a or b fall below double's normal range, which
// needs |x * c| < 2^-900: far below half of float's smallest subnormal (2^-150), so every such
// product still rounds to the correctly signed zero. inf/NaN inputs and overflow take x * c as is.
FC_HD double product_round_odd(double x, const WideCoef& k) {
  const double a = x * k.hi, b = x * k.lo, s = a + b;
  if (!(s - s == 0.0) || s == 0.0) return x * k.c;  // inf, NaN, overflow, or zero (keeps its sign)
  const double t = b - (s - a);
  if (t == 0.0) return s;
  int64_t u = double_to_bits(s);
  if ((t < 0.0) != (s < 0.0)) u -= 1;  // s is beyond x * c: one step toward zero truncates
  return bits_to_double(u | 1);
}

// A double rounded to odd at float precision (truncated, last bit set when inexact): rounding the
// result to half or bfloat16 (at least 2 bits fewer) equals rounding the double once. Overflow
// truncates to FLT_MAX, which rounds on to inf.
FC_HD float round_odd_to_float(double d) {
  const float f = static_cast<float>(d);
  const double back = static_cast<double>(f);
  if (d != d || back == d) return f;
  uint32_t u = f32_to_bits(f);
  if ((back < 0 ? -back : back) > (d < 0 ? -d : d)) u -= 1;  // f rounded away from zero: step back
  return bits_to_f32(u | 1u);
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
FC_HOST float double_to_float_round_odd(double d) { return round_odd_to_float(d); }

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
