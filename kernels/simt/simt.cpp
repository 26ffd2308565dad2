// Runs the kernels in kernels/*.cu on the CPU (cargo feature `simt`, for tests): every GPU
// thread of a block is a fiber, and a scheduler switches between them only where CUDA threads
// synchronise (__syncthreads, __syncwarp, shuffles), so the kernels' indexing, barriers and
// warp operations run as written. What a GPU would do wrong or undefined becomes an error
// naming the kernel, block and thread:
//   - a barrier some threads never reach, or a warp operation that names a lane which exited,
//     does not exist, or waits at a different barrier (divergence);
//   - a read or write outside an argument buffer (each buffer is copied next to a
//     PROT_NONE guard, after its end or before its start depending on the schedule; guard.cpp)
//     or outside the dynamic shared memory, and a write to an input;
//   - launch geometry an sm_90 GPU refuses (threads, grid, shared memory).
// Dynamic shared memory starts as 0xff bytes (NaN as f32) in every block, so reading what no
// thread wrote shows; two schedules (threads in forward or reverse order between barriers)
// expose a read that a missing barrier leaves racing with its write.

#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

#include "cuda_shim.h"
#include "internal.h"

namespace simt {

uint3 block_idx, block_dim, grid_dim;

namespace {

// ---------------------------------------------------------------------------------------------
// Contexts: a hand-written switch on x86-64 and aarch64 (a few nanoseconds; glibc's swapcontext
// makes a system call per switch), ucontext elsewhere.

#if defined(__x86_64__) || defined(__aarch64__)
// Saves the callee-saved registers on the running stack, stores its top in `*save_sp`, switches
// to `load_sp` and restores what that stack holds (the assembly below, one per architecture).
extern "C" void simt_switch(void** save_sp, void* load_sp);

struct Context {
  void* sp = nullptr;
};

void switch_context(Context& from, Context& to) { simt_switch(&from.sp, to.sp); }
#endif

#if defined(__x86_64__)
asm(R"(
  .text
  .globl simt_switch
  .hidden simt_switch
  .type simt_switch, @function
simt_switch:
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
  .size simt_switch, .-simt_switch
)");

// A fresh stack that "returns" into `entry` with the alignment of a called function.
void make_context(Context& c, char* stack, size_t size, void (*entry)()) {
  auto top = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t(15);
  auto* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;                                      // entry's return address: never used
  *--sp = reinterpret_cast<uint64_t>(entry);      // where simt_switch's ret goes
  for (int i = 0; i < 6; ++i) *--sp = 0;          // rbp rbx r12 r13 r14 r15
  *--sp = 0x1f80ull | (0x037full << 32);          // default mxcsr, x87 control word
  c.sp = sp;
}
#elif defined(__aarch64__)
// The AAPCS64 callee-saved state: x19-x28, the frame pointer x29, the link register x30 (where
// `ret` goes), the low halves of v8-v15 (d8-d15) and the FP control register; 176 bytes.
asm(R"(
  .text
  .globl simt_switch
  .hidden simt_switch
  .type simt_switch, %function
simt_switch:
  sub sp, sp, #176
  stp x19, x20, [sp, #0]
  stp x21, x22, [sp, #16]
  stp x23, x24, [sp, #32]
  stp x25, x26, [sp, #48]
  stp x27, x28, [sp, #64]
  stp x29, x30, [sp, #80]
  stp d8, d9, [sp, #96]
  stp d10, d11, [sp, #112]
  stp d12, d13, [sp, #128]
  stp d14, d15, [sp, #144]
  mrs x9, fpcr
  str x9, [sp, #160]
  mov x9, sp
  str x9, [x0]
  mov sp, x1
  ldr x9, [sp, #160]
  msr fpcr, x9
  ldp x19, x20, [sp, #0]
  ldp x21, x22, [sp, #16]
  ldp x23, x24, [sp, #32]
  ldp x25, x26, [sp, #48]
  ldp x27, x28, [sp, #64]
  ldp x29, x30, [sp, #80]
  ldp d8, d9, [sp, #96]
  ldp d10, d11, [sp, #112]
  ldp d12, d13, [sp, #128]
  ldp d14, d15, [sp, #144]
  add sp, sp, #176
  ret
  .size simt_switch, .-simt_switch
)");

// A fresh stack whose saved frame "returns" (x30) into `entry`, with sp 16-byte aligned there.
void make_context(Context& c, char* stack, size_t size, void (*entry)()) {
  auto top = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t(15);
  auto* frame = reinterpret_cast<uint64_t*>(top - 176);
  for (int i = 0; i < 22; ++i) frame[i] = 0;  // registers, and FPCR's default (round to nearest)
  frame[11] = reinterpret_cast<uint64_t>(entry);  // x30, at byte 88
  c.sp = frame;
}
#else
#include <ucontext.h>
struct Context {
  ucontext_t uc;
};
void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
void make_context(Context& c, char* stack, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

// ---------------------------------------------------------------------------------------------
// Fibers and the block scheduler.

constexpr size_t STACK = 128 * 1024;
constexpr int MAX_THREADS = 1024;
constexpr unsigned MAX_SMEM = 232448;  // sm_90: 227 KiB of dynamic shared memory per block

enum class State { Ready, AtBlockBarrier, AtWarpOp, Done };
enum class WarpOp { Exchange, Sync };

struct Fiber {
  Context ctx;
  uint3 tid{};
  int warp = 0, lane = 0;
  State state = State::Ready;
  WarpOp op = WarpOp::Sync;
  unsigned mask = 0;
  unsigned ops = 0;  // warp operations so far: picks the exchange slots (double-buffered)
  char* stack = nullptr;
};

struct Launch {
  const char* kernel = "";
  std::function<void()> body;
  std::vector<Fiber> fibers;
  int threads = 0;
  uint64_t slots[2][MAX_THREADS / 32][32];
  Fiber* current = nullptr;
  bool reverse = false;
  Context main;
  std::string error;
  char* smem = nullptr;
  unsigned smem_bytes = 0;
};

Launch* L = nullptr;
std::mutex launch_mutex;  // static __shared__ variables and the state above are global
std::vector<char*> stacks;

std::string where(const Fiber* f) {
  char buf[160];
  if (f == nullptr) {
    snprintf(buf, sizeof buf, "%s", L->kernel);
  } else {
    snprintf(buf, sizeof buf, "%s, block (%u,%u,%u), thread (%u,%u,%u)", L->kernel,
             block_idx.x, block_idx.y, block_idx.z, f->tid.x, f->tid.y, f->tid.z);
  }
  return buf;
}

// Records the first error and leaves the running fiber for good.
[[noreturn]] void fail_in_fiber(const char* fmt, ...) {
  if (L->error.empty()) {
    char msg[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    L->error = where(L->current) + ": " + msg;
  }
  Fiber* f = L->current;
  switch_context(f->ctx, L->main);
  __builtin_unreachable();
}

void yield() { switch_context(L->current->ctx, L->main); }

void fiber_main() {
  L->body();
  L->current->state = State::Done;
  yield();
  __builtin_unreachable();
}

const char* state_name(State s) {
  switch (s) {
    case State::Ready: return "running";
    case State::AtBlockBarrier: return "at __syncthreads";
    case State::AtWarpOp: return "at a warp operation";
    default: return "exited";
  }
}

// The first lane that `mask` names in warp `w` and that is not waiting at warp operation `op`
// with that mask (or does not exist in the block); -1 when they all are.
int first_absent_lane(int w, unsigned mask, WarpOp op) {
  const Fiber* lanes = &L->fibers[w * 32];
  const int width = std::min(32, L->threads - w * 32);
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    if (l >= width) return l;
    const Fiber& o = lanes[l];
    if (o.state != State::AtWarpOp || o.op != op || o.mask != mask) return l;
  }
  return -1;
}

void release_lanes(int w, unsigned mask) {
  const int width = std::min(32, L->threads - w * 32);
  for (int l = 0; l < width; ++l) {
    if (mask >> l & 1u) L->fibers[w * 32 + l].state = State::Ready;
  }
}

// The lanes of warp `w` that `mask` names and that wait at the same warp operation: released
// together. Anything else that blocks them is an error on a GPU too.
bool release_warp(int w, std::string& error) {
  const Fiber* first = nullptr;
  const int base = w * 32;
  for (int l = 0; l < 32 && base + l < L->threads; ++l) {
    if (L->fibers[base + l].state == State::AtWarpOp) {
      first = &L->fibers[base + l];
      break;
    }
  }
  if (first == nullptr) return false;
  const int l = first_absent_lane(w, first->mask, first->op);
  if (l < 0) {
    release_lanes(w, first->mask);
    return true;
  }
  if (base + l >= L->threads) {
    error = where(first) + ": a warp operation names lane " + std::to_string(l) +
            ", which this block (of " + std::to_string(L->threads) + " threads) lacks";
  } else {
    const Fiber& o = L->fibers[base + l];
    error = where(first) + ": a warp operation waits for lane " + std::to_string(l) +
            ", which is " +
            (o.state == State::AtWarpOp ? "at another warp operation" : state_name(o.state)) +
            " (divergent warp)";
  }
  return false;
}

// Runs one block to completion (or to its first error).
bool run_block(bool reverse) {
  const int n = L->threads;
  L->reverse = reverse;
  for (int i = 0; i < n; ++i) {
    Fiber& f = L->fibers[i];
    f.state = State::Ready;
    f.ops = 0;
    make_context(f.ctx, f.stack, STACK, fiber_main);
  }
  if (L->smem_bytes > 0) std::memset(L->smem, 0xff, L->smem_bytes);
  for (;;) {
    for (int k = 0; k < n; ++k) {
      Fiber& f = L->fibers[reverse ? n - 1 - k : k];
      if (f.state != State::Ready) continue;
      L->current = &f;
      switch_context(L->main, f.ctx);
      L->current = nullptr;
      if (!L->error.empty()) return false;
    }
    // A warp's lanes hand over to each other: some released behind the scan may still wait.
    bool ready = false;
    for (const Fiber& f : L->fibers) ready |= f.state == State::Ready;
    if (ready) continue;
    bool released = false, all_done = true;
    std::string error;
    for (int w = 0; w * 32 < n; ++w) {
      released |= release_warp(w, error);
      if (!error.empty()) break;
    }
    if (!error.empty()) {
      L->error = error;
      return false;
    }
    if (released) continue;
    bool all_at_barrier = true;
    for (const Fiber& f : L->fibers) {
      if (f.state != State::Done) all_done = false;
      if (f.state != State::Done && f.state != State::AtBlockBarrier) all_at_barrier = false;
    }
    if (all_done) return true;
    if (all_at_barrier) {
      for (Fiber& f : L->fibers) {
        if (f.state == State::AtBlockBarrier) f.state = State::Ready;
      }
      continue;
    }
    int count[4] = {0, 0, 0, 0};
    for (const Fiber& f : L->fibers) ++count[(int)f.state];
    L->error = where(nullptr) + ": deadlock in block (" + std::to_string(block_idx.x) + "," +
               std::to_string(block_idx.y) + "," + std::to_string(block_idx.z) + "): " +
               std::to_string(count[1]) + " threads at __syncthreads, " +
               std::to_string(count[2]) + " at warp operations, " + std::to_string(count[3]) +
               " exited";
    return false;
  }
}

// ---------------------------------------------------------------------------------------------
// The fault handler: back to the launch, which names what was touched (guard.cpp).

std::vector<Region> regions;
sigjmp_buf fault_jump;
volatile uintptr_t fault_addr = 0;
const Fiber* volatile fault_fiber = nullptr;

pthread_t launching_thread;

void on_fault(int sig, siginfo_t* info, void*) {
  if (!pthread_equal(pthread_self(), launching_thread)) {
    // Another thread's fault (the tests run in parallel): let it take its default course.
    signal(sig, SIG_DFL);
    return;
  }
  fault_addr = reinterpret_cast<uintptr_t>(info->si_addr);
  fault_fiber = L != nullptr ? L->current : nullptr;
  siglongjmp(fault_jump, 1);
}

std::string describe_fault(uintptr_t a) {
  const size_t ps = page_size();
  for (char* s : stacks) {
    const auto lo = reinterpret_cast<uintptr_t>(s) - ps;
    if (a >= lo && a < lo + ps) return "overflows its fiber stack";
  }
  return describe_access(regions, a);
}

}  // namespace

const uint3& thread_idx() { return L->current->tid; }
int lane() { return L->current->lane; }
void* dynamic_shared() { return L->smem; }

void sync_threads() {
  L->current->state = State::AtBlockBarrier;
  yield();
}

namespace {

// The running fiber has reached a warp operation. Hands over straight to the next lane of its
// mask that has yet to get there (lanes in order, or reverse order), without the scheduler; the
// last lane to arrive releases them all and goes on. Anything else (a lane of the mask waits
// elsewhere or has exited) goes back to the scheduler, which reports it.
void arrive_at_warp_op(WarpOp op, unsigned mask) {
  Fiber* f = L->current;
  f->state = State::AtWarpOp;
  f->op = op;
  f->mask = mask;
  Fiber* lanes = &L->fibers[f->warp * 32];
  const int width = std::min(32, L->threads - f->warp * 32);
  for (int k = 1; k < 32; ++k) {
    const int l = L->reverse ? (f->lane + 32 - k) % 32 : (f->lane + k) % 32;
    if (l < width && (mask >> l & 1u) && lanes[l].state == State::Ready) {
      L->current = &lanes[l];
      switch_context(f->ctx, lanes[l].ctx);
      return;  // released (by the last lane) and scheduled again
    }
  }
  if (first_absent_lane(f->warp, mask, op) >= 0) {
    yield();
    return;
  }
  release_lanes(f->warp, mask);
}

}  // namespace

void sync_warp(unsigned mask) {
  Fiber* f = L->current;
  arrive_at_warp_op(WarpOp::Sync, mask);
  ++f->ops;
}

uint64_t exchange(unsigned mask, uint64_t bits, int src) {
  Fiber* f = L->current;
  if (!(mask >> f->lane & 1u)) fail_in_fiber("a shuffle from a lane outside its own mask");
  if (src < 0 || src >= 32 || !(mask >> src & 1u)) {
    fail_in_fiber("a shuffle reads lane %d, outside its mask %#x (undefined on a GPU)", src, mask);
  }
  // Double-buffered: a lane can be at most one warp operation ahead of the slowest lane.
  const unsigned parity = f->ops & 1u;
  L->slots[parity][f->warp][f->lane] = bits;
  arrive_at_warp_op(WarpOp::Exchange, mask);
  ++f->ops;
  return L->slots[parity][f->warp][src];
}

}  // namespace simt

// ---------------------------------------------------------------------------------------------
// The entry point (src/simt.rs).

struct simt_arg {
  uint8_t kind;      // 'p', 'i' or 'f'
  uint8_t writable;  // pointers: may the kernel write through it
  uint64_t len;      // pointers: bytes
  void* ptr;         // pointers: the host buffer (copied in, and back when writable)
  int32_t i;
  float f;
};

// schedule: bit 0 runs a block's threads in reverse order, bit 1 puts the guard pages before
// the buffers instead of after. Returns 0, or 1 with a message in `err`.
extern "C" int simt_launch(const char* name, const uint32_t* grid, const uint32_t* block,
                           uint32_t smem, uint32_t schedule, const simt_arg* args, size_t nargs,
                           char* err, size_t err_len) {
  using namespace simt;
  std::lock_guard<std::mutex> lock(launch_mutex);
  auto fail = [&](const std::string& msg) {
    snprintf(err, err_len, "%s", msg.c_str());
    return 1;
  };
  const Kernel* k = find_kernel(name);
  if (k == nullptr) return fail(std::string("no kernel named ") + name);
  std::string given;
  for (size_t i = 0; i < nargs; ++i) given += (char)args[i].kind;
  if (given != k->sig) {
    return fail(std::string(name) + " takes arguments (" + k->sig + ") but was given (" + given +
                ") (p: pointer, i: int, f: float)");
  }
  const unsigned long threads = (unsigned long)block[0] * block[1] * block[2];
  if (threads == 0 || threads > MAX_THREADS || block[2] > 64) {
    return fail(std::string(name) + ": a block of " + std::to_string(threads) +
                " threads (a GPU takes 1 to 1024, z at most 64)");
  }
  if (threads > (unsigned long)k->max_threads) {
    return fail(std::string(name) + ": a block of " + std::to_string(threads) +
                " threads, over its __launch_bounds__ of " + std::to_string(k->max_threads));
  }
  if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0 || grid[0] > 0x7fffffffu ||
      grid[1] > 65535 || grid[2] > 65535) {
    return fail(std::string(name) + ": grid (" + std::to_string(grid[0]) + "," +
                std::to_string(grid[1]) + "," + std::to_string(grid[2]) +
                ") (a GPU takes x 1..2^31-1, y and z 1..65535)");
  }
  if (smem > MAX_SMEM) {
    return fail(std::string(name) + ": " + std::to_string(smem) +
                " bytes of dynamic shared memory, more than the " + std::to_string(MAX_SMEM) +
                " an sm_90 block can have");
  }

  const size_t ps = page_size();
  while (stacks.size() < threads) {
    char* m = page_alloc(STACK + ps);
    if (m == nullptr) return fail("cannot map a fiber stack");
    mprotect(m, ps, PROT_NONE);  // stacks grow down: the guard is below
    stacks.push_back(m + ps);
  }
  const bool guard_before = schedule & 2u;
  regions.clear();
  regions.resize(nargs + 1);
  std::vector<void*> pointers(nargs, nullptr);
  std::vector<void*> params(nargs, nullptr);
  auto unmap_all = [&] {
    for (Region& r : regions) unmap(r);
    regions.clear();
  };
  for (size_t i = 0; i < nargs; ++i) {
    const simt_arg& a = args[i];
    if (a.kind == 'p') {
      Region& r = regions[i];
      r.name = "argument " + std::to_string(i);
      r.writable = a.writable != 0;
      if (!guard_region(r, a.ptr, a.len, guard_before)) {
        unmap_all();
        return fail("cannot map argument buffers");
      }
      if (!r.writable && r.len > 0) {
        // Whole pages only: the page holding the buffer's start may hold nothing else.
        const auto lo = reinterpret_cast<uintptr_t>(r.data) & ~(uintptr_t)(ps - 1);
        const auto hi = reinterpret_cast<uintptr_t>(r.data) + r.len;
        mprotect(reinterpret_cast<void*>(lo), hi - lo, PROT_READ);
      }
      pointers[i] = r.data;
      params[i] = &pointers[i];
    } else if (a.kind == 'i') {
      params[i] = const_cast<int32_t*>(&a.i);
    } else {
      params[i] = const_cast<float*>(&a.f);
    }
  }
  Region& shared = regions[nargs];
  shared.name = "the dynamic shared memory";
  if (!guard_region(shared, nullptr, smem, false)) {
    unmap_all();
    return fail("cannot map shared memory");
  }

  static Launch launch;
  launch.kernel = k->name;
  launch.body = [&] { k->run(params.data()); };
  launch.threads = (int)threads;
  launch.fibers.assign(threads, Fiber{});
  for (unsigned long t = 0; t < threads; ++t) {
    Fiber& f = launch.fibers[t];
    f.tid = {(unsigned)(t % block[0]), (unsigned)(t / block[0] % block[1]),
             (unsigned)(t / ((unsigned long)block[0] * block[1]))};
    f.warp = (int)(t / 32);
    f.lane = (int)(t % 32);
    f.stack = stacks[t];
  }
  launch.error.clear();
  launch.smem = shared.data;
  launch.smem_bytes = smem;
  block_dim = {block[0], block[1], block[2]};
  grid_dim = {grid[0], grid[1], grid[2]};
  L = &launch;

  struct sigaction sa {}, old_segv{}, old_bus{};
  sa.sa_sigaction = on_fault;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  static std::vector<char> alt(1 << 16);
  stack_t ss{}, old_ss{};
  ss.ss_sp = alt.data();
  ss.ss_size = alt.size();
  sigaltstack(&ss, &old_ss);
  launching_thread = pthread_self();
  sigaction(SIGSEGV, &sa, &old_segv);
  sigaction(SIGBUS, &sa, &old_bus);
  bool ok = true;
  if (sigsetjmp(fault_jump, 1) == 0) {
    for (unsigned z = 0; z < grid[2] && ok; ++z) {
      for (unsigned y = 0; y < grid[1] && ok; ++y) {
        for (unsigned x = 0; x < grid[0] && ok; ++x) {
          block_idx = {x, y, z};
          ok = run_block(schedule & 1u);
        }
      }
    }
  } else {
    ok = false;
    launch.error = where(const_cast<const Fiber*>(fault_fiber)) + ": " +
                   describe_fault(fault_addr);
  }
  sigaction(SIGSEGV, &old_segv, nullptr);
  sigaction(SIGBUS, &old_bus, nullptr);
  sigaltstack(&old_ss, nullptr);
  L = nullptr;

  if (ok) {
    for (size_t i = 0; i < nargs; ++i) {
      if (args[i].kind == 'p' && args[i].writable && args[i].len > 0) {
        std::memcpy(args[i].ptr, regions[i].data, args[i].len);
      }
    }
  }
  const std::string error = launch.error;
  unmap_all();
  if (!ok) return fail(error);
  return 0;
}
