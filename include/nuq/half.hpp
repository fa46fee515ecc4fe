// IEEE binary16 (fp16) and bfloat16 conversions with round-to-nearest-even, usable from host and
// device code. Values are carried as raw uint16_t bits so that this header needs neither
// <cuda_fp16.h> nor a compiler extension type; kernels convert to their native types at the edge.
//
// Conventions (tested over all 65,536 bit patterns of each format):
//  * fp16/bf16 -> fp32 is exact (every value, subnormals, +-0, +-Inf); NaN stays NaN with its sign and
//    payload moved to the top of the fp32 mantissa.
//  * fp32 -> fp16/bf16 rounds to nearest, ties to even; overflow gives +-Inf; NaN gives a quiet NaN
//    with the sign and the top payload bits kept (never Inf, which plain truncation could produce).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "nuq/config.hpp"

namespace nuq {

NUQ_HOST_DEVICE inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

NUQ_HOST_DEVICE inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

NUQ_HOST_DEVICE inline float bf16_to_float(uint16_t h) { return bits_float(uint32_t(h) << 16); }

NUQ_HOST_DEVICE inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    // NaN: keep sign and top payload, force the quiet bit so the payload cannot truncate to Inf.
    return uint16_t((u >> 16) | 0x0040u);
  }
  // Adding 0x7fff plus the lowest kept bit rounds to nearest with ties to even; a carry out of the
  // mantissa correctly bumps the exponent (and the largest finite values round up to Inf).
  uint32_t lsb = (u >> 16) & 1u;
  return uint16_t((u + 0x7fffu + lsb) >> 16);
}

NUQ_HOST_DEVICE inline float fp16_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (mant << 13));  // Inf or NaN
  if (exp != 0) return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return bits_float(sign);
  // Subnormal: value = mant * 2^-24, exactly representable as a normal fp32.
  float magnitude = float(mant) * bits_float(0x33800000u);  // 2^-24
  return bits_float(sign | float_bits(magnitude));
}

NUQ_HOST_DEVICE inline uint16_t float_to_fp16(float f) {
  uint32_t u = float_bits(f);
  uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return uint16_t(sign | 0x7e00u | ((abs >> 13) & 0x3ffu));  // quiet NaN
  if (abs >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to >= 65520: Inf
  if (abs >= 0x38800000u) {
    // Normal fp16 range [2^-14, 65504]: rebias the exponent, round the 13 dropped mantissa bits.
    uint32_t lsb = (abs >> 13) & 1u;
    uint32_t rounded = abs + 0xfffu + lsb;
    return uint16_t(sign | ((rounded - (112u << 23)) >> 13));
  }
  if (abs < 0x33000000u) return sign;  // below half of the smallest subnormal (2^-25): +-0
  // Subnormal fp16: shift the implicit-1 mantissa right so that its unit is 2^-24 and round to
  // nearest even (exactly 2^-25 is a tie and goes to 0).
  uint32_t exp = abs >> 23;
  uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
  uint32_t shift = 126u - exp;  // in [14, 24] here
  uint32_t kept = mant >> shift;
  uint32_t rem = mant & ((1u << shift) - 1u);
  uint32_t half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (kept & 1u))) ++kept;  // may carry into the smallest normal: fine
  return uint16_t(sign | kept);
}

// Bulk conversions over contiguous arrays (n elements). Vectorized where the CPU allows; results are
// bit-identical to the scalar functions above.
void convert_fp16_to_float(const uint16_t* src, float* dst, std::size_t n);
void convert_float_to_fp16(const float* src, uint16_t* dst, std::size_t n);
void convert_bf16_to_float(const uint16_t* src, float* dst, std::size_t n);
void convert_float_to_bf16(const float* src, uint16_t* dst, std::size_t n);

}  // namespace nuq
