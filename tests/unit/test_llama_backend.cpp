// LlamaLoadOptions::linear_backend, the hook the CUDA path (include/nuq/llama_cuda.hpp) plugs into, checked
// on the CPU with a backend that runs the scalar reference: every packed layer reaches it once at load,
// every forward call of every length reaches it, the logits equal the reference-decoded model's, and
// combinations that cannot work are refused. tests/unit/test_cuda_linear.cpp checks the CUDA backend on a
// GPU.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "nuq/error.hpp"
#include "nuq/linear_cpu.hpp"
#include "nuq/llama.hpp"
#include "nuq/quantize_checkpoint.hpp"
#include "llama_logits.hpp"
#include "random_llama.hpp"

namespace {

namespace fs = std::filesystem;
using nuq::LlamaModel;

// Runs every layer with the scalar reference and records what it was given.
class ReferenceBackend final : public nuq::LinearBackend {
 public:
  std::string description() const override { return "reference backend"; }
  int64_t add_layer(const std::string& name, const nuq::format::PackedLinearView& w) override {
    names.push_back(name);
    layers.push_back(w);
    return int64_t(layers.size()) - 1;
  }
  void run(int64_t id, const float* x, int64_t n, float* y) override {
    const auto& w = layers.at(size_t(id));
    nuq::cpu::linear_ref(w, x, w.cols, y, w.rows, n);
    call_lengths.insert(n);
    ++calls;
  }
  std::vector<std::string> names;
  std::vector<nuq::format::PackedLinearView> layers;
  std::set<int64_t> call_lengths;
  int64_t calls = 0;
};

struct Checkpoints {
  fs::path dir, fp32, packed;
};

const Checkpoints& checkpoints() {
  static Checkpoints c = [] {
    Checkpoints r;
    r.dir = fs::temp_directory_path() / ("nuq_llama_backend_" + std::to_string(::getpid()));
    fs::create_directories(r.dir);
    nuq::testing::write_random_llama2c(r.dir / "random.bin");
    r.fp32 = r.dir / "hf";
    LlamaModel::load((r.dir / "random.bin").string(), {1, false})->save_hf(r.fp32.string());
    r.packed = r.dir / "packed";
    nuq::CheckpointQuantizeOptions o;
    o.input = r.fp32.string();
    o.output_dir = r.packed.string();
    o.layer.bits = 3;
    o.layer.outlier_fraction = 0.01;  // the sparse part must reach the backend too
    o.threads = 1;
    nuq::quantize_checkpoint(o);
    return r;
  }();
  return c;
}

// The checkpoints live until the test program ends (packed models map their files).
class RemoveCheckpoints : public ::testing::Environment {
 public:
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(fs::temp_directory_path() / ("nuq_llama_backend_" + std::to_string(::getpid())), ec);
  }
};
const auto* const remove_checkpoints = ::testing::AddGlobalTestEnvironment(new RemoveCheckpoints);

using nuq::testing::logits_of;

TEST(LlamaLinearBackend, RunsEveryPackedLayerAndMatchesTheDecodedModel) {
  const Checkpoints& ck = checkpoints();
  auto backend = std::make_shared<ReferenceBackend>();
  nuq::LlamaLoadOptions with_backend{1, false};
  with_backend.linear_backend = backend;
  const auto model = LlamaModel::load(ck.packed.string(), with_backend);
  const auto decoded = LlamaModel::load(ck.packed.string(), {1, true});
  const auto& c = model->config();
  ASSERT_EQ(int64_t(backend->layers.size()), 7 * c.n_layers);
  EXPECT_EQ(std::set<std::string>(backend->names.begin(), backend->names.end()).size(), backend->names.size());
  int64_t nnz = 0;
  for (const auto& w : backend->layers) nnz += w.nnz;
  EXPECT_GT(nnz, 0);
  EXPECT_NE(model->description().find("reference backend"), std::string::npos) << model->description();
  EXPECT_EQ(model->linear_bits_per_weight(), decoded->linear_bits_per_weight());

  std::vector<int32_t> tokens(37);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = int32_t((i * 31 + 7) % size_t(c.vocab_size));
  // A prefill (one call of 37 tokens), then uneven steps like generation's.
  for (const std::vector<int64_t>& steps : {std::vector<int64_t>{37}, std::vector<int64_t>{1, 5, 16, 3}}) {
    backend->calls = 0;
    const auto got = logits_of(*model, tokens, steps);
    const auto want = logits_of(*decoded, tokens, steps);
    // Both multiply the same decoded weights in fp32; only the summation order differs.
    double max_diff = 0, max_abs = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      max_diff = std::max(max_diff, double(std::fabs(got[i] - want[i])));
      max_abs = std::max(max_abs, double(std::fabs(want[i])));
    }
    EXPECT_LE(max_diff, 1e-4 * max_abs) << "steps " << steps.size();
    int64_t expected_calls = 0;
    for (int64_t i = 0, s = 0; i < 37; s = (s + 1) % int64_t(steps.size())) {
      i += steps[size_t(s)];
      expected_calls += 7 * c.n_layers;
    }
    EXPECT_EQ(backend->calls, expected_calls);
  }
  EXPECT_TRUE(backend->call_lengths.count(37) && backend->call_lengths.count(1) && backend->call_lengths.count(16));
}

TEST(LlamaLinearBackend, FullPrecisionLayersStayOnTheCpu) {
  auto backend = std::make_shared<ReferenceBackend>();
  nuq::LlamaLoadOptions o{1, false};
  o.linear_backend = backend;
  const auto model = LlamaModel::load(checkpoints().fp32.string(), o);
  EXPECT_TRUE(backend->layers.empty());
  EXPECT_EQ(model->description().find("reference backend"), std::string::npos) << model->description();
  std::vector<int32_t> tokens{1, 2, 3};
  logits_of(*model, tokens, {3});
  EXPECT_EQ(backend->calls, 0);
}

TEST(LlamaLinearBackend, CannotBeCombinedWithDecodePacked) {
  nuq::LlamaLoadOptions o{1, true};
  o.linear_backend = std::make_shared<ReferenceBackend>();
  try {
    LlamaModel::load(checkpoints().packed.string(), o);
    FAIL() << "decode_packed with a backend was accepted";
  } catch (const nuq::Error& e) {
    EXPECT_EQ(e.code(), nuq::Errc::invalid_argument);
    EXPECT_NE(std::string(e.what()).find("decode_packed"), std::string::npos) << e.what();
  }
}

}  // namespace
