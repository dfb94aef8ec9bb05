#include "thread_pool.h"

#include <dlfcn.h>
#include <link.h>
#include <pthread.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <algorithm>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define FC_CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define FC_CPU_RELAX() asm volatile("yield" ::: "memory")
#else
#define FC_CPU_RELAX() ((void)0)
#endif

namespace fusedclip {
namespace cpu {
namespace {

using Clock = std::chrono::steady_clock;

// How long a worker keeps polling for the next job after finishing one before it sleeps. A clip
// call is a norm pass and, a few microseconds of Python later, a scale pass: a worker still polling
// joins the scale pass at once, where a sleeping one takes 5-60 us to wake (the longer when its
// core went idle). Bounded, so idle workers give the cores back to torch's own threads.
constexpr auto kWorkerSpin = std::chrono::microseconds(250);
// How long the caller polls for workers still inside the job before it sleeps: at most the rest
// of one claim (cpu_ops.cpp), usually a few microseconds.
constexpr auto kCallerSpin = std::chrono::microseconds(100);

// Poll `ready` until it holds or `limit` has passed; true when it holds.
template <class Ready>
bool spin_until(Ready ready, Clock::duration limit) {
  const Clock::time_point deadline = Clock::now() + limit;
  for (;;) {
    for (int i = 0; i < 64; ++i) {
      if (ready()) return true;
      FC_CPU_RELAX();
    }
    if (Clock::now() >= deadline) return ready();
  }
}

class ThreadPool {
 public:
  // Runs the job on the caller plus up to threads - 1 workers; false when the pool is busy.
  //
  // The caller never waits for a worker that has not started: once the caller has run out of
  // work it closes the job, and a worker that arrives later leaves the job alone. So a worker
  // descheduled by a noisy neighbour costs nothing (the work is claimed dynamically, see
  // cpu_ops.cpp); the caller only waits for workers still inside fn.
  //
  // Publishing a job costs the caller one atomic increment while the workers are still polling
  // after the previous job, and a futex wake only when some of them went to sleep.
  bool run(int threads, void (*fn)(void*, int), void* ctx) {
    std::unique_lock<std::mutex> busy(run_mutex_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    const int helpers = threads - 1;
    if (static_cast<int>(workers_.size()) < helpers) start_workers(helpers);
    fn_ = fn;
    ctx_ = ctx;
    helpers_ = helpers;
    open_.store(true);
    generation_.fetch_add(1);  // publishes the fields above (seq_cst)
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      wake_.notify_all();
    }
    fn(ctx, 0);
    open_.store(false);
    if (!spin_until([this] { return running_.load() == 0; }, kCallerSpin)) {
      std::unique_lock<std::mutex> lock(mutex_);
      done_.wait(lock, [this] { return running_.load() == 0; });
    }
    return true;
  }

 private:
  void start_workers(int helpers) {
    while (static_cast<int>(workers_.size()) < helpers) {
      const int index = static_cast<int>(workers_.size()) + 1;
      const uint64_t seen = generation_.load();
      workers_.emplace_back([this, index, seen] { worker_loop(index, seen); });
    }
  }

  void worker_loop(int index, uint64_t seen) {
    for (;;) {
      uint64_t now = seen;
      const auto changed = [&] { return (now = generation_.load()) != seen; };
      if (!spin_until(changed, kWorkerSpin)) {
        std::unique_lock<std::mutex> lock(mutex_);
        sleepers_.fetch_add(1);  // before the last check: run() then sees a sleeper and notifies
        wake_.wait(lock, changed);
        sleepers_.fetch_sub(1);
      }
      seen = now;
      join(index, now);
    }
  }

  // Take part in job `generation` if it is still open and needs this worker.
  void join(int index, uint64_t generation) {
    // Announce first, then check: either the caller sees this worker in running_ and waits for
    // it, or this worker sees the job closed (or replaced) and backs out (all seq_cst).
    running_.fetch_add(1);
    if (open_.load() && generation_.load() == generation && index <= helpers_) fn_(ctx_, index);
    if (running_.fetch_sub(1) == 1 && !open_.load()) {
      std::lock_guard<std::mutex> lock(mutex_);  // the caller may be about to sleep on done_
      done_.notify_one();
    }
  }

  std::mutex run_mutex_;  // one call at a time
  std::mutex mutex_;      // for sleeping: wake_ and done_
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;  // touched only under run_mutex_
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> sleepers_{0};  // workers asleep (or about to be) on wake_
  std::atomic<int> running_{0};   // workers inside join()
  std::atomic<bool> open_{false};  // the caller is still working: late workers may join
  // the job, written by run() before generation_ is incremented
  void (*fn_)(void*, int) = nullptr;
  void* ctx_ = nullptr;
  int helpers_ = 0;
};

// Never destroyed: worker threads are left to the process exit, and a forked child (whose
// workers do not exist) starts from a fresh pool.
ThreadPool* g_pool = nullptr;
std::once_flag g_once;

void make_fresh_pool_in_child() { g_pool = new ThreadPool(); }

ThreadPool& pool() {
  std::call_once(g_once, [] {
    g_pool = new ThreadPool();
    pthread_atfork(nullptr, nullptr, make_fresh_pool_in_child);
  });
  return *g_pool;
}

// ---- torch's own OpenMP threads -------------------------------------------------------------------
//
// torch's CPU ops run on an OpenMP team whose threads keep spinning for a while after each op. A
// clip call comes right after the backward pass (or, in a benchmark, after a copy), so a second
// pool's worker finds its core taken by a spinning OpenMP thread and joins late or not at all:
// measured here, the norm pass of 57 MB took 4.5 ms right after a torch op against 2.5 ms with
// OMP_WAIT_POLICY=PASSIVE. Running the passes on the OpenMP runtime torch has already loaded
// (through the GNU OpenMP ABI, which libgomp and Intel's libiomp5 both export) uses exactly the
// threads that are spinning, and never adds threads of our own. Nothing is linked at build time:
// the runtime is found among the libraries already in the process, so the build still needs no
// torch, and without one the pool above is used.

using GompParallel = void (*)(void (*)(void*), void*, unsigned, unsigned);
using OmpThreadNum = int (*)();

struct OpenMpRuntime {
  GompParallel parallel = nullptr;
  OmpThreadNum thread_num = nullptr;
  std::string path;
};

bool is_openmp_library(const char* path) {
  const char* slash = std::strrchr(path, '/');
  const char* base = slash == nullptr ? path : slash + 1;
  return std::strncmp(base, "libgomp", 7) == 0 || std::strncmp(base, "libiomp", 7) == 0;
}

int collect_openmp(dl_phdr_info* info, size_t, void* out) {
  if (info->dlpi_name != nullptr && is_openmp_library(info->dlpi_name)) {
    auto& found = *static_cast<std::vector<std::string>*>(out);
    found.emplace_back(info->dlpi_name);
  }
  return 0;
}

OpenMpRuntime find_loaded_openmp() {
  OpenMpRuntime runtime;
  const char* choice = std::getenv("FUSEDCLIP_CPU_THREADS");
  if (choice != nullptr && std::strcmp(choice, "pool") == 0) return runtime;
  std::vector<std::string> found;
  dl_iterate_phdr(collect_openmp, &found);
  // torch's bundled runtime first: that is the team torch's ops use
  std::stable_partition(found.begin(), found.end(),
                        [](const std::string& path) { return path.find("/torch/lib/") != std::string::npos; });
  for (const std::string& path : found) {
    void* handle = dlopen(path.c_str(), RTLD_LAZY | RTLD_NOLOAD);  // never loads a new runtime
    if (handle == nullptr) continue;
    auto parallel = reinterpret_cast<GompParallel>(dlsym(handle, "GOMP_parallel"));
    auto thread_num = reinterpret_cast<OmpThreadNum>(dlsym(handle, "omp_get_thread_num"));
    if (parallel != nullptr && thread_num != nullptr) {
      runtime.parallel = parallel;
      runtime.thread_num = thread_num;
      runtime.path = path;
      return runtime;
    }
  }
  return runtime;
}

// GNU libgomp is not fork-safe: a child's OpenMP team refers to threads that were not copied. A
// forked child uses the pool (which starts afresh there) instead.
std::atomic<bool> g_forked{false};

const OpenMpRuntime& openmp() {
  static const OpenMpRuntime runtime = [] {
    pthread_atfork(nullptr, nullptr, [] { g_forked.store(true); });
    return find_loaded_openmp();
  }();
  return runtime;
}

struct OpenMpJob {
  void (*fn)(void*, int);
  void* ctx;
  OmpThreadNum thread_num;
};

void openmp_trampoline(void* data) {
  const OpenMpJob& job = *static_cast<const OpenMpJob*>(data);
  job.fn(job.ctx, job.thread_num());
}

// One call at a time on the OpenMP team as well: a second Python thread runs on its caller alone,
// as with the pool.
std::mutex g_openmp_busy;

}  // namespace

void parallel_run(int threads, void (*fn)(void* ctx, int worker), void* ctx) {
  if (threads <= 1) return fn(ctx, 0);
  const OpenMpRuntime& omp = openmp();
  if (omp.parallel != nullptr && !g_forked.load()) {
    std::unique_lock<std::mutex> busy(g_openmp_busy, std::try_to_lock);
    if (!busy.owns_lock()) return fn(ctx, 0);
    OpenMpJob job{fn, ctx, omp.thread_num};
    omp.parallel(openmp_trampoline, &job, static_cast<unsigned>(threads), 0);
    return;
  }
  if (!pool().run(threads, fn, ctx)) fn(ctx, 0);
}

const char* parallel_runtime() {
  const OpenMpRuntime& omp = openmp();
  if (omp.parallel != nullptr && !g_forked.load()) return omp.path.c_str();
  return "pool";
}

}  // namespace cpu
}  // namespace fusedclip
