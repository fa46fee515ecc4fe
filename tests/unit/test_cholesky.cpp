// The double-precision factorization behind error feedback (src/cholesky.hpp) against scalar references:
// the product tiles of every instruction set this CPU has, the blocked Cholesky factor and the blocked
// triangular inverse, on sizes that are not multiples of the tiles (4), the depth chunks (256) or the
// panels (128), and with 1, 2 and 3 threads, which must not change a bit.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "cholesky.hpp"
#include "cpu_features.hpp"

namespace {

using nuq::detail::DoubleTiles;

std::vector<double> random_matrix(int64_t rows, int64_t cols, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> g(0.0, 1.0);
  std::vector<double> m(std::size_t(rows * cols));
  for (double& x : m) x = g(rng);
  return m;
}

// X·Xᵀ/k + 0.1·I for a random X [n, k]: symmetric positive definite with a spread of eigenvalues.
std::vector<double> spd(int64_t n, uint64_t seed) {
  const int64_t k = n + 7;
  const std::vector<double> x = random_matrix(n, k, seed);
  std::vector<double> a(std::size_t(n * n));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (int64_t p = 0; p < k; ++p) s += x[i * k + p] * x[j * k + p];
      a[i * n + j] = s / double(k) + (i == j ? 0.1 : 0.0);
    }
  return a;
}

// Textbook Cholesky–Banachiewicz, one element at a time.
std::vector<double> reference_cholesky(const std::vector<double>& a, int64_t n) {
  std::vector<double> l(a.size(), 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j <= i; ++j) {
      double s = a[i * n + j];
      for (int64_t p = 0; p < j; ++p) s -= l[i * n + p] * l[j * n + p];
      l[i * n + j] = i == j ? std::sqrt(s) : s / l[j * n + j];
    }
  return l;
}

// L⁻¹ by forward substitution against each unit vector.
std::vector<double> reference_inverse(const std::vector<double>& l, int64_t n) {
  std::vector<double> inv(l.size(), 0.0);
  for (int64_t c = 0; c < n; ++c)
    for (int64_t i = c; i < n; ++i) {
      double s = i == c ? 1.0 : 0.0;
      for (int64_t p = c; p < i; ++p) s -= l[i * n + p] * inv[p * n + c];
      inv[i * n + c] = s / l[i * n + i];
    }
  return inv;
}

double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::fabs(x));
  return m;
}

std::vector<double> lower(const std::vector<double>& a, int64_t n) {
  std::vector<double> l(a.size(), 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j <= i; ++j) l[i * n + j] = a[i * n + j];
  return l;
}

std::vector<DoubleTiles> supported_tiles() {
  std::vector<DoubleTiles> t{DoubleTiles::scalar};
  const auto& f = nuq::detail::cpu_features();
  if (f.avx2 && f.fma) t.push_back(DoubleTiles::avx2);
  if (f.avx512f && f.fma) t.push_back(DoubleTiles::avx512);
  return t;
}

const int64_t kSizes[] = {1, 3, 19, 111, 128, 129, 300, 601};

TEST(Cholesky, ProductTilesOfEveryInstructionSetMatchTheScalarLoop) {
  // Shapes cross the 4×4 tiles, the 8- and 4-wide vectors and the 256-deep chunks; strides exceed widths.
  for (const DoubleTiles tiles : supported_tiles()) {
    for (const auto& [m, nb, k] : std::vector<std::array<int64_t, 3>>{{1, 1, 1}, {5, 3, 7}, {19, 17, 33}, {9, 6, 600}}) {
      SCOPED_TRACE(testing::Message() << "tiles " << int(tiles) << " m " << m << " nb " << nb << " k " << k);
      const int64_t lda = k + 3, ldb = k + 5, ldc = nb + 2;
      const std::vector<double> a = random_matrix(m, lda, 1), b = random_matrix(nb, ldb, 2);
      std::vector<double> c = random_matrix(m, ldc, 3), want = c;
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < nb; ++j) {
          double s = 0;
          for (int64_t p = 0; p < k; ++p) s += a[i * lda + p] * b[j * ldb + p];
          want[i * ldc + j] += -0.5 * s;
        }
      nuq::detail::gemm_nt_accumulate(tiles, a.data(), m, lda, b.data(), nb, ldb, k, c.data(), ldc, -0.5);
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < ldc; ++j)
          // Beyond nb the row's padding must stay as it was; inside, sums of k products in another order.
          EXPECT_NEAR(c[i * ldc + j], want[i * ldc + j], j < nb ? 1e-12 * double(k) : 0.0) << i << ", " << j;
    }
  }
}

TEST(Cholesky, BlockedFactorAndInverseMatchTheTextbookOnOddSizes) {
  for (const int64_t n : kSizes) {
    SCOPED_TRACE(testing::Message() << "n = " << n);
    const std::vector<double> a = spd(n, uint64_t(n));
    const std::vector<double> want_l = reference_cholesky(a, n), want_inv = reference_inverse(want_l, n);
    std::vector<double> first;
    for (const int threads : {1, 2, 3}) {
      std::vector<double> l = a;
      ASSERT_TRUE(nuq::detail::cholesky_lower_in_place(l.data(), n, threads));
      const std::vector<double> got_l = lower(l, n);
      double err = 0;
      for (std::size_t i = 0; i < got_l.size(); ++i) err = std::max(err, std::fabs(got_l[i] - want_l[i]));
      EXPECT_LE(err, 1e-11 * max_abs(want_l)) << threads << " threads: factor";
      nuq::detail::invert_lower_in_place(l.data(), n, threads);
      err = 0;
      for (std::size_t i = 0; i < l.size(); ++i) err = std::max(err, std::fabs(l[i] - want_inv[i]));
      EXPECT_LE(err, 1e-10 * max_abs(want_inv)) << threads << " threads: inverse (upper triangle must be zero)";
      if (first.empty()) first = l;
      else EXPECT_EQ(l, first) << threads << " threads changed the result";
    }
  }
}

TEST(Cholesky, RefusesMatricesThatAreNotPositiveDefinite) {
  for (const int64_t n : {int64_t(3), int64_t(300)}) {
    std::vector<double> a = spd(n, 5);
    a[(n - 1) * n + (n - 1)] = -1.0;  // the last pivot, reached after every panel
    EXPECT_FALSE(nuq::detail::cholesky_lower_in_place(a.data(), n, 2)) << n;
    std::vector<double> nan = spd(n, 6);
    nan[n / 2 * n + n / 2] = std::nan("");
    EXPECT_FALSE(nuq::detail::cholesky_lower_in_place(nan.data(), n, 2)) << n;
  }
}

}  // namespace
