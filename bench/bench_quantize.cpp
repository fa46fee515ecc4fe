// Quantization throughput and the solver trade-off (objective per second).
//
// quantize/...: nuq's quantizer on a 4096×11008 matrix (a LLaMA-7B MLP shape) with Fisher-like
//   sensitivities and 0.45% sparse, at 3 and 4 bits, 1 and 2 threads; weights_per_s is the figure
//   docs/quantization.md extrapolates to a whole model.
// solver/...: one 1-D weighted k-means problem per row (rows of 4096 heavy-tailed weights), per
//   initialization strategy; excess is the mean relative objective above the exact optimum (exact DP),
//   so a strategy is judged by excess against seconds per row. "naive_lloyd" is the reference
//   implementation's approach (k-means++ then O(n·k) Lloyd, 50 iterations), for the speed comparison.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "bench_common.hpp"
#include "nuq/quantize.hpp"

namespace {

// Student-t (3 degrees of freedom) weights: heavy tails like real LLM weight rows. Sensitivities are
// squared Gaussians, like squared gradients (the Fisher diagonal).
void make_problem(int64_t rows, int64_t cols, std::vector<float>& w, std::vector<float>& s, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::student_t_distribution<float> t(3.0f);
  std::normal_distribution<float> g(0.0f, 1.0f);
  w.resize(size_t(rows * cols));
  s.resize(size_t(rows * cols));
  for (auto& x : w) x = 0.02f * t(rng);
  for (auto& x : s) { const float v = g(rng); x = v * v; }
}

void quantize(benchmark::State& state) {
  const int64_t rows = state.range(0), cols = state.range(1);
  const int bits = int(state.range(2)), threads = int(state.range(3));
  static std::vector<float> w, s;
  if (int64_t(w.size()) != rows * cols) make_problem(rows, cols, w, s, 1);
  nuq::QuantizeOptions opt;
  opt.bits = bits;
  opt.threads = threads;
  opt.outlier_fraction = 0.004;
  opt.sensitive_fraction = 0.0005;
  nuq::QuantizeReport rep;
  const auto start = std::chrono::steady_clock::now();
  for (auto _ : state) {
    auto packed = nuq::quantize_linear(w.data(), s.data(), rows, cols, cols, opt, "bench", &rep);
    benchmark::DoNotOptimize(packed.qweight.data());
  }
  // Bytes read: weights and sensitivities in fp32.
  nuq::bench::report_counters(state, nuq::bench::seconds_since(start), double(rows * cols) * 8,
                              double(rows * cols), threads);
  state.counters["bpw"] = rep.bits_per_weight;
  state.counters["rel_mse"] = rep.mse / (0.02 * 0.02 * 3.0);  // Student-t(3) variance is 3
}

// An XᵀX-like matrix: low-rank correlation (a few shared directions, as in real activations) plus a
// per-column diagonal spread over two decades, so that act-order and the factorization see a realistic
// conditioning. Built in O(rank·cols²).
std::vector<double> make_hessian(int64_t cols, uint64_t seed) {
  constexpr int64_t kRank = 16;
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> g(0.0, 1.0);
  std::uniform_real_distribution<double> u(0.0, 2.0);
  std::vector<double> f(std::size_t(cols * kRank)), h(std::size_t(cols * cols));
  for (auto& x : f) x = g(rng);
  for (int64_t i = 0; i < cols; ++i)
    for (int64_t j = 0; j <= i; ++j) {
      double sum = 0;
      for (int64_t k = 0; k < kRank; ++k) sum += f[i * kRank + k] * f[j * kRank + k];
      h[i * cols + j] = h[j * cols + i] = sum / kRank;
    }
  for (int64_t i = 0; i < cols; ++i) h[i * cols + i] += std::pow(10.0, u(rng));
  return h;
}

// `nuq quantize --hessian`'s cost per layer: codebooks, the error-feedback sweep (factorization
// included: each iteration sees a new XᵀX) and the output-error measure, 3 bits + 0.45% sparse. The
// shapes are LLaMA-2-7B's attention (4096 in) and down projection (11008 in).
void quantize_hessian(benchmark::State& state) {
  const int64_t rows = state.range(0), cols = state.range(1);
  const int threads = int(state.range(2));
  std::vector<float> w, s;
  make_problem(rows, cols, w, s, 3);
  std::vector<double> h = make_hessian(cols, 4);
  nuq::QuantizeOptions opt;
  opt.bits = 3;
  opt.threads = threads;
  opt.outlier_fraction = 0.0045;
  opt.hessian = h.data();
  nuq::QuantizeReport rep;
  const auto start = std::chrono::steady_clock::now();
  for (auto _ : state) {
    h[0] *= 1 + 1e-12;  // a different matrix each iteration: the factor cache must not answer
    auto packed = nuq::quantize_linear(w.data(), nullptr, rows, cols, cols, opt, "bench", &rep);
    benchmark::DoNotOptimize(packed.qweight.data());
  }
  nuq::bench::report_counters(state, nuq::bench::seconds_since(start), double(rows * cols) * 4,
                              double(rows * cols), threads);
  state.counters["output_rel_err"] = rep.relative_output_error;
}

// The reference approach: k-means++ seeding and Lloyd over all points and centers each iteration.
double naive_lloyd(const float* x, const float* w, int64_t n, int k, uint64_t seed, float* out) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> uni(0, 1);
  std::vector<double> c, d2(n, std::numeric_limits<double>::infinity());
  double total = 0;
  for (int64_t i = 0; i < n; ++i) total += w[i];
  double r = uni(rng) * total;
  int64_t first = 0;
  while (first < n - 1 && (r -= w[first]) > 0) ++first;
  c.push_back(x[first]);
  while (int(c.size()) < k) {
    double mass = 0;
    for (int64_t i = 0; i < n; ++i) {
      const double d = x[i] - c.back();
      d2[i] = std::min(d2[i], d * d);
      mass += w[i] * d2[i];
    }
    double t = uni(rng) * mass;
    int64_t pick = 0;
    while (pick < n - 1 && (t -= w[pick] * d2[pick]) > 0) ++pick;
    c.push_back(x[pick]);
  }
  std::vector<int> a(n);
  double cost = 0;
  for (int it = 0; it < 50; ++it) {
    std::vector<double> sw(k, 0), swx(k, 0);
    cost = 0;
    for (int64_t i = 0; i < n; ++i) {
      int best = 0;
      double bd = std::numeric_limits<double>::infinity();
      for (int j = 0; j < k; ++j) {
        const double d = (x[i] - c[j]) * (x[i] - c[j]);
        if (d < bd) { bd = d; best = j; }
      }
      a[i] = best;
      cost += w[i] * bd;
      sw[best] += w[i];
      swx[best] += w[i] * x[i];
    }
    for (int j = 0; j < k; ++j)
      if (sw[j] > 0) c[j] = swx[j] / sw[j];
  }
  for (int j = 0; j < k; ++j) out[j] = float(c[j]);
  return cost;
}

constexpr int64_t kSolverRows = 64, kSolverCols = 4096;

void solver(benchmark::State& state, int strategy) {
  const int k = 1 << state.range(0);
  const int candidates = int(state.range(1));
  static std::vector<float> w, s;
  if (w.empty()) make_problem(kSolverRows, kSolverCols, w, s, 2);
  static std::vector<nuq::SortedWeightedPoints> points;
  if (points.empty()) {
    points.resize(kSolverRows);
    for (int64_t r = 0; r < kSolverRows; ++r) points[r].assign(&w[r * kSolverCols], &s[r * kSolverCols], kSolverCols);
  }
  // The optimum per row, for the excess; computed outside the timed loop.
  std::vector<double> optimum(kSolverRows);
  std::vector<float> centers(k);
  nuq::KMeansOptions exact;
  exact.init = nuq::KMeansInit::exact_dp;
  for (int64_t r = 0; r < kSolverRows; ++r) optimum[r] = nuq::kmeans_1d(points[r], k, exact, centers.data());

  nuq::KMeansOptions opt;
  if (strategy >= 0) opt.init = nuq::KMeansInit(strategy);
  opt.dp_candidates = candidates;
  double excess = 0;
  int64_t solved = 0;
  const auto start = std::chrono::steady_clock::now();
  for (auto _ : state) {
    excess = 0;
    for (int64_t r = 0; r < kSolverRows; ++r) {
      double cost;
      if (strategy < 0) {
        cost = naive_lloyd(&w[r * kSolverCols], &s[r * kSolverCols], kSolverCols, k, 1, centers.data());
      } else {
        // Sorting is part of the solver's cost.
        nuq::SortedWeightedPoints p;
        p.assign(&w[r * kSolverCols], &s[r * kSolverCols], kSolverCols);
        cost = nuq::kmeans_1d(p, k, opt, centers.data());
      }
      excess += cost / optimum[r] - 1;
    }
    solved += kSolverRows;
  }
  const double seconds = nuq::bench::seconds_since(start);
  state.counters["excess"] = excess / kSolverRows;
  state.counters["us_per_row"] = 1e6 * seconds / double(solved);
}

}  // namespace

BENCHMARK(quantize)
    ->ArgNames({"rows", "cols", "bits", "threads"})
    ->Args({4096, 11008, 3, 1})
    ->Args({4096, 11008, 3, 2})
    ->Args({4096, 11008, 4, 1})
    ->Args({4096, 11008, 4, 2})
    ->UseRealTime()
    ->Unit(benchmark::kSecond)
    ->Iterations(1);

BENCHMARK(quantize_hessian)
    ->ArgNames({"rows", "cols", "threads"})
    ->Args({4096, 4096, 2})
    ->Args({4096, 11008, 2})
    ->UseRealTime()
    ->Unit(benchmark::kSecond)
    ->Iterations(1);

BENCHMARK_CAPTURE(solver, naive_lloyd, -1)->ArgNames({"bits", "cand"})->Args({3, 0})->Args({4, 0})->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(solver, kmeans_plus_plus, int(nuq::KMeansInit::kmeans_plus_plus))->ArgNames({"bits", "cand"})->Args({3, 0})->Args({4, 0})->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(solver, quantiles, int(nuq::KMeansInit::quantiles))->ArgNames({"bits", "cand"})->Args({3, 0})->Args({4, 0})->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(solver, binned_dp, int(nuq::KMeansInit::binned_dp))
    ->ArgNames({"bits", "cand"})
    ->ArgsProduct({{3, 4}, {64, 256, 1024}})
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(solver, exact_dp, int(nuq::KMeansInit::exact_dp))->ArgNames({"bits", "cand"})->Args({3, 0})->Args({4, 0})->Unit(benchmark::kMillisecond);
