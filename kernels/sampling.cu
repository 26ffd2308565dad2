// Sampling on the device: one block per row of logits, the steps of src/engine/sampler/rows.rs
// (the CPU reference), so that only the drawn ids go back to the host.
//
// Top-k and top-p thresholds are found by radix selection on the logits' order-preserving
// 32-bit keys (four passes of one byte each, a 256-bin histogram in shared memory): counts for
// top-k, softmax mass for top-p. The draw walks the kept tokens in index order: each thread owns
// a contiguous chunk of the row, a block scan gives each chunk the mass before it, and the chunk
// holding u x total walks to the token.

#include "common.cuh"

// Threads per row (src/engine/sampler/mod.rs, SAMPLE_THREADS): the kernel's __launch_bounds__.
constexpr int SAMPLE_THREADS = 1024;

// Keys that order like the floats they come from (-inf lowest), -0 equal to +0 as the CPU
// compares them (else a -0 logit at the threshold would be dropped).
__device__ __forceinline__ uint32_t order_key(float x) {
  uint32_t b = __float_as_uint(x);
  if (b == 0x80000000u) b = 0;
  return b ^ ((b >> 31) ? 0xffffffffu : 0x80000000u);
}

__device__ __forceinline__ float weight(float logit, float mx, float inv_t) {
  return __expf((logit - mx) * inv_t);
}

// Block-wide reductions; every thread gets the result. `scratch` holds 32 floats.
__device__ float block_sum(float v, float* scratch) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
  v = warp_sum(v);
  __syncthreads();  // an earlier reduction may still be reading scratch
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  return warp_sum(lane < nwarps ? scratch[lane] : 0.f);
}

__device__ float block_max(float v, float* scratch) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  return warp_max(lane < nwarps ? scratch[lane] : -INFINITY);
}

// Exclusive prefix sum over the threads in order; `total` gets the sum of all.
__device__ float block_exclusive_scan(float v, float* scratch, float* total) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
  float incl = v;
  for (int o = 1; o < 32; o <<= 1) {
    const float n = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += n;
  }
  __syncthreads();
  if (lane == 31) scratch[warp] = incl;
  __syncthreads();
  float before = 0.f, sum = 0.f;
  for (int w = 0; w < nwarps; ++w) {
    if (w < warp) before += scratch[w];
    sum += scratch[w];
  }
  *total = sum;
  return before + incl - v;
}

// The largest key v such that the measure of the row's keys >= v (among keys >= floor_key)
// reaches `target`: the count of them when !MASS (top-k: the k-th largest logit), their
// softmax weight when MASS (top-p). If rounding leaves the target out of reach, the smallest
// key present (everything stays kept).
template <bool MASS>
__device__ uint32_t radix_select(const float* __restrict__ row, int n, uint32_t floor_key,
                                 float target, float mx, float inv_t, float* hist) {
  __shared__ uint32_t s_prefix;
  __shared__ float s_above;
  uint32_t prefix = 0, mask = 0;
  float above = 0.f;  // measure of keys whose decided bytes are above the prefix's
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0.f;
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const uint32_t k = order_key(row[i]);
      if (k < floor_key || (k & mask) != prefix) continue;
      atomicAdd(&hist[(k >> shift) & 0xffu], MASS ? weight(row[i], mx, inv_t) : 1.f);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int chosen = -1, lowest = -1;
      for (int b = 255; b >= 0; --b) {
        if (hist[b] <= 0.f) continue;
        lowest = b;
        if (above + hist[b] >= target) {
          chosen = b;
          break;
        }
        above += hist[b];
      }
      if (chosen < 0) {
        chosen = lowest < 0 ? 0 : lowest;
        if (lowest >= 0) above -= hist[lowest];
      }
      s_prefix = prefix | ((uint32_t)chosen << shift);
      s_above = above;
    }
    __syncthreads();
    prefix = s_prefix;
    above = s_above;
    mask |= 0xffu << shift;
  }
  return prefix;
}

// logits [rows, vocab] f32, uniforms [rows] in [0, 1) -> ids [rows].
// top_k: 0 or >= vocab is off; top_p: 1 is off.
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_rows(const float* __restrict__ logits, const float* __restrict__ uniforms,
                uint32_t* __restrict__ ids, int vocab, float inv_t, int top_k, float top_p) {
  __shared__ float hist[256];
  __shared__ float scratch[32];
  __shared__ int choice, fallback;
  const float* row = logits + (long)blockIdx.x * vocab;

  float mx = -INFINITY;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) mx = fmaxf(mx, row[i]);
  mx = block_max(mx, scratch);

  uint32_t floor_key = 0;
  if (top_k > 0 && top_k < vocab) {
    floor_key = radix_select<false>(row, vocab, 0, (float)top_k, mx, inv_t, hist);
  }
  if (top_p < 1.f) {
    float z = 0.f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
      if (order_key(row[i]) >= floor_key) z += weight(row[i], mx, inv_t);
    }
    z = block_sum(z, scratch);
    floor_key = radix_select<true>(row, vocab, floor_key, top_p * z, mx, inv_t, hist);
  }

  // This thread's chunk of the row and its kept mass.
  const int chunk = (vocab + blockDim.x - 1) / blockDim.x;
  const int lo = min(vocab, (int)threadIdx.x * chunk), hi = min(vocab, lo + chunk);
  float own = 0.f;
  int last = -1;
  for (int i = lo; i < hi; ++i) {
    if (order_key(row[i]) >= floor_key) {
      own += weight(row[i], mx, inv_t);
      last = i;
    }
  }
  float total;
  const float before = block_exclusive_scan(own, scratch, &total);
  const float target = uniforms[blockIdx.x] * total;
  if (threadIdx.x == 0) {
    choice = 0x7fffffff;
    fallback = -1;
  }
  __syncthreads();
  if (last >= 0 && before <= target) {
    // The last kept token before the target: taken if rounding leaves the target in no chunk.
    atomicMax(&fallback, last);
    if (target - before < own) {
      float acc = 0.f;
      int pick = last;
      for (int i = lo; i < hi; ++i) {
        if (order_key(row[i]) < floor_key) continue;
        acc += weight(row[i], mx, inv_t);
        if (target - before < acc) {
          pick = i;
          break;
        }
      }
      atomicMin(&choice, pick);
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    ids[blockIdx.x] = (uint32_t)(choice != 0x7fffffff ? choice : max(fallback, 0));
  }
}
