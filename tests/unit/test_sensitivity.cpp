// Calibration statistics: the Fisher and Hessian accumulators against sums computed directly here,
// split-and-merged runs against single runs, file round trips, bad input, and Hutchinson's estimator
// on operators whose trace is known.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "nuq/error.hpp"
#include "nuq/hutchinson.hpp"
#include "nuq/safetensors.hpp"
#include "nuq/sensitivity.hpp"

namespace {

namespace fs = std::filesystem;
using nuq::FisherAccumulator;
using nuq::HessianAccumulator;
using nuq::Shape;

std::vector<float> random_vector(std::size_t n, uint64_t seed, double scale = 1.0) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0, scale);
  std::vector<float> v(n);
  for (float& x : v) x = float(normal(rng));
  return v;
}

class TempDir {
 public:
  TempDir() {
    path_ = fs::temp_directory_path() /
            ("nuq_sens_" + std::to_string(::getpid()) + "_" + ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() { fs::remove_all(path_); }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  fs::path path_;
};

template <class Fn>
std::string error_of(Fn fn) {
  try {
    fn();
  } catch (const nuq::Error& e) {
    return e.what();
  }
  return "(no error)";
}

// ---- Fisher -------------------------------------------------------------------------------------------

struct FisherData {
  std::vector<std::vector<float>> a, b;  // per sample: tensor "a" [3, 4], tensor "b" [5]
};

FisherData fisher_samples(int n, uint64_t seed) {
  FisherData d;
  for (int s = 0; s < n; ++s) {
    d.a.push_back(random_vector(12, seed + 2 * s));
    d.b.push_back(random_vector(5, seed + 2 * s + 1, 3.0));
  }
  return d;
}

void feed(FisherAccumulator& acc, const FisherData& d, int begin, int end) {
  for (int s = begin; s < end; ++s) {
    acc.add("a", d.a[s].data(), Shape{3, 4});
    acc.add("b", d.b[s].data(), Shape{5});
  }
}

TEST(FisherAccumulator, MatchesDirectSumOfSquares) {
  const FisherData d = fisher_samples(7, 11);
  FisherAccumulator acc;
  feed(acc, d, 0, 7);
  EXPECT_EQ(acc.names(), (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(acc.count("a"), 7);
  EXPECT_EQ(acc.shape("a"), (Shape{3, 4}));
  for (int i = 0; i < 12; ++i) {
    long double direct = 0;
    for (int s = 0; s < 7; ++s) direct += (long double)d.a[s][i] * d.a[s][i];
    EXPECT_NEAR(acc.sum("a")[i], double(direct), 1e-12 * double(direct));
    EXPECT_FLOAT_EQ(acc.mean("a")[i], float(direct / 7));
  }
}

TEST(FisherAccumulator, MergeOfSplitRunsEqualsSingleRun) {
  const FisherData d = fisher_samples(9, 3);
  FisherAccumulator single, first, second, third;
  feed(single, d, 0, 9);
  feed(first, d, 0, 4);
  feed(second, d, 4, 6);
  feed(third, d, 6, 9);
  first.merge(second);
  first.merge(third);
  ASSERT_EQ(first.count("b"), 9);
  for (const char* name : {"a", "b"})
    for (std::size_t i = 0; i < single.sum(name).size(); ++i)
      EXPECT_NEAR(first.sum(name)[i], single.sum(name)[i], 1e-12 * single.sum(name)[i]);
  // A tensor only one run saw is taken over whole.
  FisherAccumulator other;
  const std::vector<float> c{1, 2};
  other.add("c", c.data(), Shape{2});
  first.merge(other);
  EXPECT_EQ(first.count("c"), 1);
  EXPECT_EQ(first.sum("c")[1], 4.0);
}

TEST(FisherAccumulator, SaveLoadRoundTripAndFileLayout) {
  TempDir dir;
  const FisherData d = fisher_samples(5, 21);
  FisherAccumulator acc;
  feed(acc, d, 0, 5);
  acc.save(dir.file("f.safetensors"));

  // The file is what `nuq quantize --fisher` reads: the weights' names and shapes, F32 means.
  nuq::SafetensorsCheckpoint file(dir.file("f.safetensors"));
  EXPECT_EQ(file.info("a").dtype, nuq::DType::F32);
  EXPECT_EQ(file.info("a").shape, (Shape{3, 4}));
  const nuq::Buffer a = nuq::to_float32(file.tensor("a"));
  for (int i = 0; i < 12; ++i) {
    double direct = 0;
    for (int s = 0; s < 5; ++s) direct += double(d.a[s][i]) * d.a[s][i];
    EXPECT_FLOAT_EQ(a.data_as<float>()[i], float(direct / 5));
  }
  const auto meta = nlohmann::json::parse(file.metadata().at(nuq::kStatsMetadataKey));
  EXPECT_EQ(meta["kind"], "fisher");
  EXPECT_EQ(meta["counts"]["a"], 5);
  EXPECT_EQ(nuq::detect_stats_kind(dir.file("f.safetensors")), nuq::StatsKind::fisher);

  const FisherAccumulator back = FisherAccumulator::load(dir.file("f.safetensors"));
  EXPECT_EQ(back.count("b"), 5);
  EXPECT_EQ(back.mean("b"), acc.mean("b"));
  EXPECT_EQ(back.mean("a"), acc.mean("a"));
}

TEST(FisherAccumulator, FilesOfSplitRunsMergeIntoTheSingleRun) {
  TempDir dir;
  const FisherData d = fisher_samples(6, 5);
  FisherAccumulator single, first, second;
  feed(single, d, 0, 6);
  feed(first, d, 0, 2);
  feed(second, d, 2, 6);
  first.save(dir.file("1.safetensors"));
  second.save(dir.file("2.safetensors"));
  FisherAccumulator merged = FisherAccumulator::load(dir.file("1.safetensors"));
  merged.merge(FisherAccumulator::load(dir.file("2.safetensors")));
  EXPECT_EQ(merged.count("a"), 6);
  // Each file holds F32 means, so the merge is as exact as F32 rounding of the two parts.
  for (std::size_t i = 0; i < 12; ++i) EXPECT_NEAR(merged.mean("a")[i], single.mean("a")[i], 1e-6 * single.mean("a")[i]);
}

TEST(FisherAccumulator, RejectsNonFiniteGradientsAndShapeChanges) {
  FisherAccumulator acc;
  std::vector<float> g = random_vector(12, 1);
  acc.add("w", g.data(), Shape{3, 4});
  g[6] = NAN;
  const std::string nan = error_of([&] { acc.add("w", g.data(), Shape{3, 4}); });
  EXPECT_NE(nan.find("'w'"), std::string::npos) << nan;
  EXPECT_NE(nan.find("nan"), std::string::npos) << nan;
  EXPECT_NE(nan.find("[1, 2]"), std::string::npos) << nan;
  EXPECT_EQ(acc.count("w"), 1);  // the bad batch left no trace
  g[6] = INFINITY;
  EXPECT_NE(error_of([&] { acc.add("w", g.data(), Shape{3, 4}); }).find("inf"), std::string::npos);
  g[6] = 0;
  const std::string shape = error_of([&] { acc.add("w", g.data(), Shape{4, 3}); });
  EXPECT_NE(shape.find("[4, 3]"), std::string::npos) << shape;
  EXPECT_NE(shape.find("[3, 4]"), std::string::npos) << shape;
  FisherAccumulator other;
  other.add("w", g.data(), Shape{12});
  EXPECT_NE(error_of([&] { acc.merge(other); }).find("shape"), std::string::npos);
}

TEST(FisherAccumulator, LoadRejectsNegativeValuesAndFilesWithoutCounts) {
  TempDir dir;
  std::vector<float> v{1, 2, -0.5f, 4};
  nuq::ConstTensorView view(reinterpret_cast<const std::byte*>(v.data()), nuq::DType::F32, Shape{2, 2});
  nuq::write_safetensors(dir.file("neg.safetensors"), {{"w", view}},
                         {{nuq::kStatsMetadataKey, R"({"kind":"fisher","version":1,"counts":{"w":3}})"}});
  const std::string neg = error_of([&] { FisherAccumulator::load(dir.file("neg.safetensors")); });
  EXPECT_NE(neg.find("'w'"), std::string::npos) << neg;
  EXPECT_NE(neg.find("[1, 0]"), std::string::npos) << neg;
  EXPECT_NE(neg.find(">= 0"), std::string::npos) << neg;

  v[2] = 0.5f;
  nuq::write_safetensors(dir.file("plain.safetensors"), {{"w", view}});
  EXPECT_NE(error_of([&] { FisherAccumulator::load(dir.file("plain.safetensors")); }).find("nuq_stats"),
            std::string::npos);
  nuq::write_safetensors(dir.file("nocount.safetensors"), {{"w", view}},
                         {{nuq::kStatsMetadataKey, R"({"kind":"fisher","version":1,"counts":{}})"}});
  EXPECT_NE(error_of([&] { FisherAccumulator::load(dir.file("nocount.safetensors")); }).find("count"),
            std::string::npos);
  nuq::write_safetensors(dir.file("hess.safetensors"), {{"w", view}},
                         {{nuq::kStatsMetadataKey, R"({"kind":"hessian","version":1,"counts":{"w":1}})"}});
  EXPECT_NE(error_of([&] { FisherAccumulator::load(dir.file("hess.safetensors")); }).find("expected fisher"),
            std::string::npos);
}

// ---- Hessian ------------------------------------------------------------------------------------------

// Activations with a row stride wider than the row, so that ldx is exercised.
struct Batch {
  int64_t tokens, cols, ldx;
  std::vector<float> x;
};

Batch make_batch(int64_t tokens, int64_t cols, uint64_t seed) {
  Batch b{tokens, cols, cols + 3, {}};
  b.x = random_vector(std::size_t(tokens * b.ldx), seed);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t c = cols; c < b.ldx; ++c) b.x[t * b.ldx + c] = NAN;  // padding must never be read
  return b;
}

std::vector<long double> direct_xtx(const std::vector<Batch>& batches, int64_t cols) {
  std::vector<long double> h(std::size_t(cols * cols), 0);
  for (const Batch& b : batches)
    for (int64_t t = 0; t < b.tokens; ++t)
      for (int64_t i = 0; i < cols; ++i)
        for (int64_t j = 0; j < cols; ++j) h[i * cols + j] += (long double)b.x[t * b.ldx + i] * b.x[t * b.ldx + j];
  return h;
}

TEST(HessianAccumulator, MatchesDirectXtXTraceAndDiagonal) {
  const int64_t cols = 9;
  // 300 tokens in the second batch cross the accumulator's internal block of 256.
  const std::vector<Batch> batches{make_batch(5, cols, 1), make_batch(300, cols, 2), make_batch(1, cols, 3)};
  HessianAccumulator acc;
  for (const Batch& b : batches) acc.add("model.layers.0.self_attn.q_proj", b.x.data(), b.tokens, b.cols, b.ldx);
  const std::string name = "model.layers.0.self_attn.q_proj";
  EXPECT_EQ(acc.count(name), 306);
  EXPECT_EQ(acc.cols(name), cols);
  ASSERT_TRUE(acc.has_matrix(name));
  const std::vector<long double> h = direct_xtx(batches, cols);
  const std::vector<double> m = acc.matrix(name), diag = acc.diagonal(name);
  long double trace = 0;
  for (int64_t i = 0; i < cols; ++i) {
    trace += h[i * cols + i];
    EXPECT_NEAR(diag[i], double(h[i * cols + i] / 306), 1e-12);
    for (int64_t j = 0; j < cols; ++j) EXPECT_NEAR(m[i * cols + j], double(h[i * cols + j] / 306), 1e-12) << i << "," << j;
  }
  EXPECT_NEAR(acc.trace(name), double(trace / 306), 1e-11);
}

TEST(HessianAccumulator, DiagonalOnlyKeepsTheDiagonal) {
  const int64_t cols = 6;
  const std::vector<Batch> batches{make_batch(40, cols, 7)};
  HessianAccumulator acc(true);
  acc.add("l", batches[0].x.data(), 40, cols, batches[0].ldx);
  EXPECT_FALSE(acc.has_matrix("l"));
  const std::vector<long double> h = direct_xtx(batches, cols);
  for (int64_t i = 0; i < cols; ++i) EXPECT_NEAR(acc.diagonal("l")[i], double(h[i * cols + i] / 40), 1e-12);
  EXPECT_NE(error_of([&] { acc.matrix("l"); }).find("only the diagonal"), std::string::npos);
}

TEST(HessianAccumulator, MergeOfSplitRunsEqualsSingleRunAndAliasesResolve) {
  const int64_t cols = 7;
  const std::vector<Batch> batches{make_batch(13, cols, 1), make_batch(8, cols, 2), make_batch(21, cols, 3)};
  HessianAccumulator single, first, second;
  for (const Batch& b : batches) single.add("q", b.x.data(), b.tokens, cols, b.ldx);
  first.add("q", batches[0].x.data(), batches[0].tokens, cols, batches[0].ldx);
  second.add("q", batches[1].x.data(), batches[1].tokens, cols, batches[1].ldx);
  second.add("q", batches[2].x.data(), batches[2].tokens, cols, batches[2].ldx);
  second.alias("k", "q");
  first.merge(second);
  EXPECT_EQ(first.count("q"), 42);
  const std::vector<double> a = first.matrix("q"), b = single.matrix("q");
  for (std::size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(a[i], b[i], 1e-12 * (1 + std::abs(b[i])));
  // The alias came along with the merge and reads the shared statistics.
  EXPECT_TRUE(first.contains("k"));
  EXPECT_EQ(first.resolve("k"), "q");
  EXPECT_EQ(first.matrix("k"), first.matrix("q"));
  EXPECT_EQ(first.names(), (std::vector<std::string>{"q"}));
  EXPECT_NE(error_of([&] { first.add("k", batches[0].x.data(), 1, cols, batches[0].ldx); }).find("alias"),
            std::string::npos);
}

TEST(HessianAccumulator, SaveLoadRoundTrip) {
  TempDir dir;
  const int64_t cols = 5;
  const Batch b = make_batch(30, cols, 9);
  HessianAccumulator acc;
  acc.add("model.layers.0.mlp.gate_proj", b.x.data(), b.tokens, cols, b.ldx);
  acc.alias("model.layers.0.mlp.up_proj", "model.layers.0.mlp.gate_proj");
  acc.save(dir.file("h64.safetensors"), nuq::DType::F64);
  acc.save(dir.file("h32.safetensors"));

  nuq::SafetensorsCheckpoint file(dir.file("h32.safetensors"));
  EXPECT_EQ(file.info("model.layers.0.mlp.gate_proj.xtx").shape, (Shape{cols, cols}));
  EXPECT_EQ(file.info("model.layers.0.mlp.gate_proj.xtx_diag").shape, (Shape{cols}));
  EXPECT_EQ(file.tensor_names().size(), 2u);  // the alias is metadata, not a copy

  const HessianAccumulator exact = HessianAccumulator::load(dir.file("h64.safetensors"));
  EXPECT_EQ(exact.count("model.layers.0.mlp.up_proj"), 30);
  const std::vector<double> m = acc.matrix("model.layers.0.mlp.gate_proj");
  const std::vector<double> m64 = exact.matrix("model.layers.0.mlp.up_proj");
  for (std::size_t i = 0; i < m.size(); ++i) EXPECT_NEAR(m64[i], m[i], 1e-15 * (1 + std::abs(m[i])));
  const HessianAccumulator f32 = HessianAccumulator::load(dir.file("h32.safetensors"));
  const std::vector<double> m32 = f32.matrix("model.layers.0.mlp.gate_proj");
  for (std::size_t i = 0; i < m.size(); ++i) EXPECT_NEAR(m32[i], m[i], 1e-6 * (1 + std::abs(m[i])));

  // The streaming reader nuq plan uses sees the same, aliases resolved.
  const nuq::StatisticsFile reader(dir.file("h64.safetensors"));
  EXPECT_EQ(reader.kind(), nuq::StatsKind::hessian);
  EXPECT_TRUE(reader.has_layer("model.layers.0.mlp.up_proj"));
  EXPECT_FALSE(reader.has_layer("model.layers.0.mlp.down_proj"));
  const std::vector<double> rm = reader.hessian_matrix("model.layers.0.mlp.up_proj", cols);
  for (std::size_t i = 0; i < m.size(); ++i) EXPECT_NEAR(rm[i], m[i], 1e-15 * (1 + std::abs(m[i])));
  EXPECT_NE(error_of([&] { reader.hessian_diagonal("model.layers.0.mlp.up_proj", cols + 1); }).find("input columns"),
            std::string::npos);
}

TEST(StatisticsFile, ReadsNuqCalibrateOutputAsHessianDiagonals) {
  TempDir dir;
  // `nuq calibrate` writes mean squared inputs per column under the weight's name.
  std::vector<float> d{0.5f, 2.0f, 1.5f};
  nuq::ConstTensorView view(reinterpret_cast<const std::byte*>(d.data()), nuq::DType::F32, Shape{3});
  nuq::write_safetensors(dir.file("act.safetensors"), {{"blk.0.attn_q.weight", view}},
                         {{"nuq_statistics", "activation_mean_square"}, {"tokens", "100"}});
  EXPECT_EQ(nuq::detect_stats_kind(dir.file("act.safetensors")), nuq::StatsKind::hessian);
  const nuq::StatisticsFile f(dir.file("act.safetensors"));
  EXPECT_TRUE(f.is_calibrate_output());
  EXPECT_TRUE(f.has_layer("blk.0.attn_q"));
  EXPECT_FALSE(f.has_layer("blk.0.attn_k"));
  EXPECT_EQ(f.hessian_diagonal("blk.0.attn_q", 3), (std::vector<double>{0.5, 2.0, 1.5}));
  EXPECT_TRUE(f.hessian_matrix("blk.0.attn_q", 3).empty());
  EXPECT_NE(error_of([&] { f.hessian_diagonal("blk.0.attn_k", 3); }).find("no Hessian statistics for layer 'blk.0.attn_k'"),
            std::string::npos);
}

TEST(HessianAccumulator, RejectsNonFiniteActivationsAndWidthChanges) {
  HessianAccumulator acc;
  Batch b = make_batch(4, 3, 1);
  acc.add("l", b.x.data(), b.tokens, 3, b.ldx);
  b.x[2 * b.ldx + 1] = -INFINITY;
  const std::string inf = error_of([&] { acc.add("l", b.x.data(), b.tokens, 3, b.ldx); });
  EXPECT_NE(inf.find("'l'"), std::string::npos) << inf;
  EXPECT_NE(inf.find("token 2, column 1"), std::string::npos) << inf;
  EXPECT_EQ(acc.count("l"), 4);
  const Batch wide = make_batch(2, 4, 2);
  const std::string width = error_of([&] { acc.add("l", wide.x.data(), 2, 4, wide.ldx); });
  EXPECT_NE(width.find("4 columns"), std::string::npos) << width;
  EXPECT_NE(width.find("had 3"), std::string::npos) << width;
  EXPECT_NE(error_of([&] { acc.add("m", wide.x.data(), 2, 4, 3); }).find("row stride 3"), std::string::npos);
}

// ---- Hutchinson ---------------------------------------------------------------------------------------

// y = A x for a dense row-major n x n matrix.
nuq::HessianVectorProduct dense_operator(const std::vector<double>& a, int64_t n) {
  return [a, n](const float* v, float* hv) {
    for (int64_t i = 0; i < n; ++i) {
      double s = 0;
      for (int64_t j = 0; j < n; ++j) s += a[i * n + j] * v[j];
      hv[i] = float(s);
    }
  };
}

TEST(Hutchinson, DiagonalOperatorIsExact) {
  const int64_t n = 100;
  std::vector<float> d(n);
  double trace = 0;
  for (int64_t i = 0; i < n; ++i) trace += d[i] = float(0.5 + i % 7);
  const auto est = nuq::hutchinson_trace(
      [&](const float* v, float* hv) {
        for (int64_t i = 0; i < n; ++i) hv[i] = d[i] * v[i];
      },
      n, {.seed = 5, .min_probes = 4, .max_probes = 100, .rel_tolerance = 1e-3});
  // Rademacher probes: vᵀDv = Σ d_i v_i² = tr(D) for every probe.
  EXPECT_DOUBLE_EQ(est.trace, trace);
  EXPECT_EQ(est.standard_error, 0.0);
  EXPECT_EQ(est.probes, 4);
  EXPECT_TRUE(est.converged);
}

TEST(Hutchinson, RandomSpdAndLowRankWithinTolerance) {
  const int64_t n = 40;
  // SPD: AᵀA of a random 60 x 40 A; low rank: u uᵀ + 2 w wᵀ.
  const std::vector<float> a = random_vector(60 * n, 17);
  std::vector<double> spd(n * n, 0.0), low(n * n, 0.0);
  for (int64_t k = 0; k < 60; ++k)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) spd[i * n + j] += double(a[k * n + i]) * a[k * n + j];
  const std::vector<float> u = random_vector(n, 1), w = random_vector(n, 2);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) low[i * n + j] = double(u[i]) * u[j] + 2.0 * w[i] * w[j];
  for (const auto* m : {&spd, &low}) {
    double trace = 0;
    for (int64_t i = 0; i < n; ++i) trace += (*m)[i * n + i];
    const auto est =
        nuq::hutchinson_trace(dense_operator(*m, n), n, {.seed = 3, .min_probes = 10, .max_probes = 20000, .rel_tolerance = 0.01});
    EXPECT_TRUE(est.converged);
    EXPECT_GT(est.probes, 50);  // off-diagonal mass makes single probes noisy
    EXPECT_LE(est.standard_error, 0.01 * std::abs(est.trace));
    // Within 4 standard errors of the truth (a deterministic seed, so this is not flaky).
    EXPECT_NEAR(est.trace, trace, 4 * est.standard_error) << "probes " << est.probes;
    EXPECT_NEAR(est.trace, trace, 0.05 * trace);
  }
}

TEST(Hutchinson, DeterministicPerSeedAndStopsAtTheBudget) {
  const int64_t n = 30;
  const std::vector<float> a = random_vector(n * n, 4);
  std::vector<double> m(a.begin(), a.end());
  const nuq::HutchinsonOptions opt{.seed = 42, .min_probes = 2, .max_probes = 25, .rel_tolerance = 0};
  const auto x = nuq::hutchinson_trace(dense_operator(m, n), n, opt);
  const auto y = nuq::hutchinson_trace(dense_operator(m, n), n, opt);
  EXPECT_EQ(x.trace, y.trace);
  EXPECT_EQ(x.standard_error, y.standard_error);
  EXPECT_EQ(x.probes, 25);
  EXPECT_FALSE(x.converged);
  auto other = opt;
  other.seed = 43;
  EXPECT_NE(nuq::hutchinson_trace(dense_operator(m, n), n, other).trace, x.trace);
}

TEST(Hutchinson, RejectsBadInput) {
  const auto nan_op = [](const float*, float* hv) { hv[0] = NAN; };
  EXPECT_NE(error_of([&] { nuq::hutchinson_trace(nan_op, 3); }).find("probe 1"), std::string::npos);
  EXPECT_NE(error_of([&] { nuq::hutchinson_trace(nan_op, 0); }).find("dimension"), std::string::npos);
  EXPECT_NE(error_of([&] { nuq::hutchinson_trace(nan_op, 3, {.min_probes = 5, .max_probes = 2}); }).find("min_probes"),
            std::string::npos);
}

}  // namespace
