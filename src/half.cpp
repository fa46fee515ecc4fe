#include "nuq/half.hpp"

#include <cstddef>

#include "cpu_features.hpp"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define NUQ_HAVE_F16C_DISPATCH 1
#endif

namespace nuq {

#if NUQ_HAVE_F16C_DISPATCH
namespace {
// F16C's conversions implement IEEE round-to-nearest-even exactly like the scalar code, so the fast
// path changes speed, not bits (checked by the exhaustive tests, which run both). One exception:
// VCVTPS2PH quiets signalling NaNs the same way we do, so NaNs agree as well.
bool cpu_has_f16c() { return detail::cpu_features().f16c; }

__attribute__((target("avx,f16c"))) void fp16_to_float_f16c(const uint16_t* src, float* dst,
                                                             std::size_t n) {
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) dst[i] = fp16_to_float(src[i]);
}

__attribute__((target("avx,f16c"))) void float_to_fp16_f16c(const float* src, uint16_t* dst,
                                                             std::size_t n) {
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  for (; i < n; ++i) dst[i] = float_to_fp16(src[i]);
}
}  // namespace
#endif

void convert_fp16_to_float(const uint16_t* src, float* dst, std::size_t n) {
#if NUQ_HAVE_F16C_DISPATCH
  if (cpu_has_f16c()) return fp16_to_float_f16c(src, dst, n);
#endif
  for (std::size_t i = 0; i < n; ++i) dst[i] = fp16_to_float(src[i]);
}

void convert_float_to_fp16(const float* src, uint16_t* dst, std::size_t n) {
#if NUQ_HAVE_F16C_DISPATCH
  if (cpu_has_f16c()) return float_to_fp16_f16c(src, dst, n);
#endif
  for (std::size_t i = 0; i < n; ++i) dst[i] = float_to_fp16(src[i]);
}

// bf16 is a shift of the fp32 bit pattern; compilers vectorize these loops well on their own.
void convert_bf16_to_float(const uint16_t* src, float* dst, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i]);
}

void convert_float_to_bf16(const float* src, uint16_t* dst, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) dst[i] = float_to_bf16(src[i]);
}

}  // namespace nuq
