#include "work_ranges.h"

#include <algorithm>

namespace fusedclip {
namespace cpu {
namespace {

constexpr uint64_t kLow = 0xffffffffu;

uint64_t pack(uint64_t first, uint64_t end) { return (first << 32) | end; }

}  // namespace

WorkRanges::WorkRanges(int64_t chunks, int threads, int64_t grain, bool backwards)
    : count_(std::max(1, threads)), grain_(std::max<int64_t>(1, grain)), backwards_(backwards),
      ranges_(new std::atomic<uint64_t>[static_cast<size_t>(count_)]) {
  for (int t = 0; t < count_; ++t) {
    const uint64_t first = static_cast<uint64_t>(chunks * t / count_);
    const uint64_t end = static_cast<uint64_t>(chunks * (t + 1) / count_);
    ranges_[t].store(pack(first, end), std::memory_order_relaxed);
  }
}

bool WorkRanges::take(int range, bool from_front, int64_t* begin, int64_t* end) {
  std::atomic<uint64_t>& slot = ranges_[range];
  uint64_t current = slot.load(std::memory_order_relaxed);
  for (;;) {
    const uint64_t first = current >> 32, last = current & kLow;
    if (first >= last) return false;
    const uint64_t size = std::min<uint64_t>(static_cast<uint64_t>(grain_), last - first);
    const uint64_t next = from_front ? pack(first + size, last) : pack(first, last - size);
    if (slot.compare_exchange_weak(current, next, std::memory_order_relaxed)) {
      *begin = static_cast<int64_t>(from_front ? first : last - size);
      *end = static_cast<int64_t>(from_front ? first + size : last);
      return true;
    }
  }
}

bool WorkRanges::claim(int worker, int64_t* begin, int64_t* end) {
  const int own = worker % count_;
  if (take(own, !backwards_, begin, end)) return true;
  for (int k = 1; k < count_; ++k) {
    if (take((own + k) % count_, backwards_, begin, end)) return true;
  }
  return false;
}

}  // namespace cpu
}  // namespace fusedclip
