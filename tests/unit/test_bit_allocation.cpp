// Mixed-precision planning: the knapsack against brute force (optimum, tie-breaking, rounding bound,
// Pareto frontier), the Ω measures against direct formulas, candidate sizes against the packed
// layout of docs/format.md, and plan_checkpoint on a small synthetic checkpoint.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "nuq/bit_allocation.hpp"
#include "nuq/error.hpp"
#include "nuq/safetensors.hpp"
#include "nuq/sensitivity.hpp"

namespace {

namespace fs = std::filesystem;
using nuq::AllocationChoice;
using Problem = std::vector<std::vector<AllocationChoice>>;

template <class Fn>
std::string error_of(Fn fn) {
  try {
    fn();
  } catch (const nuq::Error& e) {
    return e.what();
  }
  return "(no error)";
}

// Every allocation of a small problem: (bytes, omega) per combination.
struct Combination {
  uint64_t bytes;
  double omega;
};
std::vector<Combination> enumerate(const Problem& p) {
  std::vector<Combination> out{{0, 0}};
  for (const auto& layer : p) {
    std::vector<Combination> next;
    for (const Combination& c : out)
      for (const AllocationChoice& a : layer) next.push_back({c.bytes + a.bytes, c.omega + a.omega});
    out.swap(next);
  }
  return out;
}

// Integer-valued omegas keep sums exact, so optima and ties are compared exactly.
Problem random_problem(std::mt19937_64& rng, uint64_t byte_scale) {
  std::uniform_int_distribution<int> layers(1, 5), choices(1, 4), bytes(1, 40), omega(0, 30);
  Problem p(std::size_t(layers(rng)));
  for (auto& layer : p) {
    layer.resize(std::size_t(choices(rng)));
    for (auto& c : layer) c = {uint64_t(bytes(rng)) * byte_scale, double(omega(rng))};
  }
  return p;
}

TEST(BitAllocation, OptimalAgainstBruteForce) {
  std::mt19937_64 rng(1);
  for (int trial = 0; trial < 500; ++trial) {
    const Problem p = random_problem(rng, trial % 2 ? 1 : 6);
    const auto all = enumerate(p);
    uint64_t lo = UINT64_MAX, hi = 0;
    for (const auto& c : all) lo = std::min(lo, c.bytes), hi = std::max(hi, c.bytes);
    const uint64_t budget = lo + std::uniform_int_distribution<uint64_t>(0, hi - lo + 10)(rng);
    double best = INFINITY;
    for (const auto& c : all)
      if (c.bytes <= budget) best = std::min(best, c.omega);
    uint64_t smallest = UINT64_MAX;
    for (const auto& c : all)
      if (c.bytes <= budget && c.omega == best) smallest = std::min(smallest, c.bytes);

    const nuq::Allocation a = nuq::allocate_bits(p, budget);
    ASSERT_TRUE(a.exact);
    EXPECT_EQ(a.omega, best) << "trial " << trial;
    EXPECT_EQ(a.bytes, smallest) << "trial " << trial;  // ties go to the smaller allocation
    ASSERT_EQ(a.choice.size(), p.size());
    uint64_t bytes = 0;
    double omega = 0;
    for (std::size_t l = 0; l < p.size(); ++l) bytes += p[l][a.choice[l]].bytes, omega += p[l][a.choice[l]].omega;
    EXPECT_EQ(bytes, a.bytes);
    EXPECT_EQ(omega, a.omega);
  }
}

TEST(BitAllocation, RoundedSizesNeverExceedTheBudgetAndMeetTheSlackBound) {
  std::mt19937_64 rng(2);
  int rounded = 0;
  for (int trial = 0; trial < 300; ++trial) {
    Problem p = random_problem(rng, 1);
    for (auto& layer : p)
      for (auto& c : layer) c.bytes = c.bytes * 997 + uint64_t(trial % 13);  // no useful common divisor
    const auto all = enumerate(p);
    uint64_t lo = UINT64_MAX, hi = 0;
    for (const auto& c : all) lo = std::min(lo, c.bytes), hi = std::max(hi, c.bytes);
    const uint64_t budget = lo + std::uniform_int_distribution<uint64_t>(0, hi - lo)(rng);
    const nuq::Allocation a = nuq::allocate_bits(p, budget, {.max_units = 8});
    EXPECT_LE(a.bytes, budget);
    // A rounded frontier still reaches the least error of all, and its points are real allocations.
    double least = INFINITY;
    for (const auto& c : all) least = std::min(least, c.omega);
    const auto frontier = nuq::pareto_frontier(p, {.max_units = 8});
    EXPECT_EQ(frontier.back().omega, least);
    for (const auto& f : frontier) {
      double omega = 0;
      for (std::size_t l = 0; l < p.size(); ++l) omega += p[l][f.choice[l]].omega;
      EXPECT_EQ(omega, f.omega);
    }
    if (a.exact) continue;
    ++rounded;
    EXPECT_EQ(a.slack_bytes, (p.size() + 1) * a.granule);
    // At least as good as the true optimum of the budget reduced by the slack.
    double reduced = INFINITY;
    for (const auto& c : all)
      if (c.bytes + a.slack_bytes <= budget) reduced = std::min(reduced, c.omega);
    EXPECT_LE(a.omega, reduced) << "trial " << trial;
  }
  EXPECT_GT(rounded, 100);  // the rounding path was really taken
}

TEST(BitAllocation, ParetoFrontierMatchesBruteForce) {
  std::mt19937_64 rng(3);
  for (int trial = 0; trial < 300; ++trial) {
    const Problem p = random_problem(rng, trial % 3 + 1);
    auto all = enumerate(p);
    std::sort(all.begin(), all.end(),
              [](const Combination& a, const Combination& b) { return a.bytes != b.bytes ? a.bytes < b.bytes : a.omega < b.omega; });
    std::vector<Combination> expected;
    for (const auto& c : all)
      if (expected.empty() || c.omega < expected.back().omega) expected.push_back(c);
    const auto frontier = nuq::pareto_frontier(p);
    ASSERT_EQ(frontier.size(), expected.size()) << "trial " << trial;
    for (std::size_t k = 0; k < expected.size(); ++k) {
      EXPECT_EQ(frontier[k].bytes, expected[k].bytes);
      EXPECT_EQ(frontier[k].omega, expected[k].omega);
      uint64_t bytes = 0;
      for (std::size_t l = 0; l < p.size(); ++l) bytes += p[l][frontier[k].choice[l]].bytes;
      EXPECT_EQ(bytes, frontier[k].bytes);
    }
  }
}

TEST(BitAllocation, RejectsInfeasibleBudgetsAndBadOmegas) {
  const Problem p{{{100, 5}, {60, 9}}, {{70, 1}, {40, 2}}};
  const std::string infeasible = error_of([&] { nuq::allocate_bits(p, 99); });
  EXPECT_NE(infeasible.find("99 bytes is infeasible"), std::string::npos) << infeasible;
  EXPECT_NE(infeasible.find("takes 100 bytes"), std::string::npos) << infeasible;
  EXPECT_EQ(nuq::allocate_bits(p, 100).omega, 11.0);
  EXPECT_EQ(nuq::allocate_bits(p, 170).omega, 6.0);
  Problem bad = p;
  bad[1][0].omega = NAN;
  EXPECT_NE(error_of([&] { nuq::allocate_bits(bad, 500); }).find("layer 1 choice 0"), std::string::npos);
  bad[1][0].omega = -1;
  EXPECT_NE(error_of([&] { nuq::allocate_bits(bad, 500); }).find(">= 0"), std::string::npos);
  EXPECT_NE(error_of([&] { nuq::allocate_bits({{}}, 500); }).find("0 choices"), std::string::npos);
}

// ---- Ω ----------------------------------------------------------------------------------------------------

std::vector<float> normal_vector(std::size_t n, uint64_t seed, double scale = 1.0) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0, scale);
  std::vector<float> v(n);
  for (float& x : v) x = float(normal(rng));
  return v;
}

TEST(LayerOmega, MeasuresAgreeWithTheirDefinitions) {
  const int64_t rows = 7, cols = 12, tokens = 50;
  const std::vector<float> w = normal_vector(rows * cols, 1), q = normal_vector(rows * cols, 2);
  std::vector<float> fisher = normal_vector(rows * cols, 3);
  for (float& f : fisher) f = f * f;
  // H from activations, so tr(ΔW H ΔWᵀ) can be checked as the mean squared output error Σ_t ||ΔW x_t||² / T.
  const std::vector<float> x = normal_vector(tokens * cols, 4);
  nuq::HessianAccumulator acc;
  acc.add("l", x.data(), tokens, cols, cols);
  const std::vector<double> h = acc.matrix("l"), diag = acc.diagonal("l");

  double fisher_direct = 0, sse = 0, output_error = 0, diag_direct = 0, trace = 0;
  for (int64_t i = 0; i < rows * cols; ++i) {
    const double d = double(w[i]) - q[i];
    fisher_direct += fisher[i] * d * d;
    sse += d * d;
    diag_direct += diag[i % cols] * d * d;
  }
  for (int64_t c = 0; c < cols; ++c) trace += diag[c];
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t r = 0; r < rows; ++r) {
      double y = 0;
      for (int64_t c = 0; c < cols; ++c) y += (double(w[r * cols + c]) - q[r * cols + c]) * x[t * cols + c];
      output_error += y * y / tokens;
    }

  nuq::LayerStatistics s;
  s.fisher = fisher.data();
  s.hessian = h.data();
  s.hessian_diagonal = diag.data();
  using nuq::OmegaKind;
  EXPECT_NEAR(nuq::layer_omega(OmegaKind::fisher, w.data(), q.data(), rows, cols, s), fisher_direct, 1e-9 * fisher_direct);
  EXPECT_NEAR(nuq::layer_omega(OmegaKind::unweighted, w.data(), q.data(), rows, cols, s), sse, 1e-9 * sse);
  EXPECT_NEAR(nuq::layer_omega(OmegaKind::hessian, w.data(), q.data(), rows, cols, s), output_error, 1e-9 * output_error);
  EXPECT_NEAR(nuq::layer_omega(OmegaKind::hessian_diagonal, w.data(), q.data(), rows, cols, s), diag_direct,
              1e-9 * diag_direct);
  EXPECT_NEAR(nuq::layer_omega(OmegaKind::hawq_trace, w.data(), q.data(), rows, cols, s), trace / cols * sse,
              1e-9 * trace / cols * sse);
  const std::string missing =
      error_of([&] { nuq::layer_omega(OmegaKind::hessian, w.data(), q.data(), rows, cols, nuq::LayerStatistics{}); });
  EXPECT_NE(missing.find("hessian"), std::string::npos) << missing;

  // fisher-output: per output row, the mean squared output error times that row's E[g²], which a Fisher
  // of the K-FAC form F_ij = E[g_i²]·E[x_j²] gives back as Σ_j F_ij / tr(H). Built that way here, so the
  // definition can be checked with known g².
  std::vector<float> kfac(std::size_t(rows * cols));
  std::vector<double> g2(static_cast<std::size_t>(rows));
  double weighted_output_error = 0;
  for (int64_t r = 0; r < rows; ++r) {
    g2[r] = 0.5 + double(r);
    for (int64_t c = 0; c < cols; ++c) kfac[r * cols + c] = float(g2[r] * diag[c]);
    double row_error = 0;
    for (int64_t t = 0; t < tokens; ++t) {
      double y = 0;
      for (int64_t c = 0; c < cols; ++c) y += (double(w[r * cols + c]) - q[r * cols + c]) * x[t * cols + c];
      row_error += y * y / tokens;
    }
    weighted_output_error += g2[r] * row_error;
  }
  nuq::LayerStatistics k = s;
  k.fisher = kfac.data();
  EXPECT_NEAR(nuq::layer_omega(OmegaKind::fisher_output, w.data(), q.data(), rows, cols, k), weighted_output_error,
              1e-6 * weighted_output_error);
  nuq::LayerStatistics no_fisher = s;
  no_fisher.fisher = nullptr;
  const std::string needs_fisher =
      error_of([&] { nuq::layer_omega(OmegaKind::fisher_output, w.data(), q.data(), rows, cols, no_fisher); });
  EXPECT_NE(needs_fisher.find("Fisher"), std::string::npos) << needs_fisher;
  EXPECT_EQ(nuq::parse_omega_kind("fisher-output"), OmegaKind::fisher_output);
}

TEST(LayerOmega, CandidatesHaveExactPackedSizesAndOrderedErrors) {
  const int64_t rows = 16, cols = 96;
  const std::vector<float> w = normal_vector(rows * cols, 5, 0.02);
  const auto candidates = nuq::make_candidates({2, 3, 4}, {0.0}, {nuq::QuantMethod::nuq}, {0, 64}, false);
  const auto eval = nuq::evaluate_candidates(w.data(), rows, cols, {}, nuq::OmegaKind::unweighted, candidates, 1, "w");
  ASSERT_EQ(eval.size(), 3u);  // group size 64 does not divide 96 columns
  for (const auto& e : eval) {
    // docs/format.md: each row's indices are padded to a multiple of 64 columns; one fp16 codebook of
    // 2^bits entries per row.
    const uint64_t padded = (cols + 63) / 64 * 64;
    EXPECT_EQ(e.bytes, uint64_t(rows) * padded * e.config.bits / 8 + uint64_t(rows) * (1u << e.config.bits) * 2);
    EXPECT_NEAR(e.omega, e.mse * rows * cols, 1e-9 * e.omega);
  }
  EXPECT_GT(eval[0].omega, eval[1].omega);
  EXPECT_GT(eval[1].omega, eval[2].omega);
  // Relative Ω: the same errors divided by ||W||², so scaling the weights leaves it unchanged.
  double energy = 0;
  for (float x : w) energy += double(x) * x;
  std::vector<float> scaled(w);
  for (float& x : scaled) x *= 8;  // a power of two: quantization commutes with it exactly
  const auto rel = nuq::evaluate_candidates(scaled.data(), rows, cols, {}, nuq::OmegaKind::unweighted, candidates, 1,
                                            "w", true);
  ASSERT_EQ(rel.size(), 3u);
  for (int k = 0; k < 3; ++k) EXPECT_NEAR(rel[k].omega, eval[k].omega / energy, 1e-6 * rel[k].omega);
}

// ---- whole checkpoints --------------------------------------------------------------------------------

class PlanCheckpoint : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("nuq_plan_" + std::to_string(::getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    // Two "decoder layers" of two projections with different value scales, plus tensors the default rule skips.
    std::vector<std::pair<std::string, std::vector<int64_t>>> shapes{
        {"model.embed_tokens.weight", {32, 512}},
        {"model.layers.0.self_attn.q_proj.weight", {32, 512}},
        {"model.layers.0.mlp.down_proj.weight", {32, 1024}},
        {"model.layers.1.self_attn.q_proj.weight", {32, 512}},
        {"model.layers.1.mlp.down_proj.weight", {32, 1024}},
        {"model.norm.weight", {512}}};
    std::vector<std::pair<std::string, nuq::ConstTensorView>> views;
    nuq::FisherAccumulator fisher;
    uint64_t seed = 10;
    for (const auto& [name, dims] : shapes) {
      const nuq::Shape shape(dims.begin(), dims.end());
      data_.push_back(normal_vector(std::size_t(shape.numel()), seed++, name.find("layers.1") != std::string::npos ? 0.5 : 0.02));
      views.emplace_back(name, nuq::ConstTensorView(reinterpret_cast<const std::byte*>(data_.back().data()),
                                                     nuq::DType::F32, shape));
      if (shape.rank() == 2 && name.find("embed") == std::string::npos) {
        const std::vector<float> g = normal_vector(std::size_t(shape.numel()), seed++);
        fisher.add(name, g.data(), shape);
      }
    }
    nuq::write_safetensors(file("model.safetensors"), views);
    fisher.save(file("fisher.safetensors"));
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string file(const std::string& n) const { return (dir_ / n).string(); }

  fs::path dir_;
  std::vector<std::vector<float>> data_;
};

TEST_F(PlanCheckpoint, PlanMeetsTheBudgetAndBeatsFeasibleUniformConfigs) {
  nuq::CheckpointPlanOptions o;
  o.model = file("model.safetensors");
  o.stats_path = file("fisher.safetensors");
  o.budget_bits_per_weight = 3.3;
  o.threads = 1;
  const nuq::CheckpointPlan plan = nuq::plan_checkpoint(o);
  EXPECT_EQ(plan.omega, nuq::OmegaKind::fisher);
  ASSERT_EQ(plan.layers.size(), 4u);  // embeddings and norms are not planned
  EXPECT_EQ(plan.weights, 2 * (32 * 512 + 32 * 1024));
  EXPECT_LE(plan.bytes, plan.budget_bytes);
  EXPECT_LE(plan.bits_per_weight, 3.3);
  ASSERT_EQ(plan.uniform.size(), 6u);  // 2/3/4 bits x 0 / 0.45% sparse
  int feasible = 0;
  for (const auto& u : plan.uniform)
    if (u.bytes <= plan.budget_bytes) {
      ++feasible;
      EXPECT_LE(plan.total_omega, u.omega) << u.label;
    }
  EXPECT_GE(feasible, 2);
  // The sum of the chosen candidates is what the plan reports.
  double omega = 0;
  for (const auto& l : plan.layers) omega += l.candidates[l.chosen].omega;
  EXPECT_DOUBLE_EQ(omega, plan.total_omega);

  const auto j = nlohmann::json::parse(nuq::plan_to_json(plan));
  ASSERT_EQ(j["layers"].size(), 4u);
  const auto& entry = j["layers"]["model.layers.1.mlp.down_proj"];
  for (const char* key : {"bits", "method", "group_size", "outlier_fraction", "sensitive_fraction", "outliers_per_row"})
    EXPECT_TRUE(entry.contains(key)) << key;
  EXPECT_EQ(entry.size(), 6u);
  EXPECT_EQ(j["nuq_plan"]["bytes"], plan.bytes);
}

TEST_F(PlanCheckpoint, ErrorsNameTheBudgetAndTheMissingStatistics) {
  nuq::CheckpointPlanOptions o;
  o.model = file("model.safetensors");
  o.stats_path = file("fisher.safetensors");
  o.budget_bits_per_weight = 1.0;
  const std::string infeasible = error_of([&] { nuq::plan_checkpoint(o); });
  EXPECT_NE(infeasible.find("infeasible"), std::string::npos) << infeasible;
  EXPECT_NE(infeasible.find("smallest candidates take"), std::string::npos) << infeasible;

  nuq::FisherAccumulator partial;
  const std::vector<float> g(32 * 512, 1.0f);
  partial.add("model.layers.0.self_attn.q_proj.weight", g.data(), nuq::Shape{32, 512});
  partial.save(file("partial.safetensors"));
  o.stats_path = file("partial.safetensors");
  o.budget_bits_per_weight = 3;
  const std::string missing = error_of([&] { nuq::plan_checkpoint(o); });
  EXPECT_NE(missing.find("no Fisher tensor 'model.layers.0.mlp.down_proj.weight'"), std::string::npos) << missing;

  o.stats_path = file("fisher.safetensors");
  o.omega = nuq::OmegaKind::hessian;
  EXPECT_NE(error_of([&] { nuq::plan_checkpoint(o); }).find("needs a Hessian statistics file"), std::string::npos);
}

}  // namespace
