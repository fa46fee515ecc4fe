// Calibration, Fisher statistics, perplexity and generation over a text (include/nuq/model_tasks.hpp),
// moved here from the `nuq` subcommands so that the Python bindings run the same code.
#include "nuq/model_tasks.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>


#include "activation_statistics.hpp"
#include "block_calibration.hpp"
#include "nuq/kv_cache.hpp"
#include "nuq/llama_grad.hpp"
#include "nuq/safetensors.hpp"
#include "nuq/sensitivity.hpp"
#include "nuq/tokenizer.hpp"

namespace nuq {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// "--device cuda" / "device='cuda'": an option together with the value it was given.
std::string option_value(ArgStyle style, std::string_view cli, std::string_view python, const std::string& value) {
  return style == ArgStyle::cli ? fmt::format("{} {}", cli, value) : fmt::format("{}='{}'", python, value);
}

// ---- loading -----------------------------------------------------------------------------------------

struct ModelAndText {
  std::unique_ptr<LlamaModel> model;
  std::unique_ptr<Tokenizer> tok;
  std::vector<int32_t> ids;
  double load_seconds = 0;
};

// Loads the model and its tokenizer and tokenizes the text as one string, keeping tokens [skip, skip + max)
// (max <= 0: all), as `nuq eval` and `nuq calibrate` always have.
ModelAndText load_model_and_text(const std::string& model_path, const std::string& tokenizer,
                                 const std::string& text_path, int64_t skip, int64_t max_tokens,
                                 const LlamaLoadOptions& load, ArgStyle style) {
  ModelAndText r;
  const auto t0 = Clock::now();
  r.model = LlamaModel::load(model_path, load);
  const std::string tok_path = find_tokenizer(*r.model, model_path, tokenizer, style);
  r.tok = Tokenizer::load(tok_path);
  NUQ_CHECK(r.tok->vocab_size() <= r.model->config().vocab_size, Errc::invalid_argument,
            "{}: the tokenizer has {} tokens but the model only {}", tok_path, r.tok->vocab_size(),
            r.model->config().vocab_size);
  r.load_seconds = seconds_since(t0);
  r.ids = r.tok->encode(read_small_file(text_path, "the text"));
  NUQ_CHECK(skip >= 0 && skip < int64_t(r.ids.size()), Errc::invalid_argument,
            "{}: cannot skip {} of its {} tokens", text_path, skip, r.ids.size());
  r.ids.erase(r.ids.begin(), r.ids.begin() + skip);
  if (max_tokens > 0 && int64_t(r.ids.size()) > max_tokens) r.ids.resize(std::size_t(max_tokens));
  return r;
}

// Window w holds BOS followed by text tokens [w·(ctx−1), (w+1)·(ctx−1)); every text token is predicted
// exactly once, from BOS and the tokens before it in its window. fn(w, windows, begin, len, hidden) runs
// after the window's forward pass; hidden holds the final states of its `len` inputs (BOS first). step > 0
// feeds each window in forward calls of `step` tokens (as generation does) instead of one call.
// `quantized_kv` runs the windows on a quantized KV cache with that calibration.
template <class Fn>
int64_t for_each_window(LlamaModel& model, const Tokenizer& tok, const std::vector<int32_t>& ids, int64_t ctx, Fn fn,
                        int64_t step = 0, const kv::Calibration* quantized_kv = nullptr) {
  const int64_t windows = window_count(int64_t(ids.size()), ctx);
  auto cache = quantized_kv ? model.new_cache(ctx, *quantized_kv) : model.new_cache(ctx);
  std::vector<float> hidden(std::size_t(ctx * model.config().dim));
  std::vector<int32_t> input;
  for (int64_t w = 0; w < windows; ++w) {
    const auto [begin, len] = window_input(ids, tok.bos(), ctx, w, input);
    cache->length = 0;
    const int64_t m = int64_t(input.size()), chunk = step > 0 ? step : m;
    for (int64_t i = 0; i < m; i += chunk)
      model.forward(input.data() + i, std::min(chunk, m - i), *cache, hidden.data() + i * model.config().dim);
    fn(w, windows, begin, len, hidden.data());
  }
  return windows;
}

void check_context(int64_t ctx, int64_t max_ctx, ArgStyle style) {
  NUQ_CHECK(ctx >= 2 && ctx <= max_ctx, Errc::invalid_argument, "{} must be in [2, {}], got {}",
            arg_name(style, "--ctx", "ctx"), max_ctx, ctx);
}

// Reports the loaded stage and times the windows.
struct TextTaskReporter {
  const TextTaskCallback& callback;
  TextTaskProgress p;
  Clock::time_point start, window_start;

  TextTaskReporter(const TextTaskCallback& cb, const LlamaModel& model, int64_t windows, int64_t tokens,
                   double load_seconds)
      : callback(cb) {
    p.model = &model;
    p.windows = windows;
    p.tokens = tokens;
    p.load_seconds = load_seconds;
    if (callback) callback(p);
    start = window_start = Clock::now();
  }

  void window(int64_t w, int64_t tokens_done, double value, double window_seconds = -1) {
    const auto now = Clock::now();
    p.stage = TextTaskProgress::Stage::window;
    p.window = w;
    p.tokens_done = tokens_done;
    p.value = value;
    p.window_seconds = window_seconds >= 0 ? window_seconds : std::chrono::duration<double>(now - window_start).count();
    p.elapsed_seconds = std::chrono::duration<double>(now - start).count();
    window_start = now;
    if (callback) callback(p);
  }

  // Before the first window of a task that writes `need` bytes into `dir` at its end: reports them (a disk
  // event) and refuses when they do not fit, rather than after hours of windows.
  void check_disk(const fs::path& dir, uint64_t need, std::string_view what) {
    std::error_code ec;
    const fs::space_info space = fs::space(dir, ec);
    disk(need, ec ? 0 : space.available, dir.string());
    NUQ_CHECK(ec || space.available >= need, Errc::io,
              "{}: {} needs {:.1f} MiB, only {:.1f} MiB are free; nothing was run", dir.string(), what,
              double(need) / (1 << 20), double(space.available) / (1 << 20));
  }

  void disk(uint64_t need, uint64_t available, const std::string& where) {
    p.stage = TextTaskProgress::Stage::disk;
    p.bytes_needed = need;
    p.bytes_free = available;
    p.where = where;
    if (callback) callback(p);
  }

  // The same callback for calibrate's by-block run.
  detail::BlockProgress block_progress() {
    detail::BlockProgress b;
    if (!callback) return b;
    b.plan = [this](uint64_t need, uint64_t available, const std::string& where) { disk(need, available, where); };
    b.block = [this](int64_t block, int64_t blocks, int64_t first, double seconds) {
      p.stage = TextTaskProgress::Stage::block;
      p.block = block;
      p.blocks = blocks;
      p.first_block = first;
      p.block_seconds = seconds;
      p.elapsed_seconds = std::chrono::duration<double>(Clock::now() - start).count();
      callback(p);
    };
    return b;
  }
};

// The int8 arithmetic as the caller asked for it.
std::string int8_option(ArgStyle style) { return style == ArgStyle::cli ? "--int8" : "arithmetic='int8'"; }

// "fastest", "exact" or "int8" (EvalOptions::arithmetic) as the kernels' enum.
cpu::Arithmetic parse_arithmetic(const std::string& name, ArgStyle style) {
  const std::optional<cpu::Arithmetic> parsed = cpu::arithmetic_from_string(name);
  NUQ_CHECK(parsed.has_value(), Errc::invalid_argument, "{}: expected fastest, exact or int8",
            option_value(style, "--arithmetic", "arithmetic", name));
  return *parsed;
}

void check_device(const std::string& device, bool decode_packed, bool int8, ArgStyle style) {
  NUQ_CHECK(device == "cpu" || device == "cuda" || device == "cuda-bf16", Errc::invalid_argument,
            "{}: expected cpu, cuda or cuda-bf16", option_value(style, "--device", "device", device));
  if (device == "cpu") return;
  NUQ_CHECK(!decode_packed && !int8, Errc::invalid_argument,
            "{} runs the packed layers on the GPU; {} and {} are CPU options",
            option_value(style, "--device", "device", device), flag_name(style, "--decode-packed", "decode_packed"),
            int8_option(style));
}

// The load options of evaluate/generate: arithmetic, and the backend for a device other than the CPU.
// Only an explicit int8 conflicts with decode_packed or a device; "fastest" then has nothing to choose.
LlamaLoadOptions load_options(int threads, bool decode_packed, const std::string& arithmetic,
                              const std::string& device, const LinearBackendFactory& make_backend, ArgStyle style) {
  const cpu::Arithmetic parsed = parse_arithmetic(arithmetic, style);
  const bool int8 = parsed == cpu::Arithmetic::int8;
  NUQ_CHECK(!(int8 && decode_packed), Errc::invalid_argument,
            "{} applies to the packed kernels; it cannot be combined with {}", int8_option(style),
            flag_name(style, "--decode-packed", "decode_packed"));
  check_device(device, decode_packed, int8, style);
  LlamaLoadOptions load;
  load.threads = threads;
  load.decode_packed = decode_packed;
  load.arithmetic = parsed;
  if (device != "cpu") {
    NUQ_CHECK(make_backend != nullptr, Errc::unsupported, "{}: this nuq was built without CUDA",
              option_value(style, "--device", "device", device));
    load.linear_backend = make_backend(device);
  }
  return load;
}

// EvalResult::arithmetic: how packed layers multiplied in forward calls of `step` tokens (0: prefill),
// counted per layer with the kernels' own decision (under "fastest", layers whose groups are not a
// multiple of cpu::kInt8Block columns stay exact).
std::string arithmetic_used(const LlamaModel& model, const LlamaLoadOptions& load, const std::string& device,
                            int64_t step) {
  if (load.decode_packed) return "decoded to fp32";
  const int64_t packed = model.packed_layer_count();
  if (packed == 0) return "none (full-precision layers)";
  if (load.linear_backend) return device;
  if (step == 0 || step > cpu::kMaxFusedBatch) return "exact (prefill)";
  const int64_t int8 = model.int8_layer_count();
  if (int8 == 0) return "exact";
  if (int8 == packed) return "int8";
  return fmt::format("int8 in {} of {} packed layers, exact in the rest", int8, packed);
}

kv::Rope rope_of(const LlamaConfig& c) { return kv::Rope{c.rope, c.rope_theta, kv::RopeScaling::none, 1.0}; }

// The baseline KVQuant compares with: asymmetric uniform b-bit quantization of each (token, kv head)
// vector between its own minimum and maximum, no outliers, no sink.
void uniform_per_token(float* x, int64_t vectors, int64_t width, int bits) {
  const float levels = float((1 << bits) - 1);
  for (int64_t r = 0; r < vectors; ++r) {
    float* p = x + r * width;
    const auto [lo, hi] = std::minmax_element(p, p + width);
    const float a = *lo, step = (*hi - *lo) / levels;
    if (!(step > 0)) continue;
    for (int64_t i = 0; i < width; ++i) p[i] = a + std::nearbyint((p[i] - a) / step) * step;
  }
}

// ---- evaluate ----------------------------------------------------------------------------------------

// Adds −log softmax(logits)[target] of the window's `len` positions to `nll`, kLogitRows rows at a time
// (the logits of a whole window would be ctx × vocab floats).
class NllAccumulator {
 public:
  explicit NllAccumulator(const LlamaModel& model)
      : model_(model), logits_(std::size_t(kLogitRows * model.config().vocab_size)) {}

  void add(const float* hidden, int64_t len, const int32_t* targets) {
    const LlamaConfig& c = model_.config();
    for (int64_t r = 0; r < len; r += kLogitRows) {
      const int64_t rows = std::min(kLogitRows, len - r);
      model_.logits(hidden + r * c.dim, rows, logits_.data());
      for (int64_t i = 0; i < rows; ++i) {
        const float* l = &logits_[std::size_t(i * c.vocab_size)];
        double mx = l[0];
        for (int64_t v = 1; v < c.vocab_size; ++v) mx = std::max(mx, double(l[v]));
        double sum = 0;
        for (int64_t v = 0; v < c.vocab_size; ++v) sum += std::exp(double(l[v]) - mx);
        nll += std::log(sum) + mx - double(l[targets[r + i]]);
      }
    }
  }

  double nll = 0;

 private:
  static constexpr int64_t kLogitRows = 16;
  const LlamaModel& model_;
  std::vector<float> logits_;
};

// ---- generate ----------------------------------------------------------------------------------------

int32_t sample(const std::vector<float>& logits, float temperature, std::mt19937_64& rng, std::vector<float>& probs) {
  const int64_t vocab = int64_t(logits.size());
  int32_t next = 0;
  if (temperature <= 0) {
    for (int64_t v = 1; v < vocab; ++v)
      if (logits[std::size_t(v)] > logits[std::size_t(next)]) next = int32_t(v);
    return next;
  }
  float mx = logits[0];
  for (float l : logits) mx = std::max(mx, l);
  double sum = 0;
  for (int64_t v = 0; v < vocab; ++v)
    sum += probs[std::size_t(v)] = std::exp((logits[std::size_t(v)] - mx) / temperature);
  double r = std::uniform_real_distribution<double>(0, sum)(rng);
  for (next = 0; next + 1 < vocab && (r -= probs[std::size_t(next)]) > 0; ++next) {
  }
  return next;
}

}  // namespace

std::string find_tokenizer(const LlamaModel& model, const std::string& model_path, const std::string& given,
                           ArgStyle style) {
  if (!given.empty()) return given;
  if (!model.embedded_tokenizer_path().empty()) return model.embedded_tokenizer_path();
  const fs::path dir = fs::is_directory(model_path) ? fs::path(model_path) : fs::path(model_path).parent_path();
  if (fs::exists(dir / "tokenizer.json")) return (dir / "tokenizer.json").string();
  fail(Errc::invalid_argument, "{}: the checkpoint holds no tokenizer; pass {}", model_path,
       arg_name(style, "--tokenizer", "tokenizer=..."));
}

CalibrateResult calibrate_activations(const CalibrateOptions& o, const TextTaskCallback& progress) {
  const ArgStyle style = o.arg_style;
  check_context(o.ctx, 1 << 20, style);
  NUQ_CHECK(!o.out.empty(), Errc::invalid_argument, "{} is required", arg_name(style, "--out", "out"));
  NUQ_CHECK(o.hessian.empty() || fs::path(o.hessian) != fs::path(o.out), Errc::invalid_argument,
            "{} and {} name the same file {}", arg_name(style, "--hessian", "hessian"), arg_name(style, "--out", "out"),
            o.out);
  NUQ_CHECK(!o.sequential || (o.by_block && !o.hessian.empty()), Errc::invalid_argument,
            "the sequential order ({}) needs {} and {}", arg_name(style, "--sequential", "sequential"),
            arg_name(style, "--by-block", "by_block=True"), arg_name(style, "--hessian", "hessian"));
  LlamaLoadOptions load;
  load.threads = o.threads;
  // By block, each block's weights are read once per window and not again after the block: they need
  // not stay resident beside the block's statistics.
  if (o.by_block) load.release_weights = LlamaLoadOptions::Release::after_each_block;
  ModelAndText mt = load_model_and_text(o.model, o.tokenizer, o.text, o.skip_tokens, o.max_tokens, load, style);
  CalibrateResult r;
  r.tokens = int64_t(mt.ids.size());
  TextTaskReporter report(progress, *mt.model, window_count(r.tokens, o.ctx), r.tokens, mt.load_seconds);
  const auto t0 = Clock::now();
  if (o.by_block) {
    detail::calibrate_blocks(*mt.model, mt.tok->bos(), mt.ids, o, report.block_progress(), r);
    r.seconds = seconds_since(t0);
    return r;
  }
  if (!o.hessian.empty())
    report.check_disk(fs::absolute(o.hessian).parent_path(), detail::hessian_bytes(mt.model->config()),
                      "the XᵀX statistics (written after the last window)");
  detail::ActivationStatistics stats(!o.hessian.empty());
  mt.model->set_activation_hook(
      [&stats](const std::string& layer, const float* x, int64_t n, int64_t cols) { stats.add(layer, x, n, cols); });
  // The classifier's input is the window's final hidden states (one row per input token, as the
  // blocks' layers see them); forward() stops before the classifier, so they are added here.
  r.windows = for_each_window(*mt.model, *mt.tok, mt.ids, o.ctx,
                              [&](int64_t w, int64_t, int64_t begin, int64_t len, const float* hidden) {
                                stats.add(mt.model->classifier_layer(), hidden, len, mt.model->config().dim);
                                report.window(w, begin + len, 0);
                              });
  r.seconds = seconds_since(t0);
  r.layers = stats.save_means(o.out, {{"nuq_statistics", "activation_mean_square"},
                                      {"tokens", std::to_string(mt.ids.size())},
                                      {"text", fs::path(o.text).filename().string()},
                                      {"skip_tokens", std::to_string(o.skip_tokens)}});
  if (!o.hessian.empty()) {
    stats.hessian().save(o.hessian);
    r.hessian_inputs = int64_t(stats.hessian().names().size());
    r.hessian_layers = r.hessian_inputs + int64_t(stats.hessian().aliases().size());
  }
  return r;
}

std::vector<int32_t> calibration_tokens(const Tokenizer& tok, const std::string& tok_path, int64_t vocab,
                                        const std::string& text, int64_t skip, int64_t max_tokens, ArgStyle style) {
  NUQ_CHECK(skip >= 0 && max_tokens >= 0, Errc::invalid_argument, "{} and {} must not be negative",
            arg_name(style, "--skip-tokens", "skip_tokens"), arg_name(style, "--max-tokens", "max_tokens"));
  NUQ_CHECK(tok.vocab_size() <= vocab, Errc::invalid_argument, "{}: the tokenizer has {} tokens but the model only {}",
            tok_path, tok.vocab_size(), vocab);
  std::vector<int32_t> ids = tok.encode(read_small_file(text, "the text"));
  NUQ_CHECK(!ids.empty(), Errc::invalid_argument, "{}: the text has no tokens", text);
  NUQ_CHECK(skip < int64_t(ids.size()), Errc::invalid_argument, "{}: cannot skip {} of its {} tokens", text, skip,
            ids.size());
  ids.erase(ids.begin(), ids.begin() + skip);
  if (max_tokens > 0 && int64_t(ids.size()) > max_tokens) ids.resize(std::size_t(max_tokens));
  return ids;
}

FisherResult compute_fisher(const FisherOptions& o, const TextTaskCallback& progress) {
  const ArgStyle style = o.arg_style;
  check_context(o.ctx, 1 << 16, style);
  const std::string out_flag = arg_name(style, "--out", "out");
  NUQ_CHECK(!o.out.empty(), Errc::invalid_argument, "{} is required", out_flag);
  // Fail before hours of compute, not at the end, when the output cannot be written.
  const fs::path out_dir = fs::absolute(o.out).parent_path();
  NUQ_CHECK(fs::is_directory(out_dir), Errc::invalid_argument, "{}: the directory {} does not exist", o.out,
            out_dir.string());
  NUQ_CHECK(!fs::is_directory(o.out), Errc::invalid_argument, "{}: is a directory; {} names a file", o.out, out_flag);
  const auto t0 = Clock::now();
  // Packed layers are decoded and the rest copied to fp32: gradients are taken with respect to the dense
  // weights they stand for, in the arrays the backward pass reads.
  LlamaLoadOptions load{o.threads, true};
  load.fp32_weights = true;
  auto model = LlamaModel::load(o.model, load);
  const std::string tok_path = find_tokenizer(*model, o.model, o.tokenizer, style);
  auto tok = Tokenizer::load(tok_path);
  const std::vector<int32_t> ids =
      calibration_tokens(*tok, tok_path, model->config().vocab_size, o.text, o.skip_tokens, o.max_tokens, style);
  LlamaBackward backward(model->weights(), o.threads);
  FisherResult result;
  result.load_seconds = seconds_since(t0);
  FisherAccumulator acc;
  TextTaskReporter report(progress, *model, window_count(int64_t(ids.size()), o.ctx), int64_t(ids.size()),
                          result.load_seconds);
  // The Fisher file holds every block linear weight's value in F32.
  report.check_disk(out_dir, uint64_t(model->linear_weight_count()) * sizeof(float),
                    "the Fisher diagonal (written after the last window)");
  const auto t1 = Clock::now();
  const FisherCollectResult r =
      collect_fisher(backward, ids, tok->bos(), o.ctx, acc, [&](int64_t w, int64_t, double loss, double seconds) {
        report.window(w, std::min(int64_t(ids.size()), (w + 1) * (o.ctx - 1)), loss, seconds);
      });
  acc.save(o.out);
  result.seconds = seconds_since(t1);
  result.weights = int64_t(acc.names().size());
  result.windows = r.windows;
  result.tokens = r.tokens;
  result.mean_loss = r.mean_loss;
  return result;
}

KvCacheSetup install_kv_cache(LlamaModel& model, const KvCacheOptions& o, ArgStyle style) {
  const LlamaConfig& c = model.config();
  const auto name = [style](std::string_view cli, std::string_view python) { return arg_name(style, cli, python); };
  const bool outliers_given = o.outlier_fraction >= 0;
  NUQ_CHECK(o.method == "nuq" || o.method == "uniform", Errc::invalid_argument, "{}: expected nuq or uniform",
            option_value(style, "--kv-method", "kv_method", o.method));
  NUQ_CHECK(o.path.empty() || o.path == "kernel" || o.path == "roundtrip", Errc::invalid_argument,
            "{}: expected kernel or roundtrip", option_value(style, "--kv-path", "kv_path", o.path));
  NUQ_CHECK(o.bits == 0 || (o.bits >= 2 && o.bits <= 8), Errc::invalid_argument, "{} must be in [2, 8], got {}",
            name("--kv-bits", "kv_bits"), o.bits);
  if (o.method == "uniform") {
    const std::string uniform = option_value(style, "--kv-method", "kv_method", "uniform");
    NUQ_CHECK(o.bits > 0, Errc::invalid_argument, "{} needs {}", uniform, name("--kv-bits", "kv_bits"));
    NUQ_CHECK(o.calibration.empty(), Errc::invalid_argument, "{} takes no {}", uniform,
              name("--kv-calibration", "kv_calibration"));
    NUQ_CHECK(o.path.empty(), Errc::invalid_argument, "{} applies to {}; {} always quantizes in the KV hook",
              name("--kv-path", "kv_path"), name("--kv-calibration", "kv_calibration"), uniform);
    const int bits = o.bits;
    const int64_t hd = c.head_dim, n_kv = c.n_kv_heads;
    model.set_kv_hook([bits, hd, n_kv](int64_t, int64_t, int64_t n, float* k, float* v) {
      uniform_per_token(k, n * n_kv, hd, bits);
      uniform_per_token(v, n * n_kv, hd, bits);
    });
    return {fmt::format("uniform int{} per token (keys before RoPE), {} bytes/token/layer with fp16 scale and zero",
                        bits, n_kv * 2 * (hd * bits / 8 + 4)),
            nullptr};
  }
  if (o.calibration.empty()) {
    NUQ_CHECK(o.bits == 0 && !outliers_given && o.path.empty(), Errc::invalid_argument,
              "{}/{}/{} need {} (from {}) or {}", name("--kv-bits", "kv_bits"), name("--kv-outliers", "kv_outliers"),
              name("--kv-path", "kv_path"), name("--kv-calibration", "kv_calibration"),
              name("`nuq kv-calibrate`", "nuq.save_kv_calibration or `nuq kv-calibrate`"),
              option_value(style, "--kv-method", "kv_method", "uniform"));
    return {};
  }
  auto cal = std::make_shared<kv::Calibration>(kv::load_calibration(o.calibration));
  NUQ_CHECK(int64_t(cal->layers.size()) == c.n_layers, Errc::invalid_argument,
            "{}: calibration of {} layers for a model of {}", o.calibration, cal->layers.size(), c.n_layers);
  if (outliers_given)
    NUQ_CHECK(std::fabs(o.outlier_fraction - cal->outlier_fraction) < 1e-9, Errc::invalid_argument,
              "{} {} differs from the calibration's {}%", name("--kv-outliers", "kv_outliers"), o.outliers_text,
              cal->outlier_fraction * 100);
  auto caches = std::make_shared<std::vector<kv::LayerCache>>();
  kv::CacheOptions opt;
  opt.rope = rope_of(c);
  for (const auto& layer : cal->layers) {
    NUQ_CHECK(layer.n_kv_heads == c.n_kv_heads && layer.head_dim == c.head_dim, Errc::invalid_argument,
              "{}: calibrated for {} kv heads of {} channels, the model has {} of {}", o.calibration,
              layer.n_kv_heads, layer.head_dim, c.n_kv_heads, c.head_dim);
    NUQ_CHECK(o.bits == 0 || (layer.bits_k == o.bits && layer.bits_v == o.bits), Errc::invalid_argument,
              "{} {} differs from the calibration's {}-bit keys / {}-bit values", name("--kv-bits", "kv_bits"), o.bits,
              layer.bits_k, layer.bits_v);
    caches->emplace_back(layer, *cal, opt);
  }
  const bool kernel = o.path.empty() || o.path == "kernel";
  if (!kernel)
    model.set_kv_hook([caches](int64_t layer, int64_t pos0, int64_t n, float* k, float* v) {
      (*caches)[size_t(layer)].roundtrip(pos0, n, k, v);
    });
  const auto& first = caches->front();
  return {fmt::format("nuq {}-bit keys / {}-bit values, {}% outliers ({} slots), {} sink tokens{}, {} bytes/token/layer "
                      "({:.1f}% of fp16); {}",
                      cal->layers[0].bits_k, cal->layers[0].bits_v, cal->outlier_fraction * 100, first.layout().slots,
                      cal->sink_tokens, cal->q_norm ? ", Q-Norm" : "", first.bytes_per_token(),
                      100.0 * double(first.bytes_per_token()) / double(c.n_kv_heads * c.head_dim * 4),
                      kernel ? "quantized cache, decode attention kernels"
                             : "encode/decode round trip, fp32 attention"),
          kernel ? cal : nullptr};
}

EvalResult evaluate_perplexity(const EvalOptions& o, const TextTaskCallback& progress) {
  const ArgStyle style = o.arg_style;
  check_context(o.ctx, 1 << 20, style);
  NUQ_CHECK(o.step >= 0, Errc::invalid_argument, "{} must be positive, got {}", arg_name(style, "--step", "step"),
            o.step);
  const bool int8 = o.arithmetic == "int8";
  NUQ_CHECK(!(int8 && o.step > cpu::kMaxFusedBatch), Errc::invalid_argument,
            "{} needs {} <= {} (longer calls take the exact prefill path)", int8_option(style),
            arg_name(style, "--step", "step"), cpu::kMaxFusedBatch);
  const int64_t step = int8 && o.step == 0 ? cpu::kMaxFusedBatch : o.step;
  const LlamaLoadOptions load = load_options(o.threads, o.decode_packed, o.arithmetic, o.device, o.make_backend, style);
  ModelAndText mt = load_model_and_text(o.model, o.tokenizer, o.text, 0, o.max_tokens, load, style);
  LlamaModel& model = *mt.model;
  const KvCacheSetup kv = install_kv_cache(model, o.kv, style);
  const std::vector<int32_t>& ids = mt.ids;
  const int64_t n = int64_t(ids.size());
  NllAccumulator nll(model);
  TextTaskReporter report(progress, model, window_count(n, o.ctx), n, mt.load_seconds);
  const auto t0 = Clock::now();
  const int64_t windows = for_each_window(
      model, *mt.tok, ids, o.ctx,
      [&](int64_t w, int64_t, int64_t begin, int64_t len, const float* hidden) {
        nll.add(hidden, len, ids.data() + begin);
        report.window(w, begin + len, std::exp(nll.nll / double(begin + len)));
      },
      step, kv.calibration.get());
  EvalResult r;
  r.seconds = seconds_since(t0);
  r.model = o.model;
  r.description = model.description();
  r.linear_bits_per_weight = model.linear_bits_per_weight();
  r.tokenizer = mt.tok->description();
  r.text = o.text;
  r.ctx = o.ctx;
  r.step = step;
  r.windows = windows;
  r.tokens_scored = n;
  r.mean_nll = nll.nll / double(n);
  r.perplexity = std::exp(r.mean_nll);
  // Tokens through the model (BOS in place of each window's last).
  r.tokens_per_second = double(n) / r.seconds;
  r.load_seconds = mt.load_seconds;
  r.kv_cache = kv.description.empty() ? "fp32" : kv.description;
  r.arithmetic = arithmetic_used(model, load, o.device, step);
  return r;
}

std::string to_json(const EvalResult& r, int indent) {
  const nlohmann::json j = {{"model", r.model},
                            {"description", r.description},
                            {"linear_bits_per_weight", r.linear_bits_per_weight},
                            {"tokenizer", r.tokenizer},
                            {"text", r.text},
                            {"ctx", r.ctx},
                            {"windows", r.windows},
                            {"tokens_scored", r.tokens_scored},
                            {"mean_nll", r.mean_nll},
                            {"perplexity", r.perplexity},
                            {"tokens_per_second", r.tokens_per_second},
                            {"load_seconds", r.load_seconds},
                            {"kv_cache", r.kv_cache},
                            {"arithmetic", r.arithmetic}};
  return j.dump(indent);
}

GenerateResult generate_text(const GenerateOptions& o, const std::function<void(const GenerateProgress&)>& progress) {
  const ArgStyle style = o.arg_style;
  NUQ_CHECK(o.steps >= 0, Errc::invalid_argument, "{} must not be negative, got {}",
            arg_name(style, "--steps", "max_new_tokens"), o.steps);
  NUQ_CHECK(std::isfinite(o.temperature) && o.temperature >= 0, Errc::invalid_argument,
            "{} must be finite and >= 0, got {}", arg_name(style, "--temperature", "temperature"), o.temperature);
  const LlamaLoadOptions load = load_options(o.threads, o.decode_packed, o.arithmetic, o.device, o.make_backend, style);
  auto model = LlamaModel::load(o.model, load);
  const LlamaConfig& c = model->config();
  std::optional<kv::Calibration> kv_calibration;
  if (!o.kv_calibration.empty()) kv_calibration = kv::load_calibration(o.kv_calibration);
  const std::string tok_path = find_tokenizer(*model, o.model, o.tokenizer, style);
  auto tok = Tokenizer::load(tok_path);

  GenerateResult r;
  r.description = model->description();
  r.arithmetic = arithmetic_used(*model, load, o.device, 1);
  r.linear_bits_per_weight = model->linear_bits_per_weight();
  r.config = c;
  r.prompt_ids.push_back(tok->bos());
  for (int32_t id : tok->encode(o.prompt)) r.prompt_ids.push_back(id);
  const int64_t capacity = int64_t(r.prompt_ids.size()) + o.steps;
  auto cache = kv_calibration ? model->new_cache(capacity, *kv_calibration) : model->new_cache(capacity);
  std::vector<float> hidden(r.prompt_ids.size() * std::size_t(c.dim)), logits(std::size_t(c.vocab_size)),
      probs(std::size_t(c.vocab_size));

  GenerateProgress p;
  p.model = model.get();
  p.steps = o.steps;
  p.prompt_tokens = int64_t(r.prompt_ids.size());
  if (progress) progress(p);
  auto t0 = Clock::now();
  model->forward(r.prompt_ids.data(), int64_t(r.prompt_ids.size()), *cache, hidden.data());
  r.prefill_seconds = seconds_since(t0);
  p.stage = GenerateProgress::Stage::prefilled;
  if (progress) progress(p);
  std::mt19937_64 rng(o.seed);
  const float* last = &hidden[(r.prompt_ids.size() - 1) * std::size_t(c.dim)];
  t0 = Clock::now();
  p.stage = GenerateProgress::Stage::token;
  for (int64_t step = 0; step < o.steps; ++step) {
    model->logits(last, 1, logits.data());
    const int32_t next = sample(logits, o.temperature, rng, probs);
    if (next == tok->eos()) break;
    r.ids.push_back(next);
    p.step = step;
    p.token = next;
    p.piece = tok->decode(next);
    r.text += p.piece;
    if (progress) progress(p);
    if (cache->length == cache->capacity) break;
    model->forward(&next, 1, *cache, hidden.data());
    last = hidden.data();
  }
  r.decode_seconds = seconds_since(t0);
  r.cache_tokens = cache->length;
  r.cache_capacity = cache->capacity;
  r.cache_bytes = cache->bytes();
  r.quantized_cache = kv_calibration.has_value();
  if (kv_calibration) {
    r.kv_bits_k = kv_calibration->layers[0].bits_k;
    r.kv_bits_v = kv_calibration->layers[0].bits_v;
  }
  r.cache_fp16_bytes = double(cache->length * c.n_layers * 2 * c.n_kv_heads * c.head_dim * 2);
  return r;
}

}  // namespace nuq
