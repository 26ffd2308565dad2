// Element conversions and warp reductions shared by the kernels.
#pragma once

#include <stdint.h>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
// Dynamic shared memory; on the host (kernels/simt) the launch's buffer.
#define DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#else
#include "simt/cuda_shim.h"
#endif

// Threads per block of the one-thread-per-element kernels (src/launch.rs,
// ELEMENTWISE_THREADS): their __launch_bounds__.
constexpr int ELEMENTWISE_THREADS = 1024;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}

// FP8 E4M3 KV cache elements, as their bits (src/attention/fp8.rs does the same arithmetic on
// the CPU, so both caches hold the same bits): 4 exponent bits (bias 7), 3 mantissa bits, finite
// up to 448, 0x7f and 0xff NaN. Plain integer and float arithmetic, no cuda_fp8.h, so that the
// emulator (kernels/simt) runs exactly what the GPU does.
struct kv_fp8 {
  uint8_t bits;
};

__device__ __forceinline__ float to_f(kv_fp8 x) {
  const uint32_t e = (x.bits >> 3) & 0xfu, m = x.bits & 7u;
  float mag = e ? __uint_as_float(((e + 120u) << 23) | (m << 20)) : (float)m * (1.f / 512.f);
  if ((x.bits & 0x7fu) == 0x7fu) mag = __uint_as_float(0x7fc00000u);
  return (x.bits & 0x80u) ? -mag : mag;
}

// Nearest even; magnitudes above 464 (infinities too) saturate to 448; NaN stays NaN.
template <> __device__ __forceinline__ kv_fp8 from_f<kv_fp8>(float x) {
  const uint32_t bits = __float_as_uint(x);
  const uint32_t abs = bits & 0x7fffffffu;
  uint32_t r;
  if (abs > 0x7f800000u) {
    r = 0x7fu;
  } else if (abs > 0x43e80000u) {
    r = 0x7eu;
  } else if (abs < 0x3c800000u) {
    // Subnormal: multiples of 2^-9, rounded to nearest even by adding 1.5 * 2^23.
    r = __float_as_uint(__uint_as_float(abs) * 512.f + 12582912.f) - 0x4b400000u;
  } else {
    // Rebias the exponent (127 -> 7), keep 3 mantissa bits, round to nearest even.
    r = (abs - (120u << 23) + 0x7ffffu + ((abs >> 20) & 1u)) >> 20;
  }
  return {(uint8_t)(((bits >> 24) & 0x80u) | r)};
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
