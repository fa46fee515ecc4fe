// The fused LUT GEMV for AVX-512 (F, BW, VL). Built with those instruction sets enabled for this
// file only (CMakeLists.txt); called only after the dispatcher has checked the CPU has them.
// GCC 12 warns about the deliberately undefined pass-through operands inside its own AVX-512
// intrinsic headers (_mm512_undefined_*), not about this code.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#include "linear_kernel.hpp"

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__)
#error "linear_avx512.cpp must be compiled with -mavx512f -mavx512bw -mavx512vl"
#endif

namespace nuq::cpu::detail {
namespace {

inline float h2f(uint16_t h) { return _cvtsh_ss(h); }

#include "simd256.inl"

// 16 lanes: vpermps on a zmm reads index bits 0-3, so a 16-entry codebook is one register and the 8-
// and 4-entry ones are repeated to 16 (the bits of the next field above the index are then harmless).
struct S512 {
  static constexpr int W = 16;
  static constexpr int kMaxTile = max_tile(W);
  // Output rows per pass, sharing each activation vector (which comes from L2 once cols exceed
  // ~12k): 16 accumulators at most (4 rows up to 4 batch rows, else 2).
  static constexpr int rows(int /*bits*/, int tile) { return tile <= 4 ? 4 : 2; }
  // Accumulators per row and batch row: with one batch row, 2 × 4 rows = 8 FMA chains.
  static constexpr int chains(int tile) { return tile == 1 ? 2 : 1; }
  using F = __m512;
  using I = __m512i;
  using Table = __m512;

  static F zero() { return _mm512_setzero_ps(); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static float reduce(F v) { return _mm512_reduce_add_ps(v); }
  static I load_words(const uint8_t* p) { return _mm512_loadu_si512(p); }
  static I load_hi16(const uint8_t* p) {
    return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  template <int N>
  static I srl(I v) {
    if constexpr (N == 0) return v; else return _mm512_srli_epi32(v, N);
  }
  template <int N>
  static I sll(I v) {
    if constexpr (N == 0) return v; else return _mm512_slli_epi32(v, N);
  }
  // One vpternlogd, bit by bit (mask 3) ? lo : hi. The mask is the third operand so that the result
  // overwrites the shifted temporary rather than a copy of the constant (0xE4 is c ? a : b).
  static I combine3(I lo, I hi) { return _mm512_ternarylogic_epi32(lo, hi, _mm512_set1_epi32(3), 0xE4); }
  template <int BITS>
  static Table table(const uint16_t* lut) {
    if constexpr (BITS == 4) {
      return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lut)));
    } else if constexpr (BITS == 3) {
      const __m256 t = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lut)));
      return _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(t)));
    } else {
      return _mm512_broadcast_f32x4(_mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(lut))));
    }
  }
  template <int BITS>
  static F lookup(I idx, Table t) { return _mm512_permutexvar_ps(idx, t); }
};

#define NUQ_KERNEL_SIMD 1
#include "linear_kernel.inl"

}  // namespace

void gemv_rows_avx512(const KernelArgs& args, int64_t r0, int64_t r1, float* scratch) {
  switch (args.lanes) {
    case S512::W: gemv_rows<S512>(args, r0, r1, scratch); return;
    case S256::W: gemv_rows<S256>(args, r0, r1, scratch); return;
    default: kernel_unsupported("AVX-512 lanes", args.lanes);
  }
}

}  // namespace nuq::cpu::detail
