// Per-layer sensitivities, the multiple-choice knapsack, and whole-checkpoint planning
// (include/nuq/bit_allocation.hpp, docs/sensitivity.md).
#include "nuq/bit_allocation.hpp"

#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <numeric>
#include <set>

#include "nuq/error.hpp"
#include "nuq/gguf.hpp"
#include "nuq/inspect.hpp"
#include "nuq/packed.hpp"
#include "nuq/quantize_checkpoint.hpp"
#include "nuq/safetensors.hpp"
#include "nuq/sensitivity.hpp"
#include "plan_inputs.hpp"

namespace nuq {
namespace {

using Json = nlohmann::json;

std::string percent(double f) {
  std::string s = fmt::format("{:.4f}", 100 * f);
  while (s.back() == '0') s.pop_back();
  if (s.back() == '.') s.pop_back();
  return s + "%";
}

}  // namespace

std::string LayerConfig::label() const {
  std::string s = fmt::format("{}-bit {}", bits, to_string(method));
  if (group_size) s += fmt::format(" g{}", group_size);
  const double sparse = outlier_fraction + sensitive_fraction;
  if (sparse > 0) s += " +" + percent(sparse);
  if (outliers_per_row) s += " per-row";
  return s;
}

std::string_view to_string(OmegaKind kind) {
  switch (kind) {
    case OmegaKind::fisher: return "fisher";
    case OmegaKind::hessian: return "hessian";
    case OmegaKind::hessian_diagonal: return "hessian-diag";
    case OmegaKind::hawq_trace: return "hawq";
    case OmegaKind::unweighted: return "unweighted";
    case OmegaKind::fisher_output: return "fisher-output";
    case OmegaKind::kl: return "kl";
  }
  return "?";
}

OmegaKind parse_omega_kind(std::string_view text) {
  for (OmegaKind k : {OmegaKind::fisher, OmegaKind::hessian, OmegaKind::hessian_diagonal, OmegaKind::hawq_trace,
                      OmegaKind::unweighted, OmegaKind::fisher_output, OmegaKind::kl})
    if (text == to_string(k)) return k;
  fail(Errc::invalid_argument,
       "unknown sensitivity measure '{}' (expected fisher, hessian, hessian-diag, hawq, unweighted, fisher-output or kl)",
       text);
}

// ---- Ω ----------------------------------------------------------------------------------------------------

double layer_omega(OmegaKind kind, const float* weight, const float* quantized, int64_t rows, int64_t cols,
                   const LayerStatistics& stats) {
  const int64_t n = rows * cols;
  auto need = [&](bool have, std::string_view what) {
    NUQ_CHECK(have, Errc::invalid_argument, "sensitivity measure {} needs {}, which is not available", to_string(kind),
              what);
  };
  NUQ_CHECK(kind != OmegaKind::kl, Errc::invalid_argument,
            "sensitivity measure kl is measured through the model (a table from `nuq plan --text`), not computed from "
            "the weights");
  switch (kind) {
    case OmegaKind::kl:
    case OmegaKind::unweighted: {
      double s = 0;
      for (int64_t i = 0; i < n; ++i) s += (double(weight[i]) - quantized[i]) * (double(weight[i]) - quantized[i]);
      return s;
    }
    case OmegaKind::fisher: {
      need(stats.fisher, "the Fisher diagonal");
      double s = 0;
      for (int64_t i = 0; i < n; ++i) {
        const double d = double(weight[i]) - quantized[i];
        s += double(stats.fisher[i]) * d * d;
      }
      return s;
    }
    case OmegaKind::hessian_diagonal:
    case OmegaKind::hawq_trace: {
      need(stats.hessian_diagonal || stats.hessian, "the Hessian diagonal");
      std::vector<double> col_sse(std::size_t(cols), 0.0);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) {
          const double d = double(weight[r * cols + c]) - quantized[r * cols + c];
          col_sse[c] += d * d;
        }
      auto diag = [&](int64_t c) { return stats.hessian_diagonal ? stats.hessian_diagonal[c] : stats.hessian[c * cols + c]; };
      double s = 0;
      if (kind == OmegaKind::hessian_diagonal) {
        for (int64_t c = 0; c < cols; ++c) s += diag(c) * col_sse[c];
      } else {
        double trace = 0, sse = 0;
        for (int64_t c = 0; c < cols; ++c) trace += diag(c), sse += col_sse[c];
        s = trace / double(cols) * sse;
      }
      return s;
    }
    case OmegaKind::fisher_output:
    case OmegaKind::hessian: {
      need(stats.hessian, "the full Hessian XᵀX (the statistics hold only its diagonal)");
      // fisher_output: each output row's error counts with its mean squared output gradient, read off
      // the Fisher diagonal under the K-FAC factorization F_ij ≈ E[g_i²]·E[x_j²].
      std::vector<double> row_weight;
      if (kind == OmegaKind::fisher_output) {
        need(stats.fisher, "the Fisher diagonal");
        double trace = 0;
        for (int64_t c = 0; c < cols; ++c) trace += stats.hessian[c * cols + c];
        NUQ_CHECK(trace > 0, Errc::invalid_argument, "sensitivity measure {} needs a non-zero XᵀX trace",
                  to_string(kind));
        row_weight.resize(std::size_t(rows));
        for (int64_t r = 0; r < rows; ++r) {
          double f = 0;
          for (int64_t c = 0; c < cols; ++c) f += stats.fisher[r * cols + c];
          row_weight[r] = f / trace;
        }
      }
      // tr(ΔW H ΔWᵀ) = Σ_r Δw_r H Δw_rᵀ, in blocks of rows so the product stays small.
      Eigen::Map<const Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>> H(stats.hessian, cols, cols);
      constexpr int64_t kBlock = 64;
      Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> D, DH;
      double s = 0;
      for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
        const int64_t m = std::min(kBlock, rows - r0);
        D.resize(m, cols);
        for (int64_t r = 0; r < m; ++r)
          for (int64_t c = 0; c < cols; ++c)
            D(r, c) = double(weight[(r0 + r) * cols + c]) - quantized[(r0 + r) * cols + c];
        DH.noalias() = D * H;
        if (row_weight.empty()) {
          s += DH.cwiseProduct(D).sum();
        } else {
          for (int64_t r = 0; r < m; ++r) s += row_weight[r0 + r] * DH.row(r).dot(D.row(r));
        }
      }
      // H is positive semi-definite, so a negative result is rounding around zero.
      return std::max(s, 0.0);
    }
  }
  return 0;
}

bool candidate_applies(const LayerConfig& c, int64_t cols) { return c.group_size == 0 || cols % c.group_size == 0; }

PackedLinear quantize_candidate(const float* weight, int64_t rows, int64_t cols, const LayerStatistics& stats,
                                const LayerConfig& c, int threads, std::string_view name, QuantizeReport* report) {
  QuantizeOptions o;
  o.method = c.method;
  o.bits = c.bits;
  o.group_size = c.group_size;
  o.outlier_fraction = c.outlier_fraction;
  o.sensitive_fraction = c.sensitive_fraction;
  o.outliers_per_row = c.outliers_per_row;
  o.threads = threads;
  o.hessian = stats.error_feedback_hessian;
  o.hessian_damping = stats.damping;
  return quantize_linear(weight, c.method == QuantMethod::nuq ? stats.sensitivity : nullptr, rows, cols, cols, o, name,
                         report);
}

std::vector<CandidateEvaluation> evaluate_candidates(const float* weight, int64_t rows, int64_t cols,
                                                     const LayerStatistics& stats, OmegaKind kind,
                                                     const std::vector<LayerConfig>& candidates, int threads,
                                                     std::string_view name, bool relative) {
  std::vector<CandidateEvaluation> out;
  std::vector<float> quantized(std::size_t(rows * cols), 0.0f);
  double scale = 1;
  if (relative) {
    const double energy = layer_omega(kind, weight, quantized.data(), rows, cols, stats);
    NUQ_CHECK(energy > 0, Errc::invalid_argument,
              "{}: relative sensitivity is undefined: the layer's weighted energy ({} of zero weights) is {}", name,
              to_string(kind), energy);
    scale = 1 / energy;
  }
  for (const LayerConfig& c : candidates) {
    if (!candidate_applies(c, cols)) continue;
    QuantizeReport rep;
    const PackedLinear packed = quantize_candidate(weight, rows, cols, stats, c, threads, name, &rep);
    dequantize_reference(packed.view(), quantized.data());
    CandidateEvaluation e;
    e.config = c;
    e.bytes = rep.storage.total();
    e.omega = layer_omega(kind, weight, quantized.data(), rows, cols, stats) * scale;
    e.mse = rep.mse;
    e.bits_per_weight = rep.bits_per_weight;
    e.nnz = packed.nnz();
    out.push_back(e);
  }
  return out;
}

// ---- the knapsack ---------------------------------------------------------------------------------------

namespace {

void check_problem(const std::vector<std::vector<AllocationChoice>>& layers) {
  NUQ_CHECK(!layers.empty(), Errc::invalid_argument, "bit allocation: no layers");
  for (std::size_t l = 0; l < layers.size(); ++l) {
    NUQ_CHECK(!layers[l].empty() && layers[l].size() <= 255, Errc::invalid_argument,
              "bit allocation: layer {} has {} choices (need 1 to 255)", l, layers[l].size());
    for (std::size_t c = 0; c < layers[l].size(); ++c)
      NUQ_CHECK(std::isfinite(layers[l][c].omega) && layers[l][c].omega >= 0, Errc::invalid_argument,
                "bit allocation: layer {} choice {} has sensitivity {} (must be finite and >= 0)", l, c,
                layers[l][c].omega);
  }
}

// The DP over "units above each layer's smallest choice". best[u] = the least Σ omega of an allocation
// whose rounded extra size is <= u units; pick[l][u] = the choice of layer l in that allocation.
struct KnapsackTable {
  uint64_t granule = 1;
  bool exact = true;
  std::vector<uint64_t> min_bytes;
  std::vector<std::vector<uint64_t>> units;  // per layer and choice
  std::vector<double> best;
  std::vector<std::vector<uint8_t>> pick;

  // range: the extra bytes allowed. cover_all: size the table so that every allocation fits even after
  // rounding up (the frontier needs its largest point; a budget must instead never be exceeded).
  KnapsackTable(const std::vector<std::vector<AllocationChoice>>& layers, uint64_t range, int64_t max_units,
                bool cover_all) {
    NUQ_CHECK(max_units >= 1, Errc::invalid_argument, "bit allocation: max_units must be >= 1, got {}", max_units);
    uint64_t g = 0;
    for (const auto& choices : layers) {
      uint64_t lo = UINT64_MAX;
      for (const AllocationChoice& c : choices) lo = std::min(lo, c.bytes);
      min_bytes.push_back(lo);
      for (const AllocationChoice& c : choices) g = std::gcd(g, c.bytes - lo);
    }
    // All differences are multiples of g, so counting in units of g loses nothing.
    granule = std::max<uint64_t>(g, 1);
    if (range / granule > uint64_t(max_units)) {
      granule = (range + uint64_t(max_units) - 1) / uint64_t(max_units);
      exact = false;
    }
    uint64_t U = range / granule, all = 0;
    for (std::size_t l = 0; l < layers.size(); ++l) {
      std::vector<uint64_t> u;
      for (const AllocationChoice& c : layers[l]) u.push_back((c.bytes - min_bytes[l] + granule - 1) / granule);
      all += *std::max_element(u.begin(), u.end());
      units.push_back(std::move(u));
    }
    if (cover_all) U = all;
    best.assign(std::size_t(U + 1), 0.0);
    std::vector<double> next(best.size());
    pick.assign(layers.size(), std::vector<uint8_t>(best.size(), 0));
    for (std::size_t l = 0; l < layers.size(); ++l) {
      std::fill(next.begin(), next.end(), std::numeric_limits<double>::infinity());
      for (std::size_t c = 0; c < layers[l].size(); ++c) {
        const uint64_t w = units[l][c];
        const double om = layers[l][c].omega;
        for (uint64_t u = w; u <= U; ++u) {
          const double v = best[u - w] + om;
          if (v < next[u]) {
            next[u] = v;
            pick[l][u] = uint8_t(c);
          }
        }
      }
      best.swap(next);
    }
  }

  uint64_t size_units() const { return best.size() - 1; }

  std::vector<int> backtrack(uint64_t u) const {
    std::vector<int> choice(pick.size());
    for (std::size_t l = pick.size(); l-- > 0;) {
      choice[l] = pick[l][u];
      u -= units[l][std::size_t(choice[l])];
    }
    return choice;
  }

  // The smallest u whose best equals best[target]: ties go to the smaller allocation.
  uint64_t smallest_equal(uint64_t target) const {
    uint64_t u = target;
    while (u > 0 && best[u - 1] <= best[target]) --u;
    return u;
  }
};

void totals(const std::vector<std::vector<AllocationChoice>>& layers, const std::vector<int>& choice, uint64_t& bytes,
            double& omega) {
  bytes = 0;
  omega = 0;
  for (std::size_t l = 0; l < layers.size(); ++l) {
    bytes += layers[l][std::size_t(choice[l])].bytes;
    omega += layers[l][std::size_t(choice[l])].omega;
  }
}

}  // namespace

uint64_t minimum_bytes(const std::vector<std::vector<AllocationChoice>>& layers) {
  uint64_t total = 0;
  for (const auto& choices : layers) {
    uint64_t lo = UINT64_MAX;
    for (const AllocationChoice& c : choices) lo = std::min(lo, c.bytes);
    total += choices.empty() ? 0 : lo;
  }
  return total;
}

Allocation allocate_bits(const std::vector<std::vector<AllocationChoice>>& layers, uint64_t budget_bytes,
                         const AllocationOptions& options) {
  check_problem(layers);
  const uint64_t floor_bytes = minimum_bytes(layers);
  NUQ_CHECK(budget_bytes >= floor_bytes, Errc::invalid_argument,
            "bit allocation: budget of {} bytes is infeasible: the smallest allocation (every layer at its smallest "
            "candidate) takes {} bytes",
            budget_bytes, floor_bytes);
  uint64_t span = 0;  // no allocation has more extra bytes than this
  for (const auto& choices : layers) {
    uint64_t lo = UINT64_MAX, hi = 0;
    for (const AllocationChoice& c : choices) lo = std::min(lo, c.bytes), hi = std::max(hi, c.bytes);
    span += hi - lo;
  }
  const uint64_t range = std::min(budget_bytes - floor_bytes, span);
  const KnapsackTable t(layers, range, options.max_units, false);
  Allocation a;
  a.granule = t.granule;
  a.exact = t.exact;
  a.slack_bytes = t.exact ? 0 : (uint64_t(layers.size()) + 1) * t.granule;
  a.choice = t.backtrack(t.smallest_equal(t.size_units()));
  totals(layers, a.choice, a.bytes, a.omega);
  NUQ_CHECK(a.bytes <= budget_bytes, Errc::internal, "bit allocation: {} bytes chosen for a budget of {}", a.bytes,
            budget_bytes);
  return a;
}

std::vector<FrontierPoint> pareto_frontier(const std::vector<std::vector<AllocationChoice>>& layers,
                                           const AllocationOptions& options) {
  check_problem(layers);
  uint64_t span = 0;
  for (const auto& choices : layers) {
    uint64_t lo = UINT64_MAX, hi = 0;
    for (const AllocationChoice& c : choices) lo = std::min(lo, c.bytes), hi = std::max(hi, c.bytes);
    span += hi - lo;
  }
  const KnapsackTable t(layers, span, options.max_units, true);
  std::vector<FrontierPoint> points;
  for (uint64_t u = 0; u <= t.size_units(); ++u) {
    if (u > 0 && !(t.best[u] < t.best[u - 1])) continue;
    FrontierPoint p;
    p.choice = t.backtrack(u);
    totals(layers, p.choice, p.bytes, p.omega);
    points.push_back(std::move(p));
  }
  // With rounded sizes the exact byte counts may reorder slightly: keep the non-dominated points.
  std::stable_sort(points.begin(), points.end(), [](const FrontierPoint& a, const FrontierPoint& b) {
    return a.bytes != b.bytes ? a.bytes < b.bytes : a.omega < b.omega;
  });
  std::vector<FrontierPoint> out;
  for (FrontierPoint& p : points)
    if (out.empty() || p.omega < out.back().omega) out.push_back(std::move(p));
  return out;
}

// ---- whole checkpoints ------------------------------------------------------------------------------

std::vector<LayerConfig> make_candidates(const std::vector<int>& bits, const std::vector<double>& sparse_fractions,
                                         const std::vector<QuantMethod>& methods,
                                         const std::vector<int64_t>& group_sizes, bool fisher) {
  std::vector<LayerConfig> out;
  for (QuantMethod m : methods)
    for (int64_t g : group_sizes)
      for (int b : bits)
        for (double s : sparse_fractions) {
          NUQ_CHECK(format::is_supported_bits(b), Errc::invalid_argument, "candidate bits must be 2, 3 or 4, got {}", b);
          NUQ_CHECK(s >= 0 && s < 1, Errc::invalid_argument, "candidate sparse fraction must be in [0, 1), got {}", s);
          NUQ_CHECK(g >= 0, Errc::invalid_argument, "candidate group size must be >= 0, got {}", g);
          LayerConfig c;
          c.bits = b;
          c.method = m;
          c.group_size = g;
          // The split `nuq quantize --fisher --sparse` makes by default.
          c.sensitive_fraction = fisher && m == QuantMethod::nuq ? std::min(s, 0.0005) : 0.0;
          c.outlier_fraction = s - c.sensitive_fraction;
          out.push_back(c);
        }
  return out;
}

namespace {

using detail::ModelReader;
using detail::ModelTensor;
using detail::weight_base;

// Evenly spaced (by size) subset of the frontier for printing and the plan file; ends always kept.
Json frontier_json(const std::vector<FrontierPoint>& frontier, int64_t weights, std::size_t max_points) {
  Json out = Json::array();
  const std::size_t n = frontier.size();
  std::set<std::size_t> keep;
  if (n <= max_points) {
    for (std::size_t i = 0; i < n; ++i) keep.insert(i);
  } else {
    for (std::size_t k = 0; k < max_points; ++k) keep.insert(k * (n - 1) / (max_points - 1));
  }
  for (std::size_t i : keep)
    out.push_back(Json{{"bytes", frontier[i].bytes},
                       {"bits_per_weight", 8.0 * double(frontier[i].bytes) / double(weights)},
                       {"total_omega", frontier[i].omega}});
  return out;
}

}  // namespace

CheckpointPlan plan_checkpoint(const CheckpointPlanOptions& options) {
  NUQ_CHECK((options.budget_bits_per_weight > 0) != (options.budget_bytes > 0), Errc::invalid_argument,
            "give exactly one budget: average bits per weight (e.g. 3.25bpw) or a size in bytes");
  NUQ_CHECK(std::isfinite(options.budget_bits_per_weight), Errc::invalid_argument, "the budget must be finite");
  CheckpointPlan plan;
  plan.relative = options.relative;
  plan.model = options.model;
  plan.stats_path = options.stats_path;
  plan.hessian_path = options.hessian_path;
  const ModelReader model(options.model);
  NUQ_CHECK(!model.tensors().empty(), Errc::invalid_argument,
            "{}: no tensor to plan (the default rule takes {})", options.model, default_quantize_rule_text());

  std::unique_ptr<StatisticsFile> stats, feedback;
  if (!options.stats_path.empty()) stats = std::make_unique<StatisticsFile>(options.stats_path);
  if (!options.hessian_path.empty()) {
    feedback = std::make_unique<StatisticsFile>(options.hessian_path);
    NUQ_CHECK(feedback->kind() == StatsKind::hessian && !feedback->is_calibrate_output(), Errc::invalid_argument,
              "{}: the error-feedback statistics must be the full XᵀX of `nuq calibrate --hessian`",
              options.hessian_path);
  }
  // The measure: the caller's, else the best the statistics allow.
  if (options.omega) {
    plan.omega = *options.omega;
  } else if (feedback && stats && stats->kind() == StatsKind::fisher) {
    plan.omega = OmegaKind::fisher_output;
  } else if (!stats) {
    plan.omega = OmegaKind::unweighted;
  } else if (stats->kind() == StatsKind::fisher) {
    plan.omega = OmegaKind::fisher;
  } else {
    plan.omega = OmegaKind::hessian;
    const ModelTensor& first = model.tensors().front();
    if (stats->has_layer(weight_base(first.name)) && !stats->has_hessian_matrix(weight_base(first.name), first.shape[1]))
      plan.omega = OmegaKind::hessian_diagonal;
  }
  const bool need_fisher = plan.omega == OmegaKind::fisher || plan.omega == OmegaKind::fisher_output;
  NUQ_CHECK(plan.omega != OmegaKind::fisher_output || feedback, Errc::invalid_argument,
            "sensitivity measure fisher-output needs the full XᵀX of `nuq calibrate --hessian` (--hessian) besides "
            "the Fisher statistics (--stats)");
  const bool need_hessian = plan.omega == OmegaKind::hessian || plan.omega == OmegaKind::hessian_diagonal ||
                            plan.omega == OmegaKind::hawq_trace;
  NUQ_CHECK(!need_fisher || (stats && stats->kind() == StatsKind::fisher), Errc::invalid_argument,
            "sensitivity measure fisher needs a Fisher statistics file (--stats){}",
            stats ? fmt::format("; {} holds Hessian statistics", stats->path()) : std::string());
  NUQ_CHECK(!need_hessian || (stats && stats->kind() == StatsKind::hessian), Errc::invalid_argument,
            "sensitivity measure {} needs a Hessian statistics file (--stats){}", to_string(plan.omega),
            stats ? fmt::format("; {} holds Fisher statistics", stats->path()) : std::string());
  // Files `nuq quantize --fisher` accepts (Fisher diagonals, `nuq calibrate` per-column statistics) steer
  // the nuq quantizer here exactly as they will there.
  const bool fisher_file = stats && stats->kind() == StatsKind::fisher;
  const bool steers = fisher_file || (stats && stats->is_calibrate_output());
  const std::vector<LayerConfig> candidates =
      options.candidates.empty()
          ? make_candidates({2, 3, 4}, {0.0, 0.0045}, {QuantMethod::nuq}, {0}, steers)
          : options.candidates;

  // Every statistic is checked to exist before hours of quantization.
  for (const ModelTensor& t : model.tensors()) {
    if (need_fisher)
      NUQ_CHECK(stats->has_fisher(t.name), Errc::invalid_argument,
                "{}: no Fisher tensor '{}' for the weight of that name in {}", stats->path(), t.name, options.model);
    if (feedback)
      NUQ_CHECK(feedback->has_layer(weight_base(t.name)) && feedback->has_hessian_matrix(weight_base(t.name), t.shape[1]),
                Errc::invalid_argument, "{}: no full XᵀX for layer '{}' of {}", feedback->path(), weight_base(t.name),
                options.model);
    if (need_hessian || (stats && stats->is_calibrate_output()))
      NUQ_CHECK(stats->has_layer(weight_base(t.name)), Errc::invalid_argument,
                "{}: no Hessian statistics for layer '{}' of {} (nor an alias naming the layer it shares its "
                "input with)",
                stats->path(), weight_base(t.name), options.model);
  }

  const int64_t count = int64_t(model.tensors().size());
  for (int64_t i = 0; i < count; ++i) {
    const ModelTensor& t = model.tensors()[std::size_t(i)];
    const auto t0 = std::chrono::steady_clock::now();
    const int64_t rows = t.shape[0], cols = t.shape[1];
    const Buffer w = model.read(t);
    std::vector<float> fisher, per_column;
    std::vector<double> hessian, hdiag;
    LayerStatistics ls;
    if (fisher_file && stats->has_fisher(t.name)) {
      fisher = stats->fisher(t.name, t.shape);
      ls.fisher = fisher.data();
      ls.sensitivity = fisher.data();
    }
    if (need_hessian || (stats && stats->is_calibrate_output())) {
      hdiag = stats->hessian_diagonal(weight_base(t.name), cols);
      ls.hessian_diagonal = hdiag.data();
      if (stats->is_calibrate_output()) {
        // `nuq quantize --fisher` gives every row the same per-column sensitivities.
        per_column.resize(std::size_t(rows * cols));
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < cols; ++c) per_column[std::size_t(r * cols + c)] = float(hdiag[std::size_t(c)]);
        ls.sensitivity = per_column.data();
      }
      if (plan.omega == OmegaKind::hessian) {
        hessian = stats->hessian_matrix(weight_base(t.name), cols);
        NUQ_CHECK(!hessian.empty(), Errc::invalid_argument,
                  "{}: layer '{}' has only the diagonal of XᵀX; use --omega hessian-diag or hawq", stats->path(),
                  weight_base(t.name));
        ls.hessian = hessian.data();
      }
    }
    std::vector<double> xtx;
    if (feedback) {
      xtx = feedback->hessian_matrix(weight_base(t.name), cols);
      ls.error_feedback_hessian = xtx.data();
      ls.damping = options.damping;
      if (plan.omega == OmegaKind::fisher_output) ls.hessian = xtx.data();
    }
    PlannedLayer layer;
    layer.name = t.name;
    layer.base = weight_base(t.name);
    layer.rows = rows;
    layer.cols = cols;
    try {
      layer.candidates =
          evaluate_candidates(w.data_as<float>(), rows, cols, ls, plan.omega, candidates, options.threads, t.name,
                              options.relative);
    } catch (const Error& e) {
      throw Error(e.code(), fmt::format("{}: {}", options.model, e.what()));
    }
    NUQ_CHECK(!layer.candidates.empty(), Errc::invalid_argument,
              "{}: no candidate applies to '{}' (shape {}): every candidate group size fails to divide {} columns",
              options.model, t.name, to_string(t.shape), cols);
    plan.weights += rows * cols;
    plan.layers.push_back(std::move(layer));
    if (options.progress) {
      CheckpointPlanProgress p;
      p.index = i;
      p.count = count;
      p.name = t.name;
      p.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      p.candidates = &plan.layers.back().candidates;
      options.progress(p);
    }
  }

  std::vector<std::vector<AllocationChoice>> problem;
  for (const PlannedLayer& l : plan.layers) {
    std::vector<AllocationChoice> choices;
    for (const CandidateEvaluation& c : l.candidates) choices.push_back({c.bytes, c.omega});
    problem.push_back(std::move(choices));
  }
  plan.budget_bytes = options.budget_bytes
                          ? options.budget_bytes
                          : uint64_t(std::floor(options.budget_bits_per_weight * double(plan.weights) / 8.0));
  const uint64_t floor_bytes = minimum_bytes(problem);
  NUQ_CHECK(plan.budget_bytes >= floor_bytes, Errc::invalid_argument,
            "budget {} ({} bytes, {:.4f} bits/weight over {} weights) is infeasible: the smallest candidates take {} "
            "bytes ({:.4f} bits/weight)",
            options.budget_bytes ? fmt::format("{} bytes", options.budget_bytes)
                                 : fmt::format("{}bpw", options.budget_bits_per_weight),
            plan.budget_bytes, 8.0 * double(plan.budget_bytes) / double(plan.weights), plan.weights, floor_bytes,
            8.0 * double(floor_bytes) / double(plan.weights));
  plan.allocation = allocate_bits(problem, plan.budget_bytes, options.allocation);
  for (std::size_t l = 0; l < plan.layers.size(); ++l) plan.layers[l].chosen = plan.allocation.choice[l];
  plan.bytes = plan.allocation.bytes;
  plan.total_omega = plan.allocation.omega;
  plan.bits_per_weight = 8.0 * double(plan.bytes) / double(plan.weights);
  plan.frontier = pareto_frontier(problem, options.allocation);

  for (const LayerConfig& c : candidates) {
    UniformBaseline u;
    u.label = c.label();
    bool everywhere = true;
    for (const PlannedLayer& l : plan.layers) {
      const auto it = std::find_if(l.candidates.begin(), l.candidates.end(),
                                   [&](const CandidateEvaluation& e) { return e.config.label() == u.label; });
      if (it == l.candidates.end()) {
        everywhere = false;
        break;
      }
      u.bytes += it->bytes;
      u.omega += it->omega;
    }
    if (!everywhere) continue;
    u.bits_per_weight = 8.0 * double(u.bytes) / double(plan.weights);
    plan.uniform.push_back(u);
  }
  return plan;
}

std::string plan_to_json(const CheckpointPlan& plan) {
  Json layers = Json::object(), details = Json::object();
  for (const PlannedLayer& l : plan.layers) {
    const CandidateEvaluation& c = l.candidates[std::size_t(l.chosen)];
    layers[l.base] = Json{{"bits", c.config.bits},
                          {"method", std::string(to_string(c.config.method))},
                          {"group_size", c.config.group_size},
                          {"outlier_fraction", c.config.outlier_fraction},
                          {"sensitive_fraction", c.config.sensitive_fraction},
                          {"outliers_per_row", c.config.outliers_per_row}};
    details[l.base] = Json{{"config", c.config.label()}, {"bytes", c.bytes}, {"omega", c.omega},
                           {"bits_per_weight", c.bits_per_weight}};
  }
  Json uniform = Json::array();
  for (const UniformBaseline& u : plan.uniform)
    uniform.push_back(Json{{"config", u.label}, {"bytes", u.bytes}, {"bits_per_weight", u.bits_per_weight},
                           {"total_omega", u.omega}});
  Json j;
  j["layers"] = layers;
  j["nuq_plan"] = Json{{"model", plan.model},
                       {"stats", plan.stats_path.empty() ? Json(nullptr) : Json(plan.stats_path)},
                       {"hessian", plan.hessian_path.empty() ? Json(nullptr) : Json(plan.hessian_path)},
                       {"omega", std::string(to_string(plan.omega))},
                       {"relative", plan.relative},
                       {"weights", plan.weights},
                       {"budget_bytes", plan.budget_bytes},
                       {"budget_bits_per_weight", 8.0 * double(plan.budget_bytes) / double(plan.weights)},
                       {"bytes", plan.bytes},
                       {"bits_per_weight", plan.bits_per_weight},
                       {"total_omega", plan.total_omega},
                       {"exact", plan.allocation.exact},
                       {"granule_bytes", plan.allocation.granule},
                       {"layers", details},
                       {"uniform", uniform},
                       {"frontier", frontier_json(plan.frontier, plan.weights, 64)}};
  if (!plan.measured.empty()) {
    Json measured = Json::array();
    for (const PlanMeasurement& m : plan.measured)
      measured.push_back(Json{{"plan", m.label}, {"bytes", m.bytes}, {"bits_per_weight", m.bits_per_weight},
                              {"predicted_kl", m.predicted_kl}, {"predicted_nll_increase", m.predicted_dnll},
                              {"kl", m.kl}, {"nll", m.nll}});
    j["nuq_plan"]["measured"] = Json{{"validation_positions", plan.validation_positions},
                                     {"reference_nll", plan.reference_nll},
                                     {"plans", measured}};
  }
  if (plan.search.ran)
    j["nuq_plan"]["search"] = Json{{"objective", plan.search.objective},
                                   {"generations", plan.search.generations},
                                   {"evaluations", plan.search.evaluations},
                                   {"improvements", plan.search.improvements},
                                   {"seconds", plan.search.seconds},
                                   {"start_kl", plan.search.start_kl},
                                   {"search_kl", plan.search.search_kl},
                                   {"accepted", plan.search.accepted}};
  return j.dump(1) + "\n";
}

}  // namespace nuq
