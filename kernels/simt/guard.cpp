// Argument buffers of an emulated launch, each next to a PROT_NONE guard region, and what a
// fault address says about the access that caused it.

#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>

#include "internal.h"

namespace simt {

size_t page_size() { return (size_t)sysconf(_SC_PAGESIZE); }

char* page_alloc(size_t bytes) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  return p == MAP_FAILED ? nullptr : static_cast<char*>(p);
}

bool guard_region(Region& r, const void* src, size_t len, bool guard_before) {
  const size_t ps = page_size();
  const size_t pages = (len + ps - 1) / ps;
  r.len = len;
  r.map_len = pages * ps + GUARD;
  r.map = page_alloc(r.map_len);
  if (r.map == nullptr) return false;
  if (guard_before) {
    r.guard = r.map;
    r.data = r.map + GUARD;
  } else {
    r.guard = r.map + pages * ps;
    r.data = r.guard - len;
  }
  mprotect(r.guard, GUARD, PROT_NONE);
  if (len > 0 && src != nullptr) std::memcpy(r.data, src, len);
  return true;
}

void unmap(Region& r) {
  if (r.map != nullptr) munmap(r.map, r.map_len);
  r.map = nullptr;
}

std::string describe_access(const std::vector<Region>& regions, uintptr_t a) {
  for (const Region& r : regions) {
    const auto g = reinterpret_cast<uintptr_t>(r.guard);
    const auto d0 = reinterpret_cast<uintptr_t>(r.data), d1 = d0 + r.len;
    if (a >= g && a < g + GUARD) {
      char buf[200];
      if (a >= d1) {
        snprintf(buf, sizeof buf, "accesses byte %zu past the end of %s (%zu bytes)",
                 (size_t)(a - d1), r.name.c_str(), r.len);
      } else {
        snprintf(buf, sizeof buf, "accesses byte %zu before the start of %s (%zu bytes)",
                 (size_t)(d0 - a), r.name.c_str(), r.len);
      }
      return buf;
    }
    if (a >= d0 && a < d1 && !r.writable) return "writes to " + r.name + ", an input";
  }
  char buf[80];
  snprintf(buf, sizeof buf, "accesses address %#zx, in no argument buffer", (size_t)a);
  return buf;
}

}  // namespace simt
