// The decoder's backward pass (include/nuq/llama_grad.hpp) on the real stories260K model: gradients
// against central finite differences of a float64 loss, fp32 against float64, the two RoPE layouts against
// each other, a separate classifier, and Fisher accumulation against squared per-window gradients.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <deque>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "nuq/error.hpp"
#include "nuq/llama.hpp"
#include "nuq/llama_grad.hpp"
#include "nuq/sensitivity.hpp"
#include "nuq/tokenizer.hpp"
#include "test_paths.hpp"

namespace {

namespace fs = std::filesystem;
using nuq::LlamaLinearKind;
using nuq::LlamaWeights;

// The caller-owned copy of a model's weights that finite differences perturb.
struct OwnedWeights {
  std::deque<std::vector<float>> store;
  LlamaWeights w;
  explicit OwnedWeights(const LlamaWeights& src) : w(src) {
    const auto& c = src.config;
    auto copy = [&](const float* p, int64_t n) { return store.emplace_back(p, p + n).data(); };
    w.embedding = copy(src.embedding, c.vocab_size * c.dim);
    w.classifier = src.classifier == src.embedding ? w.embedding : copy(src.classifier, c.vocab_size * c.dim);
    w.final_norm = copy(src.final_norm, c.dim);
    for (auto& b : w.blocks) {
      b.attn_norm = copy(b.attn_norm, c.dim);
      b.ffn_norm = copy(b.ffn_norm, c.dim);
      for (auto& l : b.linear) l.data = copy(l.data, l.rows * l.cols);
    }
  }
  float& at(int64_t layer, LlamaLinearKind k, int64_t i) {
    return const_cast<float&>(w.blocks[std::size_t(layer)][k].data[i]);
  }
};

struct Stories {
  std::unique_ptr<nuq::LlamaModel> model;
  std::vector<int32_t> ids;  // text tokens
  int32_t bos = 1;
};

std::optional<Stories> load_stories() {
  const auto dir = nuq::testing::shared_data_dir();
  if (!dir || !fs::exists(*dir / "stories260K.bin")) return std::nullopt;
  Stories s;
  s.model = nuq::LlamaModel::load((*dir / "stories260K.bin").string(), {2, false});
  auto tok = nuq::Tokenizer::load((*dir / "tok512.bin").string());
  std::ifstream in(*dir / "tinystories_valid.txt", std::ios::binary);
  std::string text(20000, '\0');
  in.read(text.data(), std::streamsize(text.size()));
  text.resize(std::size_t(in.gcount()));
  s.ids = tok->encode(text);
  s.bos = tok->bos();
  return s;
}

#define NEED_STORIES(s)                                                                                \
  auto s##_opt = load_stories();                                                                       \
  if (!s##_opt) GTEST_SKIP() << "stories260K is absent from ../shared/data (set NUQ_SHARED_DATA)"; \
  Stories& s = *s##_opt

// BOS + the first n − 1 text tokens, predicting the first n text tokens (one `nuq eval` window).
void window(const Stories& s, int64_t n, std::vector<int32_t>& in, std::vector<int32_t>& tg) {
  in.assign(1, s.bos);
  in.insert(in.end(), s.ids.begin(), s.ids.begin() + n - 1);
  tg.assign(s.ids.begin(), s.ids.begin() + n);
}

// Central differences of the float64 loss in one fp32 weight: the perturbations are the exact fp32 steps
// (w ± h rounded), so the quotient has no rounding bias.
double finite_difference(OwnedWeights& ow, int64_t layer, LlamaLinearKind k, int64_t i, const std::vector<int32_t>& in,
                         const std::vector<int32_t>& tg, double h = 2e-3) {
  float& w = ow.at(layer, k, i);
  const float w0 = w;
  const float up = float(double(w0) + h), down = float(double(w0) - h);
  w = up;
  const double lu = nuq::llama_loss_f64(ow.w, in.data(), tg.data(), int64_t(in.size()));
  w = down;
  const double ld = nuq::llama_loss_f64(ow.w, in.data(), tg.data(), int64_t(in.size()));
  w = w0;
  return (lu - ld) / (double(up) - double(down));
}

// For `layers` and every kind: the largest-magnitude gradient entry and three random ones against finite
// differences. Returns the number of entries checked.
int check_against_finite_differences(OwnedWeights& ow, const std::vector<int64_t>& layers,
                                     const std::vector<int32_t>& in, const std::vector<int32_t>& tg) {
  const nuq::LlamaGradientsF64 g = nuq::llama_gradients_f64(ow.w, in.data(), tg.data(), int64_t(in.size()));
  std::mt19937_64 rng(7);
  int checked = 0;
  for (int64_t l : layers)
    for (int k = 0; k < nuq::kLlamaLinearKinds; ++k) {
      const std::vector<double>& gk = g.linear[std::size_t(l)][std::size_t(k)];
      EXPECT_EQ(int64_t(gk.size()), ow.w.blocks[std::size_t(l)].linear[std::size_t(k)].rows *
                                        ow.w.blocks[std::size_t(l)].linear[std::size_t(k)].cols);
      double gmax = 0;
      int64_t imax = 0;
      for (std::size_t i = 0; i < gk.size(); ++i)
        if (std::abs(gk[i]) > gmax) gmax = std::abs(gk[i]), imax = int64_t(i);
      if (gmax == 0) {
        ADD_FAILURE() << "layer " << l << " " << nuq::to_string(LlamaLinearKind(k)) << ": all gradients are zero";
        continue;
      }
      std::vector<int64_t> picks{imax};
      for (int r = 0; r < 3; ++r) picks.push_back(int64_t(rng() % gk.size()));
      for (int64_t i : picks) {
        const double fd = finite_difference(ow, l, LlamaLinearKind(k), i, in, tg);
        // Truncation error of central differences is O(h²·f'''); relative to the tensor's largest gradient.
        EXPECT_NEAR(gk[std::size_t(i)], fd, 1e-4 * gmax + 1e-9)
            << "layer " << l << " " << nuq::to_string(LlamaLinearKind(k)) << " entry " << i;
        ++checked;
      }
    }
  return checked;
}

TEST(LlamaGrad, LossMatchesDecoderAndPublishedFigure) {
  NEED_STORIES(s);
  const int64_t n = 511;
  std::vector<int32_t> in, tg;
  window(s, n, in, tg);
  // The decoder's own forward pass and a log-softmax written here.
  auto cache = s.model->new_cache(n);
  const auto& c = s.model->config();
  std::vector<float> hidden(std::size_t(n * c.dim)), logits(std::size_t(n * c.vocab_size));
  s.model->forward(in.data(), n, *cache, hidden.data());
  s.model->logits(hidden.data(), n, logits.data());
  double nll = 0;
  for (int64_t t = 0; t < n; ++t) {
    const float* l = &logits[std::size_t(t * c.vocab_size)];
    double mx = *std::max_element(l, l + c.vocab_size), sum = 0;
    for (int64_t v = 0; v < c.vocab_size; ++v) sum += std::exp(double(l[v]) - mx);
    nll += std::log(sum) + mx - l[tg[std::size_t(t)]];
  }
  nll /= double(n);
  nuq::LlamaBackward bw(s.model->weights(), 2);
  nuq::LlamaGradients g;
  bw.compute(in.data(), tg.data(), n, g);
  EXPECT_NEAR(g.loss, nll, 1e-5);
  EXPECT_NEAR(g.loss, 1.311, 6e-4);  // the published figure (../shared/data/README.md)
  EXPECT_NEAR(bw.loss(in.data(), tg.data(), n), g.loss, 1e-12);
  EXPECT_NEAR(nuq::llama_loss_f64(s.model->weights(), in.data(), tg.data(), n), nll, 1e-5);
}

// The RMSNorm gains' gradients (fp32 backward) against central differences of the float64 loss: the
// largest entry and two random ones of the attention and feed-forward gains of two layers and of the
// final gain.
TEST(LlamaGrad, NormGainGradientsMatchFiniteDifferences) {
  NEED_STORIES(s);
  std::vector<int32_t> in, tg;
  window(s, 64, in, tg);
  OwnedWeights ow(s.model->weights());
  nuq::LlamaBackward bw(ow.w, 2);
  nuq::LlamaGradients g;
  bw.compute(in.data(), tg.data(), int64_t(in.size()), g);
  const int64_t dim = ow.w.config.dim;
  ASSERT_EQ(g.norms.size(), ow.w.blocks.size());
  ASSERT_EQ(int64_t(g.final_norm.size()), dim);
  std::mt19937_64 rng(11);
  auto check = [&](const float* gain, const std::vector<float>& grad, const std::string& what) {
    ASSERT_EQ(int64_t(grad.size()), dim) << what;
    double gmax = 0;
    int64_t imax = 0;
    for (int64_t i = 0; i < dim; ++i)
      if (std::abs(grad[std::size_t(i)]) > gmax) gmax = std::abs(grad[std::size_t(i)]), imax = i;
    ASSERT_GT(gmax, 0.0) << what;
    for (int64_t i : {imax, int64_t(rng() % uint64_t(dim)), int64_t(rng() % uint64_t(dim))}) {
      float& w = const_cast<float&>(gain[i]);
      const float w0 = w, up = float(double(w0) + 2e-3), down = float(double(w0) - 2e-3);
      w = up;
      const double lu = nuq::llama_loss_f64(ow.w, in.data(), tg.data(), int64_t(in.size()));
      w = down;
      const double ld = nuq::llama_loss_f64(ow.w, in.data(), tg.data(), int64_t(in.size()));
      w = w0;
      EXPECT_NEAR(grad[std::size_t(i)], (lu - ld) / (double(up) - double(down)), 2e-3 * gmax) << what << " entry " << i;
    }
  };
  for (int64_t l : {1, 3}) {
    check(ow.w.blocks[std::size_t(l)].attn_norm, g.norms[std::size_t(l)][0], "attn_norm " + std::to_string(l));
    check(ow.w.blocks[std::size_t(l)].ffn_norm, g.norms[std::size_t(l)][1], "ffn_norm " + std::to_string(l));
  }
  check(ow.w.final_norm, g.final_norm, "final_norm");
}

// Distillation, pinned by two identities: against a teacher whose distribution is one-hot on the text's
// next token, KL(p ‖ q) is the NLL and its gradient the NLL's (which the finite-difference tests check);
// against the model's own logits the loss and every gradient are zero. A soft teacher (the model's logits
// scaled) gives the KL computed here from both sets of logits.
TEST(LlamaGrad, DistillationMatchesNllForOneHotTeacherAndVanishesForItself) {
  NEED_STORIES(s);
  const int64_t n = 97;
  std::vector<int32_t> in, tg;
  window(s, n, in, tg);
  const auto& c = s.model->config();
  auto cache = s.model->new_cache(n);
  std::vector<float> hidden(std::size_t(n * c.dim)), own(std::size_t(n * c.vocab_size));
  s.model->forward(in.data(), n, *cache, hidden.data());
  s.model->logits(hidden.data(), n, own.data());
  nuq::LlamaBackward bw(s.model->weights(), 2);
  nuq::LlamaGradients nll, kl;
  bw.compute(in.data(), tg.data(), n, nll);

  // exp(-200) underflows to 0 in double: p is exactly one-hot.
  std::vector<float> onehot(own.size(), -200.f);
  for (int64_t t = 0; t < n; ++t) onehot[std::size_t(t * c.vocab_size + tg[std::size_t(t)])] = 0.f;
  bw.compute_distillation(in.data(), onehot.data(), n, kl);
  EXPECT_NEAR(kl.loss, nll.loss, 1e-6);
  for (std::size_t l = 0; l < kl.linear.size(); ++l)
    for (int k = 0; k < nuq::kLlamaLinearKinds; ++k) {
      const auto &a = kl.linear[l][std::size_t(k)], &b = nll.linear[l][std::size_t(k)];
      ASSERT_EQ(a.size(), b.size());
      double scale = 0, diff = 0;
      for (std::size_t i = 0; i < a.size(); ++i) scale = std::max(scale, double(std::abs(b[i]))),
                                                 diff = std::max(diff, double(std::abs(a[i] - b[i])));
      EXPECT_GT(scale, 0.0);
      EXPECT_LE(diff, 1e-5 * scale) << "layer " << l << " " << nuq::to_string(LlamaLinearKind(k));
    }

  bw.compute_distillation(in.data(), own.data(), n, kl);
  EXPECT_NEAR(kl.loss, 0.0, 1e-6);
  for (std::size_t l = 0; l < kl.linear.size(); ++l)
    for (int k = 0; k < nuq::kLlamaLinearKinds; ++k) {
      double diff = 0, scale = 0;
      for (float v : kl.linear[l][std::size_t(k)]) diff = std::max(diff, double(std::abs(v)));
      for (float v : nll.linear[l][std::size_t(k)]) scale = std::max(scale, double(std::abs(v)));
      EXPECT_LE(diff, 1e-4 * scale) << "layer " << l << " " << nuq::to_string(LlamaLinearKind(k));
    }

  std::vector<float> soft(own.size());
  for (std::size_t i = 0; i < own.size(); ++i) soft[i] = 0.5f * own[i];
  double expected = 0;
  for (int64_t t = 0; t < n; ++t) {
    const float *p = &soft[std::size_t(t * c.vocab_size)], *q = &own[std::size_t(t * c.vocab_size)];
    double mp = *std::max_element(p, p + c.vocab_size), mq = *std::max_element(q, q + c.vocab_size), sp = 0, sq = 0;
    for (int64_t v = 0; v < c.vocab_size; ++v) sp += std::exp(p[v] - mp), sq += std::exp(q[v] - mq);
    for (int64_t v = 0; v < c.vocab_size; ++v) {
      const double lp = p[v] - mp - std::log(sp), lq = q[v] - mq - std::log(sq);
      expected += std::exp(lp) * (lp - lq);
    }
  }
  expected /= double(n);
  EXPECT_GT(expected, 0.01);
  EXPECT_NEAR(bw.distillation_loss(in.data(), soft.data(), n), expected, 1e-5 * expected + 1e-6);

  soft[std::size_t(5 * c.vocab_size + 3)] = NAN;
  try {
    bw.compute_distillation(in.data(), soft.data(), n, kl);
    ADD_FAILURE() << "a NaN teacher logit was accepted";
  } catch (const nuq::Error& e) {
    EXPECT_NE(std::string(e.what()).find("logit 3 at position 5 is not finite"), std::string::npos) << e.what();
  }
}

TEST(LlamaGrad, InterleavedRopeMatchesFiniteDifferences) {
  NEED_STORIES(s);
  ASSERT_EQ(s.model->config().rope, nuq::RopeLayout::interleaved);
  ASSERT_LT(s.model->config().n_kv_heads, s.model->config().n_heads);  // grouped-query attention is exercised
  OwnedWeights ow(s.model->weights());
  std::vector<int32_t> in, tg;
  window(s, 40, in, tg);
  EXPECT_EQ(check_against_finite_differences(ow, {0, 2, 4}, in, tg), 3 * 7 * 4);
}

TEST(LlamaGrad, Float32MatchesFloat64) {
  NEED_STORIES(s);
  std::vector<int32_t> in, tg;
  window(s, 511, in, tg);
  const LlamaWeights w = s.model->weights();
  const nuq::LlamaGradientsF64 ref = nuq::llama_gradients_f64(w, in.data(), tg.data(), 511);
  nuq::LlamaBackward bw(w, 2);
  nuq::LlamaGradients g;
  bw.compute(in.data(), tg.data(), 511, g);
  EXPECT_NEAR(g.loss, ref.loss, 1e-5);
  for (std::size_t l = 0; l < ref.linear.size(); ++l)
    for (int k = 0; k < nuq::kLlamaLinearKinds; ++k) {
      const auto& a = g.linear[l][std::size_t(k)];
      const auto& b = ref.linear[l][std::size_t(k)];
      ASSERT_EQ(a.size(), b.size());
      double gmax = 0, err = 0;
      for (std::size_t i = 0; i < a.size(); ++i) {
        gmax = std::max(gmax, std::abs(b[i]));
        err = std::max(err, std::abs(double(a[i]) - b[i]));
      }
      EXPECT_LE(err, 2e-4 * gmax) << "layer " << l << " " << nuq::to_string(LlamaLinearKind(k));
    }
  // A second window through the same object reuses its buffers and must not depend on the first.
  nuq::LlamaGradients g2;
  std::vector<int32_t> in2(in.begin(), in.begin() + 100), tg2(tg.begin(), tg.begin() + 100);
  bw.compute(in2.data(), tg2.data(), 100, g2);
  nuq::LlamaBackward fresh(w, 1);
  nuq::LlamaGradients g3;
  fresh.compute(in2.data(), tg2.data(), 100, g3);
  EXPECT_DOUBLE_EQ(g2.loss, g3.loss);
  double diff = 0;
  for (std::size_t i = 0; i < g2.linear[0][0].size(); ++i)
    diff = std::max(diff, double(std::abs(g2.linear[0][0][i] - g3.linear[0][0][i])));
  EXPECT_LE(diff, 1e-6);
}

// The same model written with Hugging Face names and half-split RoPE (Q/K rows permuted by save_hf): its
// gradients are the interleaved model's, with the same row permutation, and match finite differences.
TEST(LlamaGrad, HalfSplitRopeGradientsArePermutedInterleavedOnes) {
  NEED_STORIES(s);
  const fs::path dir = fs::temp_directory_path() / ("nuq_grad_hf_" + std::to_string(::getpid()));
  s.model->save_hf(dir.string());
  auto hf = nuq::LlamaModel::load(dir.string());
  ASSERT_EQ(hf->config().rope, nuq::RopeLayout::half_split);
  std::vector<int32_t> in, tg;
  window(s, 64, in, tg);
  const auto a = nuq::llama_gradients_f64(s.model->weights(), in.data(), tg.data(), 64);
  const auto b = nuq::llama_gradients_f64(hf->weights(), in.data(), tg.data(), 64);
  EXPECT_NEAR(a.loss, b.loss, 1e-12);
  const auto& c = s.model->config();
  const int64_t hd = c.head_dim, half = hd / 2, D = c.dim;
  for (std::size_t l = 0; l < a.linear.size(); ++l)
    for (int k = 0; k < nuq::kLlamaLinearKinds; ++k) {
      const auto& ga = a.linear[l][std::size_t(k)];
      const auto& gb = b.linear[l][std::size_t(k)];
      ASSERT_EQ(ga.size(), gb.size());
      const bool permuted = k == int(LlamaLinearKind::q) || k == int(LlamaLinearKind::k);
      double gmax = 0, err = 0;
      for (std::size_t i = 0; i < gb.size(); ++i) {
        const int64_t row = int64_t(i) / D, col = int64_t(i) % D;
        int64_t src = row;
        if (permuted) {  // half-split row h·hd + s·half + j holds interleaved row h·hd + 2j + s
          const int64_t h = row / hd, r = row % hd, sidx = r / half, j = r % half;
          src = h * hd + 2 * j + sidx;
        }
        const double va = permuted ? ga[std::size_t(src * D + col)] : ga[i];
        gmax = std::max(gmax, std::abs(va));
        err = std::max(err, std::abs(va - gb[i]));
      }
      EXPECT_LE(err, 1e-9 * gmax) << "layer " << l << " " << nuq::to_string(LlamaLinearKind(k));
    }
  OwnedWeights ow(hf->weights());
  std::vector<int32_t> in40, tg40;
  window(s, 40, in40, tg40);
  EXPECT_EQ(check_against_finite_differences(ow, {1, 3}, in40, tg40), 2 * 7 * 4);
  fs::remove_all(dir);
}

TEST(LlamaGrad, SeparateClassifierMatchesFiniteDifferences) {
  NEED_STORIES(s);
  OwnedWeights ow(s.model->weights());
  ASSERT_TRUE(ow.w.config.tied_classifier);
  const auto& c = ow.w.config;
  std::vector<float>& cls = ow.store.emplace_back(ow.w.embedding, ow.w.embedding + c.vocab_size * c.dim);
  std::mt19937_64 rng(3);
  std::normal_distribution<float> noise(0.0f, 0.02f);
  for (float& v : cls) v += noise(rng);
  ow.w.classifier = cls.data();
  ow.w.config.tied_classifier = false;
  std::vector<int32_t> in, tg;
  window(s, 40, in, tg);
  const double tied = nuq::llama_loss_f64(s.model->weights(), in.data(), tg.data(), 40);
  EXPECT_NE(nuq::llama_loss_f64(ow.w, in.data(), tg.data(), 40), tied);  // the classifier is really used
  EXPECT_EQ(check_against_finite_differences(ow, {0, 4}, in, tg), 2 * 7 * 4);
}

TEST(LlamaGrad, CollectFisherSumsSquaredWindowGradients) {
  NEED_STORIES(s);
  const int64_t ctx = 32, per = ctx - 1;
  const std::vector<int32_t> ids(s.ids.begin(), s.ids.begin() + 3 * per + 10);  // 3 full windows + 10 tokens
  nuq::LlamaBackward bw(s.model->weights(), 2);
  nuq::FisherAccumulator acc;
  int calls = 0;
  const auto r = nuq::collect_fisher(bw, ids, s.bos, ctx, acc, [&](int64_t w, int64_t windows, double, double) {
    EXPECT_EQ(w, calls++);
    EXPECT_EQ(windows, 4);
  });
  EXPECT_EQ(r.windows, 4);
  EXPECT_EQ(r.tokens, int64_t(ids.size()));
  // Windows built here from the definition: start token + the window's tokens but its last; every token
  // is a target once.
  nuq::LlamaBackward ref(s.model->weights(), 1);
  const LlamaWeights w = s.model->weights();
  std::vector<std::vector<std::vector<double>>> sums(w.blocks.size(), std::vector<std::vector<double>>(7));
  double loss = 0;
  for (int64_t begin = 0; begin < int64_t(ids.size()); begin += per) {
    const int64_t len = std::min<int64_t>(per, int64_t(ids.size()) - begin);
    std::vector<int32_t> in{s.bos}, tg(ids.begin() + begin, ids.begin() + begin + len);
    in.insert(in.end(), tg.begin(), tg.end() - 1);
    nuq::LlamaGradients g;
    ref.compute(in.data(), tg.data(), len, g);
    loss += g.loss * double(len);
    for (std::size_t l = 0; l < w.blocks.size(); ++l)
      for (int k = 0; k < 7; ++k) {
        auto& sum = sums[l][std::size_t(k)];
        sum.resize(g.linear[l][std::size_t(k)].size());
        for (std::size_t i = 0; i < sum.size(); ++i) sum[i] += double(g.linear[l][std::size_t(k)][i]) * g.linear[l][std::size_t(k)][i];
      }
  }
  EXPECT_NEAR(r.mean_loss, loss / double(ids.size()), 1e-9);
  ASSERT_EQ(acc.names().size(), w.blocks.size() * 7);
  for (std::size_t l = 0; l < w.blocks.size(); ++l)
    for (int k = 0; k < 7; ++k) {
      const auto& lw = w.blocks[l].linear[std::size_t(k)];
      const std::string name = lw.name + ".weight";
      ASSERT_TRUE(acc.contains(name)) << name;
      EXPECT_EQ(acc.count(name), 4);
      EXPECT_EQ(acc.shape(name), (nuq::Shape{lw.rows, lw.cols}));
      const auto& got = acc.sum(name);
      const auto& want = sums[l][std::size_t(k)];
      double mx = 0, err = 0;
      for (std::size_t i = 0; i < want.size(); ++i) {
        mx = std::max(mx, want[i]);
        err = std::max(err, std::abs(got[i] - want[i]));
      }
      EXPECT_GT(mx, 0) << name;
      EXPECT_LE(err, 1e-6 * mx) << name;
    }
}

TEST(LlamaGrad, BadInputIsRejectedClearly) {
  NEED_STORIES(s);
  OwnedWeights ow(s.model->weights());
  std::vector<int32_t> in{1, 5, 600}, tg{5, 7, 9};
  nuq::LlamaBackward bw(ow.w, 1);
  nuq::LlamaGradients g;
  try {
    bw.compute(in.data(), tg.data(), 3, g);
    FAIL() << "out-of-vocabulary token accepted";
  } catch (const nuq::Error& e) {
    EXPECT_NE(std::string(e.what()).find("input token 600 at position 2"), std::string::npos) << e.what();
  }
  LlamaWeights bad = ow.w;
  bad.blocks[1][LlamaLinearKind::up].rows += 1;
  try {
    nuq::LlamaBackward b2(bad, 1);
    FAIL() << "inconsistent shape accepted";
  } catch (const nuq::Error& e) {
    EXPECT_NE(std::string(e.what()).find("block 1 weight up"), std::string::npos) << e.what();
  }
  // A non-finite weight makes every gradient NaN: the window is refused and nothing is accumulated.
  ow.at(2, LlamaLinearKind::gate, 0) = NAN;
  nuq::LlamaBackward b3(ow.w, 1);
  nuq::FisherAccumulator acc;
  const std::vector<int32_t> ids(s.ids.begin(), s.ids.begin() + 50);
  try {
    nuq::collect_fisher(b3, ids, s.bos, 64, acc);
    FAIL() << "NaN gradients accepted";
  } catch (const nuq::Error& e) {
    EXPECT_NE(std::string(e.what()).find("fisher: window 0"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("is nan"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(acc.names().empty());
}

}  // namespace
