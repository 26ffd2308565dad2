// The residual add fused with the RMSNorm after it (see src/model/norm.rs).

#include "common.cuh"

// Threads per row (src/model/norm.rs, ADD_RMS_NORM_THREADS): the kernel's __launch_bounds__.
constexpr int NORM_THREADS = 256;

// ---------------------------------------------------------------------------------------------
// add_rms_norm: one block per row. out[0] = x + delta (rounded to T, as an unfused add would),
// out[1] = out[0] * rsqrt(mean(out[0]^2) + eps) * w; out is [2, rows, n].

template <typename T>
__device__ void add_rms_norm(const T* __restrict__ x, const T* __restrict__ delta,
                             const T* __restrict__ w, T* __restrict__ out, int rows, int n,
                             float eps) {
  __shared__ float partial[32];
  const long base = (long)blockIdx.x * n;
  T* sum = out + base;
  T* norm = out + (long)rows * n + base;
  float ss = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const T s = from_f<T>(to_f(x[base + i]) + to_f(delta[base + i]));
    sum[i] = s;
    const float v = to_f(s);
    ss += v * v;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int nwarps = (blockDim.x + 31) / 32;
  ss = warp_sum(ss);
  if (lane == 0) partial[warp] = ss;
  __syncthreads();
  if (warp == 0) {
    ss = warp_sum(lane < nwarps ? partial[lane] : 0.f);
    if (lane == 0) partial[0] = ss;
  }
  __syncthreads();
  const float inv = rsqrtf(partial[0] / n + eps);
  // Each thread reads back only the sums it wrote itself.
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    norm[i] = from_f<T>(to_f(sum[i]) * inv * to_f(w[i]));
  }
}

#define ENTRY_POINTS(T, SUFFIX)                                                                    \
  extern "C" __global__ void __launch_bounds__(NORM_THREADS) add_rms_norm_##SUFFIX(                \
      const T* x, const T* delta, const T* w, T* out, int rows, int n, float eps) {                \
    add_rms_norm<T>(x, delta, w, out, rows, n, eps);                                               \
  }

ENTRY_POINTS(float, f32)
ENTRY_POINTS(__half, f16)
ENTRY_POINTS(__nv_bfloat16, bf16)
#undef ENTRY_POINTS
