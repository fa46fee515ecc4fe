// KV-cache quantization (KVQuant style) and decode attention over the quantized cache on the CPU.
//
// Keys are quantized before RoPE with per-channel scale/offset fitted offline, values with a per-token
// scale/offset computed online; both map onto one non-uniform 2/3/4-bit datatype (a codebook fitted by
// weighted 1-D k-means) per layer. A fixed number of outliers per token vector is kept in fp16 slots,
// and the first `sink_tokens` tokens of every sequence stay in fp16. docs/kv-cache.md documents the
// algorithm and the byte layout of a cached token bit for bit.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "nuq/linear_cpu.hpp"  // cpu::Isa
#include "nuq/llama.hpp"       // RopeLayout

namespace nuq::kv {

// ---------------------------------------------------------------------------------------------------
// RoPE
// ---------------------------------------------------------------------------------------------------

enum class RopeScaling { none, linear, ntk };

struct Rope {
  RopeLayout layout = RopeLayout::half_split;
  double theta = 10000.0;
  RopeScaling scaling = RopeScaling::none;
  double factor = 1.0;  // linear: positions divided by it; ntk: theta multiplied by factor^(d/(d-2))
};

// cos and sin of the rotation angle of pair i (0 <= i < head_dim/2) at positions pos0 .. pos0 + n - 1:
// cos_out[t * half + i], sin_out[t * half + i]. Angles are reduced in double precision from the block's
// first position and advanced by exact per-offset steps, so positions past 10^9 keep ~1e-7 accuracy.
// The kernels use the same double-precision base with fp32 steps (docs/kv-cache.md, "RoPE at read time").
void rope_cos_sin(const Rope& rope, int64_t head_dim, int64_t pos0, int64_t n, float* cos_out, float* sin_out);

// ---------------------------------------------------------------------------------------------------
// Calibration
// ---------------------------------------------------------------------------------------------------

struct CalibrationOptions {
  int bits_k = 3, bits_v = 3;       // 2, 3 or 4
  double outlier_fraction = 0.01;   // per token vector, kept in fp16: ceil(fraction * head_dim) slots
  int sink_tokens = 1;              // first tokens of each sequence kept in fp16
  bool q_norm = false;              // match mean and std of the dequantized datatype to the data
  int kmeans_iterations = 50;
};

// Calibration of one layer. Channels are in the model's order (the order of the K projection output).
struct LayerCalibration {
  int64_t n_kv_heads = 0, head_dim = 0;
  int bits_k = 0, bits_v = 0;
  std::vector<float> k_scale, k_offset;  // [n_kv_heads * head_dim]: normalized key = (k - offset) / scale
  std::vector<float> k_codebook, v_codebook;  // 2^bits values each, ascending, over normalized values
};

struct Calibration {
  double outlier_fraction = 0.01;
  int sink_tokens = 1;
  bool q_norm = false;
  std::vector<LayerCalibration> layers;

  // Outlier slots per (token, kv head) vector: ceil(outlier_fraction * head_dim).
  int outlier_slots(int64_t head_dim) const;
};

// Fits one layer from sample pre-RoPE keys and values k, v: [tokens, n_kv_heads, head_dim] row-major.
// k_sens / v_sens (nullable, same shape, >= 0) weight the k-means (e.g. squared gradients). Throws
// Errc::invalid_argument naming the first non-finite sample or bad option.
LayerCalibration calibrate_layer(const float* k, const float* v, const float* k_sens, const float* v_sens,
                                 int64_t tokens, int64_t n_kv_heads, int64_t head_dim,
                                 const CalibrationOptions& options);

// safetensors: layers.<l>.k_scale, .k_offset ([n_kv_heads, head_dim] F32), .k_codebook, .v_codebook
// (F32), metadata format=nuq-kv-calibration/1, layers, outlier_fraction, sink_tokens, q_norm.
void save_calibration(const Calibration& calibration, const std::string& path);
Calibration load_calibration(const std::string& path);  // validates shapes; throws Errc::invalid_file

// ---------------------------------------------------------------------------------------------------
// Paged cache of one layer
// ---------------------------------------------------------------------------------------------------

struct CacheOptions {
  int block_tokens = 32;  // tokens per page; a multiple of 8
  Rope rope;
};

// Byte sizes of one cached token of one kv head (docs/kv-cache.md, "Per-token layout").
struct TokenLayout {
  int64_t head_dim = 0;
  int bits_k = 0, bits_v = 0, slots = 0;
  int64_t k_index_bytes = 0;   // head_dim * bits_k / 8
  int64_t k_bytes = 0;         // indices + slots * 3
  int64_t v_index_bytes = 0;
  int64_t v_bytes = 0;         // indices + 4 (fp16 scale, offset) + slots * 3
  int64_t token_bytes() const { return k_bytes + v_bytes; }
};
TokenLayout token_layout(int64_t head_dim, int bits_k, int bits_v, int slots);

class LayerCache {
 public:
  // head_dim must be 64, 80, 96 or 128 (the kernels are specialized for those).
  LayerCache(const LayerCalibration& calibration, const Calibration& common, const CacheOptions& options);
  ~LayerCache();
  LayerCache(LayerCache&&) noexcept;
  LayerCache& operator=(LayerCache&&) noexcept;

  // A new empty sequence; returns its id. Freed sequences' ids and pages are reused.
  int add_sequence();
  void free_sequence(int seq);
  int64_t length(int seq) const;

  // Appends n tokens of pre-RoPE keys and values [n, n_kv_heads, head_dim] (model channel order) at
  // positions length .. length + n - 1, quantizing them (n == 1: decode; n > 1: prefill, spread over
  // `threads`). Pages are allocated as needed.
  void append(int seq, const float* k, const float* v, int64_t n, int threads = 1);

  // Dequantized pre-RoPE keys and values of a sequence, [length, n_kv_heads, head_dim] each, in model
  // channel order (for tests and error measurements).
  void dequantize(int seq, float* k, float* v) const;

  // Replaces keys and values [n, n_kv_heads, head_dim] (pre-RoPE, model order) at positions pos0 ..
  // by what the cache would return for them: encoded and decoded exactly as append() + dequantize()
  // would (fp16 for positions below sink_tokens). For quality evaluation inside a decoder.
  void roundtrip(int64_t pos0, int64_t n, float* k, float* v) const;

  int64_t n_kv_heads() const;
  int64_t head_dim() const;
  const TokenLayout& layout() const;
  const Rope& rope() const;
  int sink_tokens() const;
  int block_tokens() const;
  // Every byte a token occupies in the pages, all kv heads (metadata included); the sink tokens' fp16
  // copies and the per-layer calibration are per sequence / per layer and reported separately.
  int64_t bytes_per_token() const;
  int64_t allocated_bytes() const;  // pages in use plus sink copies

  // Host copies of everything a device kernel reads for a batch (include/nuq/kv_cuda.hpp): the page
  // pool, the batch's block tables and lengths, sink copies, calibration in storage order, and the
  // RoPE frequencies. For uploading to a GPU and for tests.
  struct Export {
    std::vector<uint8_t> pages;  // every page of the pool, page_stride bytes each
    int64_t page_stride = 0;  // page bytes + 8, rounded up to a multiple of 16
    std::vector<int32_t> block_tables;  // [batch][max_blocks]
    int64_t max_blocks = 0;
    std::vector<int32_t> lengths;
    std::vector<uint16_t> sink_k, sink_v;  // [batch][sink_tokens][n_kv_heads][head_dim]
    std::vector<float> k_scale, k_offset, k_codebook, v_codebook;  // codebooks padded to 16
    std::vector<int32_t> storage;
    std::vector<double> rope_freq;  // [head_dim / 2] angle per position of each pair
    // RoPE as fp32 rotations, for devices without fast double precision: cos/sin of every pair at the
    // first position of each page up to the batch's longest sequence ([pages][head_dim / 2], formed in
    // double on the host), and at each offset 0 .. block_tokens - 1 ([block_tokens][head_dim / 2]). The
    // rotation at position t is the complex product of page t / block_tokens and offset t % block_tokens.
    std::vector<float> rope_page_cos, rope_page_sin, rope_step_cos, rope_step_sin;
  };
  Export export_pages(std::span<const int> seqs) const;

  struct Impl;
  const Impl& impl() const { return *impl_; }

 private:
  std::unique_ptr<Impl> impl_;
};

// ---------------------------------------------------------------------------------------------------
// Decode attention
// ---------------------------------------------------------------------------------------------------

struct AttentionOptions {
  int threads = 0;               // 0 = all hardware threads; results do not depend on it
  std::optional<cpu::Isa> isa;   // force an implementation (scalar = the reference)
  float scale = 0;               // 0 = 1/sqrt(head_dim)
  bool query_has_rope = false;   // q already rotated to its position (else rotated here)
  int split_tokens = 1024;       // context split per task (a multiple of the page size); fixed, so
                                 // the merge order, hence the result, does not depend on threads
  // Quantized cache only. Empty: each row attends to its whole sequence. Else one entry per batch row:
  // row b attends to the first lengths[b] tokens of seqs[b] (1 <= lengths[b] <= length(seqs[b])), its
  // query at position lengths[b] - 1. Rows may name the same sequence, so that one call serves every
  // query of a causal prefill (rows pos0 + 1 .. pos0 + n over one sequence of pos0 + n tokens).
  std::span<const int64_t> lengths;
};

// One decode step for a batch: sequence seqs[b] attends with query q[b] ([n_heads, head_dim], model
// channel order, pre-RoPE unless query_has_rope; its position is length(seqs[b]) - 1, or
// options.lengths[b] - 1) to all its cached tokens (or the first options.lengths[b]).
// out: [batch, n_heads, head_dim] fp32. n_heads must be a multiple of n_kv_heads (GQA).
void decode_attention(const LayerCache& cache, std::span<const int> seqs, const float* q, int64_t n_heads,
                      float* out, const AttentionOptions& options = {});
// The same with bf16 query and output.
void decode_attention_bf16(const LayerCache& cache, std::span<const int> seqs, const uint16_t* q,
                           int64_t n_heads, uint16_t* out, const AttentionOptions& options = {});

// The scalar reference: dequantizes each token, applies RoPE with angles from std::cos/sin in double at
// each position, softmax and accumulation in double. Slow; the ground truth for the kernels.
void decode_attention_reference(const LayerCache& cache, std::span<const int> seqs, const float* q,
                                int64_t n_heads, float* out, const AttentionOptions& options = {});

// Unquantized baseline (our own kernel): keys already rotated, K and V of sequence b, kv head h, token t
// at k + b * seq_stride + h * head_stride + t * head_dim (elements). T = float or bf16 (uint16_t).
struct DenseKv {
  const void* k = nullptr;
  const void* v = nullptr;
  bool bf16 = false;
  int64_t n_kv_heads = 0, head_dim = 0;
  int64_t seq_stride = 0, head_stride = 0;
};
// q: [batch, n_heads, head_dim] already rotated; lengths[b] tokens per sequence.
void dense_decode_attention(const DenseKv& kv, std::span<const int64_t> lengths, const float* q, int64_t n_heads,
                            float* out, const AttentionOptions& options = {});

}  // namespace nuq::kv
