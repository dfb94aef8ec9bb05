// The CUDA-on-CPU shim's runtime: fibers, the per-block scheduler, barriers and warp intrinsics
// with divergence checks, launches over a few OS threads, and the runtime API answers (device
// count, SM count, occupancy) that the tests configure. Tests only; see shim.h.
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "shim.h"

#if defined(__SANITIZE_ADDRESS__)
#define SHIM_ASAN 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#else
#define SHIM_ASAN 0
#endif

#if !defined(__x86_64__) || defined(CUDA_SHIM_UCONTEXT)
#define SHIM_UCONTEXT 1
#include <ucontext.h>
#else
#define SHIM_UCONTEXT 0
#endif

#define SHIM_EXPORT extern "C" __attribute__((visibility("default")))

namespace cuda_shim {

__thread const Coords* t_coords = nullptr;

namespace {

constexpr int kMaxDevices = 64;
// Groups of one warp that may wait at a warp intrinsic at once (lanes with disjoint masks, e.g.
// two half-warps, synchronise separately, as on the GPU).
constexpr int kGroupsPerWarp = 4;
constexpr size_t kStackBytes = SHIM_ASAN ? 256 * 1024 : 64 * 1024;

// ---- configuration and statistics ----------------------------------------------------------------

struct DeviceConfig {
  std::atomic<int> sms{0};
  std::atomic<int> blocks_per_sm{0};
};
DeviceConfig g_devices[kMaxDevices];
std::atomic<int> g_workers{3};
std::atomic<uint64_t> g_seed{0x5eed};
std::atomic<int> g_yield_percent{50};
std::atomic<uint64_t> g_launch_serial{0};

enum Stat { kLaunches, kBlocks, kSwitches, kSyncs, kWarpOps, kYields, kFailures, kStatCount };
std::atomic<uint64_t> g_stats[kStatCount];

__thread int t_device = 0;
__thread cudaError_t t_last_error = cudaSuccess;
thread_local std::string t_error_text;
__thread const char* t_kernel_name = nullptr;  // for the fault reporter

uint64_t mix(uint64_t x) {  // splitmix64
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
  char buffer[1024];
  va_list args;
  va_start(args, fmt);
  vsnprintf(buffer, sizeof buffer, fmt, args);
  va_end(args);
  return buffer;
}

// "0-15, 17, 20-31"
std::string ranges(const std::vector<int>& values) {
  std::string out;
  size_t i = 0;
  while (i < values.size()) {
    size_t j = i;
    while (j + 1 < values.size() && values[j + 1] == values[j] + 1) ++j;
    if (!out.empty()) out += ", ";
    out += j == i ? format("%d", values[i]) : format("%d-%d", values[i], values[j]);
    i = j + 1;
  }
  return out.empty() ? "none" : out;
}
std::string lanes_of(unsigned int mask) {
  std::vector<int> lanes;
  for (int l = 0; l < 32; ++l)
    if (mask >> l & 1u) lanes.push_back(l);
  return ranges(lanes);
}

const char* kind_name(int kind) {
  switch (kind) {
    case kShflIdx:
      return "__shfl_sync";
    case kShflUp:
      return "__shfl_up_sync";
    case kShflDown:
      return "__shfl_down_sync";
    case kShflXor:
      return "__shfl_xor_sync";
    case kBallot:
      return "__ballot_sync";
    case kAny:
      return "__any_sync";
    case kAll:
      return "__all_sync";
    case kSyncWarp:
      return "__syncwarp";
    default:
      return "?";
  }
}

// ---- context switching ---------------------------------------------------------------------------

#if !SHIM_UCONTEXT
extern "C" void cuda_shim_switch(void** save_sp, void* load_sp);
extern "C" void cuda_shim_trampoline();
// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack, stores
// the stack pointer, loads the other one and restores the same from it. A new fiber's stack is
// prepared so that the final `ret` enters cuda_shim_trampoline with the fiber in r12 and the
// entry function in r13.
asm(R"(
  .pushsection .text
  .globl cuda_shim_switch
  .hidden cuda_shim_switch
  .type cuda_shim_switch, @function
cuda_shim_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_shim_switch, .-cuda_shim_switch
  .globl cuda_shim_trampoline
  .hidden cuda_shim_trampoline
  .type cuda_shim_trampoline, @function
cuda_shim_trampoline:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size cuda_shim_trampoline, .-cuda_shim_trampoline
  .popsection
)");
#endif

// ---- fibers and blocks ---------------------------------------------------------------------------

enum State : uint8_t { kRunnable, kRunning, kAtSync, kAtWarp, kExited };

struct Block;

struct Fiber {
  Coords coords;
  Block* block;
  int linear, warp, lane;
  State state;
  unsigned int wait_line;
  uint64_t warp_result;
  char* stack_low;
#if SHIM_UCONTEXT
  ucontext_t context;
#else
  void* sp;
#endif
#if SHIM_ASAN
  void* fake_stack;
#endif
};

struct WarpSlot {
  int kind;
  unsigned int mask;
  unsigned int arrived;
  unsigned int line;
  int width;
  uint64_t value[32];
  int64_t param[32];
};

struct Launch;

struct Block {
  Launch* launch;
  int threads, warps;
  std::vector<Fiber> fibers;
  std::vector<Fiber*> runnable;
  int exited, at_sync;
  unsigned int sync_line;
  std::vector<WarpSlot> slots;  // kGroupsPerWarp per warp
  uint64_t rng;
  bool failed;
  std::string error;
  uint64_t stats[kStatCount];
#if SHIM_UCONTEXT
  ucontext_t scheduler;
#else
  void* scheduler_sp;
#endif
#if SHIM_ASAN
  const void* scheduler_stack;
  size_t scheduler_stack_size;
#endif

  uint64_t next_random() {
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return rng * 0x2545f4914f6cdd1dull;
  }
  unsigned int existing_lanes(int warp) const {
    const int n = threads - warp * 32;
    return n >= 32 ? 0xffffffffu : ((1u << n) - 1u);
  }
  WarpSlot* groups(int warp) { return &slots[static_cast<size_t>(warp) * kGroupsPerWarp]; }
  // The group of `warp` waiting at a warp intrinsic whose mask names `lane`, or null.
  WarpSlot* waiting_for(int warp, int lane) {
    WarpSlot* g = groups(warp);
    for (int k = 0; k < kGroupsPerWarp; ++k)
      if (g[k].arrived != 0 && (g[k].mask >> lane & 1u)) return &g[k];
    return nullptr;
  }
};

struct Launch {
  void (*body)(void*);
  void* context;
  dim3 grid, block;
  const char* name;
  uint64_t seed;
  std::vector<uint32_t> order;
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex mutex;
  std::string error;

  void fail(const std::string& text) {
    std::lock_guard<std::mutex> lock(mutex);
    if (error.empty()) error = text;
    failed.store(true);
  }
};

__thread Fiber* t_fiber = nullptr;

// Stacks: one mapping per set, a guard page below each stack; sets are reused across launches.
struct StackSet {
  char* base;
  size_t count;
  size_t stride;
};
std::mutex g_stack_mutex;
std::vector<StackSet> g_free_stacks;

StackSet take_stacks(size_t count) {
  {
    std::lock_guard<std::mutex> lock(g_stack_mutex);
    for (size_t i = 0; i < g_free_stacks.size(); ++i) {
      if (g_free_stacks[i].count >= count) {
        StackSet set = g_free_stacks[i];
        g_free_stacks.erase(g_free_stacks.begin() + static_cast<long>(i));
        return set;
      }
    }
  }
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  StackSet set;
  set.count = count;
  set.stride = page + kStackBytes;
  void* memory = mmap(nullptr, set.count * set.stride, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (memory == MAP_FAILED) {
    fprintf(stderr, "cuda_shim: cannot map fiber stacks\n");
    abort();
  }
  set.base = static_cast<char*>(memory);
  for (size_t i = 0; i < set.count; ++i) mprotect(set.base + i * set.stride, page, PROT_NONE);
  return set;
}
void give_stacks(const StackSet& set) {
  std::lock_guard<std::mutex> lock(g_stack_mutex);
  g_free_stacks.push_back(set);
}

void fiber_main(Fiber* fiber);

#if SHIM_UCONTEXT
void ucontext_entry(unsigned int hi, unsigned int lo) {
  fiber_main(reinterpret_cast<Fiber*>((static_cast<uintptr_t>(hi) << 32) | lo));
}
#endif

void prepare_fiber(Fiber& fiber) {
#if SHIM_UCONTEXT
  getcontext(&fiber.context);
  fiber.context.uc_stack.ss_sp = fiber.stack_low;
  fiber.context.uc_stack.ss_size = kStackBytes;
  fiber.context.uc_link = nullptr;
  const uintptr_t p = reinterpret_cast<uintptr_t>(&fiber);
  makecontext(&fiber.context, reinterpret_cast<void (*)()>(&ucontext_entry), 2, static_cast<unsigned int>(p >> 32),
              static_cast<unsigned int>(p & 0xffffffffu));
#else
  // [mxcsr, x87 cw] r15 r14 r13 r12 rbx rbp ret  (popped in this order; ret enters the trampoline)
  uint64_t* top = reinterpret_cast<uint64_t*>(fiber.stack_low + kStackBytes);
  uint64_t* sp = top - 10;  // 8 slots, 16 bytes of slack: after `ret`, rsp % 16 == 0
  sp[0] = 0x1f80ull | (0x037full << 32);  // default MXCSR (no flush-to-zero, as on the GPU) and x87 cw
  sp[1] = 0;                                // r15
  sp[2] = 0;                                // r14
  sp[3] = reinterpret_cast<uint64_t>(&fiber_main);  // r13
  sp[4] = reinterpret_cast<uint64_t>(&fiber);       // r12
  sp[5] = 0;                                        // rbx
  sp[6] = 0;                                        // rbp
  sp[7] = reinterpret_cast<uint64_t>(&cuda_shim_trampoline);
  sp[8] = 0;
  sp[9] = 0;
  fiber.sp = sp;
#endif
}

// Scheduler -> fiber, until the fiber yields, waits or ends.
void enter(Block& block, Fiber* fiber) {
  t_fiber = fiber;
  t_coords = &fiber->coords;
  fiber->state = kRunning;
  ++block.stats[kSwitches];
#if SHIM_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, fiber->stack_low, kStackBytes);
#endif
#if SHIM_UCONTEXT
  swapcontext(&block.scheduler, &fiber->context);
#else
  cuda_shim_switch(&block.scheduler_sp, fiber->sp);
#endif
#if SHIM_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  t_fiber = nullptr;
  t_coords = nullptr;
}

// Fiber -> scheduler. A fiber that leaves for good (ended, or abandoned after an error) passes dying.
void leave(Fiber* fiber, bool dying) {
  Block& block = *fiber->block;
#if SHIM_ASAN
  __sanitizer_start_switch_fiber(dying ? nullptr : &fiber->fake_stack, block.scheduler_stack,
                                 block.scheduler_stack_size);
#else
  (void)dying;
#endif
#if SHIM_UCONTEXT
  swapcontext(&fiber->context, &block.scheduler);
#else
  cuda_shim_switch(&fiber->sp, block.scheduler_sp);
#endif
#if SHIM_ASAN
  __sanitizer_finish_switch_fiber(fiber->fake_stack, nullptr, nullptr);
#endif
  t_fiber = fiber;  // (the scheduler set them already; kept for clarity)
}

[[noreturn]] void fail_here(const std::string& what) {
  Fiber* fiber = t_fiber;
  Block& block = *fiber->block;
  if (!block.failed) {
    block.failed = true;
    const Coords& c = fiber->coords;
    block.error = format("%s: block (%u,%u,%u), thread (%u,%u,%u) [warp %d, lane %d]: ", block.launch->name,
                         c.block_idx.x, c.block_idx.y, c.block_idx.z, c.thread_idx.x, c.thread_idx.y, c.thread_idx.z,
                         fiber->warp, fiber->lane) +
                  what;
  }
  fiber->state = kExited;
  leave(fiber, true);
  __builtin_trap();  // never resumed
}

void make_runnable(Block& block, Fiber* fiber) {
  fiber->state = kRunnable;
  block.runnable.push_back(fiber);
}

Fiber* current(const char* what) {
  Fiber* fiber = t_fiber;
  if (fiber == nullptr) {
    fprintf(stderr, "cuda_shim: %s called outside a kernel\n", what);
    abort();
  }
  return fiber;
}

std::string where_sync_waiters(Block& block) {
  std::vector<int> ids;
  for (Fiber& f : block.fibers)
    if (f.state == kAtSync) ids.push_back(f.linear);
  return format("threads %s wait at __syncthreads() (line %u)", ranges(ids).c_str(), block.sync_line);
}

void fiber_main(Fiber* fiber) {
  Block& block = *fiber->block;
#if SHIM_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &block.scheduler_stack, &block.scheduler_stack_size);
#endif
  block.launch->body(block.launch->context);
  // The thread has finished: nobody may be waiting for it.
  if (const WarpSlot* slot = block.waiting_for(fiber->warp, fiber->lane)) {
    fail_here(format("exits while lanes %s of its warp wait for it at %s (line %u, mask 0x%08x)",
                     lanes_of(slot->arrived).c_str(), kind_name(slot->kind), slot->line, slot->mask));
  }
  if (block.at_sync > 0) fail_here("exits while " + where_sync_waiters(block) + " (a divergent __syncthreads)");
  fiber->state = kExited;
  ++block.exited;
  leave(fiber, true);
  __builtin_trap();
}

// ---- one block -------------------------------------------------------------------------------------

void run_block(Launch& launch, uint32_t index, const StackSet& stacks, Block& block) {
  const dim3 g = launch.grid, b = launch.block;
  const uint3 block_idx{index % g.x, (index / g.x) % g.y, index / (g.x * g.y)};
  block.launch = &launch;
  block.threads = static_cast<int>(b.x * b.y * b.z);
  block.warps = (block.threads + 31) / 32;
  block.fibers.resize(static_cast<size_t>(block.threads));
  block.runnable.clear();
  block.exited = block.at_sync = 0;
  block.sync_line = 0;
  block.slots.assign(static_cast<size_t>(block.warps) * kGroupsPerWarp, WarpSlot{});
  block.failed = false;
  block.error.clear();
  block.rng = mix(launch.seed ^ mix(index + 1)) | 1;
  for (uint64_t& s : block.stats) s = 0;
  for (int i = 0; i < block.threads; ++i) {
    Fiber& f = block.fibers[static_cast<size_t>(i)];
    f.coords.thread_idx = uint3{i % b.x, (i / b.x) % b.y, i / (b.x * b.y)};
    f.coords.block_idx = block_idx;
    f.coords.block_dim = b;
    f.coords.grid_dim = g;
    f.block = &block;
    f.linear = i;
    f.warp = i / 32;
    f.lane = i % 32;
    f.wait_line = 0;
    f.warp_result = 0;
    f.stack_low = stacks.base + static_cast<size_t>(i) * stacks.stride + (stacks.stride - kStackBytes);
#if SHIM_ASAN
    f.fake_stack = nullptr;
    __asan_unpoison_memory_region(f.stack_low, kStackBytes);
#endif
    prepare_fiber(f);
    make_runnable(block, &f);
  }
  t_kernel_name = launch.name;
  while (!block.failed && !block.runnable.empty()) {
    if (launch.failed.load(std::memory_order_relaxed)) return;  // another block failed: abandon
    const size_t pick = block.next_random() % block.runnable.size();
    Fiber* fiber = block.runnable[pick];
    block.runnable[pick] = block.runnable.back();
    block.runnable.pop_back();
    enter(block, fiber);
  }
  if (!block.failed && block.exited != block.threads) {
    // Nothing can run and not every thread ended: describe who waits where.
    std::string what = format("%s: block (%u,%u,%u) cannot go on:", launch.name, block_idx.x, block_idx.y, block_idx.z);
    if (block.at_sync) what += " " + where_sync_waiters(block) + ";";
    for (int w = 0; w < block.warps; ++w) {
      for (int k = 0; k < kGroupsPerWarp; ++k) {
        const WarpSlot& slot = block.groups(w)[k];
        if (slot.arrived) {
          what += format(" warp %d lanes %s wait at %s (line %u) for lanes %s;", w, lanes_of(slot.arrived).c_str(),
                         kind_name(slot.kind), slot.line, lanes_of(slot.mask & ~slot.arrived).c_str());
        }
      }
    }
    block.failed = true;
    block.error = what;
  }
  for (int s = 0; s < kStatCount; ++s) g_stats[s].fetch_add(block.stats[s], std::memory_order_relaxed);
  g_stats[kBlocks].fetch_add(1, std::memory_order_relaxed);
}

// ---- fault reporting (used by the mutation tests' child processes) ---------------------------------

std::atomic<bool> g_fault_reporter{false};

void write_text(const char* text) {
  ssize_t ignored = write(2, text, strlen(text));
  (void)ignored;
}

void on_fault(int signal_number, siginfo_t* info, void*) {
  char hex[19] = "0x0000000000000000";
  uintptr_t address = reinterpret_cast<uintptr_t>(info->si_addr);
  for (int i = 17; i >= 2; --i, address >>= 4) hex[i] = "0123456789abcdef"[address & 15];
  write_text(signal_number == SIGBUS ? "cuda_shim: memory fault (SIGBUS) at "
                                      : "cuda_shim: memory fault (SIGSEGV) at ");
  write_text(hex);
  if (t_kernel_name != nullptr) {
    write_text(" in kernel ");
    write_text(t_kernel_name);
  }
  write_text(t_fiber != nullptr ? " (in a kernel thread): an out-of-bounds or unmapped access\n"
                                : " (outside kernel threads)\n");
  _exit(86);
}

void install_alternate_stack() {
  if (!g_fault_reporter.load()) return;
  static thread_local std::vector<char> memory(1 << 16);
  stack_t stack{};
  stack.ss_sp = memory.data();
  stack.ss_size = memory.size();
  sigaltstack(&stack, nullptr);
}

}  // namespace

// ---- device intrinsics ----------------------------------------------------------------------------

void maybe_yield() {
  Fiber* fiber = current("an atomic or fence");
  Block& block = *fiber->block;
  const int percent = g_yield_percent.load(std::memory_order_relaxed);
  if (static_cast<int>(block.next_random() % 100) >= percent) return;
  ++block.stats[kYields];
  make_runnable(block, fiber);
  leave(fiber, false);
}

void misaligned(const void* address, size_t alignment, const char* what, unsigned int line) {
  current(what);
  fail_here(format("misaligned address %p in %s (line %u): needs %zu-byte alignment", address, what, line, alignment));
}

void syncthreads(unsigned int line) {
  Fiber* fiber = current("__syncthreads");
  Block& block = *fiber->block;
  ++block.stats[kSyncs];
  if (block.exited > 0) {
    std::vector<int> ids;
    for (Fiber& f : block.fibers)
      if (f.state == kExited) ids.push_back(f.linear);
    fail_here(format("reaches __syncthreads() (line %u) after threads %s of its block exited (a divergent barrier)",
                     line, ranges(ids).c_str()));
  }
  if (const WarpSlot* slot = block.waiting_for(fiber->warp, fiber->lane)) {
    fail_here(format("reaches __syncthreads() (line %u) while lanes %s of its warp wait for it at %s (line %u)", line,
                     lanes_of(slot->arrived).c_str(), kind_name(slot->kind), slot->line));
  }
  if (block.at_sync == 0) block.sync_line = line;
  fiber->state = kAtSync;
  fiber->wait_line = line;
  if (++block.at_sync == block.threads) {
    block.at_sync = 0;
    for (Fiber& f : block.fibers) make_runnable(block, &f);
  }
  leave(fiber, false);
}

uint64_t warp_op(WarpKind kind, unsigned int mask, uint64_t value, int64_t param, int width, unsigned int line) {
  Fiber* fiber = current(kind_name(kind));
  Block& block = *fiber->block;
  ++block.stats[kWarpOps];
  const int lane = fiber->lane;
  if (!(mask >> lane & 1u)) {
    fail_here(format("calls %s (line %u) with mask 0x%08x, which does not name its own lane", kind_name(kind), line,
                     mask));
  }
  if (mask & ~block.existing_lanes(fiber->warp)) {
    fail_here(format("calls %s (line %u) with mask 0x%08x, which names lanes this block does not have",
                     kind_name(kind), line, mask));
  }
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    fail_here(format("calls %s (line %u) with width %d (a power of two up to 32)", kind_name(kind), line, width));
  }
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u) || l == lane) continue;
    const Fiber& other = block.fibers[static_cast<size_t>(fiber->warp * 32 + l)];
    if (other.state == kExited) {
      fail_here(format("calls %s (line %u) with mask 0x%08x, but lane %d has exited (a divergent warp)",
                       kind_name(kind), line, mask, l));
    }
    if (other.state == kAtSync) {
      fail_here(format("calls %s (line %u) with mask 0x%08x, but lane %d waits at __syncthreads() (line %u)",
                       kind_name(kind), line, mask, l, other.wait_line));
    }
  }
  // Join the group waiting with the same mask; a waiting group whose mask overlaps but differs, or
  // that waits at another intrinsic, is divergence.
  WarpSlot* group = nullptr;
  WarpSlot* free_group = nullptr;
  for (int k = 0; k < kGroupsPerWarp; ++k) {
    WarpSlot& g = block.groups(fiber->warp)[k];
    if (g.arrived == 0) {
      if (free_group == nullptr) free_group = &g;
      continue;
    }
    if ((g.mask & mask) == 0) continue;
    if (g.mask != mask || g.kind != kind || g.width != width) {
      fail_here(format("calls %s (line %u, mask 0x%08x, width %d) while lanes %s wait at %s (line %u, mask 0x%08x, "
                       "width %d): a divergent warp",
                       kind_name(kind), line, mask, width, lanes_of(g.arrived).c_str(), kind_name(g.kind), g.line,
                       g.mask, g.width));
    }
    group = &g;
  }
  if (group == nullptr) {
    if (free_group == nullptr) {
      fail_here(format("more than %d groups of one warp wait at warp intrinsics", kGroupsPerWarp));
    }
    group = free_group;
    group->kind = kind;
    group->mask = mask;
    group->line = line;
    group->width = width;
  }
  WarpSlot& slot = *group;
  slot.value[lane] = value;
  slot.param[lane] = param;
  slot.arrived |= 1u << lane;
  fiber->state = kAtWarp;
  fiber->wait_line = line;
  if (slot.arrived == mask) {
    // Everyone named is here: compute every lane's result, then release them all.
    uint64_t predicates = 0;
    for (int l = 0; l < 32; ++l)
      if (mask >> l & 1u) predicates |= (slot.value[l] != 0 ? 1ull : 0ull) << l;
    for (int l = 0; l < 32; ++l) {
      if (!(mask >> l & 1u)) continue;
      Fiber& f = block.fibers[static_cast<size_t>(fiber->warp * 32 + l)];
      const int segment = l / width * width, position = l % width;
      int source = l;
      switch (kind) {
        case kShflIdx:
          source = segment + static_cast<int>(((slot.param[l] % width) + width) % width);
          break;
        case kShflDown:
          if (position + slot.param[l] < width) source = l + static_cast<int>(slot.param[l]);
          break;
        case kShflUp:
          if (position - slot.param[l] >= 0) source = l - static_cast<int>(slot.param[l]);
          break;
        case kShflXor: {  // an earlier group may be read, a later one gives the lane its own value
          const int other = l ^ static_cast<int>(slot.param[l] & 31);
          if (other < segment + width) source = other;
          break;
        }
        default:
          break;
      }
      if (!(mask >> source & 1u)) {
        fail_here(format("%s (line %u): lane %d reads lane %d, which mask 0x%08x does not name", kind_name(kind),
                         line, l, source, mask));
      }
      switch (kind) {
        case kBallot:
          f.warp_result = predicates;
          break;
        case kAny:
          f.warp_result = predicates != 0;
          break;
        case kAll:
          f.warp_result = predicates == mask;
          break;
        case kSyncWarp:
          f.warp_result = 0;
          break;
        default:
          f.warp_result = slot.value[source];
      }
    }
    slot.arrived = 0;
    for (int l = 0; l < 32; ++l)
      if (mask >> l & 1u) make_runnable(block, &block.fibers[static_cast<size_t>(fiber->warp * 32 + l)]);
  }
  leave(fiber, false);
  return fiber->warp_result;
}

// ---- launches ---------------------------------------------------------------------------------------

void launch(void (*body)(void*), void* context, dim3 grid, dim3 block_dim, size_t shared_bytes, cudaStream_t,
            const char* name) {
  const uint64_t threads = static_cast<uint64_t>(block_dim.x) * block_dim.y * block_dim.z;
  const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  if (threads == 0 || threads > 1024 || blocks == 0 || grid.y > 65535 || grid.z > 65535 || shared_bytes > 0) {
    // (dynamic shared memory is not emulated: kernels.cu uses none)
    t_last_error = cudaErrorInvalidConfiguration;
    t_error_text = format("cuda_shim: invalid launch configuration of %s: grid (%u,%u,%u), block (%u,%u,%u), %zu "
                          "bytes of dynamic shared memory",
                          name, grid.x, grid.y, grid.z, block_dim.x, block_dim.y, block_dim.z, shared_bytes);
    return;
  }
  if (t_device < 0 || t_device >= kMaxDevices || g_devices[t_device].sms.load() == 0) {
    t_last_error = cudaErrorInvalidDevice;
    t_error_text = format("cuda_shim: launch of %s on unconfigured device %d", name, t_device);
    return;
  }
  Launch launch;
  launch.body = body;
  launch.context = context;
  launch.grid = grid;
  launch.block = block_dim;
  launch.name = name;
  launch.seed = mix(g_seed.load() ^ mix(g_launch_serial.fetch_add(1)));
  // Blocks start in a seeded random order (a GPU starts them in no promised order).
  launch.order.resize(blocks);
  for (uint64_t i = 0; i < blocks; ++i) launch.order[i] = static_cast<uint32_t>(i);
  uint64_t r = launch.seed | 1;
  for (uint64_t i = blocks; i > 1; --i) {
    r = mix(r);
    std::swap(launch.order[i - 1], launch.order[r % i]);
  }
  g_stats[kLaunches].fetch_add(1);
  const uint64_t wanted_workers = static_cast<uint64_t>(std::max(1, g_workers.load()));
  const int workers = static_cast<int>(std::min<uint64_t>(wanted_workers, blocks));
  auto work = [&launch, threads, blocks]() {
    install_alternate_stack();
    Block block;
    const StackSet stacks = take_stacks(threads);
    while (!launch.failed.load()) {
      const size_t i = launch.next.fetch_add(1);
      if (i >= blocks) break;
      run_block(launch, launch.order[i], stacks, block);
      if (block.failed) launch.fail(block.error);
    }
    t_kernel_name = nullptr;
    give_stacks(stacks);  // (fibers abandoned after an error are never resumed: their stacks are free)
  };
  std::vector<std::thread> helpers;
  for (int w = 1; w < workers; ++w) helpers.emplace_back(work);
  work();
  for (std::thread& t : helpers) t.join();
  if (launch.failed.load()) {
    g_stats[kFailures].fetch_add(1);
    t_last_error = cudaErrorLaunchFailure;
    t_error_text = "cuda_shim: " + launch.error;
  }
}

}  // namespace cuda_shim

// ---- runtime API --------------------------------------------------------------------------------------

using namespace cuda_shim;

extern "C" cudaError_t cudaGetLastError() {
  const cudaError_t error = t_last_error;
  t_last_error = cudaSuccess;
  return error;
}
extern "C" cudaError_t cudaPeekAtLastError() { return t_last_error; }
extern "C" const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidDevice:
    case cudaErrorLaunchFailure:
    case cudaErrorInvalidConfiguration:
      return t_error_text.empty() ? "cuda_shim: error" : t_error_text.c_str();
    case cudaErrorNoDevice:
      return "cuda_shim: no device configured";
    default:
      return "cuda_shim: invalid value";
  }
}
extern "C" cudaError_t cudaSetDevice(int device) {
  if (device < 0 || device >= kMaxDevices || g_devices[device].sms.load() == 0) {
    t_error_text = format("cuda_shim: device %d is not configured (cuda_shim_configure_device)", device);
    return cudaErrorInvalidDevice;
  }
  t_device = device;
  return cudaSuccess;
}
extern "C" cudaError_t cudaGetDevice(int* device) {
  *device = t_device;
  return cudaSuccess;
}
extern "C" cudaError_t cudaGetDeviceCount(int* count) {
  int n = 0;
  while (n < kMaxDevices && g_devices[n].sms.load() != 0) ++n;
  *count = n;
  return n == 0 ? cudaErrorNoDevice : cudaSuccess;
}
extern "C" cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device) {
  if (device < 0 || device >= kMaxDevices || g_devices[device].sms.load() == 0) {
    t_error_text = format("cuda_shim: device %d is not configured", device);
    return cudaErrorInvalidDevice;
  }
  switch (attribute) {
    case cudaDevAttrMultiProcessorCount:
      *value = g_devices[device].sms.load();
      return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock:
      *value = 1024;
      return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
extern "C" cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }  // launches are synchronous here

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void*, int, size_t) {
  *blocks = g_devices[t_device].blocks_per_sm.load();
  return cudaSuccess;
}

// ---- the shim's own controls, for the tests (ctypes) ---------------------------------------------------

// Device `device` has `sms` SMs and fits `blocks_per_sm` blocks of any kernel per SM. kernels.cu
// caches both per device index, so tests give each configuration its own index.
SHIM_EXPORT int cuda_shim_configure_device(int device, int sms, int blocks_per_sm) {
  if (device < 0 || device >= kMaxDevices || sms < 1 || blocks_per_sm < 1) return 1;
  g_devices[device].blocks_per_sm.store(blocks_per_sm);
  g_devices[device].sms.store(sms);
  return 0;
}
// OS threads a launch runs its blocks on (the calling thread is one of them).
SHIM_EXPORT void cuda_shim_set_workers(int workers) { g_workers.store(workers < 1 ? 1 : workers); }
// Seed of the schedules (block order, fiber picks, yields); each launch derives its own from it.
SHIM_EXPORT void cuda_shim_set_seed(uint64_t seed) {
  g_seed.store(seed);
  g_launch_serial.store(0);
}
// How often an atomic or fence hands the block's OS thread to another fiber (0-100).
SHIM_EXPORT void cuda_shim_set_yield_percent(int percent) {
  g_yield_percent.store(percent < 0 ? 0 : percent > 100 ? 100 : percent);
}
SHIM_EXPORT int cuda_shim_stats(uint64_t* out, int count) {
  for (int i = 0; i < count && i < kStatCount; ++i) out[i] = g_stats[i].load();
  return kStatCount;
}
// A SIGSEGV/SIGBUS in the process prints where it happened and exits with status 86 (for child
// processes that run kernels over guard pages).
SHIM_EXPORT void cuda_shim_install_fault_reporter() {
#if SHIM_ASAN
  return;  // AddressSanitizer reports faults itself (and owns the threads' alternate signal stacks)
#endif
  g_fault_reporter.store(true);
  install_alternate_stack();
  struct sigaction action {};
  action.sa_sigaction = &on_fault;
  action.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&action.sa_mask);
  sigaction(SIGSEGV, &action, nullptr);
  sigaction(SIGBUS, &action, nullptr);
}
SHIM_EXPORT int cuda_shim_uses_ucontext() { return SHIM_UCONTEXT; }
