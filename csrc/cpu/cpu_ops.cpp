#include "cpu_ops.h"

#include <algorithm>
#include <atomic>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

#include "../fusedclip.h"
#include "chunk_kernels.h"
#include "thread_pool.h"
#include "work_ranges.h"

namespace fusedclip {
namespace cpu {
namespace {

// Below this many elements a call runs on the calling thread: waking a worker costs more than
// it saves.
constexpr int64_t kParallelMinElements = 1 << 18;
// Elements claimed at a time by a thread (whole chunks): large enough that claiming is cheap,
// small enough that a thread descheduled by a noisy neighbour leaves little work behind.
constexpr int64_t kClaimElements = 1 << 18;

// The default floating-point environment (round to nearest, no flush-to-zero, no
// denormals-are-zero) for the duration of a thread's share of a pass. Worker threads start with
// it, but the calling thread carries whatever the program set (torch.set_flush_denormal), and a
// result must not depend on which thread processed a chunk.
class DefaultFloatEnvironment {
 public:
#if defined(__x86_64__) || defined(__i386__)
  DefaultFloatEnvironment() : saved_(_mm_getcsr()) {
    if (saved_ != kDefault) _mm_setcsr(kDefault);
  }
  ~DefaultFloatEnvironment() {
    if (saved_ != kDefault) _mm_setcsr(saved_);
  }

 private:
  static constexpr unsigned kDefault = 0x1f80;  // all exceptions masked, nearest, no FTZ/DAZ
  unsigned saved_;
#endif
};

std::atomic<int64_t> g_norm_passes{0}, g_scale_passes{0}, g_clamp_passes{0};
std::atomic<int> g_last_threads{0};
// threads that processed at least one claim in the last norm / scale-or-clamp pass
std::atomic<int> g_norm_participants{0}, g_elementwise_participants{0};

int threads_for(const PlanArgs& plan) {
  int threads = 1;
  if (plan.total_elements >= kParallelMinElements && plan.num_chunks >= 2) {
    threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(plan.threads, plan.num_chunks)));
  }
  g_last_threads.store(threads, std::memory_order_relaxed);
  return threads;
}

// Chunks per claim: about kClaimElements elements, and at most an eighth of a thread's range so
// that stealing can even out a slow thread.
int64_t claim_grain(const PlanArgs& plan, int threads) {
  const int64_t average = std::max<int64_t>(1, plan.total_elements / std::max<int64_t>(1, plan.num_chunks));
  const int64_t by_size = std::max<int64_t>(1, kClaimElements / average);
  const int64_t by_balance = std::max<int64_t>(1, plan.num_chunks / (8 * static_cast<int64_t>(threads)));
  return std::min(by_size, by_balance);
}

// Runs `body(begin, end)` over every claim this worker gets; true when it got any.
template <class Body>
bool work_through(WorkRanges& ranges, int worker, Body body) {
  int64_t begin, end;
  bool worked = false;
  while (ranges.claim(worker, &begin, &end)) {
    body(begin, end);
    worked = true;
  }
  return worked;
}

struct NormJob {
  Tables tables;
  const ChunkKernels* kernels;
  int kind;
  double p;
  double norm_scale;
  double* partials;
  WorkRanges* ranges;
  std::atomic<int> participants{0};
};

void norm_worker(void* ctx, int worker) {
  NormJob& job = *static_cast<NormJob*>(ctx);
  const DefaultFloatEnvironment environment;
  const bool worked = work_through(*job.ranges, worker, [&job](int64_t begin, int64_t end) {
    job.kernels->norm(job.tables, begin, end, job.kind, job.p, job.norm_scale, job.partials);
  });
  if (worked) job.participants.fetch_add(1, std::memory_order_relaxed);
}

struct ElementwiseJob {
  Tables tables;
  const ChunkKernels* kernels;
  bool is_scale;
  double value;  // coefficient or clip value
  WorkRanges* ranges;
  std::atomic<int> participants{0};
};

void elementwise_worker(void* ctx, int worker) {
  ElementwiseJob& job = *static_cast<ElementwiseJob*>(ctx);
  const DefaultFloatEnvironment environment;
  const bool worked = work_through(*job.ranges, worker, [&job](int64_t begin, int64_t end) {
    if (job.is_scale) {
      job.kernels->scale(job.tables, begin, end, job.value);
    } else {
      job.kernels->clamp(job.tables, begin, end, job.value);
    }
  });
  if (worked) job.participants.fetch_add(1, std::memory_order_relaxed);
}

void run_elementwise(const PlanArgs& plan, bool is_scale, double value) {
  ElementwiseJob job;
  job.tables = tables_from_packed(plan.packed, plan.num_tensors, plan.num_chunks, plan.chunk_elements);
  job.kernels = &active_kernels();
  job.is_scale = is_scale;
  job.value = value;
  const int threads = threads_for(plan);
  // The scale pass follows a norm pass: walking backwards it meets first what the norm read last.
  WorkRanges ranges(plan.num_chunks, threads, claim_grain(plan, threads), /*backwards=*/is_scale);
  job.ranges = &ranges;
  parallel_run(threads, elementwise_worker, &job);
  g_elementwise_participants.store(job.participants.load(), std::memory_order_relaxed);
  (is_scale ? g_scale_passes : g_clamp_passes).fetch_add(1, std::memory_order_relaxed);
}

}  // namespace

void norm(const PlanArgs& plan, const NormArgs& args) {
  std::vector<double> partials(static_cast<size_t>(plan.num_chunks));
  NormJob job;
  job.tables = tables_from_packed(plan.packed, plan.num_tensors, plan.num_chunks, plan.chunk_elements);
  job.kernels = &active_kernels();
  job.kind = args.kind;
  job.p = args.p;
  job.norm_scale = args.norm_scale;
  job.partials = partials.data();
  const int threads = threads_for(plan);
  WorkRanges ranges(plan.num_chunks, threads, claim_grain(plan, threads), /*backwards=*/false);
  job.ranges = &ranges;
  parallel_run(threads, norm_worker, &job);
  g_norm_participants.store(job.participants.load(), std::memory_order_relaxed);
  g_norm_passes.fetch_add(1, std::memory_order_relaxed);

  // Fixed-order reductions: chunks of a tensor in order, then tensors in order.
  const Tables& tables = job.tables;
  double total_acc = acc_identity(args.kind == kCount ? kSumPow : args.kind);
  for (int64_t t = 0; t < plan.num_tensors; ++t) {
    double tensor_acc = acc_identity(args.kind);
    for (int64_t c = tables.first_chunk[t]; c < tables.first_chunk[t + 1]; ++c) {
      tensor_acc = acc_combine(args.kind, tensor_acc, partials[static_cast<size_t>(c)]);
    }
    const bool empty = tables.numels[t] == 0;
    if (args.per_tensor_out != nullptr) {
      args.per_tensor_out[t] = empty ? 0.0 : scaled_norm_from_acc(args.kind, args.p, tensor_acc, args.norm_scale);
    }
    if (!empty) total_acc = acc_combine(args.kind, total_acc, tensor_contribution(args.kind, tensor_acc));
  }

  const Finished done =
      finish(args.kind, args.p, total_acc, args.coef_out != nullptr, args.max_norm, args.has_scale, args.scale,
             args.norm_scale);
  *args.acc_out = total_acc;
  write_scalar(args.total_out, args.total_dtype, done.total);
  if (args.coef_out != nullptr) *args.coef_out = done.coef;
}

void scale(const PlanArgs& plan, double coef) {
  if (coef == 1.0) return;  // unclipped: nothing to write (NaN is not 1 and is applied)
  run_elementwise(plan, true, coef);
}

void clamp(const PlanArgs& plan, double clip_value) { run_elementwise(plan, false, clip_value); }

Stats stats() {
  return Stats{g_norm_passes.load(),         g_scale_passes.load(),
               g_clamp_passes.load(),         g_last_threads.load(),
               g_norm_participants.load(),    g_elementwise_participants.load()};
}

}  // namespace cpu
}  // namespace fusedclip
