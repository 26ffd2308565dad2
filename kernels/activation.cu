// Fused activations the MLP needs and candle lacks.

#include "common.cuh"

// ---------------------------------------------------------------------------------------------
// silu_mul: x [rows, 2n] -> silu(x[:, :n]) * x[:, n:]

template <typename T>
__device__ void silu_mul(const T* __restrict__ x, T* __restrict__ out, int rows, int n) {
  const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (long)rows * n) return;
  const long r = i / n, c = i % n;
  const float gte = to_f(x[r * 2 * n + c]);
  const float up = to_f(x[r * 2 * n + n + c]);
  out[i] = from_f<T>(gte / (1.f + __expf(-gte)) * up);
}

#define ENTRY_POINTS(T, SUFFIX)                                                                    \
  extern "C" __global__ void __launch_bounds__(ELEMENTWISE_THREADS) silu_mul_##SUFFIX(             \
      const T* x, T* out, int rows, int n) {                                                       \
    silu_mul<T>(x, out, rows, n);                                                                  \
  }

ENTRY_POINTS(float, f32)
ENTRY_POINTS(__half, f16)
ENTRY_POINTS(__nv_bfloat16, bf16)
#undef ENTRY_POINTS
