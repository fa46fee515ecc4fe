// Measured sensitivity on the real stories260K (include/nuq/measured_sensitivity.hpp): the decoder's forward
// stages, the divergence meter against a direct computation from whole-model logits, and the search's
// budget, determinism and resumption.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>

#include "nuq/error.hpp"
#include "nuq/llama.hpp"
#include "nuq/llama_grad.hpp"
#include "nuq/measured_sensitivity.hpp"
#include "nuq/packed.hpp"
#include "nuq/safetensors.hpp"
#include "nuq/tokenizer.hpp"
#include "test_paths.hpp"

namespace {

namespace fs = std::filesystem;

struct Stories {
  fs::path bin, tok;
  std::vector<int32_t> ids;
};

std::optional<Stories> stories() {
  const auto dir = nuq::testing::shared_data_dir();
  if (!dir || !fs::exists(*dir / "stories260K.bin")) return std::nullopt;
  Stories s{*dir / "stories260K.bin", *dir / "tok512.bin", {}};
  const auto tok = nuq::Tokenizer::load(s.tok.string());
  s.ids = tok->encode(nuq::read_small_file((*dir / "tinystories_valid.txt").string(), "text"));
  s.ids.resize(4096);
  return s;
}

#define SKIP_WITHOUT_STORIES(s) \
  if (!(s)) GTEST_SKIP() << "../shared/data/stories260K.bin is absent"

// KL(p_ref ‖ p) and NLL per position from two models' whole forward passes, in double, written without the
// meter's algebra (log-softmax of each row, then the sum of p·(log p − log q)).
nuq::Divergence direct_divergence(nuq::LlamaModel& ref, nuq::LlamaModel& model, const nuq::CalibrationWindows& w) {
  const int64_t V = ref.config().vocab_size, D = ref.config().dim;
  double kl = 0, nll = 0;
  int64_t n_pos = 0;
  for (int64_t i = 0; i < w.size(); ++i) {
    const auto& in = w.inputs[std::size_t(i)];
    const int64_t n = int64_t(in.size());
    std::vector<float> h1(std::size_t(n * D)), h2(std::size_t(n * D)), l1(std::size_t(n * V)), l2(std::size_t(n * V));
    auto c1 = ref.new_cache(n), c2 = model.new_cache(n);
    ref.forward(in.data(), n, *c1, h1.data());
    model.forward(in.data(), n, *c2, h2.data());
    ref.logits(h1.data(), n, l1.data());
    model.logits(h2.data(), n, l2.data());
    for (int64_t t = 0; t < n; ++t) {
      auto log_softmax = [&](const float* z) {
        double mx = z[0];
        for (int64_t v = 1; v < V; ++v) mx = std::max(mx, double(z[v]));
        double s = 0;
        for (int64_t v = 0; v < V; ++v) s += std::exp(double(z[v]) - mx);
        std::vector<double> out(static_cast<std::size_t>(V));
        for (int64_t v = 0; v < V; ++v) out[std::size_t(v)] = double(z[v]) - mx - std::log(s);
        return out;
      };
      const auto lp = log_softmax(&l1[std::size_t(t * V)]), lq = log_softmax(&l2[std::size_t(t * V)]);
      for (int64_t v = 0; v < V; ++v) kl += std::exp(lp[std::size_t(v)]) * (lp[std::size_t(v)] - lq[std::size_t(v)]);
      nll -= lq[std::size_t(w.targets[std::size_t(i)][std::size_t(t)])];
      ++n_pos;
    }
  }
  return {kl / double(n_pos), nll / double(n_pos)};
}

TEST(DecoderStages, EmbedBlocksAndNormEqualForward) {
  const auto s = stories();
  SKIP_WITHOUT_STORIES(s);
  const auto model = nuq::LlamaModel::load(s->bin.string(), {2, false});
  const int64_t n = 40, D = model->config().dim, L = model->config().n_layers;
  std::vector<float> whole(std::size_t(n * D)), staged(std::size_t(n * D)), x(std::size_t(n * D));
  auto cache = model->new_cache(n);
  model->forward(s->ids.data(), n, *cache, whole.data());
  EXPECT_EQ(cache->length, n);
  cache->length = 0;
  model->embed(s->ids.data(), n, x.data());
  model->forward_blocks(0, 2, x.data(), n, *cache);
  model->forward_blocks(2, 3, x.data(), n, *cache);
  model->forward_blocks(3, L, x.data(), n, *cache);
  EXPECT_EQ(cache->length, 0);
  model->final_norm(x.data(), n, staged.data());
  EXPECT_EQ(whole, staged);  // the same operations in the same order: bit for bit
  EXPECT_THROW(model->forward_blocks(2, L + 1, x.data(), n, *cache), nuq::Error);
  EXPECT_THROW(model->set_linear_weights("no.such.layer", x.data()), nuq::Error);
}

TEST(DivergenceMeter, MatchesWholeModelLogits) {
  const auto s = stories();
  SKIP_WITHOUT_STORIES(s);
  const auto ref = nuq::LlamaModel::load(s->bin.string(), {2, false});
  const auto model = nuq::LlamaModel::load(s->bin.string(), {2, false});
  const nuq::CalibrationWindows w = nuq::calibration_windows(s->ids, 1, 100, 0, 3);
  ASSERT_EQ(w.size(), 3);
  EXPECT_EQ(w.positions(), 3 * 99);
  nuq::DivergenceMeter meter(*model, w);
  const nuq::Divergence same = meter.measure(0);
  const nuq::Divergence direct_same = direct_divergence(*ref, *model, w);
  EXPECT_NEAR(same.kl, 0.0, 1e-9);
  EXPECT_NEAR(same.nll, direct_same.nll, 1e-6);
  EXPECT_NEAR(meter.reference_nll(), direct_same.nll, 1e-6);

  // Block 3's down projection scaled: the meter, starting at block 3 from its captured stream, sees what
  // two whole forward passes see.
  const nuq::LlamaWeights lw = model->weights();
  const nuq::LlamaLinearWeights& down = lw.blocks[3][nuq::LlamaLinearKind::down];
  std::vector<float> changed(down.data, down.data + down.rows * down.cols);
  for (std::size_t i = 0; i < changed.size(); i += 3) changed[i] *= 1.5f;
  model->set_linear_weights(down.name, changed.data());
  const nuq::Divergence suffix = meter.measure(3), whole = meter.measure(0);
  const nuq::Divergence direct = direct_divergence(*ref, *model, w);
  EXPECT_EQ(suffix.kl, whole.kl);
  EXPECT_EQ(suffix.nll, whole.nll);
  EXPECT_GT(direct.kl, 1e-4);
  EXPECT_NEAR(suffix.kl, direct.kl, 1e-6 * direct.kl + 1e-9);
  EXPECT_NEAR(suffix.nll, direct.nll, 1e-6);
}

// A small table of stories260K (converted to a Hugging Face checkpoint) for the search tests.
struct SmallTable {
  fs::path dir;
  std::string table, model;
  std::vector<int32_t> ids;
  ~SmallTable() {
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
};

std::unique_ptr<SmallTable> small_table(const Stories& s) {
  auto t = std::make_unique<SmallTable>();
  t->dir = fs::temp_directory_path() / ("nuq_measured_" + std::to_string(::getpid()));
  fs::create_directories(t->dir);
  t->model = (t->dir / "hf").string();
  nuq::LlamaModel::load(s.bin.string())->save_hf(t->model);
  t->table = (t->dir / "kl.safetensors").string();
  t->ids = s.ids;
  nuq::MeasuredTableOptions o;
  o.model = t->model;
  o.ids.assign(s.ids.begin(), s.ids.begin() + 63);
  o.ctx = 64;
  o.windows = 1;
  o.threads = 2;
  o.candidates = nuq::make_candidates({2, 3, 4}, {0.0}, {nuq::QuantMethod::nuq}, {0}, false);
  EXPECT_TRUE(nuq::measure_sensitivity_table(o, t->table));
  EXPECT_FALSE(nuq::measure_sensitivity_table(o, t->table));  // the same inputs: reused, not measured again
  return t;
}

TEST(PlanSearch, StaysWithinBudgetIsDeterministicAndResumes) {
  const auto s = stories();
  SKIP_WITHOUT_STORIES(s);
  const auto t = small_table(*s);
  const nuq::DivergenceTable table(t->table);
  ASSERT_EQ(table.layers().size(), 35u);
  std::vector<std::vector<nuq::AllocationChoice>> problem;
  for (const auto& l : table.layers()) {
    problem.emplace_back();
    for (const auto& c : l.candidates) problem.back().push_back({c.bytes, c.omega});
  }
  const nuq::CalibrationWindows pool = nuq::calibration_windows(t->ids, 1, 64, 2, 12);
  const uint64_t lo = nuq::minimum_bytes(problem);
  for (double f : {0.3, 0.6}) {
    nuq::PlanSearchOptions o;
    o.budget_bytes = lo + uint64_t(f * double(lo));
    o.max_generations = 6;
    o.offspring = 4;
    o.seed = 7;
    const nuq::Allocation start = nuq::allocate_bits(problem, o.budget_bytes);
    auto run = [&](const nuq::PlanSearchOptions& opt) {
      const auto model = nuq::LlamaModel::load(t->model, {2, false});
      return nuq::search_plan(*model, table, start.choice, pool, opt);
    };
    const nuq::PlanSearchResult a = run(o), b = run(o);
    uint64_t bytes = 0;
    for (std::size_t l = 0; l < a.choice.size(); ++l) bytes += table.layers()[l].candidates[std::size_t(a.choice[l])].bytes;
    EXPECT_LE(bytes, o.budget_bytes);
    EXPECT_EQ(a.choice, b.choice);
    EXPECT_EQ(a.generations, 6);
    EXPECT_EQ(a.evaluations, b.evaluations);

    // Stopped after 3 generations and continued from the saved state: the same plan as 6 in one go.
    nuq::PlanSearchOptions part = o;
    part.state_path = (t->dir / "state.json").string();
    fs::remove(part.state_path);
    part.max_generations = 3;
    const nuq::PlanSearchResult first = run(part);
    EXPECT_FALSE(first.resumed);
    part.max_generations = 6;
    const nuq::PlanSearchResult rest = run(part);
    EXPECT_TRUE(rest.resumed);
    EXPECT_EQ(rest.choice, a.choice);
    EXPECT_EQ(rest.evaluations, a.evaluations);
    // Another budget is another search: its state is refused.
    part.budget_bytes += 1;
    EXPECT_THROW(run(part), nuq::Error);
  }
}

}  // namespace
