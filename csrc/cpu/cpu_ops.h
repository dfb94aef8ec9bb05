// The CPU backend's three operations over a whole plan, each one parallel region over chunks.
#pragma once

#include <cstdint>

namespace fusedclip {
namespace cpu {

// The plan's tables (fusedclip.plan.KernelTables) and how to run over them.
struct PlanArgs {
  const int64_t* packed;   // the packed int64 table buffer
  int64_t num_tensors;     // T
  int64_t num_chunks;      // C
  int64_t chunk_elements;  // largest chunk, in elements
  int64_t total_elements;  // sum of the tensors' element counts (decides whether threads pay)
  int threads;             // threads to use (torch.get_num_threads())
};

struct NormArgs {
  int kind;                 // fusedclip::NormKind
  double p;                 // the norm order
  void* total_out;          // 0-d output in total_dtype
  int total_dtype;          // dtype code of total_out
  double* acc_out;          // 0-d float64: the unrounded total accumulator
  double* coef_out;         // 0-d float64 clip coefficient, or null (no max_norm)
  double max_norm;          // used when coef_out is given
  double* per_tensor_out;   // [T] float64 per-tensor norms, or null
  bool has_scale;           // grads are read as scale * grad
  double scale;
  double norm_scale;        // general p: M' (usable_norm_scale of the norm scale, see fusedclip.h); else 1
};

// Norm of every tensor of the plan: one parallel pass computes a partial per chunk, then the
// partials are reduced per tensor and over tensors in a fixed order (the same bits for any
// thread count).
void norm(const PlanArgs& plan, const NormArgs& args);

// x = round(float(x) * float(coef)) (double for float64; the exact product rounded once when coef is
// outside float's normal range, see fusedclip.h); nothing at all when coef == 1 (a clip coefficient is
// never above 1, but with a grad scale folded in it can be, and is then applied).
void scale(const PlanArgs& plan, double coef);

// x = x > v ? v : (x < -v ? -v : x).
void clamp(const PlanArgs& plan, double clip_value);

// Counters for tests: passes over the data run so far, the threads the last pass asked for, and
// how many of them processed chunks in the last norm and the last scale or clamp pass.
struct Stats {
  int64_t norm_passes;
  int64_t scale_passes;
  int64_t clamp_passes;
  int last_threads;
  int norm_participants;
  int elementwise_participants;
};
Stats stats();

}  // namespace cpu
}  // namespace fusedclip
