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

#include <chrono>
#include <filesystem>

#include "commands.hpp"
#include "nuq/bit_allocation.hpp"
#include "nuq/inspect.hpp"
#include "nuq/llama.hpp"
#include "nuq/measured_sensitivity.hpp"
#include "nuq/safetensors.hpp"
#include "nuq/sensitivity.hpp"
#include "nuq/tokenizer.hpp"

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

std::string duration(double s) {
  if (s < 120) return fmt::format("{:.0f}s", s);
  if (s < 7200) return fmt::format("{:.0f}m{:02.0f}s", std::floor(s / 60), std::fmod(s, 60));
  return fmt::format("{:.0f}h{:02.0f}m", std::floor(s / 3600), std::fmod(s / 60, 60));
}

// What the measured path needs from the command line besides plan_command's own options.
struct MeasuredOptions {
  std::vector<std::string> texts;
  std::string tokenizer, table;
  int64_t skip_tokens = 0, max_tokens = 16384, ctx = 128, table_windows = 2, validation_windows = 4;
  int64_t generations = 40, pool_windows = 32;
  double search_seconds = 0;
  uint64_t seed = 0;
  int offspring = 8, survivors = 2;
  std::vector<int64_t> search_windows{2, 8};
  double margin = 1.0;
  std::string objective = "kl";
  bool restart = false;
};

// The calibration tokens: each text tokenized whole, cut to [skip, skip + max), then their windows
// interleaved (each text cut to whole windows when several are mixed) so that the table, the validation
// and the search pool all see every text.
std::vector<int32_t> calibration_stream(const MeasuredOptions& m, const Tokenizer& tok, int64_t ctx) {
  std::vector<std::vector<int32_t>> streams;
  const std::size_t per = std::size_t(ctx - 1);
  for (const std::string& text : m.texts) {
    std::vector<int32_t> ids = tok.encode(read_small_file(text, "the text"));
    NUQ_CHECK(m.skip_tokens >= 0 && m.skip_tokens < int64_t(ids.size()), Errc::invalid_argument,
              "{}: cannot skip {} of its {} tokens", text, m.skip_tokens, ids.size());
    ids.erase(ids.begin(), ids.begin() + m.skip_tokens);
    if (m.max_tokens > 0 && int64_t(ids.size()) > m.max_tokens) ids.resize(std::size_t(m.max_tokens));
    if (m.texts.size() > 1) ids.resize(ids.size() / per * per);
    streams.push_back(std::move(ids));
  }
  std::vector<int32_t> out;
  for (std::size_t at = 0;; at += per) {
    bool any = false;
    for (const auto& st : streams)
      if (at < st.size()) {
        out.insert(out.end(), st.begin() + std::ptrdiff_t(at), st.begin() + std::ptrdiff_t(std::min(st.size(), at + per)));
        any = true;
      }
    if (!any) break;
  }
  return out;
}

std::string default_tokenizer(const std::string& model) {
  namespace fs = std::filesystem;
  if (detect_checkpoint_kind(model) == CheckpointKind::gguf) return model;
  const fs::path dir = fs::is_directory(model) ? fs::path(model) : fs::path(model).parent_path();
  NUQ_CHECK(fs::exists(dir / "tokenizer.json"), Errc::invalid_argument,
            "{}: the checkpoint holds no tokenizer; pass --tokenizer", model);
  return (dir / "tokenizer.json").string();
}

std::string default_table_path(const std::string& out) {
  const std::string stem = out.size() > 5 && out.ends_with(".json") ? out.substr(0, out.size() - 5) : out;
  return stem + ".kl.safetensors";
}

// Measures the table (unless an identical one exists), with one progress line per layer.
void measure_table(const std::string& model, const std::string& stats, const std::string& hessian, double damping,
                   const std::vector<LayerConfig>& candidates, const std::vector<int32_t>& ids, int32_t start,
                   const MeasuredOptions& m, int threads, bool quiet, const std::string& text_names) {
  MeasuredTableOptions t;
  t.model = model;
  t.ids.assign(ids.begin(), ids.begin() + std::ptrdiff_t(std::min<int64_t>(int64_t(ids.size()), m.table_windows * (m.ctx - 1))));
  t.start = start;
  t.ctx = m.ctx;
  t.windows = m.table_windows;
  t.text = text_names;
  t.stats_path = stats;
  t.hessian_path = hessian;
  t.damping = damping;
  t.candidates = candidates;
  t.threads = threads;
  t.restart = m.restart;
  double spent = 0;
  int64_t fresh = 0;
  t.progress = [&](const MeasuredTableProgress& p) {
    if (quiet) return;
    if (p.resumed) {
      std::fprintf(stderr, "[%*lld/%lld] %s resumed\n", int(std::to_string(p.count).size()), (long long)(p.index + 1),
                   (long long)p.count, p.name.c_str());
      return;
    }
    spent += p.seconds;
    ++fresh;
    std::string line;
    for (std::size_t k = 0; k < p.candidates->size(); ++k)
      line += fmt::format("  {}: {:.3f}b KL={:.3g} ΔNLL={:+.3g}", (*p.candidates)[k].config.label(),
                          (*p.candidates)[k].bits_per_weight, (*p.candidates)[k].omega, (*p.nll)[k]);
    std::fprintf(stderr, "[%*lld/%lld] %s %.1fs ETA %s%s\n", int(std::to_string(p.count).size()),
                 (long long)(p.index + 1), (long long)p.count, p.name.c_str(), p.seconds,
                 duration(spent / double(fresh) * double(p.count - p.index - 1)).c_str(), line.c_str());
  };
  const auto t0 = std::chrono::steady_clock::now();
  const bool measured = measure_sensitivity_table(t, m.table);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (measured)
    fmt::print("measured table {} ({} positions of {}) in {}\n", m.table, t.ids.size(), text_names, duration(s));
  else
    fmt::print("reusing table {} (measured earlier with the same model, text and candidates)\n", m.table);
}

void print_measurements(const CheckpointPlan& plan) {
  if (plan.search.ran)
    fmt::print("search: {} generations, {} evaluations, {} improvements in {}{}; whole-model {} {:.5g} (knapsack) -> "
               "{:.5g} (search): {}\n",
               plan.search.generations, plan.search.evaluations, plan.search.improvements, duration(plan.search.seconds),
               plan.search.resumed ? " (resumed)" : "", plan.search.objective == "kl" ? "KL" : "NLL",
               plan.search.start_kl, plan.search.search_kl,
               plan.search.accepted ? "the search's plan is kept" : "no better than the knapsack's, which is kept");
  if (plan.measured.empty()) return;
  fmt::print("predicted (Σ of the table) vs measured (whole model) divergence on {} validation positions, reference "
             "NLL {:.4f}:\n",
             plan.validation_positions, plan.reference_nll);
  fmt::print("  {:<28} {:>8}  {:>12}  {:>12}  {:>10}  {:>10}\n", "plan", "bits/w", "predicted KL", "measured KL",
             "pred. ΔNLL", "meas. ΔNLL");
  for (const PlanMeasurement& m : plan.measured)
    fmt::print("  {:<28} {:>8.4f}  {:>12.5g}  {:>12.5g}  {:>+10.4f}  {:>+10.4f}{}\n", m.label, m.bits_per_weight,
               m.predicted_kl, m.kl, m.predicted_dnll, m.nll - plan.reference_nll,
               m.bytes <= plan.budget_bytes ? "" : "  (over budget)");
}

struct PlanOptions {
  std::string model, stats, budget, out, omega, hessian;
  double damping = 0.01;
  std::vector<int> bits{2, 3, 4};
  std::vector<std::string> sparse{"0", "0.45%"}, methods{"nuq"};
  std::vector<int64_t> group_sizes{0};
  int threads = 0;
  int64_t max_units = AllocationOptions{}.max_units;
  bool quiet = false, relative = false;
  MeasuredOptions measured;
};

void print_plan(const CheckpointPlan& plan) {
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
             plan.search.accepted ? std::string(" (the search's plan)")
             : plan.allocation.exact ? std::string(" (exact optimum)")
                                   : fmt::format(" (DP in {}-byte units: no worse than the exact optimum for "
                                                 "a budget {} bytes smaller)",
                                                 plan.allocation.granule, plan.allocation.slack_bytes));
  for (const auto& [label, k] : counts) fmt::print("  {:<22} {} layers\n", label, k);
}

int run_measured_plan(const PlanOptions& o) {
  MeasuredOptions m = o.measured;
  NUQ_CHECK(o.omega.empty() || o.omega == "kl", Errc::invalid_argument,
            "--omega {} weighs weight errors by --stats; --text measures the output (--omega kl)", o.omega);
  NUQ_CHECK(!o.relative, Errc::invalid_argument, "--relative applies to the proxy measures, not to --omega kl");
  const bool stats_is_table = !o.stats.empty() && is_divergence_table(o.stats);
  NUQ_CHECK(stats_is_table || !m.texts.empty(), Errc::invalid_argument,
            "--omega kl needs a measured table (--stats TABLE) or a calibration text to measure one (--text)");
  if (stats_is_table) m.table = o.stats;
  if (m.table.empty()) m.table = default_table_path(o.out);
  NUQ_CHECK(m.table != o.out, Errc::invalid_argument, "--table and --out name the same file {}", o.out);
  std::vector<int32_t> ids;
  int32_t start = 1;
  if (!m.texts.empty()) {
    const std::string tok_path = m.tokenizer.empty() ? default_tokenizer(o.model) : m.tokenizer;
    const auto tok = Tokenizer::load(tok_path);
    start = tok->bos();
    ids = calibration_stream(m, *tok, m.ctx);
    std::string names;
    for (const std::string& t : m.texts) names += (names.empty() ? "" : " + ") + t;
    if (!stats_is_table) {
      std::vector<double> sparse;
      for (const std::string& s : o.sparse) sparse.push_back(parse_percent(s, "--sparse"));
      std::vector<QuantMethod> methods;
      for (const std::string& x : o.methods) methods.push_back(parse_quant_method(x));
      bool steers = false;
      if (!o.stats.empty()) {
        const StatisticsFile stats(o.stats);
        steers = stats.kind() == StatsKind::fisher || stats.is_calibrate_output();
      }
      measure_table(o.model, o.stats, o.hessian, o.damping, make_candidates(o.bits, sparse, methods, o.group_sizes, steers),
                    ids, start, m, o.threads, o.quiet,
                    fmt::format("{} from token {}", names, m.skip_tokens));
    }
  }
  MeasuredPlanOptions p;
  p.table = m.table;
  CheckpointPlanOptions budget;
  parse_budget(o.budget, budget);
  p.budget_bits_per_weight = budget.budget_bits_per_weight;
  p.budget_bytes = budget.budget_bytes;
  p.allocation.max_units = o.max_units;
  p.threads = o.threads;
  if (!ids.empty()) {
    p.validation = calibration_windows(ids, start, m.ctx, std::min(m.table_windows, window_count(int64_t(ids.size()), m.ctx)),
                                       m.validation_windows);
    if (p.validation.size() > 0)
      p.pool = calibration_windows(ids, start, m.ctx,
                                   std::min(m.table_windows + m.validation_windows,
                                            window_count(int64_t(ids.size()), m.ctx)),
                                   m.pool_windows);
  }
  p.objective = m.objective == "nll" ? PlanObjective::nll : PlanObjective::kl;
  p.search.max_generations = m.generations;
  p.search.max_seconds = m.search_seconds;
  p.search.seed = m.seed;
  p.search.offspring = m.offspring;
  p.search.survivors = std::min(m.survivors, m.offspring);
  p.search.stage_windows[0] = m.search_windows[0];
  p.search.stage_windows[1] = m.search_windows[1];
  p.search.margin_se = m.margin;
  p.search.state_path = o.out + ".search.json";
  const bool quiet = o.quiet;
  p.search.progress = [quiet](int64_t g, int64_t gs, double kl, int64_t improvements, double seconds) {
    if (!quiet)
      std::fprintf(stderr, "generation %lld/%lld  parent KL %.5g  %lld improvements  %s\n", (long long)g,
                   (long long)gs, kl, (long long)improvements, duration(seconds).c_str());
  };
  p.stage = [quiet](const std::string& what) {
    if (!quiet) std::fprintf(stderr, "%s\n", what.c_str());
  };
  if (!m.texts.empty() && p.pool.size() == 0 && m.generations > 0)
    std::fprintf(stderr, "nuq: warning: no calibration windows are left for the search after the %lld table and %lld "
                 "validation windows; raise --max-tokens\n", (long long)m.table_windows, (long long)m.validation_windows);
  const CheckpointPlan plan = plan_from_table(p);
  write_file_atomically(o.out, plan_to_json(plan));
  std::error_code ec;
  std::filesystem::remove(p.search.state_path, ec);
  print_plan(plan);
  if (p.objective == PlanObjective::nll)
    fmt::print("objective: the calibration text's NLL (Ω above is each layer's NLL increase above its least)\n");
  print_measurements(plan);
  fmt::print("wrote {}\n", o.out);
  return 0;
}

}  // namespace

void add_plan_command(CLI::App& app, Action& action) {
  auto o = std::make_shared<PlanOptions>();
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
                  "error measure: kl (measured: the model's output divergence when the layer alone is quantized; "
                  "the default with --text, or read from a table given as --stats), fisher, hessian (tr(ΔW H ΔWᵀ)), "
                  "hessian-diag, hawq (tr(H)/cols·||ΔW||²), unweighted (default: kl with --text, else the best the "
                  "statistics allow)")
      ->check(CLI::IsMember({"kl", "fisher", "hessian", "hessian-diag", "hawq", "unweighted", "fisher-output"}));
  cmd->add_flag("--relative", o->relative,
                "divide each layer's Ω by its weighted energy (Ω of all-zero weights): relative instead of absolute "
                "errors");
  cmd->add_option("--threads,-j", o->threads, "worker threads (0: all cores; results do not depend on it)")
      ->capture_default_str();
  cmd->add_option("--max-units", o->max_units, "cells of the knapsack DP's budget axis (exact when sizes fit)")
      ->capture_default_str();
  cmd->add_flag("--quiet,-q", o->quiet, "no per-layer progress");
  MeasuredOptions& m = o->measured;
  cmd->add_option("--text", m.texts,
                  "calibration text: measure each layer's effect on the model's output (--omega kl, the default "
                  "with a text), then search; repeat to mix texts")
      ->check(CLI::ExistingFile);
  cmd->add_option("--tokenizer", m.tokenizer, "tokenizer for --text (default: the model's own GGUF or tokenizer.json)");
  cmd->add_option("--skip-tokens", m.skip_tokens,
                  "start this many tokens into each text (keep calibration and evaluation text apart)")
      ->capture_default_str();
  cmd->add_option("--max-tokens", m.max_tokens, "calibration tokens of each text (0: all)")->capture_default_str();
  cmd->add_option("--ctx", m.ctx, "calibration window length in tokens, BOS included")->capture_default_str()
      ->check(CLI::Range(8, 4096));
  cmd->add_option("--table", m.table,
                  "measured table to write or reuse (default: the --out name with .kl.safetensors); resumed after an "
                  "interruption")
      ;
  cmd->add_option("--table-windows", m.table_windows, "windows the table is measured on (the first of the text)")
      ->capture_default_str()->check(CLI::Range(1, 1 << 16));
  cmd->add_option("--validation-windows", m.validation_windows,
                  "the next windows: plans are measured whole on them (report, and the search's plan is kept only "
                  "if its KL there is lower)")
      ->capture_default_str()->check(CLI::Range(0, 1 << 16));
  cmd->add_option("--generations", m.generations, "search generations after the knapsack (0: no search)")
      ->capture_default_str()->check(CLI::NonNegativeNumber);
  cmd->add_option("--search-pool", m.pool_windows,
                  "search: windows after the validation ones that generations draw from (their reference "
                  "distributions are computed once)")
      ->capture_default_str()->check(CLI::Range(1, 1 << 20));
  cmd->add_option("--search-seconds", m.search_seconds, "stop the search after this long (0: no limit)")
      ->capture_default_str()->check(CLI::NonNegativeNumber);
  cmd->add_option("--seed", m.seed, "search seed (the plan is the same for the same seed and generations)")
      ->capture_default_str();
  cmd->add_option("--offspring", m.offspring, "search: children per generation")->capture_default_str()
      ->check(CLI::Range(1, 1024));
  cmd->add_option("--survivors", m.survivors, "search: children re-evaluated on more tokens")->capture_default_str()
      ->check(CLI::Range(1, 1024));
  cmd->add_option("--search-windows", m.search_windows,
                  "search: windows drawn per generation for ranking the children, and for comparing the best with "
                  "the parent")
      ->delimiter(',')->expected(2)->capture_default_str()->check(CLI::Range(1, 1 << 16));
  cmd->add_option("--search-margin", m.margin,
                  "search: a child replaces the parent only when its KL is lower by this many standard errors of the "
                  "per-window differences")
      ->capture_default_str()->check(CLI::Range(0.0, 100.0));
  cmd->add_option("--objective", m.objective,
                  "what the plan minimizes: kl (the divergence from the original model's next-token distributions) or "
                  "nll (the calibration text's negative log-likelihood; only for text like the calibration's)")
      ->capture_default_str()->check(CLI::IsMember({"kl", "nll"}));
  cmd->add_flag("--restart", m.restart, "measure the table again instead of resuming or reusing it");
  cmd->callback([o, &action] {
    action = [o]() -> int {
      if (!o->measured.texts.empty() || !o->omega.empty() && o->omega == "kl" ||
          (!o->stats.empty() && is_divergence_table(o->stats)))
        return run_measured_plan(*o);
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

      print_plan(plan);
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
