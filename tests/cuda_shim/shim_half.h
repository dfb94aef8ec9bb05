// float16 / bfloat16 for the CUDA-on-CPU shim: the storage types of cuda_fp16.h / cuda_bf16.h and
// the conversions kernels.cu uses, with the device's results bit for bit: conversions to the
// 16-bit types round to nearest even (double inputs rounded once, not via float), overflow to
// infinity, keep subnormals, and give the canonical NaN 0x7fff, as cvt.rn.{f16,bf16}.{f32,f64}
// does; conversions to float are exact. Written independently of csrc/fusedclip.h, so the two
// cannot share a mistake (tests/test_cuda_emulated.py checks both against numpy and torch).
#pragma once

#include <cstdint>
#include <cstring>

struct __half {
  unsigned short __x;
};
struct __nv_bfloat16 {
  unsigned short __x;
};
typedef __half half;
typedef __nv_bfloat16 nv_bfloat16;

namespace cuda_shim {

// Round a double to a binary format with `mantissa` stored bits and `exponent` exponent bits.
inline unsigned short round_to_small_float(double value, int mantissa, int exponent) {
  uint64_t u;
  std::memcpy(&u, &value, 8);
  const unsigned short sign = static_cast<unsigned short>((u >> 63) << (mantissa + exponent));
  const uint64_t magnitude = u & 0x7fffffffffffffffull;
  const unsigned int inf_bits = ((1u << exponent) - 1u) << mantissa;
  if (magnitude > 0x7ff0000000000000ull) return 0x7fff;  // NaN: canonical
  if (magnitude == 0x7ff0000000000000ull) return sign | inf_bits;
  const int biased = static_cast<int>(magnitude >> 52);
  if (biased == 0) return sign;  // zero or a double subnormal: far below half of the smallest subnormal
  const int e = biased - 1023;   // value = m * 2^(e - 52), m in [2^52, 2^53)
  const uint64_t m = (magnitude & ((1ull << 52) - 1)) | (1ull << 52);
  const int bias = (1 << (exponent - 1)) - 1;
  const bool normal = e >= 1 - bias;
  const int quantum = (normal ? e : 1 - bias) - mantissa;  // exponent of the result's last place
  const int shift = 52 + quantum - e;                      // >= 52 - mantissa > 0
  uint64_t r = 0;
  if (shift < 64) {
    r = m >> shift;
    const uint64_t rest = m & ((1ull << shift) - 1);
    const uint64_t half_way = 1ull << (shift - 1);
    if (rest > half_way || (rest == half_way && (r & 1))) ++r;
  }
  const uint64_t bits = normal ? ((static_cast<uint64_t>(e + bias) << mantissa) + (r - (1ull << mantissa))) : r;
  if (bits >= inf_bits) return sign | inf_bits;
  return sign | static_cast<unsigned short>(bits);
}

inline float small_float_to_float(unsigned short h, int mantissa, int exponent) {
  const uint32_t sign = static_cast<uint32_t>(h >> (mantissa + exponent)) << 31;
  const uint32_t e = (h >> mantissa) & ((1u << exponent) - 1u);
  const uint32_t m = h & ((1u << mantissa) - 1u);
  const int bias = (1 << (exponent - 1)) - 1;
  uint32_t bits;
  if (e == (1u << exponent) - 1u) {
    bits = sign | 0x7f800000u | (m << (23 - mantissa));  // inf, NaN (payload kept)
  } else if (e != 0) {
    bits = sign | ((e - bias + 127) << 23) | (m << (23 - mantissa));
  } else if (m == 0) {
    bits = sign;
  } else {  // subnormal: normalise (exact in float for both formats)
    int shift = 0;
    uint32_t mm = m;
    while ((mm & (1u << mantissa)) == 0) {
      mm <<= 1;
      ++shift;
    }
    const int unbiased = 1 - bias - shift;
    if (unbiased + 127 <= 0) {  // a bfloat16 subnormal is a float subnormal: same bits
      bits = sign | (m << (23 - mantissa));
    } else {
      bits = sign | (static_cast<uint32_t>(unbiased + 127) << 23) | ((mm & ((1u << mantissa) - 1u)) << (23 - mantissa));
    }
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

}  // namespace cuda_shim

inline float __half2float(__half h) { return ::cuda_shim::small_float_to_float(h.__x, 10, 5); }
inline __half __float2half_rn(float x) { return __half{::cuda_shim::round_to_small_float(x, 10, 5)}; }
inline __half __float2half(float x) { return __float2half_rn(x); }
inline __half __double2half(double x) { return __half{::cuda_shim::round_to_small_float(x, 10, 5)}; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short bits) { return __half{bits}; }

inline float __bfloat162float(__nv_bfloat16 h) { return ::cuda_shim::small_float_to_float(h.__x, 7, 8); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) { return __nv_bfloat16{::cuda_shim::round_to_small_float(x, 7, 8)}; }
inline __nv_bfloat16 __float2bfloat16(float x) { return __float2bfloat16_rn(x); }
inline __nv_bfloat16 __double2bfloat16(double x) { return __nv_bfloat16{::cuda_shim::round_to_small_float(x, 7, 8)}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short bits) { return __nv_bfloat16{bits}; }
