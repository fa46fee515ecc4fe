// AVX2 (+ FMA, F16C) instantiation of the KV decode-attention chunk kernels: 8 lanes, codebooks of 16
// entries as two registers looked up with permutes and a blend on the index's top bit.
#include <immintrin.h>

#include <cstring>

#include "kv_attention_kernel.hpp"

namespace nuq::kv::detail {
namespace {

struct Avx2 {
  static constexpr int64_t L = 8;
  using V = __m256;
  struct Cb {
    __m256 lo, hi;
  };
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V zero() { return _mm256_setzero_ps(); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V fmsub(V a, V b, V c) { return _mm256_fmsub_ps(a, b, c); }
  static float hsum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static void hsum4(V a, V b, V c, V d, float* out) {
    const V ab = _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
    const V cd = _mm256_add_ps(_mm256_unpacklo_ps(c, d), _mm256_unpackhi_ps(c, d));
    const V x = _mm256_add_ps(_mm256_shuffle_ps(ab, cd, 0x44), _mm256_shuffle_ps(ab, cd, 0xEE));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1)));
  }
  // The same range reduction and polynomial as the AVX-512 kernel; 2^n built in the exponent field.
  static V exp(V x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    x = _mm256_min_ps(x, _mm256_set1_ps(88.0f));
    const V n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);
    V p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }
  static float exp1(float x) { return _mm256_cvtss_f32(exp(_mm256_set1_ps(x))); }
  static Cb codebook(const float* cb) { return {_mm256_loadu_ps(cb), _mm256_loadu_ps(cb + 8)}; }
  // Vector j = half j % 2 of index group j / 2 (docs/kv-cache.md, "Index packing"): lane r's index (channel
  // 8h + r) sits at bit 2·B·r + B·h of the group.
  template <int B>
  static V decode(const uint8_t* idx, int64_t j, Cb cb) {
    const uint8_t* g = idx + (j / 2) * 2 * B;
    const int h = int(j % 2);
    __m256i i32;
    if constexpr (B == 2) {
      int w;
      std::memcpy(&w, g, 4);
      const __m256i sh = _mm256_add_epi32(_mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), _mm256_set1_epi32(2 * h));
      i32 = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(w), sh), _mm256_set1_epi32(3));
    } else if constexpr (B == 4) {
      long long w;
      std::memcpy(&w, g, 8);
      // Lanes 0-3 read the group's first word, lanes 4-7 its second.
      const __m256i words = _mm256_permutevar8x32_epi32(_mm256_set1_epi64x(w), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
      const __m256i sh = _mm256_add_epi32(_mm256_setr_epi32(0, 8, 16, 24, 0, 8, 16, 24), _mm256_set1_epi32(4 * h));
      i32 = _mm256_and_si256(_mm256_srlv_epi32(words, sh), _mm256_set1_epi32(15));
    } else {
      // 3 bits: 48 bits per group, so 64-bit shifts (fields cross the 32-bit boundary): even lanes from
      // one, odd lanes from the other, each taking its 64-bit lane's low word.
      // 8 bytes, not the group's 6: a 6-byte copy goes through the stack and stalls the load that
      // follows (store forwarding); the 2 bytes past the group (the next group's, the outlier slots' or
      // the page's padding) only reach index bits the 8-entry codebook ignores.
      long long w;
      std::memcpy(&w, g, 8);
      const __m256i v = _mm256_set1_epi64x(w);
      const __m256i even = _mm256_srlv_epi64(v, _mm256_add_epi64(_mm256_setr_epi64x(0, 12, 24, 36), _mm256_set1_epi64x(3 * h)));
      const __m256i odd = _mm256_srlv_epi64(v, _mm256_add_epi64(_mm256_setr_epi64x(6, 18, 30, 42), _mm256_set1_epi64x(3 * h)));
      i32 = _mm256_and_si256(_mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA), _mm256_set1_epi32(7));
    }
    const V lo = _mm256_permutevar8x32_ps(cb.lo, i32);
    if (B < 4) return lo;
    const V hi = _mm256_permutevar8x32_ps(cb.hi, i32);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(i32, 28)));  // index bit 3 -> sign
  }
  // Block b is registers 2b (first members of 8 pairs) and 2b + 1 (their partners).
  static void rotate_block(V* kr, int b, const float* c8, const float* s8) {
    const V a = kr[2 * b], p = kr[2 * b + 1];
    const V c = _mm256_loadu_ps(c8), s = _mm256_loadu_ps(s8);
    kr[2 * b] = _mm256_fmsub_ps(a, c, _mm256_mul_ps(p, s));
    kr[2 * b + 1] = _mm256_fmadd_ps(a, s, _mm256_mul_ps(p, c));
  }
  static V load_fp16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static V load_bf16(const uint16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
};

#include "kv_attention_kernel.inl"

}  // namespace

void chunk_avx2(const ChunkArgs& a) { chunk_dispatch<Avx2>(a); }
void dense_chunk_avx2(const ChunkArgs& a) { dense_dispatch<Avx2>(a); }

}  // namespace nuq::kv::detail
