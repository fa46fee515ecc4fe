// The evolutionary search over whole plans (include/nuq/measured_sensitivity.hpp, docs/sensitivity.md
// "Search beyond additivity").
//
// Why a search at all: the table measures each layer alone, and the knapsack adds those numbers up. Errors
// of several layers interact (they compound through later blocks, or partly cancel), so the sum predicts
// the whole model's divergence only roughly; the search judges whole configurations by that divergence
// itself. EvoPress (Sieberling et al., 2024) showed that a simple (1 + λ) scheme with level-switch
// mutations and multi-stage selection on few tokens converges quickly for this problem.
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <sstream>

#include "nuq/error.hpp"
#include "nuq/llama.hpp"
#include "nuq/measured_sensitivity.hpp"
#include "nuq/packed.hpp"
#include "nuq/safetensors.hpp"
#include "plan_inputs.hpp"

namespace nuq {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;
using Clock = std::chrono::steady_clock;

constexpr int kStateVersion = 1;

// A draw in [0, n) from the engine's raw output: std::uniform_int_distribution is implementation-defined,
// and the search must give the same plan on every platform for a seed.
uint64_t draw(std::mt19937_64& rng, uint64_t n) { return rng() % n; }

// Each layer's candidates that some budget could prefer: sorted by size, each smaller in KL than every
// smaller one (the table's Pareto front per layer). A mutation moves a layer one level up or down.
struct Levels {
  std::vector<std::vector<int>> of;   // per layer: candidate indices, by size ascending
  std::vector<std::vector<uint64_t>> bytes;
  std::vector<std::vector<double>> kl;  // the table's cost under the objective, per level

  Levels(const DivergenceTable& table, const std::vector<int>& start, PlanObjective objective) {
    for (std::size_t l = 0; l < table.layers().size(); ++l) {
      const auto& cs = table.layers()[l].candidates;
      std::vector<double> cost;
      for (std::size_t c = 0; c < cs.size(); ++c) cost.push_back(table_cost(table.layers()[l], c, objective));
      std::vector<int> order(cs.size());
      for (std::size_t c = 0; c < cs.size(); ++c) order[c] = int(c);
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
        return cs[std::size_t(a)].bytes != cs[std::size_t(b)].bytes ? cs[std::size_t(a)].bytes < cs[std::size_t(b)].bytes
                                                                   : cost[std::size_t(a)] < cost[std::size_t(b)];
      });
      std::vector<int> kept;
      for (int c : order)
        if (kept.empty() || cost[std::size_t(c)] < cost[std::size_t(kept.back())]) kept.push_back(c);
      // The start stays reachable even where the table ranks it dominated.
      if (std::find(kept.begin(), kept.end(), start[l]) == kept.end()) {
        kept.push_back(start[l]);
        std::stable_sort(kept.begin(), kept.end(), [&](int a, int b) { return cs[std::size_t(a)].bytes < cs[std::size_t(b)].bytes; });
      }
      std::vector<uint64_t> b;
      std::vector<double> k;
      for (int c : kept) b.push_back(cs[std::size_t(c)].bytes), k.push_back(cost[std::size_t(c)]);
      of.push_back(std::move(kept));
      bytes.push_back(std::move(b));
      kl.push_back(std::move(k));
    }
  }

  std::vector<int> levels_of(const std::vector<int>& choice) const {
    std::vector<int> out(choice.size());
    for (std::size_t l = 0; l < choice.size(); ++l) {
      const auto it = std::find(of[l].begin(), of[l].end(), choice[l]);
      NUQ_CHECK(it != of[l].end(), Errc::internal, "search: layer {} candidate {} is not a level", l, choice[l]);
      out[l] = int(it - of[l].begin());
    }
    return out;
  }
  std::vector<int> choice_of(const std::vector<int>& level) const {
    std::vector<int> out(level.size());
    for (std::size_t l = 0; l < level.size(); ++l) out[l] = of[l][std::size_t(level[l])];
    return out;
  }
  uint64_t total(const std::vector<int>& level) const {
    uint64_t s = 0;
    for (std::size_t l = 0; l < level.size(); ++l) s += bytes[l][std::size_t(level[l])];
    return s;
  }
};

// A layer drawn with probability ∝ weight (half the time) or uniformly among those with a positive
// weight (otherwise), or L when none qualifies. The table's marginal costs guide the moves, so that
// children are mostly plausible; the uniform half keeps every move possible, which is where the search
// finds what the additive table cannot see.
std::size_t pick(const std::vector<double>& weight, std::mt19937_64& rng) {
  double total = 0;
  std::size_t n = 0;
  for (double w : weight)
    if (w > 0) total += w, ++n;
  if (n == 0) return weight.size();
  const bool uniform = draw(rng, 2) == 0;
  const double u = double(rng() >> 11) * 0x1.0p-53 * (uniform ? double(n) : total);
  double at = 0;
  for (std::size_t l = 0; l < weight.size(); ++l) {
    if (!(weight[l] > 0)) continue;
    at += uniform ? 1.0 : weight[l];
    if (u < at) return l;
  }
  for (std::size_t l = weight.size(); l-- > 0;)
    if (weight[l] > 0) return l;
  return weight.size();
}

// A child of `parent` within the budget: 1–3 layers one level up (preferring those whose next level the
// table says removes the most KL per byte), then other layers one level down until the size fits
// (preferring those that lose the least KL per byte saved), then a few tries to spend what is left on more
// moves up. Returns the parent itself when no change fits (the caller draws again).
std::vector<int> mutate(const std::vector<int>& parent, const Levels& lv, uint64_t budget, std::mt19937_64& rng) {
  const std::size_t L = parent.size();
  std::vector<int> child = parent;
  std::vector<char> raised(L, 0), lowered(L, 0);
  // KL removed per byte by a move up (floored so that a level the table measured as no better stays
  // reachable), and bytes saved per KL added by a move down.
  auto up_weights = [&](bool allow_lowered) {
    std::vector<double> w(L, 0.0);
    for (std::size_t l = 0; l < L; ++l)
      if (std::size_t(child[l]) + 1 < lv.of[l].size() && (allow_lowered || !lowered[l]))
        w[l] = std::max(lv.kl[l][std::size_t(child[l])] - lv.kl[l][std::size_t(child[l] + 1)], 1e-12) /
               double(lv.bytes[l][std::size_t(child[l] + 1)] - lv.bytes[l][std::size_t(child[l])] + 1);
    return w;
  };
  const uint64_t ups = 1 + draw(rng, 3);
  for (uint64_t s = 0; s < ups; ++s) {
    const std::size_t l = pick(up_weights(true), rng);
    if (l < L) ++child[l], raised[l] = 1;
  }
  uint64_t size = lv.total(child);
  while (size > budget) {
    std::vector<double> w(L, 0.0);
    for (std::size_t l = 0; l < L; ++l)
      if (!raised[l] && child[l] > 0)
        w[l] = double(lv.bytes[l][std::size_t(child[l])] - lv.bytes[l][std::size_t(child[l] - 1)]) /
               std::max(lv.kl[l][std::size_t(child[l] - 1)] - lv.kl[l][std::size_t(child[l])], 1e-12);
    const std::size_t l = pick(w, rng);
    if (l == L) return parent;
    size -= lv.bytes[l][std::size_t(child[l])] - lv.bytes[l][std::size_t(child[l] - 1)];
    --child[l], lowered[l] = 1;
  }
  for (int tries = 0; tries < 4; ++tries) {
    const std::size_t l = pick(up_weights(false), rng);
    if (l == L) break;
    const uint64_t step = lv.bytes[l][std::size_t(child[l] + 1)] - lv.bytes[l][std::size_t(child[l])];
    if (size + step <= budget) ++child[l], size += step;
  }
  return child;
}

// `k` distinct windows of the pool, in drawn order.
std::vector<int64_t> draw_windows(int64_t pool, int64_t k, std::mt19937_64& rng) {
  std::vector<int64_t> all(static_cast<std::size_t>(pool));
  for (int64_t i = 0; i < pool; ++i) all[std::size_t(i)] = i;
  k = std::min(k, pool);
  for (int64_t i = 0; i < k; ++i) std::swap(all[std::size_t(i)], all[std::size_t(i + int64_t(draw(rng, uint64_t(pool - i))))]);
  all.resize(std::size_t(k));
  return all;
}

std::vector<float> hidden_of(const std::vector<float>& all, const CalibrationWindows& pool, const std::vector<int64_t>& which,
                             int64_t dim) {
  std::vector<int64_t> offset(static_cast<std::size_t>(pool.size()) + 1, 0);
  for (int64_t i = 0; i < pool.size(); ++i)
    offset[std::size_t(i + 1)] = offset[std::size_t(i)] + int64_t(pool.targets[std::size_t(i)].size());
  std::vector<float> out;
  for (int64_t w : which)
    out.insert(out.end(), all.begin() + offset[std::size_t(w)] * dim, all.begin() + offset[std::size_t(w + 1)] * dim);
  return out;
}

int64_t first_difference(const std::vector<int>& a, const std::vector<int>& b, const std::vector<int64_t>& blocks,
                         int64_t none) {
  int64_t first = none;
  for (std::size_t l = 0; l < a.size(); ++l)
    if (a[l] != b[l]) first = std::min(first, blocks[l]);
  return first;
}

// Paired test over windows: mean(child − parent) + margin · standard error < 0. One window has no spread
// to estimate, so there only the mean counts.
bool clearly_lower(const std::vector<double>& child, const std::vector<double>& parent, double margin) {
  const std::size_t n = child.size();
  double mean = 0;
  for (std::size_t w = 0; w < n; ++w) mean += child[w] - parent[w];
  mean /= double(n);
  if (n < 2) return mean < 0;
  double var = 0;
  for (std::size_t w = 0; w < n; ++w) var += (child[w] - parent[w] - mean) * (child[w] - parent[w] - mean);
  return mean + margin * std::sqrt(var / double(n - 1) / double(n)) < 0;
}

std::string engine_state(const std::mt19937_64& rng) {
  std::ostringstream s;
  s << rng;
  return s.str();
}

Json search_fingerprint(const DivergenceTable& table, const std::vector<int>& start, const CalibrationWindows& pool,
                        const PlanSearchOptions& o) {
  struct stat st {};
  NUQ_CHECK(::stat(table.path().c_str(), &st) == 0, Errc::io, "{}: cannot stat: {}", table.path(), std::strerror(errno));
  uint64_t h = 1469598103934665603ull;
  for (const auto& in : pool.inputs)
    for (int32_t id : in) h = (h ^ uint32_t(id)) * 1099511628211ull;
  return Json{{"version", kStateVersion},
              {"table", {{"path", fs::weakly_canonical(table.path()).string()}, {"size", uint64_t(st.st_size)}}},
              {"start", start},
              {"budget_bytes", o.budget_bytes},
              {"objective", std::string(to_string(o.objective))},
              {"seed", o.seed},
              {"offspring", o.offspring},
              {"survivors", o.survivors},
              {"stage_windows", {o.stage_windows[0], o.stage_windows[1]}},
              {"margin_se", o.margin_se},
              {"pool_windows", pool.size()},
              {"pool_fnv", h}};
}

}  // namespace

std::string_view to_string(PlanObjective objective) { return objective == PlanObjective::kl ? "kl" : "nll"; }

double table_cost(const DivergenceTable::Layer& layer, std::size_t c, PlanObjective objective) {
  if (objective == PlanObjective::kl) return layer.candidates[c].omega;
  return layer.nll[c] - *std::min_element(layer.nll.begin(), layer.nll.end());
}

double objective_value(const Divergence& d, PlanObjective objective) {
  return objective == PlanObjective::kl ? d.kl : d.nll;
}

const std::vector<double>& objective_windows(const Divergence& d, PlanObjective objective) {
  return objective == PlanObjective::kl ? d.window_kl : d.window_nll;
}

void apply_choice(LlamaModel& model, const DivergenceTable& table, const std::vector<int>& choice,
                  std::vector<int>& current) {
  NUQ_CHECK(choice.size() == table.layers().size(), Errc::invalid_argument, "a choice of {} layers for a table of {}",
            choice.size(), table.layers().size());
  if (current.size() != choice.size()) current.assign(choice.size(), -1);
  std::vector<float> w;
  for (std::size_t l = 0; l < choice.size(); ++l) {
    if (current[l] == choice[l]) continue;
    const DivergenceTable::Layer& layer = table.layers()[l];
    w.resize(std::size_t(layer.rows * layer.cols));
    dequantize_reference(table.packed(l, std::size_t(choice[l])), w.data());
    model.set_linear_weights(layer.base, w.data());
    current[l] = choice[l];
  }
}

Divergence measure_choice(LlamaModel& model, const DivergenceTable& table, const std::vector<int>& choice,
                          std::vector<int>& current, DivergenceMeter& meter) {
  apply_choice(model, table, choice, current);
  return meter.measure(0);
}

PlanSearchResult search_plan(LlamaModel& model, const DivergenceTable& table, const std::vector<int>& start,
                             const CalibrationWindows& pool, const PlanSearchOptions& o) {
  const auto t0 = Clock::now();
  const std::size_t L = table.layers().size();
  NUQ_CHECK(start.size() == L, Errc::invalid_argument, "search: a start of {} layers for a table of {}", start.size(), L);
  NUQ_CHECK(o.offspring >= 1 && o.survivors >= 1 && o.survivors <= o.offspring && o.stage_windows[0] >= 1 &&
                o.stage_windows[1] >= 1,
            Errc::invalid_argument, "search: offspring, survivors (<= offspring) and stage windows must be positive");
  NUQ_CHECK(pool.size() >= 1, Errc::invalid_argument, "search: no calibration windows to evaluate plans on");
  const Levels lv(table, start, o.objective);
  uint64_t start_bytes = lv.total(lv.levels_of(start));
  NUQ_CHECK(start_bytes <= o.budget_bytes, Errc::invalid_argument, "search: the start takes {} bytes, over the budget of {}",
            start_bytes, o.budget_bytes);
  std::vector<std::string> bases;
  for (const auto& l : table.layers()) bases.push_back(l.base);
  const std::vector<int64_t> blocks = detail::decoder_blocks(model, bases, table.model());
  const int64_t n_blocks = model.config().n_layers;

  PlanSearchResult r;
  std::mt19937_64 rng(o.seed);
  std::vector<int> parent = lv.levels_of(start);
  double saved_seconds = 0;
  const Json fingerprint = search_fingerprint(table, start, pool, o);
  if (!o.state_path.empty() && fs::exists(o.state_path)) {
    const Json s = Json::parse(read_small_file(o.state_path, "the search state"), nullptr, false);
    NUQ_CHECK(!s.is_discarded() && s.contains("fingerprint"), Errc::invalid_file, "{}: not a search state",
              o.state_path);
    NUQ_CHECK(s["fingerprint"] == fingerprint, Errc::invalid_argument,
              "{}: a search state of another table, start, budget, seed or calibration pool; remove it to start over",
              o.state_path);
    std::istringstream(s["rng"].get<std::string>()) >> rng;
    parent = lv.levels_of(s["parent"].get<std::vector<int>>());
    r.generations = s["generations"].get<int64_t>();
    r.evaluations = s["evaluations"].get<int64_t>();
    r.improvements = s["improvements"].get<int64_t>();
    saved_seconds = s["seconds"].get<double>();
    r.resumed = true;
  }

  // The reference's final states over the pool, computed once (the model still holds its weights); each
  // draw's distributions come from them.
  const std::vector<float> reference = reference_hidden_states(model, pool);
  std::vector<int> current;
  apply_choice(model, table, lv.choice_of(parent), current);

  auto elapsed = [&] { return saved_seconds + std::chrono::duration<double>(Clock::now() - t0).count(); };
  auto evaluate = [&](DivergenceMeter& meter, const std::vector<int>& level, const std::vector<int>& parent_level) {
    const std::vector<int> choice = lv.choice_of(level);
    apply_choice(model, table, choice, current);
    ++r.evaluations;
    return meter.measure(first_difference(choice, lv.choice_of(parent_level), blocks, n_blocks));
  };
  double parent_kl = std::numeric_limits<double>::quiet_NaN();
  while (r.generations < o.max_generations && (o.max_seconds <= 0 || elapsed() < o.max_seconds)) {
    // Stage 1: every child on the same small draw, the parent's stream captured once for all.
    std::vector<std::vector<int>> children;
    for (int tries = 0; int(children.size()) < o.offspring && tries < 64 * o.offspring; ++tries) {
      std::vector<int> c = mutate(parent, lv, o.budget_bytes, rng);
      NUQ_CHECK(lv.total(c) <= o.budget_bytes, Errc::internal, "search: a child of {} bytes for a budget of {}",
                lv.total(c), o.budget_bytes);
      if (c != parent && std::find(children.begin(), children.end(), c) == children.end()) children.push_back(std::move(c));
    }
    const std::vector<int64_t> w1 = draw_windows(pool.size(), o.stage_windows[0], rng);
    const std::vector<int64_t> w2 = draw_windows(pool.size(), o.stage_windows[1], rng);
    if (children.empty()) break;  // nothing fits: the parent is the only plan of this size
    apply_choice(model, table, lv.choice_of(parent), current);
    std::vector<std::pair<double, std::size_t>> ranked;
    {
      DivergenceMeter m1(model, select_windows(pool, w1), hidden_of(reference, pool, w1, model.config().dim));
      for (std::size_t i = 0; i < children.size(); ++i)
        ranked.emplace_back(objective_value(evaluate(m1, children[i], parent), o.objective), i);
    }
    std::stable_sort(ranked.begin(), ranked.end());
    // Stage 2: the best children and the parent on a larger fresh draw; the best of them is the next parent.
    apply_choice(model, table, lv.choice_of(parent), current);
    DivergenceMeter m2(model, select_windows(pool, w2), hidden_of(reference, pool, w2, model.config().dim));
    const Divergence pd = m2.measure(n_blocks);
    parent_kl = objective_value(pd, o.objective);
    std::size_t best = children.size();
    double best_kl = parent_kl;
    for (std::size_t k = 0; k < ranked.size() && int(k) < o.survivors; ++k) {
      const Divergence cd = evaluate(m2, children[ranked[k].second], parent);
      const double kl = objective_value(cd, o.objective);
      if (kl < best_kl && clearly_lower(objective_windows(cd, o.objective), objective_windows(pd, o.objective),
                                        o.margin_se))
        best_kl = kl, best = ranked[k].second;
    }
    if (best < children.size()) {
      parent = children[best];
      parent_kl = best_kl;
      ++r.improvements;
    }
    ++r.generations;
    if (!o.state_path.empty())
      write_file_atomically(o.state_path, Json{{"fingerprint", fingerprint},
                                               {"rng", engine_state(rng)},
                                               {"parent", lv.choice_of(parent)},
                                               {"generations", r.generations},
                                               {"evaluations", r.evaluations},
                                               {"improvements", r.improvements},
                                               {"seconds", elapsed()}}
                                                  .dump() +
                                                  "\n");
    if (o.progress) o.progress(r.generations, o.max_generations, parent_kl, r.improvements, elapsed());
  }
  r.choice = lv.choice_of(parent);
  apply_choice(model, table, r.choice, current);
  r.seconds = elapsed();
  return r;
}

}  // namespace nuq
