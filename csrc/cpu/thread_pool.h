// A small persistent pool of worker threads for the CPU kernels.
//
// torch keeps its own OpenMP team; linking a second OpenMP runtime into this extension would make
// the two fight over the cores. So parallel_run borrows the OpenMP runtime torch has already loaded
// (found at run time; see thread_pool.cpp), and only without one uses this pool of plain std::thread: workers sleep on a condition
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

// Where parallel_run runs its threads: the path of the OpenMP runtime already loaded in the
// process (torch's), or "pool" for the extension's own threads (no OpenMP runtime loaded,
// FUSEDCLIP_CPU_THREADS=pool, or a forked child).
const char* parallel_runtime();

}  // namespace cpu
}  // namespace fusedclip
