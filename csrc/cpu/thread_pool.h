// A small persistent pool of worker threads for the CPU kernels.
//
// torch keeps its own OpenMP pool; using a second OpenMP runtime from this extension would make
// the two fight over the cores. This pool is plain std::thread: workers sleep on a condition
// variable between calls and the calling thread always takes part, so a call on one thread never
// wakes anyone. Work is claimed dynamically by the participants (see cpu_ops.cpp), so a call
// finishes correctly even when some workers never get to run.
#pragma once

namespace fusedclip {
namespace cpu {

// Run fn(ctx, worker) on `threads` threads (the caller is worker 0) and return when all are done.
// A call made while another call is using the pool (from another Python thread) runs on the
// caller alone.
void parallel_run(int threads, void (*fn)(void* ctx, int worker), void* ctx);

}  // namespace cpu
}  // namespace fusedclip
