// Exhaustive checks of the fp16/bf16 conversions over all 65,536 bit patterns of each format. The
// expected values come from independent definitions (ldexp arithmetic for decoding, midpoints between
// neighbouring representable values for round-to-nearest-even), and, where the CPU has F16C, from the
// hardware conversion instructions as a second reference.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "nuq/half.hpp"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

using nuq::bf16_to_float;
using nuq::fp16_to_float;
using nuq::float_to_bf16;
using nuq::float_to_fp16;

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

bool is_nan_fp16(uint16_t h) { return (h & 0x7c00) == 0x7c00 && (h & 0x3ff) != 0; }
bool is_nan_bf16(uint16_t h) { return (h & 0x7f80) == 0x7f80 && (h & 0x7f) != 0; }

// IEEE binary16 value by definition.
double fp16_value(uint16_t h) {
  const int sign = h >> 15, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  double v;
  if (exp == 0x1f) v = mant ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  else if (exp == 0) v = std::ldexp(double(mant), -24);
  else v = std::ldexp(1.0 + mant / 1024.0, exp - 15);
  return sign ? -v : v;
}

TEST(Half, Fp16ToFloatMatchesDefinitionForAllPatterns) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = fp16_to_float(uint16_t(h));
    const double expected = fp16_value(uint16_t(h));
    if (std::isnan(expected)) {
      ASSERT_TRUE(std::isnan(f)) << std::hex << h;
      ASSERT_EQ(bits(f) >> 31, h >> 15) << "NaN sign lost for " << std::hex << h;
    } else {
      ASSERT_EQ(double(f), expected) << std::hex << h;
      ASSERT_EQ(std::signbit(f), bool(h & 0x8000)) << std::hex << h;  // -0 stays -0
    }
  }
}

TEST(Half, Fp16RoundTripIsIdentityAndNaNsStayQuietNaNs) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const uint16_t back = float_to_fp16(fp16_to_float(uint16_t(h)));
    if (is_nan_fp16(uint16_t(h))) {
      ASSERT_EQ(back, uint16_t(h | 0x0200)) << "NaN payload or sign changed for " << std::hex << h;
    } else {
      ASSERT_EQ(back, uint16_t(h)) << std::hex << h;
    }
  }
}

// Every pair of neighbouring finite fp16 values: their midpoint rounds to the one with an even
// mantissa, and the floats just either side of it round to the nearer one.
TEST(Half, FloatToFp16RoundsToNearestEvenAtEveryMidpoint) {
  for (uint32_t sign : {0u, 0x8000u}) {
    for (uint32_t h = 0; h < 0x7c00; ++h) {  // h and h+1 both finite or h+1 == Inf
      const uint16_t lo = uint16_t(sign | h), hi = uint16_t(sign | (h + 1));
      const double a = fp16_value(lo);
      const double b = (h + 1 == 0x7c00) ? (sign ? -65536.0 : 65536.0) : fp16_value(hi);
      const float mid = float((a + b) / 2);  // exact: needs one bit more than fp16 has
      ASSERT_EQ(double(mid), (a + b) / 2);
      const uint16_t even = (lo & 1) ? hi : lo;
      ASSERT_EQ(float_to_fp16(mid), even) << "tie between " << std::hex << lo << " and " << hi;
      const float toward_lo = std::nextafter(mid, float(a));
      const float toward_hi = std::nextafter(mid, float(b));
      ASSERT_EQ(float_to_fp16(toward_lo), lo) << std::hex << lo;
      ASSERT_EQ(float_to_fp16(toward_hi), hi) << std::hex << hi;
    }
  }
}

TEST(Half, FloatToFp16SpecialValues) {
  EXPECT_EQ(float_to_fp16(65504.f), 0x7bff);
  EXPECT_EQ(float_to_fp16(65519.99f), 0x7bff);
  EXPECT_EQ(float_to_fp16(65520.f), 0x7c00);  // tie with the next binade goes to even = Inf
  EXPECT_EQ(float_to_fp16(1e10f), 0x7c00);
  EXPECT_EQ(float_to_fp16(-1e10f), 0xfc00);
  EXPECT_EQ(float_to_fp16(std::numeric_limits<float>::infinity()), 0x7c00);
  EXPECT_EQ(float_to_fp16(-0.0f), 0x8000);
  EXPECT_EQ(float_to_fp16(std::ldexp(1.0f, -25)), 0x0000);   // tie: even is zero
  EXPECT_EQ(float_to_fp16(std::ldexp(1.5f, -25)), 0x0001);   // above the tie
  EXPECT_EQ(float_to_fp16(std::ldexp(1.0f, -26)), 0x0000);
  EXPECT_EQ(float_to_fp16(1e-30f), 0x0000);
  EXPECT_EQ(float_to_fp16(std::numeric_limits<float>::denorm_min()), 0x0000);
  EXPECT_TRUE(is_nan_fp16(float_to_fp16(std::numeric_limits<float>::quiet_NaN())));
  // A NaN whose payload lies only in the low 13 bits must not become Inf.
  EXPECT_TRUE(is_nan_fp16(float_to_fp16(from_bits(0x7f800001u))));
  EXPECT_TRUE(is_nan_fp16(float_to_fp16(from_bits(0xff800001u))));
  EXPECT_EQ(float_to_fp16(from_bits(0xff800001u)) & 0x8000, 0x8000);
}

TEST(Half, Bf16ToFloatIsExactForAllPatterns) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = bf16_to_float(uint16_t(h));
    ASSERT_EQ(bits(f), h << 16) << std::hex << h;
  }
}

TEST(Half, Bf16RoundTripIsIdentityAndNaNsStayQuietNaNs) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const uint16_t back = float_to_bf16(bf16_to_float(uint16_t(h)));
    if (is_nan_bf16(uint16_t(h)))
      ASSERT_EQ(back, uint16_t(h | 0x0040)) << std::hex << h;
    else
      ASSERT_EQ(back, uint16_t(h)) << std::hex << h;
  }
}

TEST(Half, FloatToBf16RoundsToNearestEvenAtEveryMidpoint) {
  for (uint32_t sign : {0u, 0x8000u}) {
    for (uint32_t h = 0; h < 0x7f80; ++h) {
      const uint16_t lo = uint16_t(sign | h), hi = uint16_t(sign | (h + 1));
      // The midpoint's fp32 pattern is the lower value's with the first dropped bit set.
      const float mid = from_bits((uint32_t(lo) << 16) | 0x8000u);
      const uint16_t even = (lo & 1) ? hi : lo;
      ASSERT_EQ(float_to_bf16(mid), even) << std::hex << lo;
      ASSERT_EQ(float_to_bf16(from_bits((uint32_t(lo) << 16) | 0x7fffu)), lo) << std::hex << lo;
      ASSERT_EQ(float_to_bf16(from_bits((uint32_t(lo) << 16) | 0x8001u)), hi) << std::hex << lo;
    }
  }
  EXPECT_TRUE(is_nan_bf16(float_to_bf16(from_bits(0x7f800001u))));  // payload only in dropped bits
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::max()), 0x7f80);  // rounds up to Inf
}

TEST(Half, BulkConversionsMatchScalarForAllPatterns) {
  std::vector<uint16_t> all(65536);
  for (uint32_t h = 0; h < 65536; ++h) all[h] = uint16_t(h);
  std::vector<float> f16(65536), bf(65536);
  nuq::convert_fp16_to_float(all.data(), f16.data(), all.size());
  nuq::convert_bf16_to_float(all.data(), bf.data(), all.size());
  for (uint32_t h = 0; h < 65536; ++h) {
    const float s16 = fp16_to_float(uint16_t(h)), sbf = bf16_to_float(uint16_t(h));
    ASSERT_TRUE(bits(f16[h]) == bits(s16) || (std::isnan(f16[h]) && std::isnan(s16))) << std::hex << h;
    ASSERT_EQ(bits(bf[h]), bits(sbf)) << std::hex << h;
  }
  // Float -> half over many random patterns (odd length to exercise the tail).
  std::mt19937 rng(7);
  std::vector<float> src(100003);
  for (auto& f : src) f = from_bits(rng());
  std::vector<uint16_t> out16(src.size()), outbf(src.size());
  nuq::convert_float_to_fp16(src.data(), out16.data(), src.size());
  nuq::convert_float_to_bf16(src.data(), outbf.data(), src.size());
  for (std::size_t i = 0; i < src.size(); ++i) {
    ASSERT_EQ(outbf[i], float_to_bf16(src[i])) << i;
    if (std::isnan(src[i]))
      ASSERT_TRUE(is_nan_fp16(out16[i])) << i;
    else
      ASSERT_EQ(out16[i], float_to_fp16(src[i])) << "float bits " << std::hex << bits(src[i]);
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("f16c"))) uint16_t hw_fp16(float f) { return uint16_t(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT)); }

// The hardware converter is an independent reference for rounding: compare on random floats spread
// over every exponent.
TEST(Half, FloatToFp16AgreesWithF16CHardware) {
  unsigned a, b, c, d;
  __asm__("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1), "c"(0));
  if (!(c & (1u << 29))) GTEST_SKIP() << "CPU has no F16C instructions";
  std::mt19937 rng(11);
  for (int i = 0; i < 4'000'000; ++i) {
    const float f = from_bits(rng());
    if (std::isnan(f)) continue;
    ASSERT_EQ(float_to_fp16(f), hw_fp16(f)) << "float bits " << std::hex << bits(f);
  }
}
#endif

}  // namespace
