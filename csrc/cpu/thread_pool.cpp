#include "thread_pool.h"

#include <pthread.h>

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace fusedclip {
namespace cpu {
namespace {

class ThreadPool {
 public:
  // Runs the job on the caller plus up to threads - 1 workers; false when the pool is busy.
  //
  // The caller never waits for a worker that has not started: once the caller has run out of
  // work it closes the job, and a worker that wakes up later leaves the job alone. So a worker
  // descheduled by a noisy neighbour costs nothing (the work is claimed dynamically, see
  // cpu_ops.cpp); the caller only waits for workers still inside fn.
  bool run(int threads, void (*fn)(void*, int), void* ctx) {
    std::unique_lock<std::mutex> busy(run_mutex_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    const int helpers = threads - 1;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      while (static_cast<int>(workers_.size()) < helpers) {
        const int index = static_cast<int>(workers_.size()) + 1;
        workers_.emplace_back([this, index] { worker_loop(index); });
      }
      fn_ = fn;
      ctx_ = ctx;
      helpers_ = helpers;
      open_ = true;
      ++generation_;
    }
    if (helpers > 0) wake_.notify_all();
    fn(ctx, 0);
    std::unique_lock<std::mutex> lock(mutex_);
    open_ = false;
    done_.wait(lock, [this] { return running_ == 0; });
    return true;
  }

 private:
  void worker_loop(int index) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (index > helpers_ || !open_) continue;  // not needed, or the caller already finished
      void (*fn)(void*, int) = fn_;
      void* ctx = ctx_;
      ++running_;
      lock.unlock();
      fn(ctx, index);
      lock.lock();
      if (--running_ == 0 && !open_) done_.notify_one();
    }
  }

  std::mutex run_mutex_;  // one call at a time
  std::mutex mutex_;      // guards everything below
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  uint64_t generation_ = 0;
  int helpers_ = 0;
  int running_ = 0;    // workers inside fn
  bool open_ = false;  // the caller is still working: late workers may join
  void (*fn_)(void*, int) = nullptr;
  void* ctx_ = nullptr;
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

}  // namespace

void parallel_run(int threads, void (*fn)(void* ctx, int worker), void* ctx) {
  if (threads <= 1 || !pool().run(threads, fn, ctx)) fn(ctx, 0);
}

}  // namespace cpu
}  // namespace fusedclip
