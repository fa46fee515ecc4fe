// `nuq plan` (mixed-precision bit allocation) and `nuq stats merge`: the command-line faces of
// nuq::plan_checkpoint and of the statistics accumulators (docs/sensitivity.md).
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <map>
#include <string>

#include "commands.hpp"
#include "nuq/bit_allocation.hpp"
#include "nuq/safetensors.hpp"
#include "nuq/sensitivity.hpp"

namespace nuq::cli {
namespace {

std::string lower(std::string s) {
  for (char& c : s) c = char(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// "3.25bpw" -> bits per weight; "52000000", "52MB", "49.6MiB" -> bytes (decimal or binary units).
void parse_budget(const std::string& text, CheckpointPlanOptions& o) {
  std::string t = lower(text);
  if (t.size() > 3 && t.substr(t.size() - 3) == "bpw") {
    const double v = parse_number(t.substr(0, t.size() - 3));
    NUQ_CHECK(v > 0 && v <= 64, Errc::invalid_argument,
              "--budget {}: bits per weight must be a number in (0, 64], e.g. 3.25bpw", text);
    o.budget_bits_per_weight = v;
    return;
  }
  const std::optional<uint64_t> bytes = parse_size(t);
  NUQ_CHECK(bytes.has_value(), Errc::invalid_argument,
            "--budget takes average bits per weight (e.g. 3.25bpw) or a size (e.g. 52000000, 52MB, 49.6MiB), not '{}'",
            text);
  o.budget_bytes = *bytes;
}

std::string mib(uint64_t bytes) { return fmt::format("{:.2f} MiB", double(bytes) / 1048576.0); }

}  // namespace

void add_plan_command(CLI::App& app, Action& action) {
  struct Options {
    std::string model, stats, budget, out, omega, hessian;
    double damping = 0.01;
    std::vector<int> bits{2, 3, 4};
    std::vector<std::string> sparse{"0", "0.45%"}, methods{"nuq"};
    std::vector<int64_t> group_sizes{0};
    int threads = 0;
    int64_t max_units = AllocationOptions{}.max_units;
    bool quiet = false, relative = false;
  };
  auto o = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand(
      "plan",
      "Choose per-layer quantization settings (bits, sparse fraction, method, group size) minimizing the total "
      "sensitivity-weighted error under a size budget, and write a plan for `nuq quantize --plan`.");
  cmd->add_option("--model,-m", o->model, "checkpoint to plan (.safetensors file, sharded directory or index, .gguf)")
      ->required();
  cmd->add_option("--stats,-s", o->stats,
                  "Fisher or Hessian statistics, or `nuq calibrate` output (docs/sensitivity.md); without it the error "
                  "is unweighted");
  cmd->add_option("--budget", o->budget, "average bits per weight over the quantized layers, every stored byte "
                                         "counted (e.g. 3.25bpw), or a total size of those layers (bytes, 52MB, 49.6MiB)")
      ->required();
  cmd->add_option("--out,-o", o->out, "plan file to write (JSON)")->required();
  cmd->add_option("--bits,-b", o->bits, "candidate bit widths")->delimiter(',')->check(CLI::IsMember({2, 3, 4}))
      ->capture_default_str();
  cmd->add_option("--sparse", o->sparse, "candidate sparse percentages (e.g. 0,0.45%)")->delimiter(',')
      ->capture_default_str();
  cmd->add_option("--methods", o->methods, "candidate methods: nuq, kmeans, rtn")->delimiter(',')
      ->check(CLI::IsMember({"nuq", "kmeans", "rtn"}))->capture_default_str();
  cmd->add_option("--group-sizes", o->group_sizes, "candidate group sizes (0: the method's default); sizes that do "
                                                   "not divide a layer's columns are skipped for it")
      ->delimiter(',')->capture_default_str();
  cmd->add_option("--hessian", o->hessian,
                  "full XᵀX from `nuq calibrate --hessian`: round every candidate with error feedback, as `nuq "
                  "quantize --hessian` will (pass it the same file); with a Fisher --stats file the default "
                  "measure becomes fisher-output");
  cmd->add_option("--damping", o->damping, "with --hessian: as in nuq quantize")->capture_default_str();
  cmd->add_option("--omega", o->omega,
                  "error measure: fisher, hessian (tr(ΔW H ΔWᵀ)), hessian-diag, hawq (tr(H)/cols·||ΔW||²), unweighted "
                  "(default: the best the statistics allow)")
      ->check(CLI::IsMember({"fisher", "hessian", "hessian-diag", "hawq", "unweighted", "fisher-output"}));
  cmd->add_flag("--relative", o->relative,
                "divide each layer's Ω by its weighted energy (Ω of all-zero weights): relative instead of absolute "
                "errors");
  cmd->add_option("--threads,-j", o->threads, "worker threads (0: all cores; results do not depend on it)")
      ->capture_default_str();
  cmd->add_option("--max-units", o->max_units, "cells of the knapsack DP's budget axis (exact when sizes fit)")
      ->capture_default_str();
  cmd->add_flag("--quiet,-q", o->quiet, "no per-layer progress");
  cmd->callback([o, &action] {
    action = [o]() -> int {
      CheckpointPlanOptions opt;
      opt.model = o->model;
      opt.stats_path = o->stats;
      opt.hessian_path = o->hessian;
      opt.damping = o->damping;
      parse_budget(o->budget, opt);
      if (!o->omega.empty()) opt.omega = parse_omega_kind(o->omega);
      std::vector<double> sparse;
      for (const std::string& s : o->sparse) sparse.push_back(parse_percent(s, "--sparse"));
      std::vector<QuantMethod> methods;
      for (const std::string& m : o->methods) methods.push_back(parse_quant_method(m));
      bool fisher = false;  // the statistics steer the nuq quantizer (see make_candidates)
      if (!o->stats.empty()) {
        const StatisticsFile stats(o->stats);
        fisher = stats.kind() == StatsKind::fisher || stats.is_calibrate_output();
      }
      opt.candidates = make_candidates(o->bits, sparse, methods, o->group_sizes, fisher);
      opt.threads = o->threads;
      opt.relative = o->relative;
      opt.allocation.max_units = o->max_units;
      const bool quiet = o->quiet;
      opt.progress = [quiet](const CheckpointPlanProgress& p) {
        if (quiet || !p.candidates) return;
        std::string line;
        for (const CandidateEvaluation& c : *p.candidates)
          line += fmt::format("  {}: {:.3f}b Ω={:.4g}", c.config.label(), c.bits_per_weight, c.omega);
        std::fprintf(stderr, "[%*lld/%lld] %s %.1fs%s\n", int(std::to_string(p.count).size()), (long long)(p.index + 1),
                     (long long)p.count, p.name.c_str(), p.seconds, line.c_str());
      };
      const CheckpointPlan plan = plan_checkpoint(opt);
      write_file_atomically(o->out, plan_to_json(plan));

      const double w = double(plan.weights);
      fmt::print("planned {} layers ({} weights), sensitivity measure: {}{}{}\n", plan.layers.size(), plan.weights,
                 to_string(plan.omega), plan.relative ? " (relative)" : "", plan.stats_path.empty() ? " (no statistics)" : " from " + plan.stats_path);
      fmt::print("Pareto frontier (size of the quantized layers vs total Ω):\n");
      fmt::print("  {:>12}  {:>8}  {:>14}\n", "size", "bits/w", "total Ω");
      const std::size_t n = plan.frontier.size(), shown = std::min<std::size_t>(n, 16);
      for (std::size_t k = 0; k < shown; ++k) {
        const FrontierPoint& p = plan.frontier[shown > 1 ? k * (n - 1) / (shown - 1) : 0];
        fmt::print("  {:>12}  {:>8.4f}  {:>14.6g}\n", mib(p.bytes), 8.0 * double(p.bytes) / w, p.omega);
      }
      fmt::print("uniform configurations:\n");
      for (const UniformBaseline& u : plan.uniform)
        fmt::print("  {:<22} {:>12}  {:>8.4f} bits/w  total Ω {:.6g}{}\n", u.label, mib(u.bytes), u.bits_per_weight,
                   u.omega, u.bytes <= plan.budget_bytes ? "" : "  (over budget)");
      std::map<std::string, int> counts;
      for (const PlannedLayer& l : plan.layers) ++counts[l.candidates[std::size_t(l.chosen)].config.label()];
      fmt::print("plan: budget {} ({:.4f} bits/w); chosen {} ({:.4f} bits/w), total Ω {:.6g}{}\n",
                 mib(plan.budget_bytes), 8.0 * double(plan.budget_bytes) / w, mib(plan.bytes), plan.bits_per_weight,
                 plan.total_omega,
                 plan.allocation.exact ? std::string(" (exact optimum)")
                                       : fmt::format(" (DP in {}-byte units: no worse than the exact optimum for "
                                                     "a budget {} bytes smaller)",
                                                     plan.allocation.granule, plan.allocation.slack_bytes));
      for (const auto& [label, k] : counts) fmt::print("  {:<22} {} layers\n", label, k);
      fmt::print("wrote {}\n", o->out);
      return 0;
    };
  });

  // nuq stats merge OUT IN...
  auto files = std::make_shared<std::vector<std::string>>();
  auto f64 = std::make_shared<bool>(false);
  CLI::App* stats = app.add_subcommand("stats", "Calibration statistics files (docs/sensitivity.md)");
  stats->require_subcommand(1);
  CLI::App* merge = stats->add_subcommand(
      "merge", "Merge statistics files of split calibration runs (sums weighted by their sample counts)");
  merge->add_option("files", *files, "OUT IN... (OUT is written; at least one IN)")->required()->expected(2, -1);
  merge->add_flag("--f64", *f64, "store Hessians as F64 instead of F32");
  merge->callback([files, f64, &action] {
    action = [files, f64]() -> int {
      const std::string out = files->front();
      const std::vector<std::string> in(files->begin() + 1, files->end());
      const StatsKind kind = detect_stats_kind(in.front());
      for (const std::string& f : in)
        NUQ_CHECK(detect_stats_kind(f) == kind, Errc::invalid_argument, "{} holds {} statistics but {} holds {}", f,
                  to_string(detect_stats_kind(f)), in.front(), to_string(kind));
      if (kind == StatsKind::fisher) {
        FisherAccumulator acc;
        for (const std::string& f : in) acc.merge(FisherAccumulator::load(f));
        acc.save(out);
        fmt::print("merged {} Fisher files ({} tensors) into {}\n", in.size(), acc.names().size(), out);
      } else {
        HessianAccumulator acc;
        for (const std::string& f : in) acc.merge(HessianAccumulator::load(f));
        acc.save(out, *f64 ? DType::F64 : DType::F32);
        fmt::print("merged {} Hessian files ({} layers) into {}\n", in.size(), acc.names().size(), out);
      }
      return 0;
    };
  });
}

}  // namespace nuq::cli
