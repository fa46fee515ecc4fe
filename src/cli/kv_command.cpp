// `nuq kv-calibrate` and the --kv-* options of `nuq eval` (install_kv_cache in src/model_tasks.cpp): the
// quantized KV cache (docs/kv-cache.md) inside the decoder. `--kv-path kernel` runs the decoder on real quantized caches
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

void add_kv_eval_options(CLI::App* cmd, KvCacheOptions& o, std::string& outliers) {
  cmd->add_option("--kv-calibration", o.calibration,
                  "quantize the KV cache with this calibration (from `nuq kv-calibrate`)");
  cmd->add_option("--kv-path", o.path,
                  "with --kv-calibration: kernel (default; a real quantized cache, attention by the KV decode "
                  "kernels) or roundtrip (keys and values encoded and decoded, then the decoder's fp32 attention)")
      ->check(CLI::IsMember({"kernel", "roundtrip"}));
  cmd->add_option("--kv-bits", o.bits,
                  "KV bits: checked against --kv-calibration, or the width of --kv-method uniform")
      ->check(CLI::Range(2, 8));
  cmd->add_option("--kv-outliers", outliers, "KV outlier fraction (e.g. 1%), checked against --kv-calibration");
  cmd->add_option("--kv-method", o.method, "nuq (default, needs --kv-calibration) or uniform (int per token)")
      ->check(CLI::IsMember({"nuq", "uniform"}));
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
