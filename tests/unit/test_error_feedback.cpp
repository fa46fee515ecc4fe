// Error feedback (QuantizeOptions::hessian, GPTQ's column sweep onto fixed codebooks): against an
// unblocked float64 sweep written here from the OBS update, on identity and correlated XᵀX, with the
// sparse part, for every method and bit width; thread-count invariance and bad Hessians.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "nuq/error.hpp"
#include "nuq/half.hpp"
#include "nuq/packed.hpp"
#include "nuq/quantize.hpp"

namespace {

using nuq::PackedLinear;
using nuq::QuantizeOptions;
using nuq::QuantMethod;

// Inputs with a few dominant, shared directions plus noise, as LLM activations have: XᵀX is far from
// diagonal, which is where error feedback matters.
std::vector<double> correlated_hessian(int64_t cols, int64_t tokens, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> n01;
  const int64_t directions = 4;
  std::vector<double> basis(std::size_t(directions * cols));
  for (double& b : basis) b = n01(rng);
  std::vector<double> h(std::size_t(cols * cols), 0.0), x(static_cast<std::size_t>(cols));
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t c = 0; c < cols; ++c) x[c] = 0.3 * n01(rng) * (1.0 + double(c % 5));
    for (int64_t d = 0; d < directions; ++d) {
      const double a = 2.0 * n01(rng);
      for (int64_t c = 0; c < cols; ++c) x[c] += a * basis[d * cols + c];
    }
    for (int64_t i = 0; i < cols; ++i)
      for (int64_t j = 0; j < cols; ++j) h[i * cols + j] += x[i] * x[j] / double(tokens);
  }
  return h;
}

std::vector<float> random_weights(int64_t rows, int64_t cols, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::student_t_distribution<float> t(4.0f);
  std::vector<float> w(std::size_t(rows * cols));
  for (float& v : w) v = 0.02f * t(rng);
  return w;
}

std::vector<float> decode(const PackedLinear& p) {
  std::vector<float> out(std::size_t(p.rows * p.cols));
  nuq::dequantize_reference(p.view(), out.data());
  return out;
}

// Σ_r (w_r − ŵ_r) H (w_r − ŵ_r)ᵀ: the squared output error over the calibration inputs.
double output_error(const std::vector<float>& w, const std::vector<float>& wq, const std::vector<double>& h,
                    int64_t rows, int64_t cols) {
  double total = 0;
  std::vector<double> d(static_cast<std::size_t>(cols));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) d[c] = double(w[r * cols + c]) - double(wq[r * cols + c]);
    for (int64_t i = 0; i < cols; ++i) {
      double hi = 0;
      for (int64_t j = 0; j < cols; ++j) hi += h[i * cols + j] * d[j];
      total += d[i] * hi;
    }
  }
  return total;
}

bool same_bytes(const nuq::Buffer& a, const nuq::Buffer& b) {
  return a.nbytes() == b.nbytes() && (a.nbytes() == 0 || std::memcmp(a.data(), b.data(), a.nbytes()) == 0);
}

bool same_packed(const PackedLinear& a, const PackedLinear& b) {
  return same_bytes(a.qweight, b.qweight) && same_bytes(a.lut, b.lut) && same_bytes(a.sparse_row_ptr, b.sparse_row_ptr) &&
         same_bytes(a.sparse_col_idx, b.sparse_col_idx) && same_bytes(a.sparse_values, b.sparse_values);
}

// Lower Cholesky factor of a symmetric positive definite matrix (row-major), in float64.
std::vector<double> cholesky_lower(const std::vector<double>& a, int64_t n) {
  std::vector<double> l(std::size_t(n * n), 0.0);
  for (int64_t j = 0; j < n; ++j) {
    double s = a[j * n + j];
    for (int64_t k = 0; k < j; ++k) s -= l[j * n + k] * l[j * n + k];
    l[j * n + j] = std::sqrt(s);
    for (int64_t i = j + 1; i < n; ++i) {
      double t = a[i * n + j];
      for (int64_t k = 0; k < j; ++k) t -= l[i * n + k] * l[j * n + k];
      l[i * n + j] = t / l[j * n + j];
    }
  }
  return l;
}

// The unblocked sweep from its definition: columns in decreasing-diagonal order; after rounding column
// i to the nearest entry of its row's codebook (taken from the library's LUT), every later column j
// moves by −(w_i − q_i)·[H⁻¹]_ij / [H⁻¹]_ii, with H⁻¹ the inverse of the damped Hessian restricted to
// the columns not yet rounded. That restricted inverse is what the Cholesky row of the full inverse
// encodes; here it is recomputed directly, by Gaussian elimination of the rounded column.
std::vector<float> reference_sweep(const std::vector<float>& w, const std::vector<double>& h, int64_t rows, int64_t cols,
                                   const PackedLinear& codebooks, double damping) {
  std::vector<int64_t> order(cols);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return h[a * cols + a] > h[b * cols + b]; });
  double mean = 0;
  for (int64_t c = 0; c < cols; ++c) mean += h[c * cols + c];
  mean /= double(cols);
  std::vector<double> hp(std::size_t(cols * cols));
  for (int64_t i = 0; i < cols; ++i)
    for (int64_t j = 0; j < cols; ++j) hp[i * cols + j] = h[order[i] * cols + order[j]];
  for (int64_t i = 0; i < cols; ++i) hp[i * cols + i] = (hp[i * cols + i] == 0 ? 1.0 : hp[i * cols + i]) + damping * mean;
  // Full inverse by Cholesky solves, then Gaussian elimination of one index at a time.
  const std::vector<double> l = cholesky_lower(hp, cols);
  std::vector<double> inv(std::size_t(cols * cols));
  std::vector<double> y(static_cast<std::size_t>(cols));
  for (int64_t e = 0; e < cols; ++e) {
    for (int64_t i = 0; i < cols; ++i) {
      double s = i == e ? 1.0 : 0.0;
      for (int64_t k = 0; k < i; ++k) s -= l[i * cols + k] * y[k];
      y[i] = s / l[i * cols + i];
    }
    for (int64_t i = cols - 1; i >= 0; --i) {
      double s = y[i];
      for (int64_t k = i + 1; k < cols; ++k) s -= l[k * cols + i] * inv[k * cols + e];
      inv[i * cols + e] = s / l[i * cols + i];
    }
  }
  const int k = nuq::format::lut_entries(codebooks.bits);
  const int64_t groups = codebooks.cols / codebooks.group_size;
  std::vector<double> work(w.begin(), w.end());
  std::vector<float> targets(w.size());
  for (int64_t step = 0; step < cols; ++step) {
    const int64_t c = order[step];
    for (int64_t r = 0; r < rows; ++r) {
      const double x = work[r * cols + c];
      targets[r * cols + c] = float(x);
      const uint16_t* lut = codebooks.lut.data_as<uint16_t>() + (r * groups + c / codebooks.group_size) * k;
      double q = nuq::fp16_to_float(lut[0]);
      for (int e = 1; e < k; ++e) {
        const double v = nuq::fp16_to_float(lut[e]);
        if (std::fabs(x - v) < std::fabs(x - q)) q = v;
      }
      const double err = (x - q) / inv[step * cols + step];
      for (int64_t j = step + 1; j < cols; ++j) work[r * cols + order[j]] -= err * inv[step * cols + j];
    }
    // Eliminate `step` from the inverse: what remains is the inverse of the Hessian of the unrounded columns.
    const double pivot = inv[step * cols + step];
    for (int64_t i = step + 1; i < cols; ++i)
      for (int64_t j = step + 1; j < cols; ++j) inv[i * cols + j] -= inv[i * cols + step] * inv[step * cols + j] / pivot;
  }
  // Final values: each target rounded to its nearest codebook entry.
  std::vector<float> out(w.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const uint16_t* lut = codebooks.lut.data_as<uint16_t>() + (r * groups + c / codebooks.group_size) * k;
      float q = nuq::fp16_to_float(lut[0]);
      for (int e = 1; e < k; ++e) {
        const float v = nuq::fp16_to_float(lut[e]);
        if (std::fabs(targets[r * cols + c] - v) < std::fabs(targets[r * cols + c] - q)) q = v;
      }
      out[r * cols + c] = q;
    }
  return out;
}

struct Case {
  QuantMethod method;
  int bits;
  int64_t group_size;
};

TEST(ErrorFeedback, MatchesTheUnblockedFloat64SweepAndLowersTheOutputError) {
  // 19 rows (not a multiple of the 64-row chunks), 197 columns (one full 128-column block and a ragged one).
  const int64_t rows = 19, cols = 197;
  const std::vector<double> h = correlated_hessian(cols, 4 * cols, 7);
  const std::vector<float> w = random_weights(rows, cols, 11);
  for (const Case& cs : {Case{QuantMethod::nuq, 2, 0}, Case{QuantMethod::nuq, 3, 0}, Case{QuantMethod::nuq, 4, 0},
                         Case{QuantMethod::rtn, 3, 0}, Case{QuantMethod::kmeans, 4, 0}}) {
    SCOPED_TRACE(testing::Message() << nuq::to_string(cs.method) << " " << cs.bits << " bits");
    QuantizeOptions plain;
    plain.method = cs.method;
    plain.bits = cs.bits;
    plain.threads = 1;
    QuantizeOptions fb = plain;
    fb.hessian = h.data();
    QuantizeOptions measured = fb;  // plain rounding, output error measured
    measured.error_feedback = false;
    nuq::QuantizeReport r0, r1, rm;
    const PackedLinear p0 = nuq::quantize_linear(w.data(), nullptr, rows, cols, cols, plain, "w", &r0);
    const PackedLinear p1 = nuq::quantize_linear(w.data(), nullptr, rows, cols, cols, fb, "w", &r1);
    const PackedLinear pm = nuq::quantize_linear(w.data(), nullptr, rows, cols, cols, measured, "w", &rm);
    const std::vector<float> d0 = decode(p0), d1 = decode(p1);
    const std::vector<float> zero(w.size(), 0.0f);
    const double energy = output_error(w, zero, h, rows, cols);
    EXPECT_EQ(r0.relative_output_error, 0.0);
    EXPECT_NEAR(r1.relative_output_error, output_error(w, d1, h, rows, cols) / energy, 1e-4 * r1.relative_output_error);
    if (cs.method != QuantMethod::nuq) EXPECT_TRUE(same_packed(p0, pm)) << "measuring must not change the rounding";
    EXPECT_NEAR(rm.relative_output_error, output_error(w, decode(pm), h, rows, cols) / energy,
                1e-4 * rm.relative_output_error);
    if (cs.method != QuantMethod::nuq)  // nuq weighs its k-means by diag(H) when given H, the others never do
      EXPECT_TRUE(same_bytes(p0.lut, p1.lut)) << "error feedback must not change the codebooks";
    const std::vector<float> ref = reference_sweep(w, h, rows, cols, p1, fb.hessian_damping);
    int64_t equal = 0;
    for (std::size_t i = 0; i < d1.size(); ++i) equal += d1[i] == ref[i];
    // fp32 blocked vs float64 unblocked arithmetic may round a near-tie the other way, and a flip
    // changes what later columns receive; more than a few such flips would mean a wrong update.
    EXPECT_GE(double(equal) / double(d1.size()), 0.99);
    const double e0 = output_error(w, d0, h, rows, cols), e1 = output_error(w, d1, h, rows, cols),
                 er = output_error(w, ref, h, rows, cols);
    EXPECT_NEAR(e1, er, 0.01 * er);
    // GPTQ reports several-fold lower output error than rounding to nearest on correlated inputs.
    EXPECT_LT(e1, 0.6 * e0) << "plain " << e0 << ", with feedback " << e1;
  }
}

// The factorization runs in panels of 128 columns (row blocks over threads), the sweep in blocks of 128:
// 601 columns cross several of both, with ragged ends. Same checks as above, and threads must not change
// a bit.
TEST(ErrorFeedback, WideMatricesAcrossFactorPanelsMatchTheReferenceWhateverTheThreads) {
  const int64_t rows = 5, cols = 601;
  const std::vector<double> h = correlated_hessian(cols, 2 * cols, 13);
  const std::vector<float> w = random_weights(rows, cols, 17);
  QuantizeOptions o;
  o.bits = 3;
  o.hessian = h.data();
  o.threads = 1;
  nuq::QuantizeReport report;
  const PackedLinear p1 = nuq::quantize_linear(w.data(), nullptr, rows, cols, cols, o, "w", &report);
  // Quantizing with another matrix in between evicts the cached factor, so that each thread count
  // factors `h` itself.
  const std::vector<double> other = correlated_hessian(cols, 2 * cols, 19);
  for (int t : {2, 3}) {
    QuantizeOptions evict = o;
    evict.hessian = other.data();
    (void)nuq::quantize_linear(w.data(), nullptr, rows, cols, cols, evict);
    o.threads = t;
    EXPECT_TRUE(same_packed(p1, nuq::quantize_linear(w.data(), nullptr, rows, cols, cols, o))) << t << " threads";
  }
  const std::vector<float> d1 = decode(p1), ref = reference_sweep(w, h, rows, cols, p1, o.hessian_damping);
  int64_t equal = 0;
  for (std::size_t i = 0; i < d1.size(); ++i) equal += d1[i] == ref[i];
  EXPECT_GE(double(equal) / double(d1.size()), 0.99);
  const double energy = output_error(w, std::vector<float>(w.size(), 0.0f), h, rows, cols);
  const double e1 = output_error(w, d1, h, rows, cols), er = output_error(w, ref, h, rows, cols);
  EXPECT_NEAR(e1, er, 0.01 * er);
  EXPECT_NEAR(report.relative_output_error, e1 / energy, 1e-4 * report.relative_output_error);
}

TEST(ErrorFeedback, DiagonalHessianChangesNothing) {
  // With no coupling between columns there is nothing to compensate: the result must be bit-identical
  // to plain rounding, sparse part included. A unit diagonal also leaves nuq's k-means weights (the
  // diagonal, when no sensitivities are given) equal to the unweighted default.
  const int64_t rows = 7, cols = 111;
  const std::vector<float> w = random_weights(rows, cols, 3);
  std::vector<double> h(std::size_t(cols * cols), 0.0);
  for (int64_t c = 0; c < cols; ++c) h[c * cols + c] = 1.0;
  for (QuantMethod m : {QuantMethod::nuq, QuantMethod::rtn}) {
    QuantizeOptions plain;
    plain.method = m;
    plain.bits = 3;
    plain.outlier_fraction = 0.02;
    QuantizeOptions fb = plain;
    fb.hessian = h.data();
    const PackedLinear p0 = nuq::quantize_linear(w.data(), nullptr, rows, cols, cols, plain);
    const PackedLinear p1 = nuq::quantize_linear(w.data(), nullptr, rows, cols, cols, fb);
    EXPECT_GT(p1.nnz(), 0);
    EXPECT_TRUE(same_packed(p0, p1)) << nuq::to_string(m);
  }
}

TEST(ErrorFeedback, SparseWeightsPassNoErrorOnAndResultsDoNotDependOnThreads) {
  const int64_t rows = 131, cols = 64;
  const std::vector<double> h = correlated_hessian(cols, 512, 5);
  const std::vector<float> w = random_weights(rows, cols, 9);
  QuantizeOptions o;
  o.bits = 3;
  o.outlier_fraction = 0.01;
  o.group_size = 32;
  o.hessian = h.data();
  o.threads = 1;
  const PackedLinear p1 = nuq::quantize_linear(w.data(), nullptr, rows, cols, cols, o);
  for (int t : {2, 3, 5}) {
    o.threads = t;
    EXPECT_TRUE(same_packed(p1, nuq::quantize_linear(w.data(), nullptr, rows, cols, cols, o))) << t << " threads";
  }
  // Against plain rounding with the same sparse budget, the output error still drops.
  QuantizeOptions plain = o;
  plain.hessian = nullptr;
  const PackedLinear p0 = nuq::quantize_linear(w.data(), nullptr, rows, cols, cols, plain);
  EXPECT_EQ(p0.nnz(), p1.nnz());
  EXPECT_LT(output_error(w, decode(p1), h, rows, cols), 0.8 * output_error(w, decode(p0), h, rows, cols));
}

TEST(ErrorFeedback, AHessianRewrittenInPlaceIsFactoredAgain) {
  // The factor of XᵀX is reused between calls with the same matrix (nuq plan quantizes each layer
  // several ways); it must follow the matrix's content and the damping, not the buffer's address. rtn's
  // codebooks do not depend on XᵀX, so only the factor can make the results differ, and each result is
  // held to the float64 sweep of the matrix the buffer holds at that moment.
  const int64_t rows = 19, cols = 80;
  const std::vector<float> w = random_weights(rows, cols, 21);
  const std::vector<double> h1 = correlated_hessian(cols, 256, 22), h2 = correlated_hessian(cols, 256, 23);
  std::vector<double> buffer = h2;
  const auto check = [&](const std::vector<double>& meant, double damping, const char* what) {
    QuantizeOptions o;
    o.method = QuantMethod::rtn;
    o.bits = 3;
    o.hessian = buffer.data();
    o.hessian_damping = damping;
    const PackedLinear p = nuq::quantize_linear(w.data(), nullptr, rows, cols, cols, o);
    const std::vector<float> got = decode(p), ref = reference_sweep(w, meant, rows, cols, p, damping);
    int64_t equal = 0;
    for (std::size_t i = 0; i < got.size(); ++i) equal += got[i] == ref[i];
    EXPECT_GE(double(equal) / double(got.size()), 0.99) << what;
    return got;
  };
  const std::vector<float> first = check(h2, 0.01, "first use");
  std::copy(h1.begin(), h1.end(), buffer.begin());
  const std::vector<float> rewritten = check(h1, 0.01, "same address, new content");
  EXPECT_NE(first, rewritten) << "the two Hessians must round differently for this test to mean anything";
  check(h1, 0.01, "reused");
  check(h1, 0.3, "another damping");
  check(h1, 0.01, "the first damping again");
}

TEST(ErrorFeedback, RejectsBadHessians) {
  const int64_t rows = 3, cols = 5;
  const std::vector<float> w = random_weights(rows, cols, 1);
  auto message = [&](std::vector<double> h, double damping) -> std::string {
    QuantizeOptions o;
    o.bits = 2;
    o.hessian = h.data();
    o.hessian_damping = damping;
    try {
      nuq::quantize_linear(w.data(), nullptr, rows, cols, cols, o, "blk.0.ffn_up.weight");
    } catch (const nuq::Error& e) {
      return e.what();
    }
    return "no error";
  };
  std::vector<double> eye(std::size_t(cols * cols), 0.0);
  for (int64_t c = 0; c < cols; ++c) eye[c * cols + c] = 1;
  auto with = [&](int64_t i, int64_t j, double v) {
    std::vector<double> h = eye;
    h[i * cols + j] = v;
    return h;
  };
  EXPECT_NE(message(with(1, 2, std::nan("")), 0.01).find("blk.0.ffn_up.weight: XᵀX [1, 2] is nan"), std::string::npos)
      << message(with(1, 2, std::nan("")), 0.01);
  EXPECT_NE(message(with(3, 3, -1), 0.01).find("diagonal [3] is -1"), std::string::npos);
  EXPECT_NE(message(with(0, 4, 0.5), 0.01).find("not symmetric"), std::string::npos);
  EXPECT_NE(message(eye, -0.1).find("damping -0.1"), std::string::npos);
  std::vector<double> ones(std::size_t(cols * cols), 1.0);  // rank 1: singular without damping
  EXPECT_NE(message(ones, 0.0).find("not positive definite"), std::string::npos) << message(ones, 0.0);
  EXPECT_EQ(message(ones, 0.01), "no error");
}

}  // namespace
