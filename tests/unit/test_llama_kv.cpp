// The decoder on a quantized KV cache (LlamaModel::new_cache with a kv::Calibration): its logits against
// the round-trip path (the same decoded keys and values through the decoder's own fp32 attention), for a
// prefill, token by token and in uneven steps, in both RoPE layouts; restarting and refusals of bad
// input; and AttentionOptions::lengths, which gives every query of a prefill its causal prefix.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "nuq/error.hpp"
#include "nuq/kv_cache.hpp"
#include "nuq/llama.hpp"
#include "nuq/tokenizer.hpp"
#include "test_paths.hpp"

namespace {

namespace fs = std::filesystem;
namespace kv = nuq::kv;
using nuq::LlamaModel;

std::vector<float> gaussian(size_t n, std::mt19937_64& rng, float sd) {
  std::normal_distribution<float> d(0.0f, sd);
  std::vector<float> x(n);
  for (auto& v : x) v = d(rng);
  return x;
}

// A random llama2.c checkpoint with head_dim 64 (the quantized cache supports 64, 80, 96, 128; stories260K
// has 8) and grouped-query attention (4 query heads over 2 kv heads). Q/K rows are scaled up so that
// attention is peaked rather than uniform, which makes a wrong mask or a wrong rotation visible.
void write_random_llama2c(const fs::path& path) {
  const int32_t dim = 256, hidden = 512, layers = 2, heads = 4, kv_heads = 2, vocab = 300, seq = 512;
  const int64_t hd = dim / heads, kvd = kv_heads * hd;
  std::mt19937_64 rng(11);
  std::vector<float> w;
  auto add = [&](int64_t n, float sd) {
    const auto x = gaussian(size_t(n), rng, sd);
    w.insert(w.end(), x.begin(), x.end());
  };
  auto ones = [&](int64_t n) { w.insert(w.end(), size_t(n), 1.0f); };
  const float in_sd = 1.0f / std::sqrt(float(dim));
  add(int64_t(vocab) * dim, 1.0f);             // token embedding
  ones(int64_t(layers) * dim);                 // attention RMSNorm
  add(int64_t(layers) * dim * dim, 3 * in_sd);   // wq
  add(int64_t(layers) * kvd * dim, 3 * in_sd);   // wk
  add(int64_t(layers) * kvd * dim, in_sd);       // wv
  add(int64_t(layers) * dim * dim, in_sd);       // wo
  ones(int64_t(layers) * dim);                 // FFN RMSNorm
  add(int64_t(layers) * hidden * dim, in_sd);    // w1 (gate)
  add(int64_t(layers) * dim * hidden, 1.0f / std::sqrt(float(hidden)));  // w2 (down)
  add(int64_t(layers) * hidden * dim, in_sd);    // w3 (up)
  ones(dim);                                   // final RMSNorm
  w.insert(w.end(), size_t(seq) * size_t(hd), 0.0f);  // llama2.c's RoPE tables, unused by the loader
  const int32_t header[7] = {dim, hidden, layers, heads, kv_heads, vocab, seq};
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(header), sizeof header);
  out.write(reinterpret_cast<const char*>(w.data()), std::streamsize(w.size() * sizeof(float)));
  ASSERT_TRUE(out.good()) << path;
}

std::vector<int32_t> random_tokens(int64_t n, int64_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = int32_t(rng() % uint64_t(vocab));
  return t;
}

// 3-bit keys and values, 1% outliers (one slot at head_dim 64), one fp16 sink token, fitted on the model's
// own pre-RoPE keys and values over tokens disjoint from the evaluated ones.
kv::Calibration calibrate(LlamaModel& model) {
  const auto& c = model.config();
  const int64_t n = 256, width = c.n_kv_heads * c.head_dim;
  std::vector<std::vector<float>> ks(size_t(c.n_layers)), vs(size_t(c.n_layers));
  model.set_kv_hook([&](int64_t l, int64_t, int64_t count, float* k, float* v) {
    ks[size_t(l)].insert(ks[size_t(l)].end(), k, k + count * width);
    vs[size_t(l)].insert(vs[size_t(l)].end(), v, v + count * width);
  });
  const auto tokens = random_tokens(n, c.vocab_size, 99);
  auto cache = model.new_cache(n);
  std::vector<float> hidden(size_t(n * c.dim));
  model.forward(tokens.data(), n, *cache, hidden.data());
  model.set_kv_hook(nullptr);
  kv::CalibrationOptions o;
  kv::Calibration cal;
  cal.outlier_fraction = o.outlier_fraction;
  cal.sink_tokens = o.sink_tokens;
  for (int64_t l = 0; l < c.n_layers; ++l)
    cal.layers.push_back(kv::calibrate_layer(ks[size_t(l)].data(), vs[size_t(l)].data(), nullptr, nullptr, n,
                                             c.n_kv_heads, c.head_dim, o));
  return cal;
}

struct Models {
  std::unique_ptr<LlamaModel> interleaved, half_split;  // the same weights, llama2.c and HF layouts
  kv::Calibration cal_interleaved, cal_half_split;
};

Models& models() {
  static Models m = [] {
    Models r;
    const fs::path dir = fs::temp_directory_path() / ("nuq_llama_kv_" + std::to_string(::getpid()));
    fs::create_directories(dir);
    write_random_llama2c(dir / "random.bin");
    r.interleaved = LlamaModel::load((dir / "random.bin").string(), {2, false});
    r.interleaved->save_hf((dir / "hf").string());
    r.half_split = LlamaModel::load((dir / "hf").string(), {2, false});
    fs::remove_all(dir);  // both loaders copy fp32 weights into the models
    r.cal_interleaved = calibrate(*r.interleaved);
    r.cal_half_split = calibrate(*r.half_split);
    return r;
  }();
  return m;
}

// Logits [n, vocab] of `tokens` fed in forward calls of the given sizes (cycled), from a fresh cache.
std::vector<float> logits(const LlamaModel& model, LlamaModel::Cache& cache, const std::vector<int32_t>& tokens,
                          const std::vector<int64_t>& steps) {
  const auto& c = model.config();
  const int64_t n = int64_t(tokens.size());
  std::vector<float> hidden(size_t(n * c.dim)), out(size_t(n * c.vocab_size));
  cache.length = 0;
  for (int64_t i = 0, s = 0; i < n; s = (s + 1) % int64_t(steps.size())) {
    const int64_t m = std::min(steps[size_t(s)], n - i);
    model.forward(tokens.data() + i, m, cache, hidden.data() + i * c.dim);
    i += m;
  }
  model.logits(hidden.data(), n, out.data());
  return out;
}

// Pre-RoPE keys and values of every layer, [layer][position][kv head][head_dim].
struct LayerKv {
  std::vector<std::vector<float>> k, v;
};

// The round-trip path of `nuq eval --kv-path roundtrip`: keys and values encoded and decoded exactly as
// the cache stores them, then RoPE and the decoder's fp32 attention over its fp32 cache. Also records
// the keys and values each layer computed (before the round trip) into `inputs`.
std::vector<float> roundtrip_logits(LlamaModel& model, const kv::Calibration& cal, const std::vector<int32_t>& tokens,
                                    LayerKv& inputs) {
  const auto& c = model.config();
  const int64_t width = c.n_kv_heads * c.head_dim;
  std::vector<kv::LayerCache> caches;
  kv::CacheOptions options;
  options.rope = kv::Rope{c.rope, c.rope_theta, kv::RopeScaling::none, 1.0};
  for (const auto& layer : cal.layers) caches.emplace_back(layer, cal, options);
  inputs.k.assign(size_t(c.n_layers), {});
  inputs.v.assign(size_t(c.n_layers), {});
  model.set_kv_hook([&](int64_t l, int64_t pos0, int64_t n, float* k, float* v) {
    inputs.k[size_t(l)].insert(inputs.k[size_t(l)].end(), k, k + n * width);
    inputs.v[size_t(l)].insert(inputs.v[size_t(l)].end(), v, v + n * width);
    caches[size_t(l)].roundtrip(pos0, n, k, v);
  });
  auto cache = model.new_cache(int64_t(tokens.size()));
  auto out = logits(model, *cache, tokens, {int64_t(tokens.size())});
  model.set_kv_hook(nullptr);
  return out;
}

// Makes every layer of later forward passes use the recorded keys and values. Quantization is a step
// function: past the first layer the two paths' inputs differ by float rounding, which now and then
// moves a value across a codebook boundary and changes a code, a difference of the format's size rather
// than of rounding. Pinned inputs give both paths the same codes, so only attention's arithmetic differs.
void pin_keys_and_values(LlamaModel& model, const LayerKv& inputs) {
  const int64_t width = model.config().n_kv_heads * model.config().head_dim;
  model.set_kv_hook([&inputs, width](int64_t l, int64_t pos0, int64_t n, float* k, float* v) {
    std::copy_n(inputs.k[size_t(l)].begin() + pos0 * width, n * width, k);
    std::copy_n(inputs.v[size_t(l)].begin() + pos0 * width, n * width, v);
  });
}

double max_abs(const std::vector<float>& x) {
  double m = 0;
  for (float v : x) m = std::max(m, double(std::fabs(v)));
  return m;
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, double(std::fabs(a[i] - b[i])));
  return m;
}

// With the same codes (pinned inputs) both paths attend over the same decoded values (the cache's
// decoder is shared, the sink is fp16 in both), so they differ only by float rounding: the kernels' RoPE
// angles (within 3e-7 rad of exact, the decoder's own within 1e-7), summation orders in q·k, the softmax
// and the value sums (fp32, ~1e-6 relative), carried through two layers and the classifier. Measured:
// about 2e-6 of the largest logit. 2e-5 leaves a factor of ten yet is far below what one misplaced
// token does: a query that also sees the next position moves the logits by ~1e-1 of the largest.
constexpr double kPathTolerance = 2e-5;

void expect_kernel_matches_roundtrip(LlamaModel& model, const kv::Calibration& cal, const char* layout,
                                     const std::vector<int32_t>& tokens) {
  LayerKv inputs;
  const auto reference = roundtrip_logits(model, cal, tokens, inputs);
  const double scale = max_abs(reference);
  auto cache = model.new_cache(int64_t(tokens.size()), cal);
  pin_keys_and_values(model, inputs);
  // One prefill, token by token, and uneven steps that start and end inside pages.
  const std::vector<std::vector<int64_t>> schedules = {{int64_t(tokens.size())}, {1}, {1, 31, 5, 63}, {33, 2}};
  for (const auto& steps : schedules) {
    const auto got = logits(model, *cache, tokens, steps);
    const double diff = max_abs_diff(got, reference);
    std::printf("%s, steps of %lld..: max |kernel - roundtrip| = %.3g of the largest logit %.3g\n", layout,
                (long long)steps[0], diff / scale, scale);
    EXPECT_LE(diff, kPathTolerance * scale) << layout << ", first step " << steps[0];
  }
  model.set_kv_hook(nullptr);
  // The comparison has teeth only if quantization changes the logits by far more than the tolerance.
  auto fp32 = model.new_cache(int64_t(tokens.size()));
  EXPECT_GT(max_abs_diff(logits(model, *fp32, tokens, {int64_t(tokens.size())}), reference),
            100 * kPathTolerance * scale)
      << layout;
}

TEST(LlamaQuantizedKv, InterleavedRopeMatchesRoundTrip) {
  Models& m = models();
  ASSERT_EQ(m.interleaved->config().rope, nuq::RopeLayout::interleaved);
  // Three full pages of 32 tokens and a partial one.
  expect_kernel_matches_roundtrip(*m.interleaved, m.cal_interleaved, "interleaved",
                                  random_tokens(100, m.interleaved->config().vocab_size, 5));
}

TEST(LlamaQuantizedKv, HalfSplitRopeMatchesRoundTrip) {
  Models& m = models();
  ASSERT_EQ(m.half_split->config().rope, nuq::RopeLayout::half_split);
  expect_kernel_matches_roundtrip(*m.half_split, m.cal_half_split, "half-split",
                                  random_tokens(100, m.half_split->config().vocab_size, 5));
}

// A real model: SmolLM2-135M (30 layers, 9 query heads over 3 kv heads, RoPE base 100000) on text.
TEST(LlamaQuantizedKv, SmolLM2MatchesRoundTrip) {
  const auto models_dir = nuq::testing::models_dir();
  const auto data = nuq::testing::shared_data_dir();
  const fs::path gguf = models_dir ? *models_dir / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf" : fs::path();
  if (!models_dir || !fs::exists(gguf) || !data || !fs::exists(*data / "wikitext2_test.txt"))
    GTEST_SKIP() << "SmolLM2 GGUF (scripts/fetch-models.sh) or ../shared/data/wikitext2_test.txt absent";
  auto model = LlamaModel::load(gguf.string(), {2, false});
  const kv::Calibration cal = calibrate(*model);
  auto tok = nuq::Tokenizer::load(gguf.string());
  std::ifstream in(*data / "wikitext2_test.txt", std::ios::binary);
  std::string text(4000, '\0');
  in.read(text.data(), std::streamsize(text.size()));
  std::vector<int32_t> tokens{tok->bos()};
  const auto ids = tok->encode(text);
  tokens.insert(tokens.end(), ids.begin(), ids.begin() + 159);  // five pages of 32
  expect_kernel_matches_roundtrip(*model, cal, "SmolLM2", tokens);
}

TEST(LlamaQuantizedKv, RestartsAtZeroAndReportsBytes) {
  Models& m = models();
  const LlamaModel& model = *m.interleaved;
  const auto& c = model.config();
  const auto tokens = random_tokens(40, c.vocab_size, 8);
  auto cache = model.new_cache(64, m.cal_interleaved);
  EXPECT_EQ(cache->bytes(), 0);
  const auto first = logits(model, *cache, tokens, {40});
  // Two pages of 32 tokens per layer (40 tokens), plus one fp16 sink token of K and V per layer.
  const int64_t record = 64 * 3 / 8 + 3, page = 2 * 32 * (record + record + 4) + 8;
  EXPECT_EQ(cache->bytes(), c.n_layers * (2 * page + 2 * 2 * 64 * 2));
  // logits() sets length to 0 before running again: the same tokens give the same numbers.
  EXPECT_EQ(logits(model, *cache, tokens, {40}), first);
  EXPECT_EQ(cache->bytes(), c.n_layers * (2 * page + 2 * 2 * 64 * 2));  // pages reused, not added
}

TEST(LlamaQuantizedKv, RefusesBadInput) {
  Models& m = models();
  const LlamaModel& model = *m.interleaved;
  const auto& c = model.config();
  auto expect_error = [](auto&& fn, const std::string& needle) {
    try {
      fn();
      ADD_FAILURE() << "no error; expected one containing: " << needle;
    } catch (const nuq::Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  kv::Calibration one_layer = m.cal_interleaved;
  one_layer.layers.pop_back();
  expect_error([&] { model.new_cache(16, one_layer); }, "KV calibration of 1 layers for a model of 2");
  kv::Calibration wrong_heads = m.cal_interleaved;
  for (auto& l : wrong_heads.layers) {
    l.n_kv_heads = 1;
    l.k_scale.resize(64);
    l.k_offset.resize(64);
  }
  expect_error([&] { model.new_cache(16, wrong_heads); },
               "KV calibration of layer 0 is for 1 kv heads of 64 channels, the model has 2 of 64");

  const auto tokens = random_tokens(20, c.vocab_size, 3);
  std::vector<float> hidden(size_t(20 * c.dim));
  auto cache = model.new_cache(16, m.cal_interleaved);
  expect_error([&] { model.forward(tokens.data(), 20, *cache, hidden.data()); },
               "20 more tokens do not fit a cache of 16 holding 0");
  model.forward(tokens.data(), 10, *cache, hidden.data());
  expect_error([&] { model.forward(tokens.data(), 7, *cache, hidden.data()); },
               "7 more tokens do not fit a cache of 16 holding 10");
  cache->length = 4;
  expect_error([&] { model.forward(tokens.data(), 1, *cache, hidden.data()); },
               "cache.length was set to 4 but the quantized cache holds 10 tokens");
}

// stories260K, the model of the other decoder tests, has head_dim 8, which the cache's kernels do not
// support: a calibration fitted on it is refused when the cache is made, naming the reason.
TEST(LlamaQuantizedKv, Stories260KHeadDimIsRefused) {
  const auto dir = nuq::testing::shared_data_dir();
  if (!dir || !fs::exists(*dir / "stories260K.bin"))
    GTEST_SKIP() << "stories260K is absent from ../shared/data (set NUQ_SHARED_DATA)";
  auto model = LlamaModel::load((*dir / "stories260K.bin").string(), {2, false});
  ASSERT_EQ(model->config().head_dim, 8);
  kv::Calibration cal;
  for (int64_t l = 0; l < model->config().n_layers; ++l) {
    kv::LayerCalibration layer;
    layer.n_kv_heads = model->config().n_kv_heads;
    layer.head_dim = 8;
    layer.bits_k = layer.bits_v = 3;
    layer.k_scale.assign(size_t(layer.n_kv_heads * 8), 1.0f);
    layer.k_offset.assign(size_t(layer.n_kv_heads * 8), 0.0f);
    layer.k_codebook = layer.v_codebook = {-1, -0.7f, -0.4f, -0.1f, 0.1f, 0.4f, 0.7f, 1};
    cal.layers.push_back(layer);
  }
  try {
    model->new_cache(16, cal);
    ADD_FAILURE() << "a head_dim 8 cache was made";
  } catch (const nuq::Error& e) {
    EXPECT_NE(std::string(e.what()).find("head_dim 8 is not supported"), std::string::npos) << e.what();
  }
}

// ---- AttentionOptions::lengths ---------------------------------------------------------------------------

// A row limited to the first L tokens of a sequence must give exactly what a sequence holding only those L
// tokens gives (same records, same query position, same splits), for every kernel and the reference.
TEST(KvAttentionLengths, PrefixRowsEqualShorterSequences) {
  const int64_t n_kv = 2, hd = 64, n_heads = 6, total = 200;
  std::mt19937_64 rng(21);
  const auto k = gaussian(size_t(total * n_kv * hd), rng, 1.0f);
  const auto v = gaussian(size_t(total * n_kv * hd), rng, 1.0f);
  kv::CalibrationOptions co;
  kv::Calibration cal;
  cal.layers.push_back(kv::calibrate_layer(k.data(), v.data(), nullptr, nullptr, total, n_kv, hd, co));
  kv::CacheOptions options;
  options.rope.layout = nuq::RopeLayout::interleaved;
  kv::LayerCache full(cal.layers[0], cal, options), separate(cal.layers[0], cal, options);
  const int whole = full.add_sequence();
  full.append(whole, k.data(), v.data(), total, 2);
  const std::vector<int64_t> lengths = {1, 2, 31, 32, 33, 100, 199, 200};
  std::vector<int> rows(lengths.size(), whole), own;
  for (int64_t len : lengths) {
    own.push_back(separate.add_sequence());
    separate.append(own.back(), k.data(), v.data(), len, 2);
  }
  const auto q = gaussian(lengths.size() * size_t(n_heads * hd), rng, 1.0f);
  std::vector<std::optional<nuq::cpu::Isa>> isas = {nuq::cpu::Isa::scalar};
  for (auto isa : {nuq::cpu::Isa::avx2, nuq::cpu::Isa::avx512})
    if (nuq::cpu::isa_supported(isa)) isas.push_back(isa);
  for (const auto& isa : isas) {
    kv::AttentionOptions limited;
    limited.isa = isa;
    limited.lengths = lengths;
    limited.split_tokens = 64;  // several context splits per row
    kv::AttentionOptions plain = limited;
    plain.lengths = {};
    std::vector<float> got(q.size()), want(q.size());
    kv::decode_attention(full, rows, q.data(), n_heads, got.data(), limited);
    kv::decode_attention(separate, own, q.data(), n_heads, want.data(), plain);
    EXPECT_EQ(got, want) << nuq::cpu::to_string(*isa);
  }
  kv::AttentionOptions bad;
  std::vector<float> out(q.size());
  const std::vector<int64_t> too_long = {1, 2, 3, 4, 5, 6, 7, 201}, zero = {0, 1, 1, 1, 1, 1, 1, 1}, short_list = {5};
  for (const auto* l : {&too_long, &zero}) {
    bad.lengths = *l;
    try {
      kv::decode_attention(full, rows, q.data(), n_heads, out.data(), bad);
      ADD_FAILURE() << "lengths out of range accepted";
    } catch (const nuq::Error& e) {
      EXPECT_NE(std::string(e.what()).find("tokens of sequence 0, which holds 200"), std::string::npos) << e.what();
    }
  }
  bad.lengths = short_list;
  try {
    kv::decode_attention(full, rows, q.data(), n_heads, out.data(), bad);
    ADD_FAILURE() << "a lengths list shorter than the batch was accepted";
  } catch (const nuq::Error& e) {
    EXPECT_NE(std::string(e.what()).find("1 lengths for a batch of 8 rows"), std::string::npos) << e.what();
  }
}

}  // namespace
