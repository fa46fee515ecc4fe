// Internal: double-precision Cholesky factorization and lower-triangular inverse, for error feedback's
// factor of XᵀX (quantize.cpp). Eigen's versions run at the library's baseline ISA (two doubles per
// SSE2 instruction, no FMA) and on one thread; a 28672-column XᵀX then takes minutes per layer. Here the
// O(n³) work goes through products of rows against rows (both operands contiguous) with run-time
// dispatched AVX-512/AVX2 tiles over the CPU kernels' thread pool. Every output is computed by one task
// with a fixed order of operations, so the results do not depend on the thread count.
//
// Matrices are row-major [n, n] doubles; only their lower triangles are read and written, except where
// a function says that it uses the strict upper triangle as scratch.
#pragma once

#include <cstdint>

namespace nuq::detail {

// Replaces the lower triangle of the symmetric matrix `a` by its Cholesky factor L (A = L·Lᵀ); the
// strict upper triangle is overwritten (scratch). Returns false, `a` partly factored, when a pivot is
// not positive and finite (A not numerically positive definite).
bool cholesky_lower_in_place(double* a, int64_t n, int threads);

// Replaces the lower-triangular `a` (positive diagonal) by its inverse, also lower triangular. The
// strict upper triangle is set to zero.
void invert_lower_in_place(double* a, int64_t n, int threads);

// The instruction sets the product tiles exist for; the functions above use the widest this CPU has.
enum class DoubleTiles { scalar, avx2, avx512 };
DoubleTiles widest_double_tiles();

// C[i, j] += scale · Σ_k A[i, k]·B[j, k] for i < m, j < nb (row strides lda, ldb, ldc), on the calling
// thread with the given tiles (which the CPU must support): the product everything above is made of,
// exposed for the harness that checks each instruction set against a scalar loop.
void gemm_nt_accumulate(DoubleTiles tiles, const double* a, int64_t m, int64_t lda, const double* b, int64_t nb,
                        int64_t ldb, int64_t k, double* c, int64_t ldc, double scale);

}  // namespace nuq::detail
