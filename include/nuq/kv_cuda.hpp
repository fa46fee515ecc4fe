// CUDA decode attention over the quantized KV cache (docs/kv-cache.md): split-K flash decoding, one
// kernel for the splits and one that merges them, over the same page layout as the CPU cache
// (LayerCache::export_pages gives the host side of every array below). Launchers follow
// include/nuq/cuda.hpp: device pointers, shapes and a stream in, a Status out, no host round trip.
//
// Status: run in CI emulated on the CPU (docs/cuda-kernels.md, "Emulated runs"), NOT yet run on a GPU.
#pragma once

#include <cstdint>

#include "nuq/cuda.hpp"

namespace nuq::cuda {

struct KvDeviceCache {
  const uint8_t* pages = nullptr;  // page i at pages + i * page_stride
  int64_t page_stride = 0;
  const int32_t* block_tables = nullptr;  // [batch][max_blocks] page numbers
  int64_t max_blocks = 0;
  const int32_t* lengths = nullptr;  // [batch] tokens per sequence (>= 1)
  const uint16_t* sink_k = nullptr;  // [batch][sink_tokens][n_kv_heads][head_dim] fp16, K in storage order
  const uint16_t* sink_v = nullptr;
  int sink_tokens = 0;
  int n_kv_heads = 0, head_dim = 0, block_tokens = 0, bits_k = 0, bits_v = 0, slots = 0;
  const float* k_scale = nullptr;   // [n_kv_heads][head_dim], storage order
  const float* k_offset = nullptr;
  const float* k_codebook = nullptr;  // 16 floats (padded)
  const float* v_codebook = nullptr;
  const int32_t* storage = nullptr;   // [head_dim] model channel at each key storage position
  // RoPE as fp32 rotations (LayerCache::Export::rope_page_cos ...): no double precision on the device,
  // which most GPUs run at 1/32-1/64 rate. rope_pages * block_tokens must cover every length.
  const float* rope_page_cos = nullptr;  // [rope_pages][head_dim / 2]
  const float* rope_page_sin = nullptr;
  int64_t rope_pages = 0;
  const float* rope_step_cos = nullptr;  // [block_tokens][head_dim / 2]
  const float* rope_step_sin = nullptr;
};

// Scratch the launcher needs for the split partials.
int64_t kv_decode_workspace_bytes(int batch, int n_heads, int head_dim, int max_length, int split_tokens);

Status can_implement_kv_decode(const KvDeviceCache& cache, int batch, int n_heads, int max_length, int split_tokens,
                               int64_t workspace_bytes);

// q: [batch][n_heads][head_dim] fp16 or bf16 (`type`), model channel order, pre-RoPE (rotated here to
// position length - 1); out: the same shape and type. max_length bounds every lengths[b] (it sizes the
// grid).
Status kv_decode_attention(const KvDeviceCache& cache, int batch, int n_heads, const uint16_t* q, uint16_t* out,
                           float scale, int max_length, int split_tokens, void* workspace, int64_t workspace_bytes,
                           cudaStream_t stream, ActivationType type = ActivationType::f16);

// The unquantized baseline (our own fp16/bf16 flash-decoding kernel, for benchmarks): keys already
// rotated, K and V of sequence b, kv head h, token t at k + b * seq_stride + h * head_stride + t * head_dim
// (elements of `type`, 16-byte aligned, strides multiples of 8); lengths [batch] on the device.
struct DenseKvDevice {
  const uint16_t* k = nullptr;
  const uint16_t* v = nullptr;
  int64_t seq_stride = 0, head_stride = 0;
  int n_kv_heads = 0, head_dim = 0;
  const int32_t* lengths = nullptr;
};

Status can_implement_dense_kv_decode(const DenseKvDevice& kv, int batch, int n_heads, int max_length, int split_tokens,
                                     int64_t workspace_bytes);

// q: [batch][n_heads][head_dim] already rotated; out: the same shape; both of `type`. Workspace as
// kv_decode_workspace_bytes.
Status dense_kv_decode_attention(const DenseKvDevice& kv, int batch, int n_heads, const uint16_t* q, uint16_t* out,
                                 float scale, int max_length, int split_tokens, void* workspace, int64_t workspace_bytes,
                                 cudaStream_t stream, ActivationType type = ActivationType::f16);

}  // namespace nuq::cuda
