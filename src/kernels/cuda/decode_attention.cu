// Fused decode attention over the LogQuant packed cache (CUDA, sm_90), and its reference.
//
// One query token per sequence, GQA (n_rep = n_q / n_kv query heads per kv head), a batch of
// sequences of different lengths. Split-K flash decoding (Dao et al., "Flash-Decoding for
// long-context inference", 2023): the cache of each (sequence, kv head) is cut into spans;
// one block scores one span for ALL query heads of its kv head (the codes are read once), keeps
// an exact softmax state in f32 (running max, sum, unnormalized output) and writes it; a second
// kernel merges the spans of each (sequence, query head) with max/sum rescaling. The cache
// layout and the math are LogQuant's (arXiv 2503.19950) as this crate encodes it; the encoding
// is stated once in src/quant.rs:
//
//   x_hat = code * scale + min        scale, min: f16 pairs (scale first), one per group
//   packing: a row is a little-endian bit stream, code i at bits [bits*i, bits*(i+1))
//            (2 bits: four codes a byte, low bits first; 3 bits: eight codes in 3 bytes)
//   keys:    per-channel (one pair per channel over key_group consecutive quantized tokens)
//            or per-token (one pair per key_group consecutive channels of one token)
//   values:  per-token (one pair per value_group consecutive channels of one token)
//   rotated: quantized rows are R x with R = H / sqrt(D) (Sylvester-Hadamard, symmetric,
//            orthogonal). Scores use R q; the weighted sum of rotated values is rotated back
//            (R again) once per (sequence, query head) in the reduce kernel. Full-precision
//            rows are never rotated.
//
// ---------------------------------------------------------------------------------------------
// Layout on the device (what the Rust side passes; see the report/spec of issue 12)
// ---------------------------------------------------------------------------------------------
// The store keeps one PackedBlock per quantized chunk (codes u8 (heads, tokens, row_bytes),
// params f16 (heads, tokens, D/group, 2) or (heads, D, 2)), so a layer's cache is NOT one
// buffer. The kernels read concatenations that candle produces with `Tensor::cat` along the
// token axis over all chunks of all sequences of the batch, plus per-sequence offsets:
//
//   N      tokens per kv head in the concatenated quantized buffers ("head_stride")
//   k_codes  u8    [n_kv][N][D*kbits/8]         v_codes u8 [n_kv][N][D*vbits/8]
//   k_params half2 per-token keys:   [n_kv][N][D/key_group]      (scale, min)
//                  per-channel keys: [n_kv][N/key_group][D]      (chunk params stacked)
//   v_params half2 [n_kv][N][D/value_group]
//   seq_start, seq_len  int32 [B]: sequence b's quantized tokens are [start, start+len) of N.
//                  Per-channel keys: start and N are multiples of key_group (every chunk is
//                  one whole key group, so this holds for any concatenation of whole chunks).
//   Full-precision rows (staged, then the policy's rows) in the activation dtype T (f32, f16,
//   bf16): k, v [n_kv][Nd][D], per-sequence dense_start/dense_len int32 [B].
//   q   f32 [B][n_q][D] (not scaled, not rotated); out f32 [B][n_q][D].
//   Partials (scratch, f32): part_out [B][n_q][n_slots][D], part_max/part_sum [B][n_q][n_slots]
//   with slots [0, quant_slots) for quantized spans and [quant_slots, n_slots) for dense spans.
//   part_max is in log2 units (scores are scaled by softmax_scale * log2(e), then exp2).
//
// Limits checked by the caller (the kernels assume them): D % 32 == 0 and D <= 256 (so every
// packed row is whole u32 words); per-token key_group and value_group multiples of 8 dividing
// D; rotated needs D a power of two; n_rep <= the instantiation's GT (1, 2, 4, 8); base
// pointers 4-byte aligned (16-byte aligned gets vector loads; candle's allocations are).
//
// ---------------------------------------------------------------------------------------------
// Kernels (all `extern "C"`)
// ---------------------------------------------------------------------------------------------
//   lq_decode_quant_k{2,3,4,8}v{2,3,4,8}_{pc,pt}_g{1,2,4,8}   quantized spans
//       (q, k_codes, k_params, v_codes, v_params, seq_start, seq_len, i64 head_stride N,
//        n_q, n_kv, d, key_group, value_group, span_tokens, f32 softmax_scale, rotated (0/1),
//        part_out, part_max, part_sum, n_slots, slot_base = 0); all others int32.
//       grid (quant_slots, n_kv, B) with quant_slots = max_b ceil(seq_len[b] / span_tokens),
//       block LQ_THREADS (128), dynamic smem lq_quant_smem_bytes() (or ask the device: kernel
//       lq_quant_smem_bytes_query); span_tokens a multiple of 128 (LQ_TILE); pc = per-channel
//       keys, pt = per-token keys; g = the smallest of 1, 2, 4, 8 >= n_rep.
//   lq_decode_dense_{f32,f16,bf16}_g{1,2,4,8}                 full-precision spans
//       (q, k, v, dense_start, dense_len, i64 head_stride Nd, n_q, n_kv, d, span_tokens,
//        softmax_scale, part_out, part_max, part_sum, n_slots, slot_base = quant_slots)
//       grid (dense_slots, n_kv, B), block 128, dynamic smem lq_dense_smem_bytes()
//   lq_decode_reduce                                           merge of all slots
//       (part_out, part_max, part_sum, n_slots, quant_slots, d, rotated, out)
//       grid (n_q, B), block d, dynamic smem d * 4 bytes
//   lq_ref_dequant, lq_ref_rotate_rows, lq_ref_attention      the reference (test oracle):
//       dequantize into a scratch f32 buffer, rotate back, textbook attention; one thread per
//       output element, no shared memory, nothing clever.
// A block whose span starts past its sequence's end writes max = -inf, sum = 0 (the reduce
// skips it), so grid.x may be the batch's largest span count.

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#define LQ_THREADS 128                 // 4 warps: enough blocks per SM to keep loads in flight
#define LQ_TILE LQ_THREADS             // tokens per tile: one token per thread when scoring
#define LQ_WARPS (LQ_THREADS / 32)
#define LQ_LOG2E 1.4426950408889634f
#define LQ_FULL_MASK 0xffffffffu

// Dynamic shared memory of every kernel below (each carves it its own way).
extern __shared__ __align__(16) unsigned char lq_smem[];

// ----------------------------------------------------------------------------- small helpers

__device__ __forceinline__ float lq_warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(LQ_FULL_MASK, x, o));
  return x;
}

__device__ __forceinline__ float lq_warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(LQ_FULL_MASK, x, o);
  return x;
}

// The 8 codes of channels [8*slot, 8*slot + 8) of a packed row, low code first. A slot is
// BITS whole bytes at byte 8*slot*BITS/8 = slot*BITS. `row` is word aligned (row bytes are a
// multiple of 4). 3-bit slots may straddle a word: the next word is read (callers leave one
// word of slack after the last row). PAIR: 8-bit slots read as one aligned 64-bit load.
template <int BITS, bool PAIR>
__device__ __forceinline__ uint64_t lq_slot_bits(const uint32_t* row, int slot) {
  const int bit = 8 * BITS * slot;
  const int w = bit >> 5, off = bit & 31;
  if (BITS == 8) {
    if (PAIR) {
      const uint2 p = *reinterpret_cast<const uint2*>(row + w);
      return (uint64_t)p.x | ((uint64_t)p.y << 32);
    }
    return (uint64_t)row[w] | ((uint64_t)row[w + 1] << 32);
  }
  if (BITS == 4) return row[w];               // off == 0
  if (BITS == 2) return row[w] >> off;        // off in {0, 16}
  return ((uint64_t)row[w] | ((uint64_t)row[w + 1] << 32)) >> off;  // 3 bits, off in {0,8,16,24}
}

// Codes to f32 without the int->float unit (a quarter of the FMA rate): a code field that lies
// inside bits [0, 23) of a word, OR-ed into the mantissa of 2^23, minus 2^23, is exactly
// code * 2^pos, where pos is where the field sits. The field is masked in place (no shift per
// code); pos is a constant of (BITS, i), and the factor 2^pos is folded into the query tables
// (scores) or taken out of the accumulators once at the end (values): exact powers of two.
//
// Code i of a slot (8 codes, bits [BITS*i, BITS*(i+1)) of the slot's bits) is read from the
// slot's bits shifted right by lq_code_shift(BITS, i), a multiple of 16 chosen so that the
// field ends at or below bit 23: one shift serves several codes.
__host__ __device__ constexpr int lq_code_shift(int bits, int i) {
  int sh = 0;
  while (bits * (i + 1) - sh > 23) sh += 16;
  return sh;
}
__host__ __device__ constexpr int lq_code_pos(int bits, int i) { return bits * i - lq_code_shift(bits, i); }

// 2^-pos of code i (an exact f32 power of two).
__device__ __forceinline__ float lq_code_unscale(int bits, int i) {
  return __int_as_float((127 - lq_code_pos(bits, i)) << 23);
}

// Code i of the slot as code * 2^lq_code_pos(BITS, i) (i a compile-time constant after unrolling).
template <int BITS>
__device__ __forceinline__ float lq_code_scaled(uint64_t bits8, int i) {
  const int sh = lq_code_shift(BITS, i), pos = lq_code_pos(BITS, i);
  const uint32_t field = (uint32_t)(bits8 >> sh) & (((1u << BITS) - 1u) << pos);
  return __uint_as_float(0x4B000000u | field) - 8388608.0f;
}

// Copy `bytes` (a multiple of 4) from global to shared memory, 16 bytes a load when aligned.
__device__ __forceinline__ void lq_copy_words(uint32_t* dst, const uint8_t* src, long long bytes) {
  const int words = (int)(bytes >> 2);
  if (((uintptr_t)src & 15) == 0) {
    const int vecs = words >> 2;
    const uint4* s4 = reinterpret_cast<const uint4*>(src);
    uint4* d4 = reinterpret_cast<uint4*>(dst);   // dst is 16-byte aligned by the smem carve
    for (int i = threadIdx.x; i < vecs; i += LQ_THREADS) d4[i] = __ldg(s4 + i);
    for (int i = 4 * vecs + threadIdx.x; i < words; i += LQ_THREADS)
      dst[i] = __ldg(reinterpret_cast<const uint32_t*>(src) + i);
  } else {
    const uint32_t* s = reinterpret_cast<const uint32_t*>(src);
    for (int i = threadIdx.x; i < words; i += LQ_THREADS) dst[i] = __ldg(s + i);
  }
}

// (scale, min) f16 pairs to f32 pairs in shared memory.
__device__ __forceinline__ void lq_copy_params(float2* dst, const __half2* src, int n) {
  for (int i = threadIdx.x; i < n; i += LQ_THREADS) dst[i] = __half22float2(src[i]);
}

__device__ __forceinline__ int lq_align16(int bytes) { return (bytes + 15) & ~15; }

// The dynamic shared memory of a quantized-span block, in bytes; the carve in
// lq_decode_quant follows the same order. Callable on the host too (the Rust side mirrors it,
// or asks the device through lq_quant_smem_bytes_query). The caller checks it against the
// device's opt-in maximum (227 KiB on sm_90) and sets cudaFuncAttributeMaxDynamicSharedMemorySize
// above 48 KiB; small per-channel key groups need the most (one query table per key group of
// a tile).
__host__ __device__ inline int lq_key_groups_per_tile(int key_group) { return LQ_TILE / key_group + 2; }

__host__ __device__ inline int lq_quant_smem_bytes(int kbits, int vbits, int key_per_channel, int gt,
                                                   int d, int key_group, int value_group) {
  const int kwords = d * kbits / 32, vwords = d * vbits / 32;
  const int kstride = kwords | 1;  // odd row stride: one token per thread reads conflict-free
  const int ng = key_per_channel ? lq_key_groups_per_tile(key_group) : 1;
  const int q = 4 * d * gt;                                     // scaled (rotated) queries
  const int probs = 4 * LQ_TILE * gt;
  const int red = 4 * 2 * LQ_WARPS * gt;
  const int qx = 4 * (key_per_channel ? ng : d / key_group) * gt;  // q.min per group / q sums
  const int qtab = 4 * ng * d * gt;                             // query tables
  const int kmin = key_per_channel ? 4 * ng * d : 0;            // per-channel key minimums
  const int kc = 4 * (LQ_TILE * kstride + 2);
  const int vc = 4 * (LQ_TILE * vwords + 2);
  const int kp = key_per_channel ? 0 : 8 * LQ_TILE * (d / key_group);
  const int vp = 8 * LQ_TILE * (d / value_group);
  const int staging = lq_align16(kc) + lq_align16(vc) + lq_align16(kp) + lq_align16(vp);
  const int slots = d / 8;
  const int final_red = 4 * (LQ_THREADS / slots) * gt * d;  // per-token-group partial outputs
  return lq_align16(q) + lq_align16(probs) + lq_align16(red) + lq_align16(qx) + lq_align16(qtab) +
         lq_align16(kmin) + (staging > final_red ? staging : final_red);
}

__host__ __device__ inline int lq_dense_smem_bytes(int gt, int d) {
  return lq_align16(4 * d * gt) + lq_align16(4 * LQ_TILE * gt) + lq_align16(4 * 2 * LQ_WARPS * gt);
}

__device__ __forceinline__ unsigned lq_dynamic_smem_size() {
  unsigned r;
  asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
  return r;
}

// In-place x <- H x over the D rows of an smem array laid out [c][GT] (column g), for every
// column: the butterflies of quant::hadamard_in_place (normalization left to the caller).
template <int GT>
__device__ void lq_hadamard_cols(float* x, int d) {
  for (int h = 1; h < d; h <<= 1) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < (d / 2) * GT; idx += blockDim.x) {
      const int g = idx % GT, p = idx / GT;
      const int i = (p / h) * 2 * h + (p % h), j = i + h;
      const float a = x[i * GT + g], b = x[j * GT + g];
      x[i * GT + g] = a + b;
      x[j * GT + g] = a - b;
    }
  }
  __syncthreads();
}

// Block-wide max and sum over the tile for GT values per thread; every thread gets the results.
template <int GT>
__device__ __forceinline__ void lq_block_max(const float* v, float* red, float* out) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
  for (int g = 0; g < GT; ++g) {
    const float m = lq_warp_max(v[g]);
    if (lane == 0) red[warp * GT + g] = m;
  }
  __syncthreads();
#pragma unroll
  for (int g = 0; g < GT; ++g) {
    float m = red[g];
#pragma unroll
    for (int w = 1; w < LQ_WARPS; ++w) m = fmaxf(m, red[w * GT + g]);
    out[g] = m;
  }
}

template <int GT>
__device__ __forceinline__ void lq_block_sum(const float* v, float* red, float* out) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
  for (int g = 0; g < GT; ++g) {
    const float s = lq_warp_sum(v[g]);
    if (lane == 0) red[warp * GT + g] = s;
  }
  __syncthreads();
#pragma unroll
  for (int g = 0; g < GT; ++g) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < LQ_WARPS; ++w) s += red[w * GT + g];
    out[g] = s;
  }
}

// One tile's softmax step, shared by both span kernels. `s` holds this thread's scores (log2
// units; -inf for no token). Updates the running max `m` and sum `l`, writes this thread's
// probabilities to probs[tid][GT] and returns the factor the running output must be scaled by.
template <int GT>
__device__ __forceinline__ void lq_tile_softmax(const float* s, float* m, float* l, float* alpha,
                                                float* probs, float* red_max, float* red_sum) {
  float tile_max[GT], p[GT], tile_sum[GT];
  lq_block_max<GT>(s, red_max, tile_max);
#pragma unroll
  for (int g = 0; g < GT; ++g) {
    const float m_new = fmaxf(m[g], tile_max[g]);
    // The first tile (m = -inf) or a column with no finite score: nothing to rescale.
    alpha[g] = (m[g] == -INFINITY || m_new == -INFINITY) ? 0.f : exp2f(m[g] - m_new);
    p[g] = (s[g] == -INFINITY) ? 0.f : exp2f(s[g] - m_new);
    m[g] = m_new;
    probs[threadIdx.x * GT + g] = p[g];
  }
  // The barrier inside lq_block_sum also publishes probs to the whole block.
  lq_block_sum<GT>(p, red_sum, tile_sum);
#pragma unroll
  for (int g = 0; g < GT; ++g) l[g] = l[g] * alpha[g] + tile_sum[g];
}

// -------------------------------------------------------------------- quantized span kernel

// Block (span, kv head, sequence). Once per block: the GT query rows of the kv head, rotated by
// R if the rows were and scaled by softmax_scale * log2(e), in smem as [c][GT]. Per tile of 128
// tokens:
//   1. stage the tile's K codes (rows padded to an odd word stride), V codes and parameters in
//      shared memory, coalesced and 16 bytes a load; for per-channel keys build one query table
//      per key group of the tile, qtab[c][g] = q[c][g] * scale_c * 2^-pos(c), and q . min;
//   2. scores: thread t takes token t and reads its key codes once for all GT query rows:
//        per-channel keys: q . k_hat = sum_c qtab[c] * (code_c 2^pos) + q . min
//        per-token keys:   sum_j scale_j * sum_{c in j} q'[c] * (code_c 2^pos) + min_j * sum_{c in j} q[c]
//   3. exact softmax step for the tile (block max, exp2, block sum), rescaling the running state;
//   4. values: thread (slot, token group) owns 8 channels and walks the tile's tokens
//      tg, tg + NTG, ...: acc[g][c] += (p_g * scale_t) * (code 2^pos), bias[g] += p_g * min_t.
// After the last tile the token groups' outputs (acc * 2^-pos + bias) are summed through smem.
template <int BK, int BV, bool KPC, int GT>
__device__ void lq_decode_quant(const float* __restrict__ q, const uint8_t* __restrict__ k_codes,
                                const __half2* __restrict__ k_params, const uint8_t* __restrict__ v_codes,
                                const __half2* __restrict__ v_params, const int* __restrict__ seq_start,
                                const int* __restrict__ seq_len, long long head_stride, int n_q, int n_kv,
                                int d, int key_group, int value_group, int span_tokens, float softmax_scale,
                                int rotated, float* __restrict__ part_out, float* __restrict__ part_max,
                                float* __restrict__ part_sum, int n_slots, int slot_base) {
  const int span = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
  const int warp = tid >> 5, lane = tid & 31;
  const int n_rep = n_q / n_kv;
  const int len = seq_len[b];
  const long long start = seq_start[b];
  const int span_begin = span * span_tokens;
  const int slot = slot_base + span;
  const long long part_row0 = ((long long)b * n_q + (long long)kvh * n_rep) * n_slots + slot;

  const int need = lq_quant_smem_bytes(BK, BV, KPC, GT, d, key_group, value_group);
  const bool bad_smem = lq_dynamic_smem_size() < (unsigned)need;
  if (span_begin >= len || bad_smem) {
    // Nothing to attend (or a launch without enough shared memory: NaN makes it visible).
    if (tid < n_rep) {
      part_max[part_row0 + (long long)tid * n_slots] = bad_smem ? __int_as_float(0x7fc00000) : -INFINITY;
      part_sum[part_row0 + (long long)tid * n_slots] = 0.f;
    }
    return;
  }
  const int span_end = min(len, span_begin + span_tokens);

  // Shared memory carve (order and sizes as lq_quant_smem_bytes).
  const int kwords = d * BK / 32, vwords = d * BV / 32, kstride = kwords | 1;
  const int kgroups = KPC ? 0 : d / key_group, vgroups = d / value_group;
  const int ng_max = KPC ? lq_key_groups_per_tile(key_group) : 1;
  unsigned char* p = lq_smem;
  float* qs = reinterpret_cast<float*>(p);        p += lq_align16(4 * d * GT);
  float* probs = reinterpret_cast<float*>(p);     p += lq_align16(4 * LQ_TILE * GT);
  float* red = reinterpret_cast<float*>(p);       p += lq_align16(4 * 2 * LQ_WARPS * GT);
  float* qx = reinterpret_cast<float*>(p);        p += lq_align16(4 * (KPC ? ng_max : kgroups) * GT);
  float* qtab = reinterpret_cast<float*>(p);      p += lq_align16(4 * ng_max * d * GT);
  float* kmin = reinterpret_cast<float*>(p);      p += lq_align16(KPC ? 4 * ng_max * d : 0);
  unsigned char* staging = p;
  uint32_t* kc = reinterpret_cast<uint32_t*>(p);  p += lq_align16(4 * (LQ_TILE * kstride + 2));
  uint32_t* vc = reinterpret_cast<uint32_t*>(p);  p += lq_align16(4 * (LQ_TILE * vwords + 2));
  float2* kp = reinterpret_cast<float2*>(p);      p += lq_align16(KPC ? 0 : 8 * LQ_TILE * kgroups);
  float2* vp = reinterpret_cast<float2*>(p);
  float* final_red = reinterpret_cast<float*>(staging);  // reused after the last tile

  // Query rows of this kv head, [c][GT], zero beyond n_rep; rotated by R if the rows were.
  const float* qb = q + ((long long)b * n_q + (long long)kvh * n_rep) * d;
  for (int i = tid; i < d * GT; i += LQ_THREADS) {
    const int c = i / GT, g = i % GT;
    qs[i] = g < n_rep ? qb[(long long)g * d + c] : 0.f;
  }
  float qscale = softmax_scale * LQ_LOG2E;
  if (rotated) {
    lq_hadamard_cols<GT>(qs, d);  // ends with a barrier
    qscale *= rsqrtf((float)d);
  }
  for (int i = tid; i < d * GT; i += LQ_THREADS) qs[i] *= qscale;  // same i: no barrier needed
  if (!KPC) {
    // Per-token keys: the query table is the scaled query times 2^-pos (once per block) and
    // qx[j][g] = sum of q over key group j.
    __syncthreads();
    for (int i = tid; i < d * GT; i += LQ_THREADS) qtab[i] = qs[i] * lq_code_unscale(BK, (i / GT) % 8);
    for (int i = tid; i < kgroups * GT; i += LQ_THREADS) {
      const int j = i / GT, g = i % GT;
      float sum = 0.f;
      for (int c = j * key_group; c < (j + 1) * key_group; ++c) sum += qs[c * GT + g];
      qx[i] = sum;
    }
  }
  // (the first tile's barriers publish qs, qtab and qx)

  const int kbytes = d * BK / 8, vbytes = d * BV / 8;
  const uint8_t* kh = k_codes + (long long)kvh * head_stride * kbytes;
  const uint8_t* vh = v_codes + (long long)kvh * head_stride * vbytes;
  const long long kp_head = KPC ? (long long)kvh * (head_stride / key_group) * d
                                : (long long)kvh * head_stride * kgroups;
  const long long vp_head = (long long)kvh * head_stride * vgroups;

  // Values-phase ownership: slot (8 channels) and token group.
  const int n_slot = d / 8, ntg = LQ_THREADS / n_slot;
  const int my_slot = tid % n_slot, my_tg = tid / n_slot;
  const bool values_active = my_tg < ntg;
  const int my_vgroup = my_slot * 8 / value_group;

  float m[GT], l[GT], acc[GT][8], bias[GT];
#pragma unroll
  for (int g = 0; g < GT; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
    bias[g] = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[g][i] = 0.f;
  }

  for (int tok0 = span_begin; tok0 < span_end; tok0 += LQ_TILE) {
    const int n = min(LQ_TILE, span_end - tok0);
    const long long row0 = start + tok0;  // first token of the tile in the concatenated axis
    __syncthreads();  // the previous tile's readers are done with the staging buffers and tables

    // 1. Stage. K rows go to an odd word stride, one warp per row (rows are contiguous).
    {
      const uint32_t* src = reinterpret_cast<const uint32_t*>(kh + row0 * kbytes);
      for (int r = warp; r < n; r += LQ_WARPS)
        for (int w = lane; w < kwords; w += 32) kc[r * kstride + w] = __ldg(src + (long long)r * kwords + w);
    }
    lq_copy_words(vc, vh + row0 * vbytes, (long long)n * vbytes);
    lq_copy_params(vp, v_params + vp_head + row0 * vgroups, n * vgroups);
    int kgroup0 = 0;
    if (KPC) {
      // One query table per key group the tile touches: qtab[grp][c][g] = q[c][g] * scale_c * 2^-pos(c).
      kgroup0 = (int)(row0 / key_group);
      const int ng = (int)((row0 + n - 1) / key_group) - kgroup0 + 1;
      const __half2* src = k_params + kp_head + (long long)kgroup0 * d;
      for (int i = tid; i < ng * d; i += LQ_THREADS) {
        const int c = i % d;
        const float2 sm = __half22float2(__ldg(src + i));
        kmin[i] = sm.y;
        const float sc = sm.x * lq_code_unscale(BK, c % 8);  // exact: times a power of two
#pragma unroll
        for (int g = 0; g < GT; ++g) qtab[i * GT + g] = qs[c * GT + g] * sc;
      }
      __syncthreads();
      // qx[grp][g] = q . min over the channels, one warp per (group, query row).
      for (int pair = warp; pair < ng * GT; pair += LQ_WARPS) {
        const int grp = pair / GT, g = pair % GT;
        float dot = 0.f;
        for (int c = lane; c < d; c += 32) dot = fmaf(qs[c * GT + g], kmin[grp * d + c], dot);
        dot = lq_warp_sum(dot);
        if (lane == 0) qx[pair] = dot;
      }
    } else {
      lq_copy_params(kp, k_params + kp_head + row0 * kgroups, n * kgroups);
    }
    __syncthreads();

    // 2. Scores of token tid (log2 units).
    float s[GT];
#pragma unroll
    for (int g = 0; g < GT; ++g) s[g] = -INFINITY;
    if (tid < n) {
      const uint32_t* row = kc + tid * kstride;
      if (KPC) {
        const int grp = (int)((row0 + tid) / key_group) - kgroup0;
        const float* tab = qtab + grp * d * GT;
#pragma unroll
        for (int g = 0; g < GT; ++g) s[g] = qx[grp * GT + g];
        for (int sl = 0; sl < n_slot; ++sl) {
          const uint64_t bits8 = lq_slot_bits<BK, false>(row, sl);
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            const float code = lq_code_scaled<BK>(bits8, i);
            const float* qc = tab + (sl * 8 + i) * GT;
#pragma unroll
            for (int g = 0; g < GT; ++g) s[g] = fmaf(qc[g], code, s[g]);
          }
        }
      } else {
#pragma unroll
        for (int g = 0; g < GT; ++g) s[g] = 0.f;
        const int slots_per_group = key_group / 8;
        for (int j = 0; j < kgroups; ++j) {
          float dot[GT];
#pragma unroll
          for (int g = 0; g < GT; ++g) dot[g] = 0.f;
          for (int sl = j * slots_per_group; sl < (j + 1) * slots_per_group; ++sl) {
            const uint64_t bits8 = lq_slot_bits<BK, false>(row, sl);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
              const float code = lq_code_scaled<BK>(bits8, i);
              const float* qc = qtab + (sl * 8 + i) * GT;
#pragma unroll
              for (int g = 0; g < GT; ++g) dot[g] = fmaf(qc[g], code, dot[g]);
            }
          }
          const float2 sm = kp[tid * kgroups + j];
#pragma unroll
          for (int g = 0; g < GT; ++g) s[g] = fmaf(sm.x, dot[g], fmaf(sm.y, qx[j * GT + g], s[g]));
        }
      }
    }

    // 3. Softmax step.
    float alpha[GT];
    lq_tile_softmax<GT>(s, m, l, alpha, probs, red, red + LQ_WARPS * GT);
#pragma unroll
    for (int g = 0; g < GT; ++g) {
      bias[g] *= alpha[g];
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[g][i] *= alpha[g];
    }

    // 4. Weighted values.
    if (values_active) {
      for (int t = my_tg; t < n; t += ntg) {
        const float2 sm = vp[t * vgroups + my_vgroup];
        const uint64_t bits8 = lq_slot_bits<BV, true>(vc + t * vwords, my_slot);
        float w[GT];
#pragma unroll
        for (int g = 0; g < GT; ++g) {
          const float pg = probs[t * GT + g];
          w[g] = pg * sm.x;
          bias[g] = fmaf(pg, sm.y, bias[g]);
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float code = lq_code_scaled<BV>(bits8, i);
#pragma unroll
          for (int g = 0; g < GT; ++g) acc[g][i] = fmaf(w[g], code, acc[g][i]);
        }
      }
    }
  }

  // Sum the token groups' outputs (the staging buffers are free after this barrier).
  __syncthreads();
  if (values_active) {
#pragma unroll
    for (int g = 0; g < GT; ++g)
#pragma unroll
      for (int i = 0; i < 8; ++i)
        final_red[(my_tg * GT + g) * d + my_slot * 8 + i] = acc[g][i] * lq_code_unscale(BV, i) + bias[g];
  }
  __syncthreads();
  for (int idx = tid; idx < n_rep * d; idx += LQ_THREADS) {
    const int g = idx / d, c = idx % d;
    float o = 0.f;
    for (int t = 0; t < ntg; ++t) o += final_red[(t * GT + g) * d + c];
    part_out[(part_row0 + (long long)g * n_slots) * d + c] = o;
  }
  if (tid < n_rep) {
#pragma unroll
    for (int g = 0; g < GT; ++g)
      if (g == tid) {
        part_max[part_row0 + (long long)g * n_slots] = m[g];
        part_sum[part_row0 + (long long)g * n_slots] = l[g];
      }
  }
}

// ------------------------------------------------------------------------ dense span kernel

template <typename T> __device__ __forceinline__ float lq_to_float(T x);
template <> __device__ __forceinline__ float lq_to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float lq_to_float<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float lq_to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

// The full-precision rows (staged and the policy's; at most a few hundred per sequence): one
// warp per token for the scores (lanes over channels, coalesced), one thread per channel for the
// values. Plain space: never rotated.
template <typename T, int GT>
__device__ void lq_decode_dense(const float* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                const int* __restrict__ seq_start, const int* __restrict__ seq_len,
                                long long head_stride, int n_q, int n_kv, int d, int span_tokens,
                                float softmax_scale, float* __restrict__ part_out, float* __restrict__ part_max,
                                float* __restrict__ part_sum, int n_slots, int slot_base) {
  const int span = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
  const int warp = tid >> 5, lane = tid & 31;
  const int n_rep = n_q / n_kv;
  const int len = seq_len[b];
  const long long start = seq_start[b];
  const int span_begin = span * span_tokens;
  const long long part_row0 = ((long long)b * n_q + (long long)kvh * n_rep) * n_slots + slot_base + span;
  const bool bad_smem = lq_dynamic_smem_size() < (unsigned)lq_dense_smem_bytes(GT, d);
  if (span_begin >= len || bad_smem) {
    if (tid < n_rep) {
      part_max[part_row0 + (long long)tid * n_slots] = bad_smem ? __int_as_float(0x7fc00000) : -INFINITY;
      part_sum[part_row0 + (long long)tid * n_slots] = 0.f;
    }
    return;
  }
  const int span_end = min(len, span_begin + span_tokens);

  unsigned char* p = lq_smem;
  float* qs = reinterpret_cast<float*>(p);     p += lq_align16(4 * d * GT);  // [c][GT]
  float* probs = reinterpret_cast<float*>(p);  p += lq_align16(4 * LQ_TILE * GT);  // scores, then p
  float* red = reinterpret_cast<float*>(p);

  const float* qb = q + ((long long)b * n_q + (long long)kvh * n_rep) * d;
  const float qscale = softmax_scale * LQ_LOG2E;
  for (int i = tid; i < d * GT; i += LQ_THREADS) {
    const int c = i / GT, g = i % GT;
    qs[i] = g < n_rep ? qb[(long long)g * d + c] * qscale : 0.f;
  }
  const T* kh = k + (long long)kvh * head_stride * d;
  const T* vh = v + (long long)kvh * head_stride * d;

  // Channels owned in the values phase: c = tid and tid + 128 (d <= 256).
  float m[GT], l[GT], acc[2][GT];
#pragma unroll
  for (int g = 0; g < GT; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
    acc[0][g] = acc[1][g] = 0.f;
  }
  for (int tok0 = span_begin; tok0 < span_end; tok0 += LQ_TILE) {
    const int n = min(LQ_TILE, span_end - tok0);
    const long long row0 = start + tok0;
    __syncthreads();  // qs written / the previous tile's probs read
    for (int t = warp; t < n; t += LQ_WARPS) {
      const T* kr = kh + (row0 + t) * d;
      float part[GT];
#pragma unroll
      for (int g = 0; g < GT; ++g) part[g] = 0.f;
      for (int c = lane; c < d; c += 32) {
        const float kv = lq_to_float<T>(kr[c]);
#pragma unroll
        for (int g = 0; g < GT; ++g) part[g] = fmaf(qs[c * GT + g], kv, part[g]);
      }
#pragma unroll
      for (int g = 0; g < GT; ++g) {
        const float sg = lq_warp_sum(part[g]);
        if (lane == 0) probs[t * GT + g] = sg;
      }
    }
    __syncthreads();
    float s[GT];
#pragma unroll
    for (int g = 0; g < GT; ++g) s[g] = tid < n ? probs[tid * GT + g] : -INFINITY;
    __syncthreads();  // everyone has read its score before probs is overwritten
    float alpha[GT];
    lq_tile_softmax<GT>(s, m, l, alpha, probs, red, red + LQ_WARPS * GT);
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int c = tid + j * LQ_THREADS;
#pragma unroll
      for (int g = 0; g < GT; ++g) acc[j][g] *= alpha[g];
      if (c < d) {
        for (int t = 0; t < n; ++t) {
          const float vv = lq_to_float<T>(vh[(row0 + t) * d + c]);
#pragma unroll
          for (int g = 0; g < GT; ++g) acc[j][g] = fmaf(probs[t * GT + g], vv, acc[j][g]);
        }
      }
    }
  }
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int c = tid + j * LQ_THREADS;
    if (c < d) {
#pragma unroll
      for (int g = 0; g < GT; ++g)
        if (g < n_rep) part_out[(part_row0 + (long long)g * n_slots) * d + c] = acc[j][g];
    }
  }
  if (tid < n_rep) {
#pragma unroll
    for (int g = 0; g < GT; ++g)
      if (g == tid) {
        part_max[part_row0 + (long long)g * n_slots] = m[g];
        part_sum[part_row0 + (long long)g * n_slots] = l[g];
      }
  }
}

// ---------------------------------------------------------------------------- reduce kernel

// Block (query head, sequence), thread = channel. Slots below quant_slots hold rotated outputs
// when `rotated`: they are summed apart and rotated back once (R is linear), then added.
extern "C" __global__ void __launch_bounds__(1024)
lq_decode_reduce(const float* __restrict__ part_out, const float* __restrict__ part_max,
                 const float* __restrict__ part_sum, int n_slots, int quant_slots, int d, int rotated,
                 float* __restrict__ out) {
  float* rot = reinterpret_cast<float*>(lq_smem);
  const int hq = blockIdx.x, b = blockIdx.y, n_q = gridDim.x, c = threadIdx.x;
  const long long row = (long long)b * n_q + hq;
  const float* pm = part_max + row * n_slots;
  const float* ps = part_sum + row * n_slots;
  float m = -INFINITY;
  bool bad = false;  // a span block that could not run marks its slot NaN (fmaxf would skip it)
  for (int s = 0; s < n_slots; ++s) {
    m = fmaxf(m, pm[s]);
    bad |= isnan(pm[s]);
  }
  float sum = 0.f, acc_q = 0.f, acc_d = 0.f;
  const bool any = m != -INFINITY;
  for (int s = 0; s < n_slots && any; ++s) {
    const float ms = pm[s];
    if (ms == -INFINITY || isnan(ms)) continue;  // empty slot: its part_out was never written
    const float w = exp2f(ms - m);
    sum += w * ps[s];
    const float o = w * part_out[(row * n_slots + s) * d + c];
    if (s < quant_slots) acc_q += o; else acc_d += o;
  }
  if (bad) sum = NAN;
  if (rotated) {
    rot[c] = acc_q;
    for (int h = 1; h < d; h <<= 1) {
      __syncthreads();
      float mine = rot[c], other = rot[c ^ h];
      __syncthreads();
      rot[c] = (c & h) ? other - mine : mine + other;
    }
    __syncthreads();
    acc_q = rot[c] * rsqrtf((float)d);
  }
  out[row * d + c] = sum > 0.f ? (acc_q + acc_d) / sum : (isnan(sum) ? sum : 0.f);
}

// ------------------------------------------------------------------------- entry points

#define LQ_QUANT_ENTRY(BK, BV, KPC, TAG, GT)                                                          \
  extern "C" __global__ void __launch_bounds__(LQ_THREADS) lq_decode_quant_k##BK##v##BV##_##TAG##_g##GT( \
      const float* q, const uint8_t* k_codes, const __half2* k_params, const uint8_t* v_codes,           \
      const __half2* v_params, const int* seq_start, const int* seq_len, long long head_stride, int n_q,  \
      int n_kv, int d, int key_group, int value_group, int span_tokens, float softmax_scale, int rotated, \
      float* part_out, float* part_max, float* part_sum, int n_slots, int slot_base) {                   \
    lq_decode_quant<BK, BV, KPC, GT>(q, k_codes, k_params, v_codes, v_params, seq_start, seq_len,       \
                                     head_stride, n_q, n_kv, d, key_group, value_group, span_tokens,    \
                                     softmax_scale, rotated, part_out, part_max, part_sum, n_slots,     \
                                     slot_base);                                                        \
  }
#define LQ_QUANT_G(BK, BV, KPC, TAG) \
  LQ_QUANT_ENTRY(BK, BV, KPC, TAG, 1) LQ_QUANT_ENTRY(BK, BV, KPC, TAG, 2) \
  LQ_QUANT_ENTRY(BK, BV, KPC, TAG, 4) LQ_QUANT_ENTRY(BK, BV, KPC, TAG, 8)
#define LQ_QUANT_GROUPING(BK, BV) LQ_QUANT_G(BK, BV, true, pc) LQ_QUANT_G(BK, BV, false, pt)
#define LQ_QUANT_VBITS(BK) \
  LQ_QUANT_GROUPING(BK, 2) LQ_QUANT_GROUPING(BK, 3) LQ_QUANT_GROUPING(BK, 4) LQ_QUANT_GROUPING(BK, 8)
LQ_QUANT_VBITS(2)
LQ_QUANT_VBITS(3)
LQ_QUANT_VBITS(4)
LQ_QUANT_VBITS(8)

#define LQ_DENSE_ENTRY(T, TAG, GT)                                                                      \
  extern "C" __global__ void __launch_bounds__(LQ_THREADS) lq_decode_dense_##TAG##_g##GT(                \
      const float* q, const T* k, const T* v, const int* seq_start, const int* seq_len,                  \
      long long head_stride, int n_q, int n_kv, int d, int span_tokens, float softmax_scale,             \
      float* part_out, float* part_max, float* part_sum, int n_slots, int slot_base) {                   \
    lq_decode_dense<T, GT>(q, k, v, seq_start, seq_len, head_stride, n_q, n_kv, d, span_tokens,        \
                           softmax_scale, part_out, part_max, part_sum, n_slots, slot_base);            \
  }
#define LQ_DENSE_G(T, TAG) \
  LQ_DENSE_ENTRY(T, TAG, 1) LQ_DENSE_ENTRY(T, TAG, 2) LQ_DENSE_ENTRY(T, TAG, 4) LQ_DENSE_ENTRY(T, TAG, 8)
LQ_DENSE_G(float, f32)
LQ_DENSE_G(__half, f16)
LQ_DENSE_G(__nv_bfloat16, bf16)

// The dynamic shared memory a quantized-span kernel needs, computed on the device by the same
// function the kernel checks against (one thread; out[0] = bytes).
extern "C" __global__ void lq_quant_smem_bytes_query(int kbits, int vbits, int key_per_channel, int gt, int d,
                                                     int key_group, int value_group, int* out) {
  out[0] = lq_quant_smem_bytes(kbits, vbits, key_per_channel, gt, d, key_group, value_group);
  out[1] = lq_dense_smem_bytes(gt, d);
}

// ------------------------------------------------------------------ reference (test oracle)

// out[h][n][c] = code * scale + min for the concatenated quantized buffers above (any bits in
// {2,3,4,8}, either grouping; `rotated` rows stay rotated: see lq_ref_rotate_rows). One thread
// per element; the code is read byte by byte as quant::unpack_one does.
extern "C" __global__ void lq_ref_dequant(const uint8_t* codes, const __half2* params, int bits,
                                          int per_channel, int group, long long n_tokens, int n_kv, int d,
                                          float* out) {
  const long long total = (long long)n_kv * n_tokens * d;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    const int c = (int)(i % d);
    const long long row = i / d;  // h * n_tokens + n
    const long long h = row / n_tokens, n = row % n_tokens;
    const uint8_t* r = codes + row * (d * bits / 8);
    const int bit = bits * c, byte = bit / 8, shift = bit % 8;
    unsigned wide = r[byte];
    if (shift + bits > 8) wide |= (unsigned)r[byte + 1] << 8;
    const unsigned code = (wide >> shift) & ((1u << bits) - 1u);
    const __half2 pr = per_channel ? params[(h * (n_tokens / group) + n / group) * d + c]
                                   : params[row * (d / group) + c / group];
    const float2 sm = __half22float2(pr);
    out[i] = __fadd_rn(__fmul_rn((float)code, sm.x), sm.y);
  }
}

// out[r] = (H / sqrt(d)) in[r] for every d-long row, by the definition H[i][j] = (-1)^popcount(i&j).
extern "C" __global__ void lq_ref_rotate_rows(const float* in, float* out, long long rows, int d) {
  const long long total = rows * d;
  const float norm = 1.f / sqrtf((float)d);
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    const int c = (int)(i % d);
    const float* x = in + (i / d) * d;
    float s = 0.f;
    for (int j = 0; j < d; ++j) s += (__popc(c & j) & 1) ? -x[j] : x[j];
    out[i] = s * norm;
  }
}

// Textbook attention, one thread per output element (b, query head, channel): softmax over the
// sequence's quantized rows (dequantized, in the original space, f32 [n_kv][Nq][d]) followed by
// its full-precision rows (f32 [n_kv][Nd][d]), each with per-sequence start/len.
extern "C" __global__ void lq_ref_attention(const float* q, const float* kq, const float* vq, const int* q_start,
                                            const int* q_len, long long nq, const float* kd, const float* vd,
                                            const int* d_start, const int* d_len, long long nd, int batch,
                                            int n_q, int n_kv, int d, float softmax_scale, float* out) {
  const long long total = (long long)batch * n_q * d;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    const int c = (int)(i % d);
    const long long bh = i / d;
    const int hq = (int)(bh % n_q), b = (int)(bh / n_q);
    const int kvh = hq / (n_q / n_kv);
    const float* qr = q + bh * d;
    float m = -INFINITY;
    for (int pass = 0; pass < 2; ++pass) {  // 0: the max; 1: the sum and the output
      float sum = 0.f, o = 0.f;
      for (int part = 0; part < 2; ++part) {
        const float* kk = part == 0 ? kq : kd;
        const float* vv = part == 0 ? vq : vd;
        const long long stride = part == 0 ? nq : nd;
        const int s0 = part == 0 ? q_start[b] : d_start[b];
        const int n = part == 0 ? q_len[b] : d_len[b];
        for (int t = 0; t < n; ++t) {
          const long long row = (long long)kvh * stride + s0 + t;
          float dot = 0.f;
          for (int j = 0; j < d; ++j) dot += qr[j] * kk[row * d + j];
          const float score = dot * softmax_scale;
          if (pass == 0) {
            m = fmaxf(m, score);
          } else {
            const float e = expf(score - m);
            sum += e;
            o += e * vv[row * d + c];
          }
        }
      }
      if (pass == 1) out[i] = sum > 0.f ? o / sum : 0.f;
    }
  }
}
