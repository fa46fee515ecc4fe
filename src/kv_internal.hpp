// Internal pieces of the KV cache shared by the cache, the calibration and the attention dispatcher
// (docs/kv-cache.md describes the layout these implement).
#pragma once

#include <cstdint>
#include <vector>

#include "nuq/kv_cache.hpp"

namespace nuq::kv::detail {

// RoPE angles for one geometry: per-pair frequencies (scaling folded in) and the exact rotations of the
// offsets 0 .. chunk - 1, so that a chunk's table costs one double-precision sin/cos per pair at its
// first position plus one complex product per entry.
class RopeTable {
 public:
  RopeTable() = default;
  RopeTable(const Rope& rope, int64_t head_dim, int64_t chunk);
  // cos/sin [n][half] for positions pos0 .. pos0 + n - 1, n <= chunk.
  void fill(int64_t pos0, int64_t n, float* cos_out, float* sin_out) const;
  int64_t chunk() const { return chunk_; }
  const std::vector<double>& freq() const { return freq_; }
  // The kernels' path: the rotation at pos0 in double (bc, bs [half]), advanced a chunk at a time by
  // advance() (exact double rotations by chunk * f: after 32 chunks the error is ~1e-14 rad), and the
  // per-offset rotations in fp32 (step_cos/step_sin [chunk][half]) that the kernels multiply it by.
  void base(int64_t pos0, double* bc, double* bs) const;
  void advance(double* bc, double* bs) const;
  // Rows of step_cos/step_sin (and the kernels' cos/sin tables) are padded to a multiple of 16.
  int64_t padded_half() const { return (half_ + 15) / 16 * 16; }
  const float* step_cos() const { return step_cf_.data(); }
  const float* step_sin() const { return step_sf_.data(); }
  // The same fp32 steps transposed, [padded_half()][step_stride()] (offsets of one pair contiguous,
  // zero past the chunk), for kernels that hold 16 positions of one pair in a register.
  int64_t step_stride() const { return (chunk_ + 15) / 16 * 16; }
  const float* step_cos_t() const { return step_cft_.data(); }
  const float* step_sin_t() const { return step_sft_.data(); }

 private:
  int64_t half_ = 0, chunk_ = 0;
  std::vector<double> freq_;            // angle per unit position of pair i
  std::vector<double> step_c_, step_s_;  // [chunk][half]: rotation by offset t
  std::vector<float> step_cf_, step_sf_;
  std::vector<float> step_cft_, step_sft_;
  std::vector<double> jump_c_, jump_s_;  // [half]: rotation by chunk
};

// Per-pair frequencies computed straight from the definition (theta^(-2i/d), NTK base change, linear
// position division folded in as a frequency division).
std::vector<double> rope_frequencies(const Rope& rope, int64_t head_dim);

// Model channels of RoPE pair i: (i, i + half) for half-split, (2i, 2i + 1) for interleaved.
inline void pair_channels(RopeLayout layout, int64_t half, int64_t i, int64_t& a, int64_t& b) {
  a = layout == RopeLayout::interleaved ? 2 * i : i;
  b = layout == RopeLayout::interleaved ? 2 * i + 1 : i + half;
}

// Storage order of key channels: pair i = 8 * blk + r sits at storage 16 * blk + r (its first member)
// and 16 * blk + 8 + r (its partner). storage[p] = model channel at storage position p.
std::vector<int> key_storage_order(RopeLayout layout, int64_t head_dim);

// The `slots` entries of x[0 .. n) with the largest |x[i] - center|, ties to the lower index, written
// ascending by index to out.
void select_outliers(const float* x, int64_t n, float center, int slots, int* out);

// Index of the nearest codebook entry (ascending codebook of k entries; ties to the lower entry).
int nearest_entry(const float* codebook, int k, float x);

// Per-token value normalization: offset and scale (both rounded to fp16, returned as their bits) from
// the minimum and maximum of v over the non-outlier channels; `outlier` flags the outlier channels.
void value_normalization(const float* v, int64_t n, const bool* outlier, uint16_t& scale16, uint16_t& offset16);


}  // namespace nuq::kv::detail

namespace nuq::kv {

struct LayerCache::Impl {
  int64_t n_kv = 0, hd = 0;
  int bits_k = 0, bits_v = 0, slots = 0, sink = 0, block_tokens = 0;
  Rope rope;
  TokenLayout lay;
  std::vector<int> storage;          // storage position -> model channel (keys)
  std::vector<float> k_scale, k_offset;  // [n_kv][hd], storage order
  float k_cb[16] = {}, v_cb[16] = {};    // codebooks padded to 16 with their last entry
  // Dequantized key per (kv head, storage channel, 16-entry index): fma(k_cb[j mod 2^bits_k], scale,
  // offset), the decoder's own expression. Indexed by the low 4 bits of a word whose upper bits may hold
  // the next channel's index, so entry j repeats entry j mod 2^bits_k.
  // [n_kv][hd][16] from the first 64-byte boundary of k_lut_storage: rows are one cache line (an
  // unaligned 64-byte load costs two).
  std::vector<float> k_lut_storage;
  float* k_lut() { return align64(k_lut_storage.data()); }
  const float* k_lut() const { return align64(k_lut_storage.data()); }
  template <class T>
  static T* align64(T* p) {
    return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));
  }
  int64_t page_bytes = 0, v_region = 0;
  detail::RopeTable table;

  struct Seq {
    bool live = false;
    int64_t len = 0;
    std::vector<int32_t> blocks;
    std::vector<uint16_t> sink_k, sink_v;  // [sink][n_kv][hd] fp16: K storage order, V model order
  };
  std::vector<std::vector<uint8_t>> pages;
  std::vector<int32_t> free_pages;
  std::vector<Seq> seqs;
  std::vector<int> free_seqs;

  const Seq& seq(int id) const;
  const uint8_t* k_record(const Seq& s, int64_t h, int64_t t) const {
    return pages[size_t(s.blocks[size_t(t / block_tokens)])].data() + (h * block_tokens + t % block_tokens) * lay.k_bytes;
  }
  const uint8_t* v_record(const Seq& s, int64_t h, int64_t t) const {
    return pages[size_t(s.blocks[size_t(t / block_tokens)])].data() + v_region +
           (h * block_tokens + t % block_tokens) * lay.v_bytes;
  }
  // Decodes token t of kv head h to fp32 in model channel order (the sink's fp16 copy for t < sink).
  void dequantize_token(const Seq& s, int64_t h, int64_t t, float* k, float* v) const;
  // Decodes one K record and one V record of kv head h (model order).
  void decode_records(int64_t h, const uint8_t* kr, const uint8_t* vr, float* k, float* v) const;
};

}  // namespace nuq::kv
