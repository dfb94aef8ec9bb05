// What this machine's memory can do, measured with the simplest loops that could do each job: the
// physical floor for the CPU backend's passes (benchmarks/results/cpu_targets.md).
//
//   g++ -O3 -mavx2 -mfma -pthread benchmarks/membw.cpp -o /tmp/membw && /tmp/membw [MB ...]
//
// For each buffer size: the best of many passes of
//   read      sum of float32 values in float (8 accumulators of 8 lanes): a pure read stream
//   read-f64  the same read, each value widened to double first (the old norm loop's arithmetic)
//   rw        x *= c in place (read + write of the same memory)
//   copy      y = x (read + write of different memory)
// on 1 and 2 threads (each thread takes a contiguous half). GB/s counts the bytes the job must
// move: N for read, 2N for rw and copy.
#include <immintrin.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

namespace {

volatile float g_sink;

float read_f32(const float* x, size_t n) {
  __m256 acc[8];
  for (auto& a : acc) a = _mm256_setzero_ps();
  size_t i = 0;
  for (; i + 64 <= n; i += 64) {
    for (int k = 0; k < 8; ++k) acc[k] = _mm256_add_ps(acc[k], _mm256_loadu_ps(x + i + 8 * k));
  }
  for (int k = 1; k < 8; ++k) acc[0] = _mm256_add_ps(acc[0], acc[k]);
  float lanes[8];
  _mm256_storeu_ps(lanes, acc[0]);
  return lanes[0] + lanes[7];
}

// the same read with a software prefetch `distance` bytes ahead (hardware prefetchers stop at
// 4 KiB pages; a deeper stream of outstanding misses may raise a latency-bound core's bandwidth)
float read_f32_prefetch(const float* x, size_t n, size_t distance) {
  __m256 acc[8];
  for (auto& a : acc) a = _mm256_setzero_ps();
  const size_t ahead = distance / sizeof(float);
  size_t i = 0;
  for (; i + 64 <= n; i += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(x + i + ahead), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(x + i + ahead + 16), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(x + i + ahead + 32), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(x + i + ahead + 48), _MM_HINT_T0);
    for (int k = 0; k < 8; ++k) acc[k] = _mm256_add_ps(acc[k], _mm256_loadu_ps(x + i + 8 * k));
  }
  for (int k = 1; k < 8; ++k) acc[0] = _mm256_add_ps(acc[0], acc[k]);
  float lanes[8];
  _mm256_storeu_ps(lanes, acc[0]);
  return lanes[0] + lanes[7];
}

float read_f64(const float* x, size_t n) {
  __m256d acc[4];
  for (auto& a : acc) a = _mm256_setzero_pd();
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int k = 0; k < 4; ++k) {
      const __m256d v = _mm256_cvtps_pd(_mm_loadu_ps(x + i + 4 * k));
      acc[k] = _mm256_add_pd(acc[k], _mm256_mul_pd(v, v));
    }
  }
  for (int k = 1; k < 4; ++k) acc[0] = _mm256_add_pd(acc[0], acc[k]);
  double lanes[4];
  _mm256_storeu_pd(lanes, acc[0]);
  return static_cast<float>(lanes[0] + lanes[3]);
}

void scale_inplace(float* x, size_t n) {
  const __m256 c = _mm256_set1_ps(0.99999994f);
  for (size_t i = 0; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), c));
}

void copy(const float* x, float* y, size_t n) { std::memcpy(y, x, n * sizeof(float)); }

double best_seconds(int threads, size_t n, const std::function<void(size_t, size_t)>& part, int reps) {
  double best = 1e30;
  const size_t step = (n / threads + 63) / 64 * 64;
  for (int r = 0; r < reps; ++r) {
    std::atomic<bool> go{false};
    std::vector<std::thread> helpers;  // started (and spinning) before the clock starts
    for (int t = 1; t < threads; ++t) {
      helpers.emplace_back([&, t] {
        while (!go.load(std::memory_order_acquire)) _mm_pause();
        part(std::min(n, t * step), std::min(n, (t + 1) * step));
      });
    }
    std::this_thread::sleep_for(std::chrono::microseconds(200));
    const auto start = std::chrono::steady_clock::now();
    go.store(true, std::memory_order_release);
    part(0, std::min(n, step));
    for (auto& h : helpers) h.join();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<double> sizes_mb = {20, 500};
  if (argc > 1) {
    sizes_mb.clear();
    for (int i = 1; i < argc; ++i) sizes_mb.push_back(std::atof(argv[i]));
  }
  std::printf("%8s %8s %10s %10s %10s %10s   (GB/s of bytes the job must move; best of many)\n", "MB", "threads",
              "read", "read-f64", "rw", "copy");
  for (double mb : sizes_mb) {
    const size_t n = static_cast<size_t>(mb * 1e6 / 4);
    std::vector<float> x(n), y(n);
    for (size_t i = 0; i < n; ++i) x[i] = static_cast<float>((i * 2654435761u) % 1000) * 1e-3f;
    std::memset(y.data(), 0, n * 4);
    const int reps = mb > 100 ? 15 : 200;
    for (int threads = 1; threads <= 2; ++threads) {
      const double bytes = n * 4.0;
      const double r = best_seconds(threads, n, [&](size_t b, size_t e) { g_sink = read_f32(x.data() + b, e - b); }, reps);
      for (size_t distance : {1024, 4096, 16384}) {
        const double rp = best_seconds(threads, n, [&](size_t b, size_t e) { g_sink = read_f32_prefetch(x.data() + b, e - b, distance); }, reps);
        std::printf("%8.0f %8d   read with prefetch %5zu B ahead: %5.1f GB/s\n", mb, threads, distance, bytes / rp / 1e9);
      }
      const double r64 = best_seconds(threads, n, [&](size_t b, size_t e) { g_sink = read_f64(x.data() + b, e - b); }, reps);
      const double rw = best_seconds(threads, n, [&](size_t b, size_t e) { scale_inplace(x.data() + b, e - b); }, reps);
      const double cp = best_seconds(threads, n, [&](size_t b, size_t e) { copy(x.data() + b, y.data() + b, e - b); }, reps);
      std::printf("%8.0f %8d %10.1f %10.1f %10.1f %10.1f\n", mb, threads, bytes / r / 1e9, bytes / r64 / 1e9,
                  2 * bytes / rw / 1e9, 2 * bytes / cp / 1e9);
    }
  }
  return 0;
}
