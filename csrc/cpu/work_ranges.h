// How a pass shares its chunks out to the threads.
//
// The chunks are split into one contiguous range per thread. Each thread walks its own range from
// one end in claims of `grain` chunks; a thread whose range is used up takes claims from the far
// end of the other ranges. So every thread streams through long runs of consecutive memory (what
// the hardware prefetchers and DRAM pages reward: one shared queue of interleaved claims measured
// 5-10% slower on large sets), and a thread that is descheduled or never starts still leaves
// nothing undone. Which thread handles a chunk never changes a result: every chunk has its own
// partial, reduced in a fixed order (cpu_ops.cpp).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>

namespace fusedclip {
namespace cpu {

class WorkRanges {
 public:
  // `chunks` chunks for `threads` threads; `backwards`: owners walk their range from the last
  // chunk down (a pass after a norm pass meets first the chunks the norm read last, which may
  // still be in cache) and thieves take from the front.
  WorkRanges(int64_t chunks, int threads, int64_t grain, bool backwards);

  // The next claim [*begin, *end) for `worker` (0 <= worker < threads); false when all is done.
  bool claim(int worker, int64_t* begin, int64_t* end);

  // Chunk indices are packed in pairs into one 64-bit word: no pass may have more.
  static constexpr int64_t kMaxChunks = int64_t{1} << 32;

 private:
  bool take(int range, bool from_front, int64_t* begin, int64_t* end);

  int count_;
  int64_t grain_;
  bool backwards_;
  std::unique_ptr<std::atomic<uint64_t>[]> ranges_;  // (first << 32) | end of what is left
};

}  // namespace cpu
}  // namespace fusedclip
