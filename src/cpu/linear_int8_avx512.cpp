// The int8 LUT GEMV (LinearOptions::arithmetic == int8) for AVX-512 with VNNI and BITALG. Built with
// those instruction sets for this file only (CMakeLists.txt); called only after the dispatcher has
// checked the CPU has them. docs/cpu-kernels.md ("int8 path") explains the arithmetic.
//
// Why it is faster than the exact kernel: a 16-entry byte table sits in every 128-bit lane of a
// register, so one vpshufb turns 64 indices into 64 int8 codebook values, and one vpdpbusd multiplies
// them with 64 int8 activations and accumulates in int32 — about 64 weights per three instructions,
// where the exact kernel spends a shift, a vpermps and an FMA per 16.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#include "linear_kernel.hpp"

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || !defined(__AVX512VNNI__) || \
    !defined(__AVX512BITALG__)
#error "linear_int8_avx512.cpp must be compiled with -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mavx512bitalg"
#endif

namespace nuq::cpu::detail {
namespace {

inline float h2f(uint16_t h) { return _cvtsh_ss(h); }

#include "linear_kernel.inl"

constexpr int kMaxTile = 8;  // batch rows per pass: 8 float accumulators + the decoded vectors

// The row's codebook for group g as unsigned bytes q + 128 in every 128-bit lane (vpshufb looks up
// within lanes), and its scale s. q = round-to-nearest-even(c / s), as linear_int8_ref computes it;
// the +128 makes the table unsigned for vpdpbusd, and the dispatcher's xoffset removes it again.
template <int BITS>
inline __m512i int8_table(const uint16_t* lut, float* scale) {
  constexpr int E = 1 << BITS;
  const __m512 c = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(__mmask16((1u << E) - 1), lut));
  const float s = int8_codebook_scale(_mm512_reduce_max_ps(_mm512_abs_ps(c)));
  *scale = s;
  const __m128i q = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_div_ps(c, _mm512_set1_ps(s))));
  return _mm512_broadcast_i32x4(_mm_xor_si128(q, _mm_set1_epi8(char(0x80))));
}

// The 4 index vectors (bytes 0..2^BITS-1) of block k of a row, in the activation order of Int8Args.
template <int BITS>
inline void decode_block(const KernelArgs& a, const uint8_t* row, int64_t k, __m512i idx[4]) {
  constexpr int LO = BITS == 4 ? 128 : 64;  // low-plane bytes per 256 columns
  const int64_t lo_bytes = a.padded * (BITS == 4 ? 4 : 2) / 8;
  // The last block may extend past the row (rows are padded to 64 columns only): masked loads read what
  // is there and zeros beyond (masked-off bytes are never touched, so they cannot fault); those columns
  // meet zero activations.
  const int64_t avail = lo_bytes - k * LO;
  auto load64 = [](const uint8_t* p, int64_t n) {
    return n >= 64 ? _mm512_loadu_si512(p)
                   : _mm512_maskz_loadu_epi8(n <= 0 ? __mmask64(0) : (~__mmask64(0)) >> (64 - n), p);
  };
  const uint8_t* lo = row + k * LO;
  const __m512i low4 = _mm512_set1_epi8(0x0F), low2 = _mm512_set1_epi8(0x03);
  if constexpr (BITS == 4) {
    for (int h = 0; h < 2; ++h) {
      const __m512i w = load64(lo + 64 * h, avail - 64 * h);
      idx[2 * h] = _mm512_and_si512(w, low4);
      idx[2 * h + 1] = _mm512_and_si512(_mm512_srli_epi16(w, 4), low4);
    }
  } else {
    const __m512i w = load64(lo, avail);
    idx[0] = _mm512_and_si512(w, low2);
    idx[1] = _mm512_and_si512(_mm512_srli_epi16(w, 2), low2);
    idx[2] = _mm512_and_si512(_mm512_srli_epi16(w, 4), low2);
    idx[3] = _mm512_and_si512(_mm512_srli_epi16(w, 6), low2);
  }
  if constexpr (BITS == 3) {
    // The top bits of these 256 columns are 32 bytes of the 1-bit plane; word q covers the columns of
    // lanes 2q and 2q+1 (bits 0-15 and 16-31). Widened to one word per 64-bit lane, vpshufbitqmb picks
    // for each index byte its column's bit: byte j of lane 2q (resp. 2q+1) in vector t holds column
    // 4j + t of that lane, i.e. bit 4j + t (resp. 16 + 4j + t) of the word.
    const uint8_t* hi = row + a.padded / 4 + k * 32;
    const int64_t hi_avail = a.padded / 8 - k * 32;
    const __m256i hi_bytes =
        hi_avail >= 32 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi))
                       : _mm256_maskz_loadu_epi8(__mmask32((uint64_t(1) << hi_avail) - 1), hi);
    const __m512i words = _mm512_cvtepu32_epi64(hi_bytes);
    const __m512i four = _mm512_set1_epi8(4);
    for (int t = 0; t < 4; ++t) {
      // Per 64-bit lane: bytes 0-3 select bits 4j + t, bytes 4-7 bits 16 + 4j + t.
      const __m512i select = _mm512_add_epi8(_mm512_set1_epi64(0x1C1814100C080400LL), _mm512_set1_epi8(char(t)));
      const __mmask64 top = _mm512_bitshuffle_epi64_mask(words, select);
      idx[t] = _mm512_mask_add_epi8(idx[t], top, idx[t], four);
    }
  }
}

// Rows [r, r+1) for batch rows [b0, b0 + BT): per block, the 4 looked-up vectors meet each batch row's
// 4 activation vectors in vpdpbusd (exact int32: at most 16 products of 255·127 per lane), then one
// conversion and FMA with the block's scale d·s. The row result is that sum minus s·xoffset, which
// takes the +128 of the table out again (Σ (q+128)·xq·d = Σ q·xq·d + 128·Σ xq·d).
template <int BITS, int BT>
inline void gemv_row_int8(const Int8Args& g, int64_t r, int64_t b0, float* out) {
  const KernelArgs& a = g.layer;
  constexpr int E = 1 << BITS;
  const uint8_t* row = a.qweight + r * a.stride;
  __m512 acc[BT];
  float offset[BT];
  for (int b = 0; b < BT; ++b) {
    acc[b] = _mm512_setzero_ps();
    offset[b] = 0.0f;
  }
  for (int64_t grp = 0; grp < a.groups; ++grp) {
    float s;
    const __m512i table = int8_table<BITS>(a.lut + (r * a.groups + grp) * E, &s);
    for (int b = 0; b < BT; ++b) offset[b] += s * g.xoffset[(b0 + b) * a.groups + grp];
    const int64_t k0 = grp * g.blocks_per_group;
    const int64_t k1 = k0 + g.blocks_per_group < g.blocks ? k0 + g.blocks_per_group : g.blocks;
    for (int64_t k = k0; k < k1; ++k) {
      // Every cache line of the weights is requested ~16 KiB ahead, as in the exact kernel
      // (docs/cpu-kernels.md): the hardware prefetchers alone leave the loads waiting on DRAM.
      const uint8_t* ahead = row + k * (BITS == 4 ? 128 : 64) + 16384;
      __builtin_prefetch(ahead, 0, 3);
      if constexpr (BITS == 4) __builtin_prefetch(ahead + 64, 0, 3);
      if constexpr (BITS == 3)
        if (k % 2 == 0) __builtin_prefetch(row + a.padded / 4 + k * 32 + 8192, 0, 3);
      __m512i idx[4];
      decode_block<BITS>(a, row, k, idx);
      __m512i v[4];
      for (int t = 0; t < 4; ++t) v[t] = _mm512_shuffle_epi8(table, idx[t]);
      for (int b = 0; b < BT; ++b) {
        const int8_t* xq = g.xq + ((b0 + b) * g.blocks + k) * 256;
        // Two independent chains halve the dependent vpdpbusd latency per block.
        __m512i i0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v[0], _mm512_loadu_si512(xq));
        __m512i i1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v[1], _mm512_loadu_si512(xq + 64));
        i0 = _mm512_dpbusd_epi32(i0, v[2], _mm512_loadu_si512(xq + 128));
        i1 = _mm512_dpbusd_epi32(i1, v[3], _mm512_loadu_si512(xq + 192));
        const float scale = s * g.xscale[(b0 + b) * g.blocks + k];
        acc[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(i0, i1)), _mm512_set1_ps(scale), acc[b]);
      }
    }
  }
  for (int b = 0; b < BT; ++b) out[b] = _mm512_reduce_add_ps(acc[b]) - offset[b];
}

template <int BITS, int BT>
void gemv_tile_int8(const Int8Args& g, int64_t r0, int64_t r1, int64_t b0) {
  const KernelArgs& a = g.layer;
  for (int64_t r = r0; r < r1; ++r) {
    float sum[BT];
    gemv_row_int8<BITS, BT>(g, r, b0, sum);
    if (a.nnz > 0) {
      for (int64_t k = a.row_ptr[r]; k < a.row_ptr[r + 1]; ++k) {
        const float v = h2f(a.values[k]);
        const int64_t c = sparse_column(a, k);
        for (int b = 0; b < BT; ++b) sum[b] += v * a.x[(b0 + b) * a.ldx + c];
      }
    }
    for (int b = 0; b < BT; ++b) a.y[(b0 + b) * a.ldy + r] = sum[b];
  }
}

template <int BITS, int... T>
inline void int8_tile_switch(int bt, std::integer_sequence<int, T...>, const Int8Args& g, int64_t r0, int64_t r1,
                             int64_t b0) {
  const bool done = ((bt == T + 1 ? (gemv_tile_int8<BITS, T + 1>(g, r0, r1, b0), true) : false) || ...);
  if (!done) kernel_unsupported("int8 batch tile", bt);
}

}  // namespace

void gemv_rows_int8_avx512(const Int8Args& g, int64_t r0, int64_t r1) {
  with_bits(g.layer.bits, [&](auto bc) {
    constexpr int BITS = decltype(bc)::value;
    for (int64_t b0 = 0; b0 < g.layer.batch; b0 += kMaxTile) {
      const int bt = int(g.layer.batch - b0 < kMaxTile ? g.layer.batch - b0 : kMaxTile);
      int8_tile_switch<BITS>(bt, std::make_integer_sequence<int, kMaxTile>{}, g, r0, r1, b0);
    }
  });
}

}  // namespace nuq::cpu::detail
