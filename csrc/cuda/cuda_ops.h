// The CUDA backend's launchers (defined in kernels.cu, called from bindings.cpp).
//
// Everything is passed as raw device addresses and a stream handle (torch's current stream), so
// this compiles without torch. Each launcher makes exactly one kernel launch, never synchronises
// and never allocates, so calls can be captured in CUDA graphs. Launchers return null on success,
// else a message.
#pragma once

#include <cstdint>

namespace fusedclip {
namespace cuda {

struct PlanArgs {
  const int64_t* packed;   // the packed int64 table buffer, on the device
  int64_t num_tensors;     // T
  int64_t num_chunks;      // C
  int64_t chunk_elements;  // largest chunk, in elements
  int device;              // CUDA device index of the grads
  void* stream;            // cudaStream_t to launch on
};

struct NormArgs {
  int kind;                    // fusedclip::NormKind
  double p;                    // the norm order
  void* total_out;             // 0-d output in total_dtype
  int total_dtype;             // dtype code
  double* acc_out;             // 0-d float64 accumulator
  double* coef_out;            // 0-d float64 coefficient, or null (no max_norm)
  double max_norm;             // used when coef_out is set and max_norm_ptr is null
  const void* max_norm_ptr;    // 0-d device tensor holding max_norm, or null
  int max_norm_dtype;          // its dtype code
  const void* scale_ptr;       // 0-d device tensor s (grads are read as s * grad), or null
  int scale_dtype;             // its dtype code
  const double* norm_scale_ptr;  // general p: 0-d float64 device tensor M (see fusedclip.h), or null
  double* per_tensor_out;      // [T] float64 per-tensor norms, or null
  double* partials;            // [norm_units(...)] float64 workspace
  unsigned int* ticket;        // two counters, zero before the first launch (each launch resets them)
};

// Size of the float64 partials workspace the norm launch needs for this plan on this device (the
// plan's chunks split into enough units to fill the GPU); 0 with *error set on failure.
int64_t norm_units(int device, int64_t num_chunks, int64_t chunk_elements, const char** error);

// One launch: chunk partials, then the last block to finish reduces them per tensor and over
// tensors in a fixed order and writes total, accumulator, coefficient and per-tensor norms.
const char* norm(const PlanArgs& plan, const NormArgs& args);

// One launch: every block reads the coefficient and returns at once when it is exactly 1; otherwise
// x = round(float(x) * float(coef)) (double for float64; the exact product rounded once when coef is
// outside float's normal range, see fusedclip.h).
const char* scale(const PlanArgs& plan, const void* coef_ptr, int coef_dtype);

// One launch: x = x > v ? v : (x < -v ? -v : x).
const char* clamp(const PlanArgs& plan, double clip_value);

// Devices the CUDA runtime linked into the module can see (0 when no driver), and a reason
// string when that is 0 because of an error.
int device_count(const char** error);

}  // namespace cuda
}  // namespace fusedclip
