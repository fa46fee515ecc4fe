// AVX-512 (F/BW/VL + F16C) KV decode-attention kernels: the dense baseline through the shared
// channel-parallel skeleton (kv_attention_kernel.inl), and a token-parallel kernel over the quantized
// cache (below) in which a register holds one channel of 16 tokens.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "kv_attention_kernel.hpp"

namespace nuq::kv::detail {
namespace {

struct Avx512 {
  static constexpr int64_t L = 16;
  using V = __m512;
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V zero() { return _mm512_setzero_ps(); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V fmsub(V a, V b, V c) { return _mm512_fmsub_ps(a, b, c); }
  static float hsum(V v) { return _mm512_reduce_add_ps(v); }
  // The four horizontal sums of a, b, c, d at once (a partial transpose: 11 operations, not 4 x 8).
  static void hsum4(V a, V b, V c, V d, float* out) {
    const V ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    const V cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    V x = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xEE));
    x = _mm512_add_ps(x, _mm512_shuffle_f32x4(x, x, _MM_SHUFFLE(1, 0, 3, 2)));
    x = _mm512_add_ps(x, _mm512_shuffle_f32x4(x, x, _MM_SHUFFLE(2, 3, 0, 1)));
    _mm_storeu_ps(out, _mm512_castps512_ps128(x));
  }
  // e^x: x = n ln2 + r with |r| <= ln2/2, e^r by its degree-6 Taylor polynomial (relative error below
  // 2e-7 there), 2^n by scalef. Inputs below -87 flush towards 0, which softmax weights may.
  static V exp(V x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    x = _mm512_min_ps(x, _mm512_set1_ps(88.0f));
    const V n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
    V p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
  }
  static float exp1(float x) { return _mm_cvtss_f32(_mm512_castps512_ps128(exp(_mm512_set1_ps(x)))); }
  static V load_fp16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static V load_bf16(const uint16_t* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
};

#include "kv_attention_kernel.inl"

// ---- Token-parallel kernel over the quantized cache ----------------------------------------------------
//
// The channel-parallel chunk_impl (kv_attention_kernel.inl, still the AVX2 kernel) spends ~150-200
// cycles per (token, kv head): every key needs its scale/offset FMA, a RoPE shuffle per register and
// horizontal sums for its scores. Here a register holds one channel of 16 tokens of a page instead: the
// 16 key records are loaded whole and transposed (gathers are microcoded and ~5x slower here), a channel
// is then an immediate shift (plus a merge at 3 bits, shared by the two members of a RoPE pair) and one
// vpermps from a per-channel table that already holds fma(codebook, scale, offset), the first two
// outlier residuals are added by masked adds where a lane's slot names the pair, RoPE is a complex
// product per pair with per-position cos/sin vectors, and every query head of the GQA group accumulates
// its 16 scores lane-parallel from the same decoded pair (no horizontal sums). Values stay
// channel-parallel (a token is one row of registers that every query head reads), with the token's
// scale folded into the softmax weight and its offset summed once per head, so that a row is the index
// shift and the codebook permute. A page holds each kv head's records as short runs that the hardware
// prefetcher misses; the kernel prefetches two heads ahead (without it, 1.5x slower at 32k tokens).

// Key records of up to this many 64-byte blocks (4 bits at head_dim 128 with 32 outlier slots is 160 bytes).
constexpr int64_t kMaxRecordPasses = 3;

const __m512i kLaneIds = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);

__mmask16 lanes_below(int64_t k) { return k >= 16 ? __mmask16(0xffff) : __mmask16((1u << k) - 1); }

// Index of channel R of a 16-channel group, for 16 tokens: w0/w1 hold each token's group words
// (docs/kv-cache.md, "Index packing": channel R at bit 2·B·(R % 8) + B·(R / 8)). Only bits 0-3 matter
// (vpermps); the tables repeat every 2^B entries, so bits above the index may hold the next channel's.
template <int B, int R>
__attribute__((always_inline)) inline __m512i key_index(__m512i w0, __m512i w1) {
  constexpr int at = 2 * B * (R % 8) + B * (R / 8);
  if constexpr (at + B <= 32)
    return _mm512_srli_epi32(w0, at);
  else if constexpr (at >= 32)
    return _mm512_srli_epi32(w1, at - 32);
  else  // 3 bits, channel 5: bits 30-32
    return _mm512_or_si512(_mm512_srli_epi32(w0, at), _mm512_slli_epi32(w1, 32 - at));
}

// The first kSlotsInLoop outlier slots of each token are added to the decoded keys inside the pair loop:
// slot s names pair R of the group when pid[s] == R (pid: the channel relative to the group, bit 3
// cleared) and adds da[s] to the first member, db[s] to the partner (one of the two is zero).
constexpr int kSlotsInLoop = 2;

struct SlotRegs {
  __m512i pid[kSlotsInLoop];
  __m512 da[kSlotsInLoop], db[kSlotsInLoop];
};

// RoPE pair R of a storage group (channels R and R + 8), rotated for 16 positions and dotted with the
// query heads' broadcast channels into acc.
template <int BK, int GQ, int NACC, int NS, int R>
__attribute__((always_inline)) inline void key_pair(__m512i w0, __m512i w1, const float* lut, const float* cs,
                                                    const float* sn, int64_t cstride, const float* q, int64_t hd,
                                                    const SlotRegs& sl, __m512 (&acc)[GQ][NACC]) {
  const __m512i ia = key_index<BK, R>(w0, w1), ib = key_index<BK, R + 8>(w0, w1);
  __m512 ka = _mm512_permutexvar_ps(ia, _mm512_loadu_ps(lut + R * 16));
  __m512 kb = _mm512_permutexvar_ps(ib, _mm512_loadu_ps(lut + (R + 8) * 16));
  for (int s = 0; s < NS; ++s) {
    const __mmask16 hit = _mm512_cmpeq_epi32_mask(sl.pid[s], _mm512_set1_epi32(R));
    ka = _mm512_mask_add_ps(ka, hit, ka, sl.da[s]);
    kb = _mm512_mask_add_ps(kb, hit, kb, sl.db[s]);
  }
  const __m512 c = _mm512_loadu_ps(cs + R * cstride), s = _mm512_loadu_ps(sn + R * cstride);
  const __m512 ar = _mm512_fmsub_ps(ka, c, _mm512_mul_ps(kb, s));
  const __m512 br = _mm512_fmadd_ps(kb, c, _mm512_mul_ps(ka, s));
  for (int g = 0; g < GQ; ++g) {
    acc[g][(2 * R) % NACC] = _mm512_fmadd_ps(_mm512_set1_ps(q[g * hd + R]), ar, acc[g][(2 * R) % NACC]);
    acc[g][(2 * R + 1) % NACC] = _mm512_fmadd_ps(_mm512_set1_ps(q[g * hd + R + 8]), br, acc[g][(2 * R + 1) % NACC]);
  }
}

template <int BK, int GQ, int NACC, int NS, int... R>
__attribute__((always_inline)) inline void key_group(std::integer_sequence<int, R...>, __m512i w0, __m512i w1,
                                                     const float* lut, const float* cs, const float* sn,
                                                     int64_t cstride, const float* q, int64_t hd,
                                                     const SlotRegs& sl, __m512 (&acc)[GQ][NACC]) {
  (key_pair<BK, GQ, NACC, NS, R>(w0, w1, lut, cs, sn, cstride, q, hd, sl, acc), ...);
}

// Dword c of rows r[0 .. 15] into out[c] (a 16 x 16 transpose of 32-bit elements).
__attribute__((always_inline)) inline void transpose16(__m512i (&r)[16], float* out) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  // 128-bit lane k of u[4i + c] now holds dword 4k + c of rows 4i .. 4i + 3.
  for (int c = 0; c < 4; ++c) {
    t[c] = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x88);
    t[4 + c] = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xdd);
    t[8 + c] = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x88);
    t[12 + c] = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xdd);
  }
  for (int c = 0; c < 4; ++c) {
    _mm512_store_si512(out + 16 * c, _mm512_shuffle_i32x4(t[c], t[8 + c], 0x88));
    _mm512_store_si512(out + 16 * (8 + c), _mm512_shuffle_i32x4(t[c], t[8 + c], 0xdd));
    _mm512_store_si512(out + 16 * (4 + c), _mm512_shuffle_i32x4(t[4 + c], t[12 + c], 0x88));
    _mm512_store_si512(out + 16 * (12 + c), _mm512_shuffle_i32x4(t[4 + c], t[12 + c], 0xdd));
  }
}

// Bytes o .. o + 3 of the 16 transposed records (tw: dword j of every record at tw + 16 j).
__attribute__((always_inline)) inline __m512i record_dword(const float* tw, int64_t o) {
  const __m512i a = _mm512_load_si512(tw + 16 * (o / 4)), b = _mm512_load_si512(tw + 16 * (o / 4 + 1));
  const int sh = int(8 * (o % 4));  // shifts by 32 give 0
  return _mm512_or_si512(_mm512_srlv_epi32(a, _mm512_set1_epi32(sh)), _mm512_sllv_epi32(b, _mm512_set1_epi32(32 - sh)));
}

// t[idx] for a table of NB * 16 floats (idx < NB * 16), by two-source permutes and blends: cheaper than
// a gather, whose 16 loads per call dominated the outlier corrections.
template <int NB>
__attribute__((always_inline)) inline __m512 lookup(const float* t, __m512i idx, __mmask16 bit5, __mmask16 bit6) {
  __m512 l[4];
  for (int k = 0; 2 * k < NB; ++k) {
    const int hi = 2 * k + 1 < NB ? 2 * k + 1 : 2 * k;  // an odd last register pairs with itself
    l[k] = _mm512_permutex2var_ps(_mm512_loadu_ps(t + 32 * k), idx, _mm512_loadu_ps(t + 16 * hi));
  }
  if constexpr (NB <= 2) {
    return l[0];
  } else if constexpr (NB <= 4) {
    return _mm512_mask_blend_ps(bit5, l[0], l[1]);
  } else if constexpr (NB <= 6) {
    return _mm512_mask_blend_ps(bit6, _mm512_mask_blend_ps(bit5, l[0], l[1]), l[2]);
  } else {
    return _mm512_mask_blend_ps(bit6, _mm512_mask_blend_ps(bit5, l[0], l[1]), _mm512_mask_blend_ps(bit5, l[2], l[3]));
  }
}

// record_dword for an offset o with 8 * (o % 4) == SH known at compile time (the index words).
template <int SH>
__attribute__((always_inline)) inline __m512i record_dword_at(const float* tw, int64_t o) {
  const __m512i a = _mm512_load_si512(tw + 16 * (o / 4));
  if constexpr (SH == 0) {
    return a;
  } else {
    const __m512i b = _mm512_load_si512(tw + 16 * (o / 4 + 1));
    return _mm512_or_si512(_mm512_srli_epi32(a, SH), _mm512_slli_epi32(b, 32 - SH));
  }
}

// Scaled scores of query heads g0 .. g0 + GQ - 1 of kv head h for the chunk's tokens, into
// sc[g][i] (key outliers included, sink positions not).
template <int BK, int NB, int GQ, int NS>
void key_scores(const ChunkArgs& a, int64_t h, int64_t g0, const float* cos_t, const float* sin_t, int64_t cstride,
                float* sc) {
  constexpr int64_t hd = NB * 16;
  constexpr int NACC = GQ == 1 ? 4 : GQ < 8 ? 2 : 1;  // independent FMA chains per head
  const int64_t group = a.n_heads / a.n_kv;
  const float* lut = a.k_lut + h * hd * 16;
  const float* q = a.q + (h * group + g0) * hd;
  const float* qp = a.q_partner + (h * group + g0) * hd;
  const uint8_t* krec = a.page + (h * a.block_tokens + a.t_in_page) * a.k_bytes;
  const __m512 scale = _mm512_set1_ps(a.scale);
  // The records' bytes transposed, 16 tokens per dword row (+ one spare row for record_dword).
  const int64_t passes = (a.k_bytes + 63) / 64;
  alignas(64) float tw[(kMaxRecordPasses * 16 + 1) * 16];
  _mm512_store_ps(tw + 256 * passes, _mm512_setzero_ps());  // the spare row, read only for bytes beyond use
  for (int64_t j0 = 0; j0 < a.n; j0 += 16) {
    const __mmask16 m = lanes_below(a.n - j0);
    const uint8_t* base = krec + j0 * a.k_bytes;
    // Gathers (microcoded on this CPU) cost more than loading each record whole (lanes past the chunk
    // repeat its last token) and transposing.
    const int64_t last = std::min<int64_t>(a.n - j0, 16) - 1;
    for (int64_t pass = 0; pass < passes; ++pass) {
      __m512i r[16];
      for (int t = 0; t < 16; ++t)
        r[t] = _mm512_loadu_si512(base + std::min<int64_t>(t, last) * a.k_bytes + 64 * pass);
      transpose16(r, tw + 256 * pass);
    }
    SlotRegs slot;
    for (int s = 0; s < NS; ++s) {
      if (s < a.slots) {
        const __m512i chan = _mm512_and_si512(record_dword(tw, a.k_index_bytes + s), _mm512_set1_epi32(0xff));
        const __m512i rw = record_dword(tw, a.k_index_bytes + a.slots + 2 * s);
        const __m512 d = _mm512_maskz_mov_ps(m, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(rw)));
        const __mmask16 first = _mm512_testn_epi32_mask(chan, _mm512_set1_epi32(8));
        slot.pid[s] = _mm512_andnot_si512(_mm512_set1_epi32(8), chan);
        slot.da[s] = _mm512_maskz_mov_ps(first, d);
        slot.db[s] = _mm512_maskz_mov_ps(_knot_mask16(first), d);
      } else {
        slot.pid[s] = _mm512_set1_epi32(-1);
        slot.da[s] = slot.db[s] = _mm512_setzero_ps();
      }
    }
    __m512 acc[GQ][NACC];
    for (int g = 0; g < GQ; ++g)
      for (int k = 0; k < NACC; ++k) acc[g][k] = _mm512_setzero_ps();
    for (int b = 0; b < NB; ++b) {
      SlotRegs sl = slot;
      for (int s = 0; s < NS; ++s) sl.pid[s] = _mm512_sub_epi32(slot.pid[s], _mm512_set1_epi32(16 * b));
      // Group b's words start at byte 2 * BK * b: 4-byte aligned except for odd groups at 3 bits.
      __m512i w0, w1;
      if (BK == 3 && (b & 1)) {
        w0 = record_dword_at<16>(tw, 6 * b);
        w1 = record_dword_at<16>(tw, 6 * b + 4);
      } else {
        w0 = record_dword_at<0>(tw, b * 2 * BK);
        w1 = BK == 2 ? w0 : record_dword_at<0>(tw, b * 2 * BK + 4);
      }
      key_group<BK, GQ, NACC, NS>(std::make_integer_sequence<int, 8>{}, w0, w1, lut + b * 256, cos_t + 8 * b * cstride + j0,
                                  sin_t + 8 * b * cstride + j0, cstride, q + 16 * b, hd, sl, acc);
    }
    __m512 score[GQ];
    for (int g = 0; g < GQ; ++g) {
      __m512 t = acc[g][0];
      for (int k = 1; k < NACC; ++k) t = _mm512_add_ps(t, acc[g][k]);
      score[g] = _mm512_mul_ps(t, scale);
    }
    // Slots past those: a residual d at storage channel p moves the rotated key by d times column p of
    // the rotation.
    for (int s = NS; s < a.slots; ++s) {
      const __m512i chan = _mm512_and_si512(record_dword(tw, a.k_index_bytes + s), _mm512_set1_epi32(0xff));
      const __m512i rw = record_dword(tw, a.k_index_bytes + a.slots + 2 * s);
      const __m512 d = _mm512_maskz_mul_ps(m, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(rw)), scale);
      const __m512i pair = _mm512_or_si512(_mm512_slli_epi32(_mm512_srli_epi32(chan, 4), 3), _mm512_and_si512(chan, _mm512_set1_epi32(7)));
      const __m512i at = _mm512_add_epi32(_mm512_mullo_epi32(pair, _mm512_set1_epi32(int(cstride))), kLaneIds);
      const __m512 c = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, at, cos_t + j0, 4);
      const __m512 sn = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, at, sin_t + j0, 4);
      const __mmask16 bit5 = _mm512_test_epi32_mask(chan, _mm512_set1_epi32(32));
      const __mmask16 bit6 = _mm512_test_epi32_mask(chan, _mm512_set1_epi32(64));
      const __m512 dc = _mm512_mul_ps(d, c), ds = _mm512_mul_ps(d, sn);
      for (int g = 0; g < GQ; ++g) {
        const __m512 x = lookup<NB>(q + g * hd, chan, bit5, bit6);
        const __m512 y = lookup<NB>(qp + g * hd, chan, bit5, bit6);
        score[g] = _mm512_fmadd_ps(dc, x, _mm512_fmadd_ps(ds, y, score[g]));
      }
    }
    for (int g = 0; g < GQ; ++g) _mm512_storeu_ps(sc + (g0 + g) * kMaxChunkTokens + j0, score[g]);
  }
}

// Index vector j of a value record (16 model-order channels); like key_index, bits above the index may
// hold other channels' bits.
template <int B>
__attribute__((always_inline)) inline __m512i value_index(const uint8_t* idx, int64_t j) {
  const uint8_t* g = idx + j * 2 * B;
  // Lane c's index sits at bit 2·B·(c % 8) + B·(c / 8) of the group (docs/kv-cache.md, "Index packing").
  if constexpr (B == 2) {
    int w;
    std::memcpy(&w, g, 4);
    return _mm512_srlv_epi32(_mm512_set1_epi32(w), _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 2, 6, 10, 14, 18, 22, 26, 30));
  } else if constexpr (B == 4) {
    long long w;
    std::memcpy(&w, g, 8);
    // Lanes 0-3 and 8-11 read the group's first word, the others its second.
    const __m512i words = _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1), _mm512_set1_epi64(w));
    return _mm512_srlv_epi32(words, _mm512_setr_epi32(0, 8, 16, 24, 0, 8, 16, 24, 4, 12, 20, 28, 4, 12, 20, 28));
  } else {
    // 3 bits: fields cross the 32-bit boundary, so 64-bit shifts: even lanes from one, odd lanes from the
    // other (its low words moved up), each 64-bit lane's low word being the lane's index.
    // 8 bytes, not the group's 6: a 6-byte copy goes through the stack and stalls the load that follows
    // (store forwarding, 3x slower); the 2 bytes past the group (the next group's, the outlier slots' or the
    // page's padding) only reach bit 3 of the last lanes' indices, which the repeating table ignores.
    long long w;
    std::memcpy(&w, g, 8);
    const __m512i v = _mm512_set1_epi64(w);
    const __m512i even = _mm512_srlv_epi64(v, _mm512_setr_epi64(0, 12, 24, 36, 3, 15, 27, 39));
    const __m512i odd = _mm512_srlv_epi64(v, _mm512_setr_epi64(6, 18, 30, 42, 9, 21, 33, 45));
    return _mm512_mask_blend_epi32(__mmask16(0xAAAA), even, _mm512_slli_epi64(odd, 32));
  }
}

// Registers of value channels per pass: GQ x W accumulators and W decoded rows stay in registers.
constexpr int value_block(int nb, int gq) {
  for (int w = nb; w > 1; --w)
    if (nb % w == 0 && w * gq <= 16) return w;
  return 1;
}

// acc[g] += sum_i ws[g][i] * codebook(index_i) for query heads g0 .. g0 + GQ - 1 of kv head h.
template <int BV, int NB, int GQ>
void value_rows(const ChunkArgs& a, int64_t h, int64_t g0, const float* ws, __m512 vcb) {
  constexpr int64_t hd = NB * 16;
  constexpr int W = value_block(NB, GQ);
  const int64_t group = a.n_heads / a.n_kv;
  const uint8_t* vrec = a.page + a.v_region + (h * a.block_tokens + a.t_in_page) * a.v_bytes + 4;
  float* acc_base = a.acc + (h * group + g0) * hd;
  for (int j0 = 0; j0 < NB; j0 += W) {
    __m512 acc[GQ][W];
    for (int g = 0; g < GQ; ++g)
      for (int w = 0; w < W; ++w) acc[g][w] = _mm512_loadu_ps(acc_base + g * hd + (j0 + w) * 16);
    const uint8_t* rec = vrec;
    for (int64_t i = 0; i < a.n; ++i, rec += a.v_bytes) {
      __m512 row[W];
      for (int w = 0; w < W; ++w) row[w] = _mm512_permutexvar_ps(value_index<BV>(rec, j0 + w), vcb);
      for (int g = 0; g < GQ; ++g) {
        const __m512 p = _mm512_set1_ps(ws[(g0 + g) * kMaxChunkTokens + i]);
        for (int w = 0; w < W; ++w) acc[g][w] = _mm512_fmadd_ps(p, row[w], acc[g][w]);
      }
    }
    for (int g = 0; g < GQ; ++g)
      for (int w = 0; w < W; ++w) _mm512_storeu_ps(acc_base + g * hd + (j0 + w) * 16, acc[g][w]);
  }
}

// softmax_update with vector maxima, zero weights past n, and no rescaling when the maximum holds.
float softmax_tp(const ChunkArgs& a, int64_t hg, float* sc, int64_t n) {
  __m512 mx = _mm512_set1_ps(-__builtin_inff());
  for (int64_t j0 = 0; j0 < n; j0 += 16) mx = _mm512_mask_max_ps(mx, lanes_below(n - j0), mx, _mm512_loadu_ps(sc + j0));
  const float m_old = a.m[hg], cmax = _mm512_reduce_max_ps(mx);
  const float m_new = m_old > cmax ? m_old : cmax;
  const __m512 mv = _mm512_set1_ps(m_new);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const __m512 p = _mm512_maskz_mov_ps(lanes_below(n - j0), Avx512::exp(_mm512_sub_ps(_mm512_loadu_ps(sc + j0), mv)));
    _mm512_storeu_ps(sc + j0, p);
    sum = _mm512_add_ps(sum, p);
  }
  const float total = _mm512_reduce_add_ps(sum);
  a.m[hg] = m_new;
  if (m_old == m_new) {
    a.l[hg] += total;
    return 1.0f;
  }
  // The first chunk has m_old = -inf and nothing accumulated: the correction must not turn 0 * inf into NaN.
  const float corr = m_old == -__builtin_inff() ? 0.0f : Avx512::exp1(m_old - m_new);
  a.l[hg] = a.l[hg] * corr + total;
  float* acc = a.acc + hg * a.head_dim;
  const __m512 cv = _mm512_set1_ps(corr);
  for (int64_t j = 0; j < a.head_dim; j += 16) _mm512_storeu_ps(acc + j, _mm512_mul_ps(_mm512_loadu_ps(acc + j), cv));
  return corr;
}

// Value outliers of a GQA group of 2 .. 16 query heads: acc[g][c] += p_g(i) * d for the residual d of
// token i at channel c. Per head and token these scattered updates cost as much as the rest of the value
// path; here one token's weights for the whole group (transposed into pt) scale d into a channel-major
// buffer (ChunkArgs::vout) in one vector FMA, and the buffer is added to the accumulators once per task
// (value_outlier_width and fold_value_outliers).
int value_outlier_width(int64_t group) { return group < 2 ? 0 : group <= 4 ? 4 : group <= 8 ? 8 : group <= 16 ? 16 : 0; }

template <int GW>
void value_outliers(const ChunkArgs& a, int64_t h, const float* sc, int64_t sink_n, float* pt) {
  static_assert(GW == 4 || GW == 8 || GW == 16);
  const int64_t group = a.n_heads / a.n_kv, n = a.n;
  float* vout = a.vout + h * a.head_dim * GW;  // [hd][GW]
  if constexpr (GW == 4) {
    // 4 x 16 transposes: 128-bit lane k of u[m] holds token 4k + m of the block, stored at pt4(i).
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
      __m512 p[4];
      for (int g = 0; g < 4; ++g) p[g] = g < group ? _mm512_load_ps(sc + g * kMaxChunkTokens + j0) : _mm512_setzero_ps();
      const __m512 t0 = _mm512_unpacklo_ps(p[0], p[1]), t1 = _mm512_unpackhi_ps(p[0], p[1]);
      const __m512 t2 = _mm512_unpacklo_ps(p[2], p[3]), t3 = _mm512_unpackhi_ps(p[2], p[3]);
      _mm512_store_ps(pt + 4 * j0, _mm512_shuffle_ps(t0, t2, 0x44));
      _mm512_store_ps(pt + 4 * j0 + 16, _mm512_shuffle_ps(t0, t2, 0xEE));
      _mm512_store_ps(pt + 4 * j0 + 32, _mm512_shuffle_ps(t1, t3, 0x44));
      _mm512_store_ps(pt + 4 * j0 + 48, _mm512_shuffle_ps(t1, t3, 0xEE));
    }
  } else {
    for (int64_t i = 0; i < n; ++i)
      for (int64_t g = 0; g < GW; ++g) pt[i * GW + g] = g < group ? sc[g * kMaxChunkTokens + i] : 0.0f;
  }
  const uint8_t* vrec = a.page + a.v_region + (h * a.block_tokens + a.t_in_page) * a.v_bytes;
  for (int64_t i = sink_n; i < n; ++i) {
    const uint8_t* chan = vrec + i * a.v_bytes + 4 + a.v_index_bytes;
    const float* pi = GW == 4 ? pt + 4 * (i & ~int64_t(15)) + 16 * (i & 3) + 4 * ((i >> 2) & 3) : pt + i * GW;
    for (int s = 0; s < a.slots; ++s) {
      const float d = fp16_scalar(chan + a.slots + 2 * s);
      float* o = vout + chan[s] * GW;
      if constexpr (GW == 4)
        _mm_storeu_ps(o, _mm_fmadd_ps(_mm_set1_ps(d), _mm_loadu_ps(pi), _mm_loadu_ps(o)));
      else if constexpr (GW == 8)
        _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_loadu_ps(pi), _mm256_loadu_ps(o)));
      else
        _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_set1_ps(d), _mm512_loadu_ps(pi), _mm512_loadu_ps(o)));
    }
  }
}

// Query heads are taken 8, 4, 2 or 1 at a time (each batch decodes the page again).
int head_batch(int64_t left) { return left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1; }

template <int BK, int BV, int NB>
void chunk_tp(const ChunkArgs& a) {
  constexpr int64_t hd = NB * 16, np = NB * 8;
  const int64_t group = a.n_heads / a.n_kv, n = a.n;
  const int64_t cstride = (n + 15) / 16 * 16;
  float* cos_t = a.scratch;  // [np][cstride]: cos of pair p at chunk position i
  float* sin_t = cos_t + np * cstride;
  float* sc = sin_t + np * cstride;           // [group][kMaxChunkTokens] scores, then softmax weights
  float* ws = sc + group * kMaxChunkTokens;   // [group][kMaxChunkTokens] weights times value scales
  float* osum = ws + group * kMaxChunkTokens;  // [group] weighted sums of value offsets
  float* pt = osum + 16 * ((group + 15) / 16);  // value_outliers: [kMaxChunkTokens][16]
  const int gw = a.slots > 0 ? value_outlier_width(group) : 0;
  if (gw && a.first_chunk) std::memset(a.vout, 0, size_t(a.n_kv * hd * gw) * sizeof(float));
  // Angles of every position of the chunk, shared by the kv heads: (bc + i bs)(step_c + i step_s).
  for (int64_t p = 0; p < np; ++p) {
    const __m512 bc = _mm512_set1_ps(a.base_cos[p]), bs = _mm512_set1_ps(a.base_sin[p]);
    for (int64_t j0 = 0; j0 < cstride; j0 += 16) {
      const __m512 c = _mm512_loadu_ps(a.step_cos_t + p * a.step_stride + j0);
      const __m512 s = _mm512_loadu_ps(a.step_sin_t + p * a.step_stride + j0);
      _mm512_storeu_ps(cos_t + p * cstride + j0, _mm512_fmsub_ps(bc, c, _mm512_mul_ps(bs, s)));
      _mm512_storeu_ps(sin_t + p * cstride + j0, _mm512_fmadd_ps(bs, c, _mm512_mul_ps(bc, s)));
    }
  }
  __m512 vcb = _mm512_loadu_ps(a.v_cb);
  vcb = _mm512_permutexvar_ps(_mm512_and_si512(kLaneIds, _mm512_set1_epi32((1 << BV) - 1)), vcb);
  const int64_t sink_n = std::min<int64_t>(std::max<int64_t>(a.sink_len - a.t0, 0), n);  // chunk positions < sink
  for (int64_t h = 0; h < a.n_kv; ++h) {
    // A kv head's records are short runs (1.7 KB of keys, 1.9 KB of values per page at 3 bits) that
    // the hardware prefetcher picks up too late: fetch those two heads ahead (wrapping into the next
    // page) while this one is computed.
    {
      const int64_t ah = h + 2;
      const uint8_t* pp = ah < a.n_kv ? a.page : a.next_page;
      const int64_t nh = ah < a.n_kv ? ah : ah - a.n_kv;
      if (pp && nh < a.n_kv) {
        const uint8_t* kp = pp + (nh * a.block_tokens + a.t_in_page) * a.k_bytes;
        for (int64_t o = 0; o < n * a.k_bytes; o += 64) _mm_prefetch(reinterpret_cast<const char*>(kp + o), _MM_HINT_T0);
        const uint8_t* vp = pp + a.v_region + (nh * a.block_tokens + a.t_in_page) * a.v_bytes;
        for (int64_t o = 0; o < n * a.v_bytes; o += 64) _mm_prefetch(reinterpret_cast<const char*>(vp + o), _MM_HINT_T0);
      }
    }
    for (int64_t g0 = 0; g0 < group;) {
      const int gq = head_batch(group - g0);
      if (a.slots == 0) {
        if (gq == 8) key_scores<BK, NB, 8, 0>(a, h, g0, cos_t, sin_t, cstride, sc);
        else if (gq == 4) key_scores<BK, NB, 4, 0>(a, h, g0, cos_t, sin_t, cstride, sc);
        else if (gq == 2) key_scores<BK, NB, 2, 0>(a, h, g0, cos_t, sin_t, cstride, sc);
        else key_scores<BK, NB, 1, 0>(a, h, g0, cos_t, sin_t, cstride, sc);
      } else {
        if (gq == 8) key_scores<BK, NB, 8, kSlotsInLoop>(a, h, g0, cos_t, sin_t, cstride, sc);
        else if (gq == 4) key_scores<BK, NB, 4, kSlotsInLoop>(a, h, g0, cos_t, sin_t, cstride, sc);
        else if (gq == 2) key_scores<BK, NB, 2, kSlotsInLoop>(a, h, g0, cos_t, sin_t, cstride, sc);
        else key_scores<BK, NB, 1, kSlotsInLoop>(a, h, g0, cos_t, sin_t, cstride, sc);
      }
      g0 += gq;
    }
    for (int64_t i = 0; i < sink_n; ++i) {
      const uint16_t* k = a.sink_k + ((a.t0 + i) * a.n_kv + h) * hd;
      for (int64_t g = 0; g < group; ++g) {
        const float* q = a.q + (h * group + g) * hd;
        float dot = 0;
        for (int64_t p = 0; p < np; ++p) {
          const int64_t pa = p / 8 * 16 + p % 8, pb = pa + 8;
          const float ka = _cvtsh_ss(k[pa]), kb = _cvtsh_ss(k[pb]);
          const float c = cos_t[p * cstride + i], s = sin_t[p * cstride + i];
          dot += q[pa] * (ka * c - kb * s) + q[pb] * (kb * c + ka * s);
        }
        sc[g * kMaxChunkTokens + i] = dot * a.scale;
      }
    }
    alignas(64) float corr[16];
    bool rescaled = false;
    for (int64_t g = 0; g < group; ++g) {
      const float c = softmax_tp(a, h * group + g, sc + g * kMaxChunkTokens, n);
      if (g < 16) corr[g] = c;
      rescaled |= c != 1.0f;
    }
    if (gw && rescaled) {
      // The buffered outlier sums are part of the accumulators: they take the same correction.
      for (int64_t g = group; g < 16; ++g) corr[g] = 1.0f;
      const __m512 cv = _mm512_loadu_ps(corr);
      const __m512i rep = _mm512_and_si512(kLaneIds, _mm512_set1_epi32(gw - 1));
      const __m512 cr = gw == 16 ? cv : _mm512_permutexvar_ps(rep, cv);
      float* vout = a.vout + h * hd * gw;
      for (int64_t j = 0; j < hd * gw; j += 16) _mm512_storeu_ps(vout + j, _mm512_mul_ps(_mm512_loadu_ps(vout + j), cr));
    }
    // Weights for the codebook rows: p * value scale; the offsets' share is p * offset summed per head.
    const uint8_t* vrec = a.page + a.v_region + (h * a.block_tokens + a.t_in_page) * a.v_bytes;
    __m512 os[8];
    for (int64_t g0 = 0; g0 < group; g0 += 8) {
      const int64_t gn = std::min<int64_t>(8, group - g0);
      for (int64_t g = 0; g < gn; ++g) os[g] = _mm512_setzero_ps();
      for (int64_t j0 = 0; j0 < n; j0 += 16) {
        const __mmask16 m = lanes_below(n - j0) & ~lanes_below(sink_n - j0 > 0 ? sink_n - j0 : 0);
        // Scalar loads: a gather is microcoded and stalls the front end.
        alignas(64) uint32_t so[16];
        const int64_t cnt = std::min<int64_t>(16, n - j0);
        for (int64_t i = 0; i < cnt; ++i) std::memcpy(so + i, vrec + (j0 + i) * a.v_bytes, 4);
        const __m512i w = _mm512_maskz_loadu_epi32(m, so);
        const __m512 vs = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(w));
        const __m512 vo = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(w, 16)));
        for (int64_t g = 0; g < gn; ++g) {
          const __m512 p = _mm512_maskz_loadu_ps(m, sc + (g0 + g) * kMaxChunkTokens + j0);
          _mm512_storeu_ps(ws + (g0 + g) * kMaxChunkTokens + j0, _mm512_mul_ps(p, vs));
          os[g] = _mm512_fmadd_ps(p, vo, os[g]);
        }
      }
      for (int64_t g = 0; g < gn; ++g) osum[g0 + g] = _mm512_reduce_add_ps(os[g]);
    }
    for (int64_t g0 = 0; g0 < group;) {
      const int gq = head_batch(group - g0);
      if (gq == 8) value_rows<BV, NB, 8>(a, h, g0, ws, vcb);
      else if (gq == 4) value_rows<BV, NB, 4>(a, h, g0, ws, vcb);
      else if (gq == 2) value_rows<BV, NB, 2>(a, h, g0, ws, vcb);
      else value_rows<BV, NB, 1>(a, h, g0, ws, vcb);
      g0 += gq;
    }
    for (int64_t g = 0; g < group; ++g) {
      float* acc = a.acc + (h * group + g) * hd;
      const __m512 o = _mm512_set1_ps(osum[g]);
      for (int64_t j = 0; j < hd; j += 16) _mm512_storeu_ps(acc + j, _mm512_add_ps(_mm512_loadu_ps(acc + j), o));
    }
    for (int64_t i = 0; i < sink_n; ++i) {
      const uint16_t* src = a.sink_v + ((a.t0 + i) * a.n_kv + h) * hd;
      for (int64_t g = 0; g < group; ++g) {
        float* acc = a.acc + (h * group + g) * hd;
        const __m512 p = _mm512_set1_ps(sc[g * kMaxChunkTokens + i]);
        for (int64_t j = 0; j < hd; j += 16)
          _mm512_storeu_ps(acc + j, _mm512_fmadd_ps(p, Avx512::load_fp16(src + j), _mm512_loadu_ps(acc + j)));
      }
    }
    if (a.slots > 0 && !gw) {
      const uint8_t* chan = vrec + sink_n * a.v_bytes + 4 + a.v_index_bytes;
      for (int64_t i = sink_n; i < n; ++i, chan += a.v_bytes)
        for (int s = 0; s < a.slots; ++s) {
          const float d = fp16_scalar(chan + a.slots + 2 * s);
          for (int64_t g = 0; g < group; ++g) a.acc[(h * group + g) * hd + chan[s]] += sc[g * kMaxChunkTokens + i] * d;
        }
    }
    if (gw == 4) value_outliers<4>(a, h, sc, sink_n, pt);
    else if (gw == 8) value_outliers<8>(a, h, sc, sink_n, pt);
    else if (gw == 16) value_outliers<16>(a, h, sc, sink_n, pt);
  }
}

template <int NB>
void chunk_tp_bits(const ChunkArgs& a) {
#define NUQ_KV_CASE(bk, bv) \
  case bk * 8 + bv: return chunk_tp<bk, bv, NB>(a);
  switch (a.bits_k * 8 + a.bits_v) {
    NUQ_KV_CASE(2, 2) NUQ_KV_CASE(2, 3) NUQ_KV_CASE(2, 4)
    NUQ_KV_CASE(3, 2) NUQ_KV_CASE(3, 3) NUQ_KV_CASE(3, 4)
    NUQ_KV_CASE(4, 2) NUQ_KV_CASE(4, 3) NUQ_KV_CASE(4, 4)
    default: break;
  }
#undef NUQ_KV_CASE
}

void chunk_tp_dispatch(const ChunkArgs& a) {
  switch (a.head_dim) {
    case 64: return chunk_tp_bits<4>(a);
    case 80: return chunk_tp_bits<5>(a);
    case 96: return chunk_tp_bits<6>(a);
    case 128: return chunk_tp_bits<8>(a);
    default: break;
  }
}

}  // namespace

void chunk_avx512(const ChunkArgs& a) { chunk_tp_dispatch(a); }

int64_t task_state_floats_avx512(int64_t n_kv, int64_t head_dim, int64_t n_heads) {
  return n_kv * head_dim * value_outlier_width(n_heads / n_kv);
}

void finish_task_avx512(const ChunkArgs& a) {
  const int64_t group = a.n_heads / a.n_kv, hd = a.head_dim;
  const int gw = a.slots > 0 ? value_outlier_width(group) : 0;
  if (!gw) return;
  for (int64_t h = 0; h < a.n_kv; ++h)
    for (int64_t g = 0; g < group; ++g) {
      float* acc = a.acc + (h * group + g) * hd;
      const float* vout = a.vout + h * hd * gw;
      for (int64_t c = 0; c < hd; ++c) acc[c] += vout[c * gw + g];
    }
}
void dense_chunk_avx512(const ChunkArgs& a) { dense_dispatch<Avx512>(a); }

}  // namespace nuq::kv::detail
