// The fused LUT GEMV for AVX2 + FMA + F16C. Built with those instruction sets enabled for this file
// only (CMakeLists.txt); called only after the dispatcher has checked the CPU has them.
#include <immintrin.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#include "linear_kernel.hpp"

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "linear_avx2.cpp must be compiled with -mavx2 -mfma -mf16c"
#endif

namespace nuq::cpu::detail {
namespace {

inline float h2f(uint16_t h) { return _cvtsh_ss(h); }

#define NUQ_KERNEL_SIMD 1
#include "simd256.inl"
#include "linear_kernel.inl"

}  // namespace

void gemv_rows_avx2(const KernelArgs& args, int64_t r0, int64_t r1, float* scratch) {
  if (args.lanes != S256::W) kernel_unsupported("AVX2 lanes", args.lanes);
  gemv_rows<S256>(args, r0, r1, scratch);
}

}  // namespace nuq::cpu::detail
