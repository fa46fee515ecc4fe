// Run-time CPU feature detection for dispatching to vectorized code paths (internal header). Uses
// cpuid + xgetbv directly rather than __builtin_cpu_supports, whose feature names differ between GCC
// and clang versions, and checks that the OS saves the wider registers before reporting AVX/AVX-512.
#pragma once

namespace nuq::detail {

struct CpuFeatures {
  bool avx = false;
  bool f16c = false;
  bool fma = false;
  bool avx2 = false;
  bool avx512f = false;
  bool avx512bw = false;
  bool avx512vl = false;
  bool avx512vbmi = false;
  bool avx512vnni = false;
  bool avx512bf16 = false;
};

// Detected once; safe to call from any thread.
const CpuFeatures& cpu_features();

}  // namespace nuq::detail
