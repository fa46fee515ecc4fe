// AVX-512 (F/BW/VL + F16C) instantiation of the KV decode-attention chunk kernels. Codebooks of up to
// 16 entries live in one register and are looked up with a lane permute; the 16-channel storage blocks
// (docs/kv-cache.md) make RoPE one swap of the register halves and one FMA.
// GCC 12's AVX-512 intrinsics headers build vectors from deliberately undefined values, which -Wall
// reports at every inlined use; the warnings are about the headers, not this code.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>

#include <cstring>

#include "kv_attention_kernel.hpp"

namespace nuq::kv::detail {
namespace {

struct Avx512 {
  static constexpr int64_t L = 16;
  using V = __m512;
  using Cb = __m512;
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
  static Cb codebook(const float* cb) { return _mm512_loadu_ps(cb); }
  // Group j of 16 indices (2B bytes, layout in docs/kv-cache.md, "Index packing") from broadcast loads,
  // which use only load ports, one variable shift and the codebook permute (vpermps reads index bits
  // 0-3, so 4-bit fields need no mask).
  template <int B>
  static V decode(const uint8_t* idx, int64_t j, Cb cb) {
    const uint8_t* g = idx + j * 2 * B;
    __m512i i32;
    if constexpr (B == 4) {
      long long w;
      std::memcpy(&w, g, 8);
      i32 = _mm512_srlv_epi32(_mm512_set1_epi64(w), _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28));
    } else {
      int lo;
      std::memcpy(&lo, g, 4);
      i32 = _mm512_srlv_epi32(_mm512_set1_epi32(lo),
                              _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30));
      if constexpr (B == 2) {
        i32 = _mm512_and_si512(i32, _mm512_set1_epi32(3));
      } else {
        uint16_t hi16;
        std::memcpy(&hi16, g + 4, 2);
        // Bit c of the 1-bit plane moved to bit 2 of lane c, merged with the low two bits.
        const __m512i hi = _mm512_srlv_epi32(_mm512_set1_epi32(int(hi16) << 2),
                                             _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
        i32 = _mm512_ternarylogic_epi32(_mm512_set1_epi32(3), i32, hi, 0xCA);  // a ? b : c, bitwise
        i32 = _mm512_and_si512(i32, _mm512_set1_epi32(7));
      }
    }
    return _mm512_permutexvar_ps(i32, cb);
  }
  // Block b is register b: lanes 0-7 hold the first members a of 8 pairs, lanes 8-15 their partners b;
  // a' = a cos - b sin and b' = a sin + b cos are one swap of the register halves and one FMA.
  static void rotate_block(V* kr, int b, const float* c8, const float* s8) {
    const V cv = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(_mm256_loadu_ps(c8))));
    V sv = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(_mm256_loadu_ps(s8))));
    sv = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(sv), _mm512_maskz_set1_epi32(0x00ff, int(0x80000000u))));
    const V x = kr[b];
    const V swapped = _mm512_shuffle_f32x4(x, x, _MM_SHUFFLE(1, 0, 3, 2));
    kr[b] = _mm512_fmadd_ps(x, cv, _mm512_mul_ps(swapped, sv));
  }
  static V load_fp16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static V load_bf16(const uint16_t* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
};

#include "kv_attention_kernel.inl"

}  // namespace

void chunk_avx512(const ChunkArgs& a) { chunk_dispatch<Avx512>(a); }
void dense_chunk_avx512(const ChunkArgs& a) { dense_dispatch<Avx512>(a); }

}  // namespace nuq::kv::detail
