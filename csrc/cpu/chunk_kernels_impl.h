// The CPU chunk loops, written once against a small SIMD layer and compiled once per instruction
// set. The including file defines FC_ISA_GETTER (the exported function returning the table) and
// FC_ISA_NAME, and is compiled with the matching -m flags.
//
// Everything below has internal linkage: a shared inline copy of a helper, compiled with AVX2 and
// picked by the linker for the baseline code, could crash a CPU without AVX2. For the same reason
// no standard-library templates are used here.
//
// Determinism: every instruction set gives the same bits, because every sum is taken in one fixed
// order whatever the vector width, and nothing is contracted into fused multiply-adds
// (-ffp-contract=off). The kernels run with the default floating-point environment (see
// cpu_ops.cpp), so flush-to-zero set by the caller cannot change a result either.
//
// Sums of |x| and x * x (p = 1, 2) of float32, float16 and bfloat16 data go block by block: a block
// of 256 elements is summed in float (8 rows of 32, each row's elements into 32 lanes in a fixed
// order, block_lane_element; at most 8 adds per lane, then the 32 lanes by a fixed tree) and the
// block sum is added to the chunk's double
// accumulator. Float arithmetic is several times cheaper than widening every element to double, so
// the loop runs at memory speed. A block sum that float cannot be trusted with is recomputed in
// double: not finite (an overflow, or an inf/NaN in the data), or for squares below 1e-30, where
// products may have lost bits to underflow (1e-30 is 2^18 times above the worst such loss). So the
// result is accurate for any finite input, where float32 accumulation alone overflows beyond ~1e19.
// Everything else (float64 data, the tail of a chunk after its last whole block, other norms)
// widens to double: 16 logical double lanes (element i into lane i % 16), combined by a fixed tree,
// then the scalar tail. Products of float, half and bfloat16 values are exact in double.
#pragma once

#include <cstdint>
#include <cstring>

#include "../fusedclip.h"
#include "chunk_kernels.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#if !defined(FC_ISA_GETTER) || !defined(FC_ISA_NAME)
#error "define FC_ISA_GETTER and FC_ISA_NAME before including chunk_kernels_impl.h"
#endif

namespace fusedclip {
namespace cpu {
namespace {

constexpr int kLanes = 16;

template <int D>
constexpr int64_t elem_size() {
  return D == kFloat64 ? 8 : (D == kFloat32 ? 4 : 2);
}

// The logical float lane (0 .. 31) that element `i` of a 32-element block row is summed into: lane
// i for float32 and float16; for bfloat16 the even elements fill lanes 0 .. 15 and the odd ones
// lanes 16 .. 31, the order in which whole-word shifts and masks split them (see load_block_row).
template <int D>
constexpr int block_lane_element(int lane) {
  if constexpr (D == kBFloat16) {
    return lane < 16 ? 2 * lane : 2 * (lane - 16) + 1;
  } else {
    return lane;
  }
}

// ---- scalar element access ----------------------------------------------------------------------

template <int D>
inline float load1f(const char* base, int64_t i) {
  if constexpr (D == kFloat32) {
    float v;
    std::memcpy(&v, base + 4 * i, 4);
    return v;
  } else {
    uint16_t h;
    std::memcpy(&h, base + 2 * i, 2);
    if constexpr (D == kBFloat16) {
      return bf16_to_float(h);
    } else {
#if defined(__F16C__)
      return _cvtsh_ss(h);
#else
      return half_to_float(h);
#endif
    }
  }
}

template <int D>
inline double load1d(const char* base, int64_t i) {
  if constexpr (D == kFloat64) {
    double v;
    std::memcpy(&v, base + 8 * i, 8);
    return v;
  } else {
    return static_cast<double>(load1f<D>(base, i));
  }
}

template <int D>
inline void store1f(char* base, int64_t i, float v) {
  if constexpr (D == kFloat32) {
    std::memcpy(base + 4 * i, &v, 4);
  } else {
    uint16_t h;
    if constexpr (D == kBFloat16) {
      h = float_to_bf16(v);
    } else {
#if defined(__F16C__)
      h = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
      h = float_to_half(v);
#endif
    }
    std::memcpy(base + 2 * i, &h, 2);
  }
}

inline void store1d(char* base, int64_t i, double v) { std::memcpy(base + 8 * i, &v, 8); }

inline double abs_d(double x) { return __builtin_fabs(x); }

// ---- the SIMD layer -----------------------------------------------------------------------------
// kD doubles per VD, kF floats per VF; load_d/load_f convert kD/kF elements of dtype D.

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)

// AVX-512 (x86-64-v4: Skylake-SP, Ice Lake, Zen 4 and later): twice the AVX2 width. Comparisons
// give mask registers, so the NaN and non-zero masks are made 1.0 / 0.0 vectors, which the
// callers read exactly as they read the AVX2 all-ones masks (lane != 0).
struct Simd {
  static constexpr int kD = 8;
  static constexpr int kF = 16;
  using VD = __m512d;
  using VF = __m512;

  static VD zero_d() { return _mm512_setzero_pd(); }
  static VD set1_d(double x) { return _mm512_set1_pd(x); }
  static VD add_d(VD a, VD b) { return _mm512_add_pd(a, b); }
  static VD mul_d(VD a, VD b) { return _mm512_mul_pd(a, b); }
  static VD abs_d(VD a) { return _mm512_abs_pd(a); }
  static VD max_d(VD a, VD b) { return _mm512_max_pd(a, b); }
  static VD min_d(VD a, VD b) { return _mm512_min_pd(a, b); }
  static VD nan_mask_d(VD a) { return _mm512_maskz_mov_pd(_mm512_cmp_pd_mask(a, a, _CMP_UNORD_Q), _mm512_set1_pd(1.0)); }
  static VD or_d(VD a, VD b) { return _mm512_or_pd(a, b); }
  static VD nonzero_d(VD a) {
    return _mm512_maskz_mov_pd(_mm512_cmp_pd_mask(a, _mm512_setzero_pd(), _CMP_NEQ_UQ), _mm512_set1_pd(1.0));
  }
  static void store_lanes(double* out, VD a) { _mm512_storeu_pd(out, a); }
  static VD clamp_d(VD x, VD lo, VD hi) {
    const VD low = _mm512_mask_mov_pd(x, _mm512_cmp_pd_mask(x, lo, _CMP_LT_OQ), lo);
    return _mm512_mask_mov_pd(low, _mm512_cmp_pd_mask(low, hi, _CMP_GT_OQ), hi);
  }
  static VF set1_f(float x) { return _mm512_set1_ps(x); }
  static VF add_f(VF a, VF b) { return _mm512_add_ps(a, b); }
  static VF mul_f(VF a, VF b) { return _mm512_mul_ps(a, b); }
  static VF abs_f(VF a) { return _mm512_abs_ps(a); }
  static VF clamp_f(VF x, VF lo, VF hi) {
    const VF low = _mm512_mask_mov_ps(x, _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ), lo);
    return _mm512_mask_mov_ps(low, _mm512_cmp_ps_mask(low, hi, _CMP_GT_OQ), hi);
  }
  // 32 bfloat16 values in place, as the AVX2 version does 16: even elements in the low halves of
  // the 32-bit words, odd ones in the high halves, rounded back into the same halves.
  static constexpr int kBf16Group = 32;
  template <class Op>
  static void transform_bf16_group(char* p, Op op) {
    const __m512i x = _mm512_loadu_si512(p);
    const __m512i high = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
    const __m512 even = op(_mm512_castsi512_ps(_mm512_slli_epi32(x, 16)));
    const __m512 odd = op(_mm512_castsi512_ps(_mm512_and_si512(x, high)));
    const __m512i nan = _mm512_set1_epi32(0x7fc00000);
    const __m512i re = _mm512_mask_mov_epi32(round_to_bf16_high(even), _mm512_cmp_ps_mask(even, even, _CMP_UNORD_Q), nan);
    const __m512i ro = _mm512_mask_mov_epi32(round_to_bf16_high(odd), _mm512_cmp_ps_mask(odd, odd, _CMP_UNORD_Q), nan);
    _mm512_storeu_si512(p, _mm512_or_si512(_mm512_srli_epi32(re, 16), _mm512_and_si512(ro, high)));
  }
  static __m512i round_to_bf16_high(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    return _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb);
  }
  // lanes 0..15 in accs[0], 16..31 in accs[1]; the same tree as the AVX2 and scalar versions
  static float combine32_f(const VF* accs) {
    const VF w16 = _mm512_add_ps(accs[0], accs[1]);
    const __m256 w8 = _mm256_add_ps(_mm512_castps512_ps256(w16), _mm512_extractf32x8_ps(w16, 1));
    const __m128 w4 = _mm_add_ps(_mm256_castps256_ps128(w8), _mm256_extractf128_ps(w8, 1));
    const __m128 w2 = _mm_add_ps(w4, _mm_movehl_ps(w4, w4));
    return _mm_cvtss_f32(_mm_add_ss(w2, _mm_movehdup_ps(w2)));
  }

  template <int D>
  static VD load_d(const char* p) {
    if constexpr (D == kFloat64) {
      return _mm512_loadu_pd(p);
    } else if constexpr (D == kFloat32) {
      return _mm512_cvtps_pd(_mm256_loadu_ps(reinterpret_cast<const float*>(p)));
    } else if constexpr (D == kBFloat16) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      return _mm512_cvtps_pd(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
    } else {
      return _mm512_cvtps_pd(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    }
  }
  static void store_d64(char* p, VD v) { _mm512_storeu_pd(p, v); }

  // 16 consecutive elements as doubles: out[a] holds elements 8a .. 8a + 7.
  template <int D>
  static void load16_d(const char* p, VD* out) {
    if constexpr (D == kFloat32 || D == kFloat64) {
      for (int a = 0; a < 2; ++a) out[a] = load_d<D>(p + a * 8 * (D == kFloat32 ? 4 : 8));
    } else {
      const VF f = load_f<D>(p);
      out[0] = _mm512_cvtps_pd(_mm512_castps512_ps256(f));
      out[1] = _mm512_cvtps_pd(_mm512_extractf32x8_ps(f, 1));
    }
  }

  template <int D>
  static VF load_f(const char* p) {
    if constexpr (D == kFloat32) {
      return _mm512_loadu_ps(p);
    } else if constexpr (D == kBFloat16) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
      return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    }
  }

  // One block row (32 elements) as the two vectors of its logical lanes (see kBlockLanes). A
  // bfloat16 row is one 64-byte load whose even elements sit in the low halves of the 32-bit words
  // and odd ones in the high halves: a shift and a mask make them floats without a lane shuffle.
  template <int D>
  static void load_block_row(const char* p, VF* out) {
    if constexpr (D == kBFloat16) {
      const __m512i x = _mm512_loadu_si512(p);
      out[0] = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
      out[1] = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
    } else {
      out[0] = load_f<D>(p);
      out[1] = load_f<D>(p + kF * elem_size<D>());
    }
  }

  template <int D>
  static void store_f(char* p, VF v) {
    if constexpr (D == kFloat32) {
      _mm512_storeu_ps(p, v);
    } else if constexpr (D == kBFloat16) {
      // round to nearest even, NaN -> 0x7fc0 (as c10::BFloat16)
      const __m512i r = _mm512_srli_epi32(round_to_bf16_high(v), 16);
      const __m512i fixed = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(fixed));
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
  }
};

#elif defined(__AVX2__)

struct Simd {
  static constexpr int kD = 4;
  static constexpr int kF = 8;
  using VD = __m256d;
  using VF = __m256;

  static VD zero_d() { return _mm256_setzero_pd(); }
  static VD set1_d(double x) { return _mm256_set1_pd(x); }
  static VD add_d(VD a, VD b) { return _mm256_add_pd(a, b); }
  static VD mul_d(VD a, VD b) { return _mm256_mul_pd(a, b); }
  static VD abs_d(VD a) { return _mm256_andnot_pd(_mm256_set1_pd(-0.0), a); }
  // a > b ? a : b / a < b ? a : b; NaNs are tracked separately by the callers
  static VD max_d(VD a, VD b) { return _mm256_max_pd(a, b); }
  static VD min_d(VD a, VD b) { return _mm256_min_pd(a, b); }
  static VD nan_mask_d(VD a) { return _mm256_cmp_pd(a, a, _CMP_UNORD_Q); }
  static VD or_d(VD a, VD b) { return _mm256_or_pd(a, b); }
  // 1.0 where a != 0 (NaN included), else 0.0
  static VD nonzero_d(VD a) {
    return _mm256_and_pd(_mm256_cmp_pd(a, _mm256_setzero_pd(), _CMP_NEQ_UQ), _mm256_set1_pd(1.0));
  }
  static void store_lanes(double* out, VD a) { _mm256_storeu_pd(out, a); }
  static VD clamp_d(VD x, VD lo, VD hi) {
    const VD low = _mm256_blendv_pd(x, lo, _mm256_cmp_pd(x, lo, _CMP_LT_OQ));
    return _mm256_blendv_pd(low, hi, _mm256_cmp_pd(low, hi, _CMP_GT_OQ));
  }
  static VF set1_f(float x) { return _mm256_set1_ps(x); }
  static VF add_f(VF a, VF b) { return _mm256_add_ps(a, b); }
  static VF mul_f(VF a, VF b) { return _mm256_mul_ps(a, b); }
  static VF abs_f(VF a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  static VF clamp_f(VF x, VF lo, VF hi) {
    const VF low = _mm256_blendv_ps(x, lo, _mm256_cmp_ps(x, lo, _CMP_LT_OQ));
    return _mm256_blendv_ps(low, hi, _mm256_cmp_ps(low, hi, _CMP_GT_OQ));
  }
  // 16 bfloat16 values in place, x = bf16(op(float(x))), rounded as store_f<kBFloat16> rounds. One
  // 32-byte load holds 8 even elements in the low halves of its 32-bit words and 8 odd ones in
  // the high halves: each half becomes a float without unpacking, and the rounded results go back
  // into the same halves, so no pack or lane shuffle is needed.
  static constexpr int kBf16Group = 16;
  template <class Op>
  static void transform_bf16_group(char* p, Op op) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i high = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
    const __m256 even = op(_mm256_castsi256_ps(_mm256_slli_epi32(x, 16)));
    const __m256 odd = op(_mm256_castsi256_ps(_mm256_and_si256(x, high)));
    __m256i re = round_to_bf16_high(even), ro = round_to_bf16_high(odd);
    if (_mm256_movemask_ps(_mm256_cmp_ps(even, odd, _CMP_UNORD_Q)) != 0) {  // rare: NaN -> 0x7fc0
      const __m256i nan = _mm256_set1_epi32(0x7fc00000);
      re = _mm256_blendv_epi8(re, nan, _mm256_castps_si256(_mm256_cmp_ps(even, even, _CMP_UNORD_Q)));
      ro = _mm256_blendv_epi8(ro, nan, _mm256_castps_si256(_mm256_cmp_ps(odd, odd, _CMP_UNORD_Q)));
    }
    const __m256i packed = _mm256_or_si256(_mm256_srli_epi32(re, 16), _mm256_and_si256(ro, high));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), packed);
  }
  // bits + 0x7fff + (bit 16 of bits): the upper 16 bits are the bf16 rounded to nearest even
  static __m256i round_to_bf16_high(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    return _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb);
  }
  // The 32 lanes of four vectors (lanes 8a .. 8a + 7 in accs[a]) summed by the fixed tree of
  // combine_block_lanes: lane k += lane k + w for w = 16, 8, 4, 2, 1.
  static float combine32_f(const VF* accs) {
    const VF w8 = _mm256_add_ps(_mm256_add_ps(accs[0], accs[2]), _mm256_add_ps(accs[1], accs[3]));
    const __m128 w4 = _mm_add_ps(_mm256_castps256_ps128(w8), _mm256_extractf128_ps(w8, 1));
    const __m128 w2 = _mm_add_ps(w4, _mm_movehl_ps(w4, w4));
    return _mm_cvtss_f32(_mm_add_ss(w2, _mm_movehdup_ps(w2)));
  }

  template <int D>
  static VD load_d(const char* p) {
    if constexpr (D == kFloat64) {
      return _mm256_loadu_pd(reinterpret_cast<const double*>(p));
    } else if constexpr (D == kFloat32) {
      return _mm256_cvtps_pd(_mm_loadu_ps(reinterpret_cast<const float*>(p)));
    } else if constexpr (D == kBFloat16) {
      const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
      return _mm256_cvtps_pd(_mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(h), 16)));
    } else {
      return _mm256_cvtps_pd(_mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
    }
  }
  static void store_d64(char* p, VD v) { _mm256_storeu_pd(reinterpret_cast<double*>(p), v); }

  // 16 consecutive elements as doubles: out[a] holds elements 4a .. 4a + 3.
  template <int D>
  static void load16_d(const char* p, VD* out) {
    if constexpr (D == kFloat32 || D == kFloat64) {
      for (int a = 0; a < 4; ++a) out[a] = load_d<D>(p + a * 4 * (D == kFloat32 ? 4 : 8));
    } else {
      for (int half = 0; half < 2; ++half) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * half));
        __m128 lo, hi;
        if constexpr (D == kBFloat16) {
          // a bfloat16 is the upper half of a float: interleave with zeros
          lo = _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), h));
          hi = _mm_castsi128_ps(_mm_unpackhi_epi16(_mm_setzero_si128(), h));
        } else {
          const __m256 f = _mm256_cvtph_ps(h);
          lo = _mm256_castps256_ps128(f);
          hi = _mm256_extractf128_ps(f, 1);
        }
        out[2 * half] = _mm256_cvtps_pd(lo);
        out[2 * half + 1] = _mm256_cvtps_pd(hi);
      }
    }
  }

  template <int D>
  static VF load_f(const char* p) {
    if constexpr (D == kFloat32) {
      return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
    } else if constexpr (D == kBFloat16) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    } else {
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    }
  }

  // One block row (32 elements) as the four vectors of its logical lanes (see kBlockLanes): a
  // bfloat16 row is two 32-byte loads, each split into even and odd elements by a shift and a mask.
  template <int D>
  static void load_block_row(const char* p, VF* out) {
    if constexpr (D == kBFloat16) {
      const __m256i high = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
      const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
      out[0] = _mm256_castsi256_ps(_mm256_slli_epi32(x0, 16));
      out[1] = _mm256_castsi256_ps(_mm256_slli_epi32(x1, 16));
      out[2] = _mm256_castsi256_ps(_mm256_and_si256(x0, high));
      out[3] = _mm256_castsi256_ps(_mm256_and_si256(x1, high));
    } else {
#pragma GCC unroll 4
      for (int a = 0; a < 4; ++a) out[a] = load_f<D>(p + a * kF * elem_size<D>());
    }
  }

  template <int D>
  static void store_f(char* p, VF v) {
    if constexpr (D == kFloat32) {
      _mm256_storeu_ps(reinterpret_cast<float*>(p), v);
    } else if constexpr (D == kBFloat16) {
      // round to nearest even, NaN -> 0x7fc0 (as c10::BFloat16)
      const __m256i u = _mm256_castps_si256(v);
      const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
      __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
      const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
      const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
    } else {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
  }
};

#else  // portable scalar layer: one element per "vector"

struct Simd {
  static constexpr int kD = 1;
  static constexpr int kF = 1;
  using VD = double;
  using VF = float;

  static VD zero_d() { return 0.0; }
  static VD set1_d(double x) { return x; }
  static VD add_d(VD a, VD b) { return a + b; }
  static VD mul_d(VD a, VD b) { return a * b; }
  static VD abs_d(VD a) { return __builtin_fabs(a); }
  static VD max_d(VD a, VD b) { return a > b ? a : b; }
  static VD min_d(VD a, VD b) { return a < b ? a : b; }
  static VD nan_mask_d(VD a) { return a != a ? 1.0 : 0.0; }
  static VD or_d(VD a, VD b) { return (a != 0.0 || b != 0.0) ? 1.0 : 0.0; }
  static VD nonzero_d(VD a) { return a != 0.0 ? 1.0 : 0.0; }
  static void store_lanes(double* out, VD a) { *out = a; }
  static VD clamp_d(VD x, VD lo, VD hi) {
    const VD low = x < lo ? lo : x;
    return low > hi ? hi : low;
  }
  static VF set1_f(float x) { return x; }
  static VF add_f(VF a, VF b) { return a + b; }
  static VF mul_f(VF a, VF b) { return a * b; }
  static VF abs_f(VF a) { return __builtin_fabsf(a); }
  static constexpr int kBf16Group = 0;
  template <class Op>
  static void transform_bf16_group(char*, Op) {}
  static VF clamp_f(VF x, VF lo, VF hi) {
    const VF low = x < lo ? lo : x;
    return low > hi ? hi : low;
  }
  static float combine32_f(const VF* accs) {
    float lanes[32];
    for (int k = 0; k < 32; ++k) lanes[k] = accs[k];
    for (int width = 16; width >= 1; width /= 2) {
      for (int k = 0; k < width; ++k) lanes[k] += lanes[k + width];
    }
    return lanes[0];
  }
  template <int D>
  static VD load_d(const char* p) {
    return load1d<D>(p, 0);
  }
  static void store_d64(char* p, VD v) { store1d(p, 0, v); }
  template <int D>
  static void load16_d(const char* p, VD* out) {
    for (int k = 0; k < 16; ++k) out[k] = load1d<D>(p, k);
  }
  template <int D>
  static VF load_f(const char* p) {
    return load1f<D>(p, 0);
  }
  template <int D>
  static void store_f(char* p, VF v) {
    store1f<D>(p, 0, v);
  }
  // one block row (32 elements) in logical-lane order (see kBlockLanes)
  template <int D>
  static void load_block_row(const char* p, VF* out) {
    for (int lane = 0; lane < 32; ++lane) out[lane] = load1f<D>(p, block_lane_element<D>(lane));
  }
};

#endif

using VD = Simd::VD;
using VF = Simd::VF;
constexpr int kD = Simd::kD;
constexpr int kF = Simd::kF;
constexpr int kAccs = kLanes / kD;  // vector accumulators holding the 16 logical lanes
static_assert(kLanes % kD == 0, "the logical lanes must fill whole vectors");


// Software prefetch kPrefetchBytes ahead of the stream, one prefetch per cache line. The hardware
// prefetchers stop at page boundaries and ramp up again on each new page. Measured on a Zen 5 server
// (interleaved A/B in one process against torch's sum and mul_, GPT-2 gradient layout): 8 KiB ahead
// raised the read-write passes (scale, clamp) by 5-10% over no prefetch and 2 KiB, and the norm pass
// of 16-bit data by ~15%; the norm pass of float32 measured 3-15% slower with it at any distance
// (its loads already take whole lines at a time), so it has none. A prefetch never faults, so
// running past the end of a chunk is harmless.
constexpr int64_t kPrefetchBytes = 8192;
constexpr int64_t kLine = 64;

// one prefetch per line of the kBytes starting at p
template <int64_t kBytes>
inline void prefetch_lines(const char* p) {
#pragma GCC unroll 16
  for (int64_t k = 0; k < kBytes; k += kLine) __builtin_prefetch(p + k, 0, 3);
}

template <int64_t kStepBytes>
inline void prefetch_step(const char* p) {
  if constexpr (kStepBytes >= kLine) {
    prefetch_lines<kStepBytes>(p + kPrefetchBytes);
  } else {
    // steps shorter than a line: prefetch on the step that starts a new line
    if ((reinterpret_cast<uintptr_t>(p) & (kLine - 1)) < kStepBytes) __builtin_prefetch(p + kPrefetchBytes, 0, 3);
  }
}

// The 16 lanes combined by a fixed tree (the same for every instruction set).
inline double combine_lanes(const VD* accs) {
  double lanes[kLanes];
  for (int a = 0; a < kAccs; ++a) Simd::store_lanes(lanes + a * kD, accs[a]);
  for (int width = kLanes / 2; width >= 1; width /= 2) {
    for (int k = 0; k < width; ++k) lanes[k] += lanes[k + width];
  }
  return lanes[0];
}

// ---- norm partial of one chunk --------------------------------------------------------------------

// The 16 double lanes of a sum of |x| (kSquare = false) or x * x (kSquare = true) over `groups`
// groups of 16 elements.
template <int D, bool kSquare>
inline void add_to_double_lanes(const char* data, int64_t groups, VD* accs) {
  constexpr int64_t es = elem_size<D>();
  for (int64_t g = 0; g < groups; ++g) {
    VD x[kAccs];
    Simd::load16_d<D>(data + g * kLanes * es, x);
#pragma GCC unroll 16
    for (int a = 0; a < kAccs; ++a) accs[a] = Simd::add_d(accs[a], kSquare ? Simd::mul_d(x[a], x[a]) : Simd::abs_d(x[a]));
  }
}

// sum of |x| or x * x in double: the 16 lanes, then the scalar tail
template <int D, bool kSquare>
double sum_double(const char* data, int64_t n) {
  VD accs[kAccs];
  for (int a = 0; a < kAccs; ++a) accs[a] = Simd::zero_d();
  const int64_t whole = n / kLanes * kLanes;
  add_to_double_lanes<D, kSquare>(data, whole / kLanes, accs);
  double tail = 0.0;
  for (int64_t i = whole; i < n; ++i) {
    const double x = load1d<D>(data, i);
    tail += kSquare ? x * x : abs_d(x);
  }
  return combine_lanes(accs) + tail;
}

// A block of float, half or bfloat16 data summed in float (see the top of this file).
constexpr int kBlockLanes = 32;
constexpr int kBlockDepth = 8;  // adds per lane: the float rounding error stays within ~8 ulps
constexpr int64_t kBlock = kBlockLanes * kBlockDepth;
constexpr int kBlockAccs = kBlockLanes / kF;
static_assert(kBlockLanes % kF == 0, "a block row is whole vectors");
static_assert(kBlock % kLanes == 0, "a block is whole groups of the double lanes");

template <int D, bool kSquare>
inline VF block_term(VF x) {
  return kSquare ? Simd::mul_f(x, x) : Simd::abs_f(x);
}

template <int D, bool kSquare>
inline float block_sum_float(const char* block) {
  constexpr int64_t row_bytes = kBlockLanes * elem_size<D>();
  VF accs[kBlockAccs], x[kBlockAccs];
  Simd::load_block_row<D>(block, x);
#pragma GCC unroll 32
  for (int a = 0; a < kBlockAccs; ++a) accs[a] = block_term<D, kSquare>(x[a]);
#pragma GCC unroll 1
  for (int row = 1; row < kBlockDepth; ++row) {
    Simd::load_block_row<D>(block + row * row_bytes, x);
#pragma GCC unroll 32
    for (int a = 0; a < kBlockAccs; ++a) accs[a] = Simd::add_f(accs[a], block_term<D, kSquare>(x[a]));
  }
  return Simd::combine32_f(accs);
}

// The block's sum in double, for the rare blocks float cannot sum.
template <int D, bool kSquare>
double block_sum_double(const char* block) {
  VD accs[kAccs];
  for (int a = 0; a < kAccs; ++a) accs[a] = Simd::zero_d();
  add_to_double_lanes<D, kSquare>(block, kBlock / kLanes, accs);
  return combine_lanes(accs);
}

// The block's sum, in float where float gives it accurately, else in double.
template <int D, bool kSquare>
inline double block_sum(const char* block) {
  const float sum = block_sum_float<D, kSquare>(block);
  constexpr float kFloatMax = 3.40282346638528859812e+38f;
  // Every term is >= 0 and rounding is monotonic, so a finite sum means no partial sum overflowed.
  if (__builtin_expect(kSquare ? (sum >= 1e-30f && sum <= kFloatMax) : sum <= kFloatMax, 1)) return sum;
  // A sum of |x| is 0 only for an all-zero block; squares may also have underflowed.
  if (kSquare && sum == 0.0f && block_sum_float<D, false>(block) == 0.0f) return 0.0;
  return block_sum_double<D, kSquare>(block);
}

template <int D, bool kSquare>
double sum_chunk(const char* data, int64_t n) {
  if constexpr (D == kFloat64) {
    return sum_double<D, kSquare>(data, n);
  } else {
    constexpr int64_t es = elem_size<D>();
    double acc = 0.0;
    int64_t i = 0;
    for (; i + kBlock <= n; i += kBlock) {
      const char* block = data + i * es;
      if constexpr (es == 2) prefetch_lines<kBlock * es>(block + kPrefetchBytes);  // 16-bit data only
      acc += block_sum<D, kSquare>(block);
    }
    return i == n ? acc : acc + sum_double<D, kSquare>(data + i * es, n - i);
  }
}

// max |x| (kMax) or min |x| (kMin), NaN-propagating; exact, so the order does not matter
template <int D, bool kIsMax>
double extreme_chunk(const char* data, int64_t n) {
  constexpr int64_t es = elem_size<D>();
  VD best = Simd::set1_d(kIsMax ? 0.0 : FC_INF);
  VD nan = Simd::zero_d();
  int64_t i = 0;
  for (; i + kD <= n; i += kD) {
    const VD x = Simd::abs_d(Simd::load_d<D>(data + i * es));
    nan = Simd::or_d(nan, Simd::nan_mask_d(x));
    best = kIsMax ? Simd::max_d(best, x) : Simd::min_d(best, x);
  }
  double lanes[kD], nans[kD];
  Simd::store_lanes(lanes, best);
  Simd::store_lanes(nans, nan);
  bool any_nan = false;
  double result = kIsMax ? 0.0 : FC_INF;
  for (int k = 0; k < kD; ++k) {
    any_nan |= nans[k] != 0.0;
    result = kIsMax ? (lanes[k] > result ? lanes[k] : result) : (lanes[k] < result ? lanes[k] : result);
  }
  for (; i < n; ++i) {
    const double x = abs_d(load1d<D>(data, i));
    any_nan |= x != x;
    result = kIsMax ? (x > result ? x : result) : (x < result ? x : result);
  }
  return any_nan ? __builtin_nan("") : result;
}

// number of elements != 0 (NaN counts); exact
template <int D>
double count_chunk(const char* data, int64_t n) {
  constexpr int64_t es = elem_size<D>();
  VD count = Simd::zero_d();
  int64_t i = 0;
  for (; i + kD <= n; i += kD) count = Simd::add_d(count, Simd::nonzero_d(Simd::load_d<D>(data + i * es)));
  double lanes[kD];
  Simd::store_lanes(lanes, count);
  double result = 0.0;
  for (int k = 0; k < kD; ++k) result += lanes[k];
  for (; i < n; ++i) result += load1d<D>(data, i) != 0.0 ? 1.0 : 0.0;
  return result;
}

// sum of (|x| / m)^p for any other p, in order (m: the norm scale M', 1.0 without one). The quotient is
// rounded once (relative error 2^-53), so each term is within |p| 2^-53 + pow's error of the exact
// (|x| / m)^p, and the 1/p power taken of the sum divides that by |p| again.
template <int D>
double pow_chunk(const char* data, int64_t n, double p, double m) {
  double sum = 0.0;
  if (m == 1.0) {
    for (int64_t i = 0; i < n; ++i) sum += __builtin_pow(abs_d(load1d<D>(data, i)), p);
  } else {
    for (int64_t i = 0; i < n; ++i) sum += __builtin_pow(abs_d(load1d<D>(data, i)) / m, p);
  }
  return sum;
}

template <int D>
double norm_chunk(const char* data, int64_t n, int kind, double p, double m) {
  switch (kind) {
    case kMax:
      return extreme_chunk<D, true>(data, n);
    case kMin:
      return extreme_chunk<D, false>(data, n);
    case kCount:
      return count_chunk<D>(data, n);
    default:
      if (p == 2.0) return sum_chunk<D, true>(data, n);
      if (p == 1.0) return sum_chunk<D, false>(data, n);
      return pow_chunk<D>(data, n, p, m);
  }
}

void norm_chunks(const Tables& tables, int64_t begin, int64_t end, int kind, double p, double m, double* partials) {
  for (int64_t c = begin; c < end; ++c) {
    const Chunk chunk = resolve_chunk(tables, c);
    double partial;
    switch (chunk.dtype) {
      case kFloat32:
        partial = norm_chunk<kFloat32>(chunk.data, chunk.length, kind, p, m);
        break;
      case kFloat16:
        partial = norm_chunk<kFloat16>(chunk.data, chunk.length, kind, p, m);
        break;
      case kBFloat16:
        partial = norm_chunk<kBFloat16>(chunk.data, chunk.length, kind, p, m);
        break;
      default:
        partial = norm_chunk<kFloat64>(chunk.data, chunk.length, kind, p, m);
        break;
    }
    partials[c] = partial;
  }
}

// ---- scale and clamp ------------------------------------------------------------------------------

// x = round(x * coef) for a float, half or bfloat16 chunk when coef is outside float's normal range
// (rare: one scalar loop; see product_round_odd in fusedclip.h for why this is exact).
template <int D>
void scale_chunk_wide(char* data, int64_t n, double coef) {
  const WideCoef k = split_coef(coef);
  for (int64_t i = 0; i < n; ++i) {
    const double y = product_round_odd(static_cast<double>(load1f<D>(data, i)), k);
    if constexpr (D == kFloat32) {
      const float f = static_cast<float>(y);  // the one rounding to float
      std::memcpy(data + 4 * i, &f, 4);
    } else {
      const uint16_t h = D == kBFloat16 ? double_to_bf16(y) : double_to_half(y);  // odd float, then once more
      std::memcpy(data + 2 * i, &h, 2);
    }
  }
}

template <int D>
void scale_chunk(char* data, int64_t n, double coef) {
  constexpr int64_t es = elem_size<D>();
  int64_t i = 0;
  if constexpr (D != kFloat64) {
    if (__builtin_expect(coef_needs_wide(coef), 0)) {
      scale_chunk_wide<D>(data, n, coef);
      return;
    }
  }
  if constexpr (D == kFloat64) {
    const VD c = Simd::set1_d(coef);
    for (; i + kD <= n; i += kD) {
      prefetch_step<kD * es>(data + i * es);
      Simd::store_d64(data + i * es, Simd::mul_d(Simd::load_d<D>(data + i * es), c));
    }
    for (; i < n; ++i) store1d(data, i, load1d<D>(data, i) * coef);
  } else {
    const float cf = static_cast<float>(coef);
    const VF c = Simd::set1_f(cf);
    if constexpr (D == kBFloat16 && Simd::kBf16Group > 0) {
      for (; i + Simd::kBf16Group <= n; i += Simd::kBf16Group) {
        prefetch_step<Simd::kBf16Group * 2>(data + i * es);
        Simd::transform_bf16_group(data + i * es, [c](VF x) { return Simd::mul_f(x, c); });
      }
    }
#pragma GCC unroll 4
    for (; i + kF <= n; i += kF) {
      prefetch_step<kF * es>(data + i * es);
      Simd::store_f<D>(data + i * es, Simd::mul_f(Simd::load_f<D>(data + i * es), c));
    }
    for (; i < n; ++i) store1f<D>(data, i, load1f<D>(data, i) * cf);
  }
}

template <int D>
void clamp_chunk(char* data, int64_t n, double clip_value) {
  constexpr int64_t es = elem_size<D>();
  int64_t i = 0;
  if constexpr (D == kFloat64) {
    const VD lo = Simd::set1_d(-clip_value), hi = Simd::set1_d(clip_value);
    for (; i + kD <= n; i += kD) {
      prefetch_step<kD * es>(data + i * es);
      Simd::store_d64(data + i * es, Simd::clamp_d(Simd::load_d<D>(data + i * es), lo, hi));
    }
    for (; i < n; ++i) {
      const double x = load1d<D>(data, i);
      store1d(data, i, x > clip_value ? clip_value : (x < -clip_value ? -clip_value : x));
    }
  } else {
    const float v = static_cast<float>(clip_value);
    const VF lo = Simd::set1_f(-v), hi = Simd::set1_f(v);
    if constexpr (D == kBFloat16 && Simd::kBf16Group > 0) {
      for (; i + Simd::kBf16Group <= n; i += Simd::kBf16Group) {
        prefetch_step<Simd::kBf16Group * 2>(data + i * es);
        Simd::transform_bf16_group(data + i * es, [lo, hi](VF x) { return Simd::clamp_f(x, lo, hi); });
      }
    }
#pragma GCC unroll 4
    for (; i + kF <= n; i += kF) {
      prefetch_step<kF * es>(data + i * es);
      Simd::store_f<D>(data + i * es, Simd::clamp_f(Simd::load_f<D>(data + i * es), lo, hi));
    }
    for (; i < n; ++i) {
      const float x = load1f<D>(data, i);
      store1f<D>(data, i, x > v ? v : (x < -v ? -v : x));
    }
  }
}

template <template <int> class Op, class... Args>
void for_each_chunk(const Tables& tables, int64_t begin, int64_t end, Args... args) {
  for (int64_t c = begin; c < end; ++c) {
    const Chunk chunk = resolve_chunk(tables, c);
    switch (chunk.dtype) {
      case kFloat32:
        Op<kFloat32>::run(chunk.data, chunk.length, args...);
        break;
      case kFloat16:
        Op<kFloat16>::run(chunk.data, chunk.length, args...);
        break;
      case kBFloat16:
        Op<kBFloat16>::run(chunk.data, chunk.length, args...);
        break;
      default:
        Op<kFloat64>::run(chunk.data, chunk.length, args...);
        break;
    }
  }
}

template <int D>
struct ScaleOp {
  static void run(char* data, int64_t n, double coef) { scale_chunk<D>(data, n, coef); }
};
template <int D>
struct ClampOp {
  static void run(char* data, int64_t n, double clip_value) { clamp_chunk<D>(data, n, clip_value); }
};

void scale_chunks(const Tables& tables, int64_t begin, int64_t end, double coef) {
  for_each_chunk<ScaleOp>(tables, begin, end, coef);
}

void clamp_chunks(const Tables& tables, int64_t begin, int64_t end, double clip_value) {
  for_each_chunk<ClampOp>(tables, begin, end, clip_value);
}

}  // namespace

ChunkKernels FC_ISA_GETTER() { return ChunkKernels{FC_ISA_NAME, norm_chunks, scale_chunks, clamp_chunks}; }

}  // namespace cpu
}  // namespace fusedclip
