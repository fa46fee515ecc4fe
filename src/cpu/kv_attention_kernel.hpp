// Internal interface between the KV decode-attention dispatcher (src/kv_attention.cpp, baseline x86-64)
// and the kernels built for AVX2 / AVX-512 (src/cpu/kv_attention_avx2.cpp, kv_attention_avx512.cpp).
// Plain fields only, for the reason src/cpu/linear_kernel.hpp gives: the wide-ISA units must not emit
// inline functions of shared headers.
#pragma once

#include <cstdint>

namespace nuq::kv::detail {

// Scores of at most this many tokens per chunk are kept (the page size and the dense chunk are checked
// against it).
constexpr int64_t kMaxChunkTokens = 256;

// One page-sized chunk of one sequence, all kv heads: updates the running softmax state (m, l, acc)
// of every query head with tokens t0 .. t0 + n - 1 (n <= the page size, all in one page).
struct ChunkArgs {
  // Quantized cache (src/kv_cache.cpp documents the page layout).
  const uint8_t* page;  // the page holding the chunk; tokens at page offsets t_in_page .. + n - 1
  int64_t t_in_page;
  const uint8_t* next_page;  // the page of the next chunk (a prefetch hint; may be null)
  int64_t n_kv, head_dim, block_tokens;
  int64_t k_bytes, v_bytes, k_index_bytes, v_index_bytes, v_region;  // v_region: offset of the V records
  int slots, bits_k, bits_v;
  const float* k_scale;   // [n_kv][head_dim], storage order
  const float* k_offset;
  const float* k_cb;      // 16 floats (codebook padded)
  const float* k_lut;     // [n_kv][head_dim][16] dequantized key per index (kv_internal.hpp, Impl::k_lut)
  const float* v_cb;
  // fp16 sink tokens [sink][n_kv][head_dim] (K in storage order, V in model order), positions < sink_len.
  const uint16_t* sink_k;
  const uint16_t* sink_v;
  int64_t sink_len;
  // Dense baseline instead of the quantized cache: K (rotated, model order) and V of kv head h, chunk
  // token i at dense_k + h * dense_head_stride + i * head_dim; bf16 when dense_bf16.
  const void* dense_k;
  const void* dense_v;
  int64_t dense_head_stride;
  bool dense_bf16;

  int64_t t0, n;            // positions of the chunk
  // RoPE of the chunk (quantized path only): rotation at t0 (fp32, [hp], pair order) and the per-offset
  // rotations [block_tokens][hp], hp = head_dim / 2 rounded up to 16 (zero padded); the kernel forms
  // cos/sin of t0 + i by one complex product each.
  const float* base_cos;
  const float* base_sin;
  const float* step_cos;
  const float* step_sin;
  // The steps transposed, [hp][step_stride]: offset i of pair p at p * step_stride + i.
  const float* step_cos_t;
  const float* step_sin_t;
  int64_t step_stride;
  const float* q;           // [n_heads][head_dim], storage order (quantized) or model order (dense), rotated
  // Quantized path: q_partner[p] = q[p + 8] for the first member p of a pair, -q[p - 8] for its partner,
  // so that a key residual d at storage channel p moves the score by d (cos q[p] + sin q_partner[p]).
  const float* q_partner;
  int64_t n_heads;
  float scale;
  float* m;                 // [n_heads] running max of scaled scores
  float* l;                 // [n_heads] running sum of exp
  float* acc;               // [n_heads][head_dim] running weighted V sum, model order
  float* scratch;           // kernel_scratch_floats() in src/kv_attention.cpp
  // State kept across the chunks of one task (AVX-512 quantized path): task_state_floats_avx512()
  // floats, initialized by the chunk with first_chunk set and folded into acc by finish_task_avx512().
  float* vout;
  bool first_chunk;
};

void chunk_avx512(const ChunkArgs& a);
int64_t task_state_floats_avx512(int64_t n_kv, int64_t head_dim, int64_t n_heads);
void finish_task_avx512(const ChunkArgs& a);
void chunk_avx2(const ChunkArgs& a);
void dense_chunk_avx512(const ChunkArgs& a);
void dense_chunk_avx2(const ChunkArgs& a);

}  // namespace nuq::kv::detail
