// What the emulator's three files share: simt.cpp (fibers, scheduler, launches), guard.cpp
// (guarded argument buffers) and kernels.cpp (the kernels by name).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace simt {

// A kernel compiled for the host: `sig` has one letter per parameter (p, i or f).
struct Kernel {
  const char* name;
  std::string sig;
  int max_threads;  // its __launch_bounds__
  std::function<void(void* const*)> run;
};

const Kernel* find_kernel(const char* name);

// Guard regions on one side of each buffer: 1 MiB, so that an index far out of range still
// lands in a guard rather than in another buffer.
constexpr size_t GUARD = 1 << 20;

struct Region {
  char* map = nullptr;
  size_t map_len = 0;
  char* data = nullptr;
  size_t len = 0;
  char* guard = nullptr;  // GUARD bytes
  bool writable = true;
  std::string name;
};

size_t page_size();
char* page_alloc(size_t bytes);

// Maps `len` bytes (a copy of `src`, when given) with a guard before or after them.
bool guard_region(Region& r, const void* src, size_t len, bool guard_before);
void unmap(Region& r);

// What touching address `a` was, in terms of `regions`' buffers and guards.
std::string describe_access(const std::vector<Region>& regions, uintptr_t a);

}  // namespace simt
