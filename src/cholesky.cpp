#include "cholesky.hpp"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/thread_pool.hpp"
#include "cpu_features.hpp"

namespace nuq::detail {
namespace {

using Simd = DoubleTiles;

// GCC 12 warns about the deliberately undefined pass-through operands inside its own AVX-512 headers
// (_mm512_undefined_pd, reached through _mm512_reduce_add_pd), not about this code.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
__attribute__((target("avx512f,fma"))) inline double hsum512(__m512d v) { return _mm512_reduce_add_pd(v); }
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

// c[i·ldc + j] += scale · Σ_k a[i·lda + k]·b[j·ldb + k] for an NT × NR tile: NT·NR dot products kept in
// registers while both operands stream along k.
template <int NT, int NR>
__attribute__((target("avx512f,fma"))) void tile_avx512(const double* a, int64_t lda, const double* b, int64_t ldb,
                                                        int64_t k, double* c, int64_t ldc, double scale) {
  __m512d acc[NT][NR];
  for (int i = 0; i < NT; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_pd();
  int64_t p = 0;
  for (; p + 8 <= k; p += 8) {
    __m512d bv[NR];
    for (int j = 0; j < NR; ++j) bv[j] = _mm512_loadu_pd(b + j * ldb + p);
    for (int i = 0; i < NT; ++i) {
      const __m512d av = _mm512_loadu_pd(a + i * lda + p);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_pd(av, bv[j], acc[i][j]);
    }
  }
  if (p < k) {
    const __mmask8 m = __mmask8((1u << (k - p)) - 1);
    __m512d bv[NR];
    for (int j = 0; j < NR; ++j) bv[j] = _mm512_maskz_loadu_pd(m, b + j * ldb + p);
    for (int i = 0; i < NT; ++i) {
      const __m512d av = _mm512_maskz_loadu_pd(m, a + i * lda + p);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_pd(av, bv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < NT; ++i)
    for (int j = 0; j < NR; ++j) c[i * ldc + j] += scale * hsum512(acc[i][j]);
}

__attribute__((target("avx2,fma"))) inline double hsum256(__m256d v) {
  const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

template <int NT, int NR>
__attribute__((target("avx2,fma"))) void tile_avx2(const double* a, int64_t lda, const double* b, int64_t ldb,
                                                   int64_t k, double* c, int64_t ldc, double scale) {
  __m256d acc[NT][NR];
  for (int i = 0; i < NT; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_pd();
  int64_t p = 0;
  for (; p + 4 <= k; p += 4) {
    __m256d bv[NR];
    for (int j = 0; j < NR; ++j) bv[j] = _mm256_loadu_pd(b + j * ldb + p);
    for (int i = 0; i < NT; ++i) {
      const __m256d av = _mm256_loadu_pd(a + i * lda + p);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_pd(av, bv[j], acc[i][j]);
    }
  }
  double tail[NT][NR] = {};
  for (; p < k; ++p)
    for (int i = 0; i < NT; ++i)
      for (int j = 0; j < NR; ++j) tail[i][j] += a[i * lda + p] * b[j * ldb + p];
  for (int i = 0; i < NT; ++i)
    for (int j = 0; j < NR; ++j) c[i * ldc + j] += scale * (hsum256(acc[i][j]) + tail[i][j]);
}

template <int NT, int NR>
void tile_scalar(const double* a, int64_t lda, const double* b, int64_t ldb, int64_t k, double* c, int64_t ldc,
                 double scale) {
  for (int i = 0; i < NT; ++i)
    for (int j = 0; j < NR; ++j) {
      double s = 0;
      for (int64_t p = 0; p < k; ++p) s += a[i * lda + p] * b[j * ldb + p];
      c[i * ldc + j] += scale * s;
    }
}

template <int NT, int NR>
void tile(Simd s, const double* a, int64_t lda, const double* b, int64_t ldb, int64_t k, double* c, int64_t ldc,
          double scale) {
  switch (s) {
    case Simd::avx512: return tile_avx512<NT, NR>(a, lda, b, ldb, k, c, ldc, scale);
    case Simd::avx2: return tile_avx2<NT, NR>(a, lda, b, ldb, k, c, ldc, scale);
    case Simd::scalar: return tile_scalar<NT, NR>(a, lda, b, ldb, k, c, ldc, scale);
  }
}

// Columns per step of the factorization and the inverse: the diagonal blocks (n·kPanel² work, scalar)
// stay small while the products get a depth of at least kPanel.
constexpr int64_t kPanel = 128;
// Rows per task of the parallel steps.
constexpr int64_t kRowsPerTask = 32;

// Unblocked Cholesky of the jb × jb diagonal block at `d` (row stride ld), lower triangle in place.
bool factor_diagonal_block(double* d, int64_t jb, int64_t ld) {
  for (int64_t j = 0; j < jb; ++j) {
    double s = d[j * ld + j];
    for (int64_t p = 0; p < j; ++p) s -= d[j * ld + p] * d[j * ld + p];
    if (!(s > 0) || !std::isfinite(s)) return false;
    const double l = std::sqrt(s);
    d[j * ld + j] = l;
    for (int64_t i = j + 1; i < jb; ++i) {
      double t = d[i * ld + j];
      for (int64_t p = 0; p < j; ++p) t -= d[i * ld + p] * d[j * ld + p];
      d[i * ld + j] = t / l;
    }
  }
  return true;
}

// The inverse of the lower-triangular jb × jb block at `l` (row stride ld) into `out` [jb, jb], zeros above
// the diagonal, by forward substitution column by column.
void invert_diagonal_block(const double* l, int64_t jb, int64_t ld, double* out) {
  std::fill(out, out + jb * jb, 0.0);
  for (int64_t c = 0; c < jb; ++c) {
    out[c * jb + c] = 1.0 / l[c * ld + c];
    for (int64_t i = c + 1; i < jb; ++i) {
      double t = 0;
      for (int64_t p = c; p < i; ++p) t += l[i * ld + p] * out[p * jb + c];
      out[i * jb + c] = -t / l[i * ld + i];
    }
  }
}

// fn(task) for every task in [0, tasks) over the CPU kernels' thread pool.
template <class Fn>
void for_each_task(int64_t tasks, int threads, Fn& fn) {
  cpu::detail::parallel_for(
      tasks, threads, [](void* f, int64_t t, int) { (*static_cast<Fn*>(f))(t); }, &fn);
}

}  // namespace

DoubleTiles widest_double_tiles() {
  static const DoubleTiles widest = [] {
    const CpuFeatures& f = cpu_features();
    if (f.avx512f && f.fma) return DoubleTiles::avx512;
    if (f.avx2 && f.fma) return DoubleTiles::avx2;
    return DoubleTiles::scalar;
  }();
  return widest;
}

void gemm_nt_accumulate(DoubleTiles simd, const double* a, int64_t m, int64_t lda, const double* b, int64_t nb,
                        int64_t ldb, int64_t k, double* c, int64_t ldc, double scale) {
  using Tile = void (*)(Simd, const double*, int64_t, const double*, int64_t, int64_t, double*, int64_t, double);
  static constexpr Tile tiles[4][4] = {
      {tile<1, 1>, tile<1, 2>, tile<1, 3>, tile<1, 4>},
      {tile<2, 1>, tile<2, 2>, tile<2, 3>, tile<2, 4>},
      {tile<3, 1>, tile<3, 2>, tile<3, 3>, tile<3, 4>},
      {tile<4, 1>, tile<4, 2>, tile<4, 3>, tile<4, 4>},
  };
  // Depth in chunks, so that B's chunk (at most a panel's rows × kDepth doubles) stays in L2 while every
  // row tile of A passes over it.
  constexpr int64_t kDepth = 256;
  for (int64_t p = 0; p < k; p += kDepth) {
    const int64_t kc = std::min(kDepth, k - p);
    for (int64_t i = 0; i < m; i += 4) {
      const int ni = int(std::min<int64_t>(4, m - i));
      for (int64_t j = 0; j < nb; j += 4) {
        const int nj = int(std::min<int64_t>(4, nb - j));
        tiles[ni - 1][nj - 1](simd, a + i * lda + p, lda, b + j * ldb + p, ldb, kc, c + i * ldc + j, ldc, scale);
      }
    }
  }
}

// Left-looking, a panel of kPanel columns at a time: the panel's diagonal block receives the products of
// the rows already factored and is factored itself; then, in parallel over blocks of rows, the rows below
// receive the same products and are multiplied by the inverse of the diagonal block's factor.
bool cholesky_lower_in_place(double* a, int64_t n, int threads) {
  const DoubleTiles simd = widest_double_tiles();
  std::vector<double> diagonal_inverse(std::size_t(kPanel * kPanel));
  for (int64_t j0 = 0; j0 < n; j0 += kPanel) {
    const int64_t jb = std::min(kPanel, n - j0), j1 = j0 + jb;
    double* diagonal = a + j0 * n + j0;
    if (j0 > 0) gemm_nt_accumulate(simd, a + j0 * n, jb, n, a + j0 * n, jb, n, j0, diagonal, n, -1.0);
    if (!factor_diagonal_block(diagonal, jb, n)) return false;
    invert_diagonal_block(diagonal, jb, n, diagonal_inverse.data());
    const int64_t tasks = (n - j1 + kRowsPerTask - 1) / kRowsPerTask;
    auto rows_below = [&](int64_t t) {
      const int64_t i0 = j1 + t * kRowsPerTask, m = std::min(kRowsPerTask, n - i0);
      double* panel = a + i0 * n + j0;  // A[i0 .. i0 + m, J]
      if (j0 > 0) gemm_nt_accumulate(simd, a + i0 * n, m, n, a + j0 * n, jb, n, j0, panel, n, -1.0);
      // L[i, J] = A[i, J]·L_JJ⁻ᵀ: row i against the rows of L_JJ⁻¹.
      double before[kRowsPerTask * kPanel];
      for (int64_t r = 0; r < m; ++r)
        for (int64_t b = 0; b < jb; ++b) {
          before[r * jb + b] = panel[r * n + b];
          panel[r * n + b] = 0;
        }
      gemm_nt_accumulate(simd, before, m, jb, diagonal_inverse.data(), jb, jb, jb, panel, n, 1.0);
    };
    for_each_task(tasks, threads, rows_below);
  }
  return true;
}

// From the last panel up (LAPACK's trtri order): with the trailing part already inverted,
// L⁻¹[J', J] = −L⁻¹[J', J'] · L[J', J] · L_JJ⁻¹ for the rows J' below the panel, in parallel over blocks of
// those rows; the strict upper triangle is zero, so a block of rows may run its products up to its last
// row's diagonal.
void invert_lower_in_place(double* a, int64_t n, int threads) {
  const DoubleTiles simd = widest_double_tiles();
  for (int64_t i = 0; i < n; ++i) std::fill(a + i * n + i + 1, a + (i + 1) * n, 0.0);
  std::vector<double> diagonal_inverse(std::size_t(kPanel * kPanel)), inverse_transposed(diagonal_inverse.size());
  std::vector<double> below_transposed;  // L[J', J]ᵀ: [jb, n − j1]
  for (int64_t j0 = (n - 1) / kPanel * kPanel; j0 >= 0; j0 -= kPanel) {
    const int64_t jb = std::min(kPanel, n - j0), j1 = j0 + jb, rest = n - j1;
    invert_diagonal_block(a + j0 * n + j0, jb, n, diagonal_inverse.data());
    if (rest > 0) {
      below_transposed.resize(std::size_t(jb * rest));
      for (int64_t r = 0; r < rest; ++r)
        for (int64_t b = 0; b < jb; ++b) below_transposed[b * rest + r] = a[(j1 + r) * n + j0 + b];
      for (int64_t b = 0; b < jb; ++b)
        for (int64_t c = 0; c < jb; ++c) inverse_transposed[b * jb + c] = diagonal_inverse[c * jb + b];
      const int64_t tasks = (rest + kRowsPerTask - 1) / kRowsPerTask;
      auto rows_below = [&](int64_t t) {
        const int64_t r0 = t * kRowsPerTask, m = std::min(kRowsPerTask, rest - r0), i0 = j1 + r0;
        double product[kRowsPerTask * kPanel] = {};  // L⁻¹[rows, J'] · L[J', J]
        gemm_nt_accumulate(simd, a + i0 * n + j1, m, n, below_transposed.data(), jb, rest, r0 + m, product, jb, 1.0);
        double* out = a + i0 * n + j0;
        for (int64_t r = 0; r < m; ++r) std::fill(out + r * n, out + r * n + jb, 0.0);
        gemm_nt_accumulate(simd, product, m, jb, inverse_transposed.data(), jb, jb, jb, out, n, -1.0);
      };
      for_each_task(tasks, threads, rows_below);
    }
    for (int64_t r = 0; r < jb; ++r)
      for (int64_t c = 0; c <= r; ++c) a[(j0 + r) * n + j0 + c] = diagonal_inverse[r * jb + c];
  }
}

}  // namespace nuq::detail
