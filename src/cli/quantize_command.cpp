// `nuq quantize`: the command-line face of nuq::quantize_checkpoint (docs/quantize-cli.md).
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <string>

#include "commands.hpp"
#include "nuq/quantize_checkpoint.hpp"

namespace nuq::cli {
namespace {

std::string duration(double s) {
  if (s < 60) return fmt::format("{:.1f}s", s);
  const int64_t t = int64_t(s + 0.5);
  if (t < 3600) return fmt::format("{}m{:02d}s", t / 60, t % 60);
  return fmt::format("{}h{:02d}m", t / 3600, t % 3600 / 60);
}

std::string count(double n) {
  if (n >= 1e9) return fmt::format("{:.2f}G", n / 1e9);
  if (n >= 1e6) return fmt::format("{:.1f}M", n / 1e6);
  if (n >= 1e3) return fmt::format("{:.1f}k", n / 1e3);
  return fmt::format("{:.0f}", n);
}

std::string bytes_text(uint64_t bytes) {
  if (bytes >= (uint64_t(1) << 30)) return fmt::format("{:.2f} GiB", double(bytes) / double(uint64_t(1) << 30));
  return fmt::format("{:.1f} MiB", double(bytes) / double(1 << 20));
}

// A one-line bar redrawn in place on a terminal; one plain line per layer otherwise (logs, CI).
class ProgressPrinter {
 public:
  explicit ProgressPrinter(bool quiet) : quiet_(quiet), tty_(::isatty(STDERR_FILENO) != 0) {}

  void operator()(const CheckpointQuantizeProgress& p) {
    if (quiet_) return;
    using Stage = CheckpointQuantizeProgress::Stage;
    if (p.stage == Stage::done) {
      clear_line();
      return;
    }
    if (p.stage == Stage::disk) {
      fmt::print(stderr, "{}: writes up to {}, {} free\n", p.name, bytes_text(p.bytes_needed), bytes_text(p.bytes_free));
      return;
    }
    if (p.stage == Stage::assemble) {
      line(fmt::format("writing {} ({}/{})", p.name, p.tensor_index + 1, p.tensor_count), true);
      return;
    }
    const double fraction = p.weights_total ? double(p.weights_done) / double(p.weights_total) : 1.0;
    // Resumed layers cost nothing, so the rate counts only the work done by this run.
    const double fresh = double(p.weights_done - p.weights_resumed);
    if (p.stage == Stage::quantized) quant_seconds_ += p.tensor_seconds;
    const double rate = quant_seconds_ > 0 ? fresh / quant_seconds_ : 0;
    const std::string eta =
        rate > 0 ? duration(double(p.weights_total - p.weights_done) / rate) : std::string("--");
    if (tty_) {
      const int width = 24;
      const int filled = int(fraction * width + 0.5);
      const std::string bar = std::string(std::size_t(filled), '#') + std::string(std::size_t(width - filled), '.');
      const int64_t shown = p.stage == Stage::start ? p.tensor_index : p.tensor_index + 1;
      line(fmt::format("[{}] {:5.1f}%  {}/{} layers  {} weights/s  ETA {}  {}", bar, 100 * fraction, shown,
                       p.tensor_count, count(rate), eta, p.name),
           false);
      return;
    }
    if (p.stage == Stage::start || !p.layer) return;
    const QuantizedTensorRecord& r = *p.layer;
    const std::string what = p.stage == Stage::resumed
                                 ? std::string("resumed")
                                 : fmt::format("{}  ETA {}", duration(p.tensor_seconds), eta);
    std::fprintf(stderr, "[%*lld/%lld] %s [%lld, %lld] %s %d-bit: mse %.3g, %.3f bits/weight, %lld sparse  %s\n",
                 int(std::to_string(p.tensor_count).size()), (long long)(p.tensor_index + 1), (long long)p.tensor_count,
                 r.name.c_str(), (long long)r.rows, (long long)r.cols, std::string(to_string(r.method)).c_str(), r.bits,
                 r.mse, r.bits_per_weight, (long long)r.nnz, what.c_str());
  }

  void clear_line() {
    if (tty_ && drawn_) std::fprintf(stderr, "\r\033[K");
    drawn_ = false;
  }

 private:
  void line(const std::string& text, bool plain_too) {
    if (tty_) {
      std::fprintf(stderr, "\r\033[K%s", text.c_str());
      std::fflush(stderr);
      drawn_ = true;
    } else if (plain_too) {
      std::fprintf(stderr, "%s\n", text.c_str());
    }
  }

  bool quiet_;
  bool tty_;
  bool drawn_ = false;
  double quant_seconds_ = 0;
};

}  // namespace

void add_quantize_command(CLI::App& app, Action& action) {
  struct Options {
    std::string input, out, method = "nuq", sparse = "0", sensitive, fisher, hessian, plan, max_shard = "5GB";
    double damping = 0.01;
    bool measure_only = false;
    int bits = 0;
    int64_t group_size = 0;
    bool outliers_per_row = false, force = false, restart = false, quiet = false;
    int threads = 0;
    std::vector<std::string> include, exclude;
  };
  auto o = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand(
      "quantize",
      "Quantize a checkpoint (.safetensors file, sharded directory or index, or .gguf) into nuq's packed format. "
      "Interrupted runs resume where they stopped when started again with the same arguments.");
  cmd->add_option("input", o->input, "checkpoint to quantize")->required();
  cmd->add_option("--out,-o", o->out, "output directory (created if absent)")->required();
  cmd->add_option("--bits,-b", o->bits, "bits per weight index: 2, 3 or 4")->required()->check(CLI::IsMember({2, 3, 4}));
  cmd->add_option("--method", o->method,
                  "nuq (sensitivity-weighted k-means + dense-and-sparse), kmeans (unweighted), rtn (uniform, "
                  "round to nearest)")
      ->check(CLI::IsMember({"nuq", "kmeans", "rtn"}))
      ->capture_default_str();
  cmd->add_option("--sparse", o->sparse,
                  "percentage of each layer's weights kept exactly in the sparse part (e.g. 0.45%): the largest "
                  "magnitudes, plus the most sensitive weights with --fisher")
      ->capture_default_str();
  cmd->add_option("--sensitive", o->sensitive,
                  "part of --sparse chosen by sensitivity rather than magnitude (needs --fisher; default 0.05% when "
                  "--fisher is given)");
  cmd->add_flag("--outliers-per-row", o->outliers_per_row, "count magnitude outliers per row instead of per matrix");
  cmd->add_option("--group-size", o->group_size,
                  "input columns sharing one codebook (0: one per row for nuq/kmeans, 128 for rtn when it divides)")
      ->capture_default_str();
  cmd->add_option("--fisher", o->fisher,
                  "safetensors file of per-weight sensitivities (Fisher diagonal) with the weights' names and shapes");
  cmd->add_option("--hessian", o->hessian,
                  "full XᵀX statistics from `nuq calibrate --hessian`: round with second-order error feedback "
                  "(GPTQ-style; with --method rtn this is GPTQ) so that the layer's output error is minimized");
  cmd->add_option("--damping", o->damping,
                  "with --hessian: added to XᵀX's diagonal, relative to the diagonal's mean")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 1e6));
  cmd->add_flag("--measure-only", o->measure_only,
                "with --hessian: round to nearest as without it, only recording each layer's output error in "
                "quant_report.json (to compare with error feedback)");
  cmd->add_option("--plan", o->plan, "JSON plan of per-layer settings (from `nuq plan`)");
  cmd->add_option("--include", o->include, "regular expression: also quantize matching 2-D tensors (repeatable)");
  cmd->add_option("--exclude", o->exclude, "regular expression: keep matching tensors unquantized (repeatable; wins)");
  cmd->add_option("--threads,-j", o->threads, "worker threads (0: all cores; results do not depend on it)")
      ->capture_default_str();
  cmd->add_option("--max-shard-size", o->max_shard, "split the output into files of at most this size")
      ->capture_default_str();
  cmd->add_flag("--force", o->force, "replace a finished checkpoint already in the output directory");
  cmd->add_flag("--restart", o->restart, "discard unfinished work in the output directory instead of resuming it");
  cmd->add_flag("--quiet,-q", o->quiet, "print nothing but errors and the final summary");
  cmd->footer(std::string("Default selection: ") + std::string(default_quantize_rule_text()) + ".");
  cmd->callback([o, &action] {
    action = [o]() -> int {
      CheckpointQuantizeOptions opt;
      opt.input = o->input;
      opt.output_dir = o->out;
      opt.layer.bits = o->bits;
      opt.layer.method = parse_quant_method(o->method);
      opt.layer.group_size = o->group_size;
      opt.layer.outliers_per_row = o->outliers_per_row;
      const double sparse = parse_percent(o->sparse, "--sparse");
      double sensitive = 0;
      if (!o->sensitive.empty()) {
        NUQ_CHECK(!o->fisher.empty(), Errc::invalid_argument, "--sensitive needs --fisher (the sensitivities to rank by)");
        sensitive = parse_percent(o->sensitive, "--sensitive");
        NUQ_CHECK(sensitive <= sparse, Errc::invalid_argument, "--sensitive {} is more than --sparse {}", o->sensitive,
                  o->sparse);
      } else if (!o->fisher.empty() && opt.layer.method == QuantMethod::nuq) {
        sensitive = std::min(sparse, 0.0005);
      }
      opt.layer.outlier_fraction = sparse - sensitive;
      opt.layer.sensitive_fraction = sensitive;
      opt.fisher_path = o->fisher;
      opt.hessian_path = o->hessian;
      opt.hessian_damping = o->damping;
      opt.error_feedback = !o->measure_only;
      NUQ_CHECK(!o->measure_only || !o->hessian.empty(), Errc::invalid_argument, "--measure-only needs --hessian");
      opt.plan_path = o->plan;
      opt.include = o->include;
      opt.exclude = o->exclude;
      opt.threads = o->threads;
      const std::optional<uint64_t> shard = parse_size(o->max_shard);
      NUQ_CHECK(shard.has_value(), Errc::invalid_argument,
                "--max-shard-size takes a size such as 5GB, 500MB or 2GiB, not '{}'", o->max_shard);
      opt.max_shard_bytes = *shard;
      opt.force = o->force;
      opt.restart = o->restart;
      ProgressPrinter printer(o->quiet);
      opt.progress = [&printer](const CheckpointQuantizeProgress& p) { printer(p); };
      QuantizeCheckpointResult r;
      try {
        r = quantize_checkpoint(opt);
      } catch (...) {
        printer.clear_line();
        throw;
      }
      for (const std::string& w : r.warnings) std::fprintf(stderr, "nuq: warning: %s\n", w.c_str());
      int64_t resumed = 0;
      for (const auto& l : r.layers) resumed += l.resumed;
      // With a plan, layers differ: describe the mix actually written rather than the command-line defaults.
      std::map<std::string, int64_t> mix;
      for (const auto& l : r.layers)
        ++mix[fmt::format("{} {}-bit{}", to_string(l.method), l.bits,
                          l.outlier_fraction + l.sensitive_fraction > 0
                              ? fmt::format(" + {:.3g}% sparse", 100 * (l.outlier_fraction + l.sensitive_fraction))
                                : std::string())];
      std::string described;
      for (const auto& [what, n] : mix)
        described += fmt::format("{}{}{}", described.empty() ? "" : ", ", mix.size() > 1 ? fmt::format("{}× ", n) : "", what);
      fmt::print("quantized {} layers ({} weights) to {:.3f} bits/weight ({}); copied {} tensors\n", r.layers.size(),
                 count(double(r.quantized_weights)), r.average_bits_per_weight, described, r.tensors_copied);
      fmt::print("wrote {} ({}) in {}{}\n", (std::filesystem::path(o->out) / r.files.front()).string(),
                 human_bytes(r.output_bytes), duration(r.seconds),
                 resumed ? fmt::format(", {} layers resumed from an earlier run", resumed) : std::string());
      return 0;
    };
  });
}

}  // namespace nuq::cli
