// The part of CUDA C++ our kernels use, on the host: built-in variables, barriers, warp
// shuffles, shared-memory atomics, fast-math intrinsics and the f16/bf16 types. With it, the
// files in kernels/ compile as plain C++ and run on the CPU, one fiber per GPU thread
// (simt.cpp), so that their indexing and synchronisation are tested without a GPU.
//
// Not modelled: memory ordering between threads (fibers switch only at barriers and warp
// operations, so every run is one legal interleaving, not all of them), the approximate
// accuracy of the fast intrinsics (__expf is expf here), and which call site a warp operation
// is: lanes meeting at two different shuffles of the same mask are not told apart (simt.cpp
// reports lanes that wait at different kinds of operation, at a barrier, or have exited).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

struct uint3 {
  unsigned x, y, z;
};
using dim3 = uint3;

namespace simt {

// The launch's geometry and the running fiber's index; set by simt.cpp.
extern uint3 block_idx, block_dim, grid_dim;
const uint3& thread_idx();

// Barriers: every live thread of the block / the lanes of `mask` in the running warp.
void sync_threads();
void sync_warp(unsigned mask);

// A warp exchange: every lane of `mask` offers `bits`; returns lane `src`'s offer.
uint64_t exchange(unsigned mask, uint64_t bits, int src);
int lane();

// The launch's dynamic shared memory (poisoned with 0xff bytes when each block starts).
void* dynamic_shared();

template <typename T> T shuffle(unsigned mask, T v, int src) {
  static_assert(sizeof(T) <= 8, "shuffled values are at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = exchange(mask, bits, src);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

}  // namespace simt

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static
#define threadIdx (simt::thread_idx())
#define blockIdx (simt::block_idx)
#define blockDim (simt::block_dim)
#define gridDim (simt::grid_dim)
// `extern __shared__ T name[]` is written DYNAMIC_SHARED(T, name) in the kernels.
#define DYNAMIC_SHARED(T, name) T* name = static_cast<T*>(simt::dynamic_shared())

inline void __syncthreads() { simt::sync_threads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { simt::sync_warp(mask); }

template <typename T> T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  const int base = simt::lane() / width * width;
  return simt::shuffle(mask, v, base + (src % width));
}
template <typename T> T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int me = simt::lane();
  const int src = me ^ lane_mask;
  return simt::shuffle(mask, v, src / width == me / width ? src : me);
}
template <typename T> T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int me = simt::lane();
  const int src = me - (int)delta;
  return simt::shuffle(mask, v, src >= me / width * width ? src : me);
}

// Fibers switch only at barriers, so a read-modify-write is atomic here.
inline float atomicAdd(float* p, float v) {
  const float old = *p;
  *p = old + v;
  return old;
}
inline int atomicMax(int* p, int v) {
  const int old = *p;
  if (v > old) *p = v;
  return old;
}
inline int atomicMin(int* p, int v) {
  const int old = *p;
  if (v < old) *p = v;
  return old;
}

inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline uint32_t __float_as_uint(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return b;
}
inline float __uint_as_float(uint32_t b) {
  float x;
  std::memcpy(&x, &b, 4);
  return x;
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }

// f16 and bf16 as their bits, converted with round-to-nearest-even like cuda_fp16.h,
// cuda_bf16.h and the `half` crate, so a value stored by a kernel equals the CPU's.
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half h) {
  const uint32_t sign = (uint32_t)(h.bits & 0x8000u) << 16;
  const uint32_t exp = (h.bits >> 10) & 0x1fu, man = h.bits & 0x3ffu;
  if (exp == 0x1f) return __uint_as_float(sign | 0x7f800000u | (man << 13));
  if (exp != 0) return __uint_as_float(sign | ((exp + 112) << 23) | (man << 13));
  const float mag = std::ldexp((float)man, -24);  // subnormal or zero
  return sign ? -mag : mag;
}

inline __half __float2half(float f) {
  const uint32_t x = __float_as_uint(f);
  const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
  const uint32_t abs = x & 0x7fffffffu;
  if (abs >= 0x7f800000u) {  // inf or NaN (NaN stays NaN)
    return {(uint16_t)(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u))};
  }
  if (abs >= 0x477ff000u) return {(uint16_t)(sign | 0x7c00u)};  // rounds past 65504
  if (abs < 0x38800000u) {                                       // below f16's normal range
    const float mag = __uint_as_float(abs);
    // Subnormal steps are 2^-24: rint rounds to nearest even at the current (default) mode.
    return {(uint16_t)(sign | (uint16_t)std::nearbyint(std::ldexp(mag, 24)))};
  }
  const uint32_t exp = (abs >> 23) - 112, man = abs & 0x7fffffu;
  uint32_t h = (exp << 10) | (man >> 13);
  const uint32_t rest = man & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // carries into the exponent
  return {(uint16_t)(sign | h)};
}

inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float((uint32_t)b.bits << 16); }

inline __nv_bfloat16 __float2bfloat16(float f) {
  const uint32_t x = __float_as_uint(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return {(uint16_t)((x >> 16) | 0x40u)};  // quiet NaN
  const uint32_t rounded = x + 0x7fffu + ((x >> 16) & 1u);
  return {(uint16_t)(rounded >> 16)};
}
