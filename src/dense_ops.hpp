// Internal: the decoder's dense fp32 product tiles and work splitting (defined in llama.cpp), shared with
// the backward pass (llama_grad.cpp) so that both run the same run-time-dispatched AVX-512/AVX2 code.
#pragma once

#include <cstdint>
#include <functional>

namespace nuq::detail {

// Splits [0, n) into at most `threads` contiguous chunks aligned to `grain` on the CPU kernels' thread pool.
void dense_parallel_for(int threads, int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

// C = A·Bᵀ in fp32: A [m, k] (row stride lda), B [nb, k] (row stride ldb), C [m, nb] (row stride ldc); the
// nb rows of B are split over `threads`.
void dense_gemm_nt(int threads, const float* a, int64_t m, int64_t lda, const float* b, int64_t nb, int64_t ldb,
                   int64_t k, float* c, int64_t ldc);

}  // namespace nuq::detail
