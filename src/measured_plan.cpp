// Plans from a measured table: the knapsack, the search, and the whole-model measurements of the report
// (include/nuq/measured_sensitivity.hpp, docs/sensitivity.md).
#include <algorithm>
#include <cmath>

#include "nuq/error.hpp"
#include "nuq/llama.hpp"
#include "nuq/measured_sensitivity.hpp"

namespace nuq {
namespace {

std::vector<std::vector<AllocationChoice>> knapsack_problem(const DivergenceTable& table, PlanObjective objective) {
  std::vector<std::vector<AllocationChoice>> problem;
  for (const auto& l : table.layers()) {
    std::vector<AllocationChoice> choices;
    for (std::size_t c = 0; c < l.candidates.size(); ++c)
      choices.push_back({l.candidates[c].bytes, table_cost(l, c, objective)});
    problem.push_back(std::move(choices));
  }
  return problem;
}

// Every layer with the candidate of this label, or empty when some layer lacks it.
std::vector<int> uniform_choice(const DivergenceTable& table, const std::string& label) {
  std::vector<int> choice;
  for (const auto& l : table.layers()) {
    const auto it = std::find_if(l.candidates.begin(), l.candidates.end(),
                                 [&](const CandidateEvaluation& e) { return e.config.label() == label; });
    if (it == l.candidates.end()) return {};
    choice.push_back(int(it - l.candidates.begin()));
  }
  return choice;
}

void uniform_baselines(CheckpointPlan& plan, const DivergenceTable& table, PlanObjective objective) {
  std::vector<std::string> seen;
  for (const auto& c : table.layers().front().candidates) {
    const std::string label = c.config.label();
    if (std::find(seen.begin(), seen.end(), label) != seen.end()) continue;
    seen.push_back(label);
    const std::vector<int> choice = uniform_choice(table, label);
    if (choice.empty()) continue;
    UniformBaseline u;
    u.label = label;
    for (std::size_t l = 0; l < choice.size(); ++l) {
      u.bytes += table.layers()[l].candidates[std::size_t(choice[l])].bytes;
      u.omega += table_cost(table.layers()[l], std::size_t(choice[l]), objective);
    }
    u.bits_per_weight = 8.0 * double(u.bytes) / double(table.weights());
    plan.uniform.push_back(u);
  }
}

PlanMeasurement measure_plan(const std::string& label, const std::vector<int>& choice, LlamaModel& model,
                             const DivergenceTable& table, std::vector<int>& current, DivergenceMeter& meter) {
  PlanMeasurement m;
  m.label = label;
  for (std::size_t l = 0; l < choice.size(); ++l) {
    m.bytes += table.layers()[l].candidates[std::size_t(choice[l])].bytes;
    m.predicted_kl += table.layers()[l].candidates[std::size_t(choice[l])].omega;
    m.predicted_dnll += table.layers()[l].nll[std::size_t(choice[l])];
  }
  m.bits_per_weight = 8.0 * double(m.bytes) / double(table.weights());
  const Divergence d = measure_choice(model, table, choice, current, meter);
  m.kl = d.kl;
  m.nll = d.nll;
  return m;
}

}  // namespace

CheckpointPlan plan_from_table(const MeasuredPlanOptions& o) {
  NUQ_CHECK((o.budget_bits_per_weight > 0) != (o.budget_bytes > 0), Errc::invalid_argument,
            "give exactly one budget: average bits per weight (e.g. 3.25bpw) or a size in bytes");
  const DivergenceTable table(o.table);
  CheckpointPlan plan;
  plan.model = table.model();
  plan.stats_path = o.table;
  plan.hessian_path = table.hessian_path();
  plan.omega = OmegaKind::kl;
  plan.weights = table.weights();
  for (const auto& l : table.layers()) {
    PlannedLayer p;
    p.name = l.name, p.base = l.base, p.rows = l.rows, p.cols = l.cols, p.candidates = l.candidates;
    for (std::size_t c = 0; c < l.candidates.size(); ++c) p.candidates[c].omega = table_cost(l, c, o.objective);
    plan.layers.push_back(std::move(p));
  }
  const auto problem = knapsack_problem(table, o.objective);
  plan.budget_bytes = o.budget_bytes ? o.budget_bytes
                                     : uint64_t(std::floor(o.budget_bits_per_weight * double(plan.weights) / 8.0));
  const uint64_t floor_bytes = minimum_bytes(problem);
  NUQ_CHECK(plan.budget_bytes >= floor_bytes, Errc::invalid_argument,
            "budget of {} bytes ({:.4f} bits/weight over {} weights) is infeasible: the smallest candidates take {} "
            "bytes ({:.4f} bits/weight)",
            plan.budget_bytes, 8.0 * double(plan.budget_bytes) / double(plan.weights), plan.weights, floor_bytes,
            8.0 * double(floor_bytes) / double(plan.weights));
  plan.allocation = allocate_bits(problem, plan.budget_bytes, o.allocation);
  plan.frontier = pareto_frontier(problem, o.allocation);
  uniform_baselines(plan, table, o.objective);
  std::vector<int> chosen = plan.allocation.choice;

  if (o.validation.size() > 0) {
    LlamaLoadOptions load;
    load.threads = o.threads;
    const auto model = LlamaModel::load(table.model(), load);
    if (o.stage) o.stage("computing the reference's distributions on the validation windows");
    DivergenceMeter validation(*model, o.validation);
    plan.validation_positions = o.validation.positions();
    plan.reference_nll = validation.reference_nll();
    std::vector<int> current;
    std::vector<int> searched;
    if (o.pool.size() > 0 && o.search.max_generations > 0) {
      if (o.stage) o.stage("searching");
      PlanSearchOptions so = o.search;
      so.budget_bytes = plan.budget_bytes;
      so.objective = o.objective;
      so.threads = o.threads;
      const PlanSearchResult r = search_plan(*model, table, chosen, o.pool, so);
      searched = r.choice;
      current = r.choice;  // search_plan leaves the model with its choice applied
      plan.search.ran = true;
      plan.search.resumed = r.resumed;
      plan.search.generations = r.generations;
      plan.search.evaluations = r.evaluations;
      plan.search.improvements = r.improvements;
      plan.search.seconds = r.seconds;
    }
    if (o.stage) o.stage("measuring the plans and the uniform configurations whole");
    if (!searched.empty()) plan.measured.push_back(measure_plan("search", searched, *model, table, current, validation));
    plan.measured.push_back(measure_plan("knapsack", chosen, *model, table, current, validation));
    if (!searched.empty()) {
      const bool kl = o.objective == PlanObjective::kl;
      plan.search.objective = std::string(to_string(o.objective));
      plan.search.search_kl = kl ? plan.measured[0].kl : plan.measured[0].nll;
      plan.search.start_kl = kl ? plan.measured[1].kl : plan.measured[1].nll;
      // The search's plan replaces the knapsack's only when the whole model measurably diverges less.
      plan.search.accepted = plan.search.search_kl < plan.search.start_kl;
      if (plan.search.accepted) chosen = searched;
    }
    for (const UniformBaseline& u : plan.uniform)
      plan.measured.push_back(
          measure_plan("uniform " + u.label, uniform_choice(table, u.label), *model, table, current, validation));
  }

  plan.allocation.choice = chosen;
  plan.bytes = 0;
  plan.total_omega = 0;
  for (std::size_t l = 0; l < plan.layers.size(); ++l) {
    plan.layers[l].chosen = chosen[l];
    plan.bytes += plan.layers[l].candidates[std::size_t(chosen[l])].bytes;
    plan.total_omega += plan.layers[l].candidates[std::size_t(chosen[l])].omega;
  }
  NUQ_CHECK(plan.bytes <= plan.budget_bytes, Errc::internal, "plan of {} bytes for a budget of {}", plan.bytes,
            plan.budget_bytes);
  plan.allocation.bytes = plan.bytes;
  plan.allocation.omega = plan.total_omega;
  plan.bits_per_weight = 8.0 * double(plan.bytes) / double(plan.weights);
  return plan;
}

}  // namespace nuq
