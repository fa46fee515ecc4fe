// `nuq eval`: perplexity of a LLaMA-family checkpoint on a text file (docs/llama.md describes the
// chunking), and `nuq convert`: any checkpoint the decoder reads, written as a Hugging Face one.
#include <fmt/format.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "nuq/error.hpp"
#include "nuq/llama.hpp"
#ifdef NUQ_WITH_CUDA
#include "nuq/llama_cuda.hpp"
#endif
#include "nuq/safetensors.hpp"
#include "nuq/sensitivity.hpp"
#include "nuq/tokenizer.hpp"

namespace nuq::cli {
namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

struct ModelAndText {
  std::unique_ptr<LlamaModel> model;
  std::unique_ptr<Tokenizer> tok;
  std::vector<int32_t> ids;
  double load_seconds = 0;
};

// Loads the model and its tokenizer (the --tokenizer file, the model's own GGUF, or tokenizer.json next to
// a safetensors checkpoint) and tokenizes the text as one string, keeping tokens [skip, skip + max).
ModelAndText load_model_and_text(const std::string& model_path, std::string tok_path, const std::string& text_path,
                                 int64_t skip, int64_t max_tokens, const LlamaLoadOptions& load) {
  ModelAndText r;
  const auto t0 = std::chrono::steady_clock::now();
  r.model = LlamaModel::load(model_path, load);
  if (tok_path.empty()) tok_path = r.model->embedded_tokenizer_path();
  if (tok_path.empty()) {
    namespace fs = std::filesystem;
    const fs::path dir = fs::is_directory(model_path) ? fs::path(model_path) : fs::path(model_path).parent_path();
    if (fs::exists(dir / "tokenizer.json")) tok_path = (dir / "tokenizer.json").string();
  }
  NUQ_CHECK(!tok_path.empty(), Errc::invalid_argument, "{}: the checkpoint holds no tokenizer; pass --tokenizer",
            model_path);
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
// exactly once, from BOS and the tokens before it in its window. fn(w, begin, len, hidden) runs after
// the window's forward pass; hidden holds the final states of its `len` inputs (BOS first). step > 0
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

}  // namespace

void add_eval_command(CLI::App& app, Action& action) {
  struct Options {
    std::string model, tokenizer, text;
    int64_t ctx = 512, max_tokens = 0;
    int64_t step = 0;
    int threads = 0;
    bool json = false, quiet = false, decode_packed = false, int8 = false;
    std::string device = "cpu";
    KvEvalOptions kv;
  };
  auto o = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand(
      "eval", "Perplexity of a LLaMA-family checkpoint (llama2.c .bin, .gguf, safetensors, full precision or "
              "nuq-packed) on a text file, over non-overlapping windows that each start with BOS");
  cmd->add_option("--model,-m", o->model, "checkpoint")->required();
  cmd->add_option("--tokenizer", o->tokenizer,
                  "tokenizer: llama2.c .bin, .gguf or tokenizer.json (default: the model's own GGUF, or "
                  "tokenizer.json next to a safetensors checkpoint)");
  cmd->add_option("--text", o->text, "UTF-8 text file, tokenized as one string")->required();
  cmd->add_option("--ctx", o->ctx, "window length in tokens, BOS included")->capture_default_str()->check(CLI::Range(2, 1 << 20));
  cmd->add_option("--max-tokens", o->max_tokens, "score only the first N tokens of the text (0: all)")->capture_default_str();
  cmd->add_option("--threads,-j", o->threads, "worker threads (0: all cores)")->capture_default_str();
  cmd->add_flag("--json", o->json, "print one JSON object instead of text");
  cmd->add_flag("--decode-packed", o->decode_packed,
                "decode nuq-packed layers to fp32 at load (reference numbers) instead of running the packed kernels");
  cmd->add_option("--step", o->step,
                  "feed each window in forward calls of N tokens, as generation does; N <= 16 runs packed layers "
                  "through the fused decode kernels (default: the whole window at once, the prefill path)")
      ->check(CLI::Range(int64_t(1), int64_t(1) << 20));
  cmd->add_flag("--int8", o->int8,
                "packed layers multiply int8-quantized activations by int8 codebooks (cpu::Arithmetic::int8); "
                "implies --step 16 unless --step is given");
  cmd->add_option("--device", o->device,
                  "where nuq-packed layers run: cpu, or cuda / cuda-bf16 (the CUDA kernels with fp16 / bf16 "
                  "activations; the rest of the decoder stays on the CPU)")
      ->capture_default_str()
      ->check(CLI::IsMember({"cpu", "cuda", "cuda-bf16"}));
  cmd->add_flag("--quiet,-q", o->quiet, "no progress output");
  add_kv_eval_options(cmd, o->kv);
  cmd->callback([o, &action] {
    action = [o]() -> int {
      NUQ_CHECK(!(o->int8 && o->decode_packed), Errc::invalid_argument,
                "--int8 applies to the packed kernels; it cannot be combined with --decode-packed");
      NUQ_CHECK(!(o->int8 && o->step > cpu::kMaxFusedBatch), Errc::invalid_argument,
                "--int8 needs --step <= {} (longer calls take the exact prefill path)", cpu::kMaxFusedBatch);
      if (o->int8 && o->step == 0) o->step = cpu::kMaxFusedBatch;
      LlamaLoadOptions load;
      load.threads = o->threads;
      load.decode_packed = o->decode_packed;
      load.arithmetic = o->int8 ? cpu::Arithmetic::int8 : cpu::Arithmetic::exact;
      if (o->device != "cpu") {
        NUQ_CHECK(!o->decode_packed && !o->int8, Errc::invalid_argument,
                  "--device {} runs the packed layers on the GPU; --decode-packed and --int8 are CPU options",
                  o->device);
#ifdef NUQ_WITH_CUDA
        load.linear_backend = cuda::make_linear_backend(o->device == "cuda" ? cuda::ActivationType::f16
                                                                            : cuda::ActivationType::bf16);
#else
        fail(Errc::unsupported, "--device {}: this nuq was built without CUDA", o->device);
#endif
      }
      ModelAndText mt = load_model_and_text(o->model, o->tokenizer, o->text, 0, o->max_tokens, load);
      LlamaModel& model = *mt.model;
      const KvEval kv = install_kv_eval(model, o->kv);
      const std::string& kv_cache = kv.description;
      const Tokenizer& tok = *mt.tok;
      const std::vector<int32_t>& ids = mt.ids;
      const LlamaConfig& c = model.config();
      const double load_seconds = mt.load_seconds;
      const int64_t n = int64_t(ids.size());
      constexpr int64_t kLogitRows = 16;  // logits of a whole window would be ctx × vocab floats
      std::vector<float> logits(std::size_t(kLogitRows * c.vocab_size));
      double nll = 0;
      const bool tty = ::isatty(STDERR_FILENO) && !o->quiet && !o->json;
      const auto t0 = std::chrono::steady_clock::now();
      const int64_t windows = for_each_window(model, tok, ids, o->ctx, [&](int64_t w, int64_t windows, int64_t begin,
                                                                          int64_t len, const float* hidden) {
        for (int64_t r = 0; r < len; r += kLogitRows) {
          const int64_t rows = std::min(kLogitRows, len - r);
          model.logits(hidden + r * c.dim, rows, logits.data());
          for (int64_t i = 0; i < rows; ++i) {
            const float* l = &logits[std::size_t(i * c.vocab_size)];
            double mx = l[0];
            for (int64_t v = 1; v < c.vocab_size; ++v) mx = std::max(mx, double(l[v]));
            double sum = 0;
            for (int64_t v = 0; v < c.vocab_size; ++v) sum += std::exp(double(l[v]) - mx);
            const int32_t target = ids[std::size_t(begin + r + i)];
            nll += std::log(sum) + mx - double(l[target]);
          }
        }
        if (tty)
          std::fprintf(stderr, "\r\033[Kwindow %lld/%lld  perplexity so far %.4f", (long long)(w + 1), (long long)windows,
                       std::exp(nll / double(begin + len)));
        else if (!o->quiet && !o->json && (w + 1) % 16 == 0)
          std::fprintf(stderr, "window %lld/%lld  perplexity so far %.4f\n", (long long)(w + 1), (long long)windows,
                       std::exp(nll / double(begin + len)));
      }, o->step, kv.calibration.get());
      if (tty) std::fprintf(stderr, "\r\033[K");
      const double seconds = seconds_since(t0);
      const double mean = nll / double(n);
      const double processed = double(n);  // tokens through the model (BOS in place of each window's last)
      if (o->json) {
        nlohmann::json j = {{"model", o->model},
                            {"description", model.description()},
                            {"linear_bits_per_weight", model.linear_bits_per_weight()},
                            {"tokenizer", tok.description()},
                            {"text", o->text},
                            {"ctx", o->ctx},
                            {"windows", windows},
                            {"tokens_scored", n},
                            {"mean_nll", mean},
                            {"perplexity", std::exp(mean)},
                            {"tokens_per_second", processed / seconds},
                            {"load_seconds", load_seconds},
                            {"kv_cache", kv_cache.empty() ? "fp32" : kv_cache}};
        fmt::print("{}\n", j.dump(1));
      } else {
        fmt::print("model: {} ({}; linear layers {:.3f} bits/weight)\n", o->model, model.description(),
                   model.linear_bits_per_weight());
        fmt::print("text: {} ({} tokens, {} windows of up to {} tokens with BOS)\n", o->text, n, windows, o->ctx);
        if (!kv_cache.empty()) fmt::print("KV cache: {}\n", kv_cache);
        fmt::print("tokens scored {}, mean NLL {:.4f}, perplexity {:.4f}\n", n, mean, std::exp(mean));
        const std::string mode = o->step > 0 ? fmt::format("{}-token step", o->step) : std::string("prefill");
        fmt::print("{} throughput {:.1f} tokens/s ({:.1f} s; model loaded in {:.1f} s)\n", mode, processed / seconds,
                   seconds, load_seconds);
      }
      return 0;
    };
  });
}

void add_calibrate_command(CLI::App& app, Action& action) {
  struct Options {
    std::string model, tokenizer, text, out, hessian;
    int64_t ctx = 512, max_tokens = 32768, skip_tokens = 0;
    int threads = 0;
  };
  auto o = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand(
      "calibrate", "Activation statistics of every linear layer's input (mean of x² per input column, the diagonal "
                   "of XᵀX / tokens) from a forward pass over a text, written as a sensitivity file that `nuq "
                   "quantize --fisher` accepts");
  cmd->add_option("--model,-m", o->model, "checkpoint (the one to be quantized, for matching tensor names)")->required();
  cmd->add_option("--tokenizer", o->tokenizer, "tokenizer (as for nuq eval)");
  cmd->add_option("--text", o->text, "calibration text")->required();
  cmd->add_option("--out,-o", o->out, "output .safetensors file")->required();
  cmd->add_option("--hessian", o->hessian,
                  "also write the full XᵀX / tokens of every linear layer's input (Hessian statistics, "
                  "docs/sensitivity.md) to this file, for `nuq quantize --hessian` and `nuq plan --stats`; layers "
                  "reading the same input (q/k/v, gate/up) share one matrix");
  cmd->add_option("--ctx", o->ctx, "window length in tokens, BOS included")->capture_default_str()->check(CLI::Range(2, 1 << 20));
  cmd->add_option("--max-tokens", o->max_tokens, "tokens of text to run (0: all)")->capture_default_str();
  cmd->add_option("--skip-tokens", o->skip_tokens,
                  "start this many tokens into the text (keep calibration and evaluation text apart)")
      ->capture_default_str();
  cmd->add_option("--threads,-j", o->threads, "worker threads (0: all cores)")->capture_default_str();
  cmd->callback([o, &action] {
    action = [o]() -> int {
      NUQ_CHECK(o->hessian.empty() || std::filesystem::path(o->hessian) != std::filesystem::path(o->out),
                Errc::invalid_argument, "--hessian and --out name the same file {}", o->out);
      ModelAndText mt =
          load_model_and_text(o->model, o->tokenizer, o->text, o->skip_tokens, o->max_tokens, {o->threads, false});
      HessianAccumulator hessian;
      // The input the hook saw last (a copy), to recognize layers fed the same activations.
      struct Last {
        std::vector<float> x;
        int64_t n = 0, cols = 0;
        std::string layer;
      } last;
      // Sums in double: a long calibration run adds up millions of squares per column.
      std::map<std::string, std::vector<double>> sums;
      std::map<std::string, int64_t> tokens;
      mt.model->set_activation_hook([&](const std::string& layer, const float* x, int64_t n, int64_t cols) {
        auto& s = sums[layer];
        s.resize(std::size_t(cols), 0.0);
        for (int64_t t = 0; t < n; ++t)
          for (int64_t c = 0; c < cols; ++c) {
            const double v = x[t * cols + c];
            NUQ_CHECK(std::isfinite(v), Errc::invalid_argument, "calibration: the input of {} is {} at token {}",
                      layer, v, t);
            s[std::size_t(c)] += v * v;
          }
        tokens[layer] += n;
        if (o->hessian.empty()) return;
        // q/k/v (and gate/up) are applied to one input; storing its XᵀX once saves 2/3 of the rank
        // updates and of the file. Compared by contents: the decoder reuses its buffers.
        const bool same_input = !last.layer.empty() && last.n == n && last.cols == cols &&
                                std::memcmp(last.x.data(), x, std::size_t(n * cols) * sizeof(float)) == 0;
        if (hessian.contains(layer) && hessian.resolve(layer) != layer) {
          NUQ_CHECK(same_input && hessian.resolve(last.layer) == hessian.resolve(layer), Errc::internal,
                    "calibration: {} shared the input of {} in the first window but not now", layer,
                    hessian.resolve(layer));
        } else if (same_input && !hessian.contains(layer)) {
          hessian.alias(layer, hessian.resolve(last.layer));
        } else {
          hessian.add(layer, x, n, cols, cols);
        }
        last.x.assign(x, x + n * cols);
        last.n = n;
        last.cols = cols;
        last.layer = layer;
      });
      const auto t0 = std::chrono::steady_clock::now();
      const int64_t windows = for_each_window(*mt.model, *mt.tok, mt.ids, o->ctx,
                                              [&](int64_t w, int64_t windows, int64_t, int64_t, const float*) {
                                                if ((w + 1) % 8 == 0 || w + 1 == windows)
                                                  std::fprintf(stderr, "window %lld/%lld\n", (long long)(w + 1),
                                                               (long long)windows);
                                              });
      std::vector<std::vector<float>> data;
      std::vector<std::pair<std::string, ConstTensorView>> views;
      data.reserve(sums.size());
      for (const auto& [layer, s] : sums) {
        std::vector<float> mean(s.size());
        for (std::size_t c = 0; c < s.size(); ++c) mean[c] = float(s[c] / double(tokens[layer]));
        data.push_back(std::move(mean));
        views.emplace_back(layer + ".weight", ConstTensorView(reinterpret_cast<const std::byte*>(data.back().data()),
                                                              DType::F32, Shape{int64_t(s.size())}));
      }
      write_safetensors(o->out, views,
                        {{"nuq_statistics", "activation_mean_square"},
                         {"tokens", std::to_string(mt.ids.size())},
                         {"text", std::filesystem::path(o->text).filename().string()},
                         {"skip_tokens", std::to_string(o->skip_tokens)}});
      fmt::print("wrote {}: mean squared inputs of {} layers over {} tokens ({} windows) in {:.1f} s\n", o->out,
                 views.size(), mt.ids.size(), windows, seconds_since(t0));
      if (!o->hessian.empty()) {
        hessian.save(o->hessian);
        fmt::print("wrote {}: XᵀX of {} distinct layer inputs ({} layers)\n", o->hessian, hessian.names().size(),
                   hessian.names().size() + hessian.aliases().size());
      }
      return 0;
    };
  });
}

void add_convert_command(CLI::App& app, Action& action) {
  struct Options {
    std::string input, out;
  };
  auto o = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand(
      "convert", "Write a LLaMA-family checkpoint the decoder reads (llama2.c .bin, .gguf, safetensors) as a Hugging "
                 "Face checkpoint (fp32 model.safetensors + config.json), e.g. to quantize a llama2.c model");
  cmd->add_option("input", o->input, "checkpoint")->required();
  cmd->add_option("--out,-o", o->out, "output directory")->required();
  cmd->callback([o, &action] {
    action = [o]() -> int {
      auto model = LlamaModel::load(o->input);
      model->save_hf(o->out);
      fmt::print("wrote {}/model.safetensors and config.json ({}, {} layers)\n", o->out, model->description(),
                 model->config().n_layers);
      return 0;
    };
  });
}

}  // namespace nuq::cli
