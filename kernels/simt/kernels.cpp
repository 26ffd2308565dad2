// The kernels of kernels/*.cu, compiled for the host, by name: parameter kinds (p pointer,
// i 32-bit integer, f float) and a call that takes cuLaunchKernel-style parameters (one
// pointer per argument, to its value).

#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "../attention.cu"
#include "../activation.cu"
#include "../norm.cu"
#include "../sampling.cu"
#include "internal.h"

namespace simt {
namespace {

template <typename T> constexpr char kind() {
  if constexpr (std::is_pointer_v<T>) return 'p';
  else if constexpr (std::is_same_v<T, float>) return 'f';
  else {
    static_assert(std::is_integral_v<T> && sizeof(T) == 4,
                  "kernel parameters: pointers, 32-bit ints, floats");
    return 'i';
  }
}

template <typename... A> std::string signature(void (*)(A...)) { return {kind<A>()...}; }

template <typename... A, size_t... I>
void call(void (*f)(A...), void* const* p, std::index_sequence<I...>) {
  f(*static_cast<A*>(p[I])...);
}
template <typename... A> void call(void (*f)(A...), void* const* p) {
  call(f, p, std::index_sequence_for<A...>{});
}

// Each with the __launch_bounds__ its .cu file gives it.
#define KERNEL(f, bound) \
  Kernel { #f, signature(&f), bound, [](void* const* p) { call(&f, p); } }
#define CACHE_KERNELS(S)                                                                     \
  KERNEL(write_kv_##S, ELEMENTWISE_THREADS), KERNEL(attention_tiles_##S, ATTENTION_THREADS), \
      KERNEL(attention_split_##S, ATTENTION_THREADS)
#define KERNELS_OF_TYPE(S)                                                                    \
  CACHE_KERNELS(S), CACHE_KERNELS(S##_fp8),                                                   \
      KERNEL(attention_reduce_##S, REDUCE_THREADS), KERNEL(silu_mul_##S, ELEMENTWISE_THREADS), \
      KERNEL(add_rms_norm_##S, NORM_THREADS)

}  // namespace

const Kernel* find_kernel(const char* name) {
  static const std::vector<Kernel> all = {KERNELS_OF_TYPE(f32), KERNELS_OF_TYPE(f16),
                                          KERNELS_OF_TYPE(bf16),
                                          KERNEL(sample_rows, SAMPLE_THREADS)};
  for (const Kernel& k : all) {
    if (std::strcmp(k.name, name) == 0) return &k;
  }
  return nullptr;
}

}  // namespace simt

