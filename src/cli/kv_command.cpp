// `nuq kv-calibrate` and the --kv-* options of `nuq eval`: the quantized KV cache (docs/kv-cache.md)
// inside the decoder. `--kv-path kernel` runs the decoder on real quantized caches
// (LlamaModel::new_cache with a calibration: keys and values quantized as they are appended, attention by
// kv::decode_attention); `--kv-path roundtrip` passes every key and value through the cache's exact
// encode/decode (LayerCache::roundtrip) in the KV hook, before RoPE and the decoder's own fp32 attention.
// Given the same keys and values both attend over the same codes; docs/kv-cache.md ("Through the
// kernels") explains why full-model perplexities still differ by a fraction of a percent.
#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include <fmt/format.h>

#include "commands.hpp"
#include "nuq/error.hpp"
#include "nuq/half.hpp"
#include "nuq/kv_cache.hpp"
#include "nuq/llama.hpp"
#include "nuq/safetensors.hpp"
#include "nuq/tokenizer.hpp"

namespace nuq::cli {
namespace {

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

}  // namespace

void add_kv_eval_options(CLI::App* cmd, KvEvalOptions& o) {
  cmd->add_option("--kv-calibration", o.calibration,
                  "quantize the KV cache with this calibration (from `nuq kv-calibrate`)");
  cmd->add_option("--kv-path", o.path,
                  "with --kv-calibration: kernel (default; a real quantized cache, attention by the KV decode "
                  "kernels) or roundtrip (keys and values encoded and decoded, then the decoder's fp32 attention)")
      ->check(CLI::IsMember({"kernel", "roundtrip"}));
  cmd->add_option("--kv-bits", o.bits,
                  "KV bits: checked against --kv-calibration, or the width of --kv-method uniform")
      ->check(CLI::Range(2, 8));
  cmd->add_option("--kv-outliers", o.outliers, "KV outlier fraction (e.g. 1%), checked against --kv-calibration");
  cmd->add_option("--kv-method", o.method, "nuq (default, needs --kv-calibration) or uniform (int per token)")
      ->check(CLI::IsMember({"nuq", "uniform"}));
}

KvEval install_kv_eval(LlamaModel& model, const KvEvalOptions& o) {
  const LlamaConfig& c = model.config();
  if (o.method == "uniform") {
    NUQ_CHECK(o.bits > 0, Errc::invalid_argument, "--kv-method uniform needs --kv-bits");
    NUQ_CHECK(o.calibration.empty(), Errc::invalid_argument, "--kv-method uniform takes no --kv-calibration");
    NUQ_CHECK(o.path.empty(), Errc::invalid_argument,
              "--kv-path applies to --kv-calibration; --kv-method uniform always quantizes in the KV hook");
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
    NUQ_CHECK(o.bits == 0 && o.outliers.empty() && o.path.empty(), Errc::invalid_argument,
              "--kv-bits/--kv-outliers/--kv-path need --kv-calibration (from `nuq kv-calibrate`) or --kv-method "
              "uniform");
    return {};
  }
  auto cal = std::make_shared<kv::Calibration>(kv::load_calibration(o.calibration));
  NUQ_CHECK(int64_t(cal->layers.size()) == c.n_layers, Errc::invalid_argument,
            "{}: calibration of {} layers for a model of {}", o.calibration, cal->layers.size(), c.n_layers);
  if (!o.outliers.empty()) {
    const double f = parse_percent(o.outliers, "--kv-outliers");
    NUQ_CHECK(std::fabs(f - cal->outlier_fraction) < 1e-9, Errc::invalid_argument,
              "--kv-outliers {} differs from the calibration's {}%", o.outliers, cal->outlier_fraction * 100);
  }
  auto caches = std::make_shared<std::vector<kv::LayerCache>>();
  kv::CacheOptions opt;
  opt.rope = rope_of(c);
  for (const auto& layer : cal->layers) {
    NUQ_CHECK(layer.n_kv_heads == c.n_kv_heads && layer.head_dim == c.head_dim, Errc::invalid_argument,
              "{}: calibrated for {} kv heads of {} channels, the model has {} of {}", o.calibration,
              layer.n_kv_heads, layer.head_dim, c.n_kv_heads, c.head_dim);
    NUQ_CHECK(o.bits == 0 || (layer.bits_k == o.bits && layer.bits_v == o.bits), Errc::invalid_argument,
              "--kv-bits {} differs from the calibration's {}-bit keys / {}-bit values", o.bits, layer.bits_k,
              layer.bits_v);
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

void add_kv_calibrate_command(CLI::App& app, Action& action) {
  struct Options {
    std::string model, tokenizer, text, out, outliers = "1%";
    int bits = 3, sink = 1, threads = 0;
    int64_t ctx = 512, max_tokens = 4096, skip_tokens = 0;
    bool q_norm = false;
  };
  auto o = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand(
      "kv-calibrate", "Fit a quantized KV cache (per-channel key ranges, per-layer non-uniform datatypes for keys and "
                      "values) from the keys and values of a forward pass over a text (docs/kv-cache.md)");
  cmd->add_option("--model,-m", o->model, "checkpoint")->required();
  cmd->add_option("--tokenizer", o->tokenizer, "tokenizer (default: the model's own GGUF)");
  cmd->add_option("--text", o->text, "calibration text")->required();
  cmd->add_option("--out,-o", o->out, "output .safetensors file")->required();
  cmd->add_option("--bits", o->bits, "bits per key and value")->capture_default_str()->check(CLI::Range(2, 4));
  cmd->add_option("--outliers", o->outliers, "fraction of each vector kept in fp16")->capture_default_str();
  cmd->add_option("--sink", o->sink, "first tokens of each sequence kept in fp16")->capture_default_str();
  cmd->add_flag("--q-norm", o->q_norm, "match the datatypes' mean and spread to the data (Q-Norm)");
  cmd->add_option("--ctx", o->ctx, "window length in tokens, BOS included")->capture_default_str()->check(CLI::Range(2, 1 << 20));
  cmd->add_option("--max-tokens", o->max_tokens, "tokens of text to run")->capture_default_str();
  cmd->add_option("--skip-tokens", o->skip_tokens, "skip this many tokens first (keep calibration and evaluation apart)")
      ->capture_default_str();
  cmd->add_option("--threads,-j", o->threads, "worker threads (0: all cores)")->capture_default_str();
  cmd->callback([o, &action] {
    action = [o]() -> int {
      LlamaLoadOptions load;
      load.threads = o->threads;
      auto model = LlamaModel::load(o->model, load);
      std::string tok_path = o->tokenizer.empty() ? model->embedded_tokenizer_path() : o->tokenizer;
      NUQ_CHECK(!tok_path.empty(), Errc::invalid_argument, "{}: the checkpoint holds no tokenizer; pass --tokenizer",
                o->model);
      auto tok = Tokenizer::load(tok_path);
      auto ids = tok->encode(read_small_file(o->text, "the text"));
      NUQ_CHECK(o->skip_tokens >= 0 && o->skip_tokens < int64_t(ids.size()), Errc::invalid_argument,
                "{}: cannot skip {} of its {} tokens", o->text, o->skip_tokens, ids.size());
      ids.erase(ids.begin(), ids.begin() + o->skip_tokens);
      if (o->max_tokens > 0 && int64_t(ids.size()) > o->max_tokens) ids.resize(size_t(o->max_tokens));
      const LlamaConfig& c = model->config();
      const int64_t width = c.n_kv_heads * c.head_dim;
      std::vector<std::vector<float>> ks(size_t(c.n_layers)), vs(size_t(c.n_layers));
      const int sink = o->sink;
      // The sink positions stay fp16 in the cache, so their (typically extreme) values stay out of the fit.
      model->set_kv_hook([&](int64_t l, int64_t pos0, int64_t n, float* k, float* v) {
        for (int64_t t = 0; t < n; ++t) {
          if (pos0 + t < sink) continue;
          ks[size_t(l)].insert(ks[size_t(l)].end(), k + t * width, k + (t + 1) * width);
          vs[size_t(l)].insert(vs[size_t(l)].end(), v + t * width, v + (t + 1) * width);
        }
      });
      const int64_t per = o->ctx - 1;
      auto cache = model->new_cache(o->ctx);
      std::vector<float> hidden(size_t(o->ctx * c.dim));
      for (int64_t begin = 0; begin < int64_t(ids.size()); begin += per) {
        std::vector<int32_t> input{tok->bos()};
        input.insert(input.end(), ids.begin() + begin, ids.begin() + std::min<int64_t>(begin + per, int64_t(ids.size())));
        cache->length = 0;
        model->forward(input.data(), int64_t(input.size()), *cache, hidden.data());
      }
      kv::CalibrationOptions co;
      co.bits_k = co.bits_v = o->bits;
      co.outlier_fraction = parse_percent(o->outliers, "--outliers");
      co.sink_tokens = o->sink;
      co.q_norm = o->q_norm;
      kv::Calibration cal;
      cal.outlier_fraction = co.outlier_fraction;
      cal.sink_tokens = o->sink;
      cal.q_norm = o->q_norm;
      for (int64_t l = 0; l < c.n_layers; ++l) {
        const int64_t tokens = int64_t(ks[size_t(l)].size()) / width;
        NUQ_CHECK(tokens > 0, Errc::invalid_argument, "{}: no tokens past the sink to calibrate on", o->text);
        cal.layers.push_back(kv::calibrate_layer(ks[size_t(l)].data(), vs[size_t(l)].data(), nullptr, nullptr, tokens,
                                                 c.n_kv_heads, c.head_dim, co));
      }
      kv::save_calibration(cal, o->out);
      fmt::print("{}: {} layers, {}-bit keys and values, {} outliers, {} sink tokens, calibrated on {} tokens\n", o->out,
                 c.n_layers, o->bits, o->outliers, o->sink, ids.size());
      return 0;
    };
  });
}

}  // namespace nuq::cli
