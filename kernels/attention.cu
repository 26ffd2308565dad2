// Paged attention on CUDA: writing K/V into their cache slots, and attention of a flattened batch
// (prefill chunks and decode tokens mixed) over the paged cache.
//
// Cache layout, per layer (the same as the CPU's, see src/attention/cpu.rs):
//   K: [num_blocks, kv_heads, head_dim, block_size]  (each block's keys transposed)
//   V: [num_blocks, kv_heads, block_size, head_dim]
// so that consecutive threads read consecutive keys of a block (K) or consecutive dimensions of a
// value row (V): both coalesced.
// A cache holds the queries' element type, or fp8 E4M3 (kv_fp8, common.cuh) at half the bytes;
// blocks are widened to f32 as they are loaded into shared memory.
//
// Work items:
//   attention_tiles: one CTA per (tile, KV head). A tile is up to TILE_Q consecutive query tokens
//     of one sequence (a decode token is a tile of one). The CTA handles the tile's tokens times the
//     G query heads that share the KV head (rows), loads each K/V block once into shared memory,
//     and keeps an online softmax per row (FlashAttention's recurrence), so K/V are read once per
//     tile and KV head.
//   attention_split + attention_reduce ("v2", split-K): for decode tokens with long contexts when
//     there are too few (token, KV head) pairs to fill the GPU: each CTA takes one partition of the
//     keys, writes an unnormalised partial result with its max and sum, and a second kernel merges
//     the partitions.
// Requirements (checked on the host): head_dim a multiple of 32, block_size <= 32.

#include "common.cuh"

// Threads per block (src/attention/launch.rs): the tile and split-K kernels take THREADS, the
// merge one per head dimension (at most 1024). They are the kernels' __launch_bounds__: the
// compiler keeps registers within what a block of that many threads can have (a launch would
// fail for lack of them otherwise), and the emulator refuses a launch over them.
constexpr int ATTENTION_THREADS = 256;
constexpr int REDUCE_THREADS = 1024;

// ---------------------------------------------------------------------------------------------
// write_kv: src [tokens, kv_heads, d] -> cache slot slots[t] (block = slot / bs, offset = slot % bs),
// converted to the cache's element type C (the identity but for an fp8 cache).

template <typename T, typename C>
__device__ void write_kv(const T* __restrict__ src, C* __restrict__ cache,
                         const uint32_t* __restrict__ slots, int tokens, int kv_heads, int d,
                         int bs, int values) {
  const long per_token = (long)kv_heads * d;
  const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (long)tokens * per_token) return;
  const long t = i / per_token;
  const int r = (int)(i % per_token);
  const int g = r / d, dd = r % d;
  const uint32_t slot = slots[t];
  const long blk = slot / bs, off = slot % bs;
  const long base = (blk * kv_heads + g) * (long)d * bs;
  cache[values ? base + off * d + dd : base + (long)dd * bs + off] = from_f<C>(to_f(src[i]));
}

// ---------------------------------------------------------------------------------------------
// The shared core: rows = G heads x len tokens (row r = hh * len + i) against keys
// [k_begin, k_end) of the sequence, each row additionally limited to keys <= its own position.
// Leaves the unnormalised output in acc[rows][d], the running max in m[rows] and the sum in l[rows].
// T: the queries' element type; C: the cache's (widened to f32 as blocks are loaded).

template <typename T, typename C>
__device__ void attend_rows(const T* __restrict__ q, const C* __restrict__ kc,
                            const C* __restrict__ vc, const uint32_t* __restrict__ table,
                            int heads, int kv_heads, int d, int bs, float scale, int g, int t0,
                            int len, int pos0, int k_begin, int k_end, float* qs, float* ks,
                            float* vs, float* acc, float* m, float* l) {
  const int G = heads / kv_heads;
  const int rows = G * len;
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int warp = tid / 32, lane = tid % 32, nwarps = nthreads / 32;
  for (int idx = tid; idx < rows * d; idx += nthreads) {
    const int r = idx / d, dd = idx % d;
    const int hh = r / len, i = r % len;
    qs[idx] = to_f(q[((long)(t0 + i) * heads + g * G + hh) * d + dd]) * scale;
    acc[idx] = 0.f;
  }
  for (int r = tid; r < rows; r += nthreads) {
    m[r] = -INFINITY;
    l[r] = 0.f;
  }
  if (k_end <= k_begin) {
    __syncthreads();
    return;
  }
  const int b_first = k_begin / bs, b_last = (k_end - 1) / bs;
  for (int b = b_first; b <= b_last; ++b) {
    __syncthreads();
    const long blk = table[b];
    const C* kb = kc + (blk * kv_heads + g) * (long)d * bs;
    const C* vb = vc + (blk * kv_heads + g) * (long)bs * d;
    for (int idx = tid; idx < d * bs; idx += nthreads) {
      ks[idx] = to_f(kb[idx]);
      vs[idx] = to_f(vb[idx]);
    }
    __syncthreads();
    const int j_lo = max(k_begin - b * bs, 0);
    const int j_hi = min(k_end - b * bs, bs);
    for (int r = warp; r < rows; r += nwarps) {
      const int qpos = pos0 + r % len;
      const int j_end = min(j_hi, qpos + 1 - b * bs);
      const int j = lane;
      const bool valid = j >= j_lo && j < j_end;
      float s = -INFINITY;
      if (valid) {
        const float* qr = qs + r * d;
        float dot = 0.f;
        for (int dd = 0; dd < d; ++dd) dot += qr[dd] * ks[dd * bs + j];
        s = dot;
      }
      const float mb = warp_max(s);
      if (mb == -INFINITY) continue;  // no key of this block is visible to this row (warp-uniform)
      const float m_old = m[r];
      const float m_new = fmaxf(m_old, mb);
      const float p = valid ? __expf(s - m_new) : 0.f;
      const float lb = warp_sum(p);
      const float corr = __expf(m_old - m_new);  // 0 when m_old is -inf
      for (int dd = lane; dd < d; dd += 32) {
        float a = acc[r * d + dd] * corr;
        for (int jj = j_lo; jj < j_end; ++jj) a += __shfl_sync(0xffffffffu, p, jj) * vs[jj * d + dd];
        acc[r * d + dd] = a;
      }
      __syncwarp();
      if (lane == 0) {
        l[r] = l[r] * corr + lb;
        m[r] = m_new;
      }
      __syncwarp();
    }
  }
  __syncthreads();
}

// Dynamic shared memory of attend_rows for `rows` rows, in floats.
// qs[rows*d] | acc[rows*d] | ks[d*bs] | vs[bs*d] | m[rows] | l[rows]

template <typename T, typename C>
__device__ void attention_tiles(const T* __restrict__ q, const C* __restrict__ kc,
                                const C* __restrict__ vc, T* __restrict__ out,
                                const uint32_t* __restrict__ tiles,
                                const uint32_t* __restrict__ query_start,
                                const uint32_t* __restrict__ context_lens,
                                const uint32_t* __restrict__ block_tables, int max_blocks,
                                int heads, int kv_heads, int d, int bs, float scale,
                                int max_rows) {
  DYNAMIC_SHARED(float, smem);
  const int tile = blockIdx.x, g = blockIdx.y;
  const int seq = tiles[3 * tile], t0 = tiles[3 * tile + 1], len = tiles[3 * tile + 2];
  const int q0 = query_start[seq], qlen = query_start[seq + 1] - q0;
  const int pos0 = (int)context_lens[seq] - qlen + (t0 - q0);
  float* qs = smem;
  float* acc = qs + max_rows * d;
  float* ks = acc + max_rows * d;
  float* vs = ks + d * bs;
  float* m = vs + bs * d;
  float* l = m + max_rows;
  attend_rows<T, C>(q, kc, vc, block_tables + (long)seq * max_blocks, heads, kv_heads, d, bs,
                    scale, g, t0, len, pos0, 0, pos0 + len, qs, ks, vs, acc, m, l);
  const int G = heads / kv_heads, rows = G * len;
  for (int idx = threadIdx.x; idx < rows * d; idx += blockDim.x) {
    const int r = idx / d, dd = idx % d;
    const int hh = r / len, i = r % len;
    out[((long)(t0 + i) * heads + g * G + hh) * d + dd] = from_f<T>(acc[idx] / l[r]);
  }
}

// Split-K over the keys of single decode tokens: grid (tokens, kv_heads, parts).
template <typename T, typename C>
__device__ void attention_split(const T* __restrict__ q, const C* __restrict__ kc,
                                const C* __restrict__ vc, float* __restrict__ part_acc,
                                float* __restrict__ part_m, float* __restrict__ part_l,
                                const uint32_t* __restrict__ tokens,
                                const uint32_t* __restrict__ token_seq,
                                const uint32_t* __restrict__ query_start,
                                const uint32_t* __restrict__ context_lens,
                                const uint32_t* __restrict__ block_tables, int max_blocks,
                                int heads, int kv_heads, int d, int bs, float scale,
                                int part_size) {
  DYNAMIC_SHARED(float, smem);
  const int item = blockIdx.x, g = blockIdx.y, p = blockIdx.z, parts = gridDim.z;
  const int t = tokens[item];
  const int seq = token_seq[t];
  const int q0 = query_start[seq], qlen = query_start[seq + 1] - q0;
  const int pos = (int)context_lens[seq] - qlen + (t - q0);
  const int G = heads / kv_heads;
  float* qs = smem;
  float* acc = qs + G * d;
  float* ks = acc + G * d;
  float* vs = ks + d * bs;
  float* m = vs + bs * d;
  float* l = m + G;
  const int k_begin = p * part_size, k_end = min(pos + 1, (p + 1) * part_size);
  attend_rows<T, C>(q, kc, vc, block_tables + (long)seq * max_blocks, heads, kv_heads, d, bs,
                    scale, g, t, 1, pos, k_begin, k_end, qs, ks, vs, acc, m, l);
  for (int idx = threadIdx.x; idx < G * d; idx += blockDim.x) {
    const int hh = idx / d, dd = idx % d;
    const long row = ((long)item * heads + g * G + hh) * parts + p;
    part_acc[row * d + dd] = acc[idx];
    if (dd == 0) {
      part_m[row] = m[hh];
      part_l[row] = l[hh];
    }
  }
}

// Merges the partitions: grid (tokens, heads), block of d threads (at most 1024).
template <typename T>
__device__ void attention_reduce(const float* __restrict__ part_acc,
                                 const float* __restrict__ part_m,
                                 const float* __restrict__ part_l, T* __restrict__ out,
                                 const uint32_t* __restrict__ tokens, int heads, int d,
                                 int parts) {
  const int item = blockIdx.x, h = blockIdx.y, dd = threadIdx.x;
  if (dd >= d) return;
  const long row0 = ((long)item * heads + h) * parts;
  float mx = -INFINITY;
  for (int p = 0; p < parts; ++p) mx = fmaxf(mx, part_m[row0 + p]);
  float num = 0.f, den = 0.f;
  for (int p = 0; p < parts; ++p) {
    const float mp = part_m[row0 + p];
    if (mp == -INFINITY) continue;
    const float w = __expf(mp - mx);
    num += part_acc[(row0 + p) * d + dd] * w;
    den += part_l[row0 + p] * w;
  }
  out[((long)tokens[item] * heads + h) * d + dd] = from_f<T>(num / den);
}

// ---------------------------------------------------------------------------------------------
// Entry points: per element type T of the queries and outputs, the kernels over a cache of T
// (suffix T's) and over an fp8 cache (suffix T's + "_fp8"); the merge does not read the cache.

#define CACHE_ENTRY_POINTS(T, C, SUFFIX)                                                           \
  extern "C" __global__ void __launch_bounds__(ELEMENTWISE_THREADS) write_kv_##SUFFIX(             \
      const T* src, C* cache, const uint32_t* slots, int tokens, int kv_heads, int d, int bs,      \
      int values) {                                                                                \
    write_kv<T, C>(src, cache, slots, tokens, kv_heads, d, bs, values);                            \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(ATTENTION_THREADS) attention_tiles_##SUFFIX(        \
      const T* q, const C* kc, const C* vc, T* out, const uint32_t* tiles,                         \
      const uint32_t* query_start, const uint32_t* context_lens, const uint32_t* block_tables,     \
      int max_blocks, int heads, int kv_heads, int d, int bs, float scale, int max_rows) {         \
    attention_tiles<T, C>(q, kc, vc, out, tiles, query_start, context_lens, block_tables,          \
                          max_blocks, heads, kv_heads, d, bs, scale, max_rows);                    \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(ATTENTION_THREADS) attention_split_##SUFFIX(        \
      const T* q, const C* kc, const C* vc, float* part_acc, float* part_m, float* part_l,         \
      const uint32_t* tokens, const uint32_t* token_seq, const uint32_t* query_start,              \
      const uint32_t* context_lens, const uint32_t* block_tables, int max_blocks, int heads,       \
      int kv_heads, int d, int bs, float scale, int part_size) {                                   \
    attention_split<T, C>(q, kc, vc, part_acc, part_m, part_l, tokens, token_seq, query_start,     \
                          context_lens, block_tables, max_blocks, heads, kv_heads, d, bs, scale,   \
                          part_size);                                                              \
  }

#define ENTRY_POINTS(T, SUFFIX)                                                                    \
  CACHE_ENTRY_POINTS(T, T, SUFFIX)                                                                 \
  CACHE_ENTRY_POINTS(T, kv_fp8, SUFFIX##_fp8)                                                      \
  extern "C" __global__ void __launch_bounds__(REDUCE_THREADS) attention_reduce_##SUFFIX(          \
      const float* part_acc, const float* part_m, const float* part_l, T* out,                     \
      const uint32_t* tokens, int heads, int d, int parts) {                                       \
    attention_reduce<T>(part_acc, part_m, part_l, out, tokens, heads, d, parts);                   \
  }

ENTRY_POINTS(float, f32)
ENTRY_POINTS(__half, f16)
ENTRY_POINTS(__nv_bfloat16, bf16)
#undef ENTRY_POINTS
#undef CACHE_ENTRY_POINTS
