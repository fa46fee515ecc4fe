// nuq-packed embeddings and classifiers (`nuq quantize` with a plan or --include naming them): the
// decoder loads them, looks tokens up through the packed rows, runs the classifier on the packed kernels,
// and gives the logits of the same checkpoint decoded to fp32 at load (`decode_packed`): bit for bit on
// the prefill path (the same decoded values in the same dense tiles), within fp32 summation order on the
// fused kernels of generation-sized calls.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include "nuq/error.hpp"
#include "nuq/llama.hpp"
#include "nuq/llama_grad.hpp"
#include "nuq/quantize_checkpoint.hpp"
#include "nuq/safetensors.hpp"
#include "llama_logits.hpp"
#include "random_llama.hpp"

namespace {

namespace fs = std::filesystem;
using nuq::LlamaModel;

fs::path work_dir() { return fs::temp_directory_path() / ("nuq_packed_head_" + std::to_string(::getpid())); }

// A random model saved as Hugging Face safetensors, then quantized to 3 bits + 1% with the tensors that
// `include` selects.
fs::path quantized(const std::string& name, bool tied, const std::string& include) {
  const fs::path dir = work_dir() / name;
  fs::create_directories(dir);
  nuq::testing::write_random_llama2c(dir / "random.bin", tied);
  LlamaModel::load((dir / "random.bin").string(), {1, false})->save_hf((dir / "hf").string());
  nuq::CheckpointQuantizeOptions o;
  o.input = (dir / "hf").string();
  o.output_dir = (dir / "packed").string();
  o.layer.bits = 3;
  o.layer.outlier_fraction = 0.01;  // rows with and without nonzeros, as a real embedding has
  o.include = {include};
  o.threads = 1;
  nuq::quantize_checkpoint(o);
  return dir / "packed";
}

class RemoveWorkDir : public ::testing::Environment {
 public:
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(work_dir(), ec);
  }
};
const auto* const remove_work_dir = ::testing::AddGlobalTestEnvironment(new RemoveWorkDir);

using nuq::testing::logits_of;

std::vector<int32_t> some_tokens(int64_t vocab) {
  std::vector<int32_t> tokens(37);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = int32_t((i * 31 + 7) % size_t(vocab));
  return tokens;
}

void expect_matches_decoded(const fs::path& packed_dir) {
  const auto model = LlamaModel::load(packed_dir.string(), {1, false});
  const auto decoded = LlamaModel::load(packed_dir.string(), {1, true});
  const auto tokens = some_tokens(model->config().vocab_size);
  // One prefill call of 37 tokens: every layer, embedding and classifier included, decoded a slab at a
  // time into the tiles the decoded model multiplies: the same numbers.
  EXPECT_EQ(logits_of(*model, tokens, {37}), logits_of(*decoded, tokens, {37}));
  // Generation-sized calls go through the fused kernels (exact arithmetic): only the order of the fp32
  // sums differs.
  const auto got = logits_of(*model, tokens, {1, 5, 16, 3});
  const auto want = logits_of(*decoded, tokens, {1, 5, 16, 3});
  double max_diff = 0, max_abs = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    max_diff = std::max(max_diff, double(std::fabs(got[i] - want[i])));
    max_abs = std::max(max_abs, double(std::fabs(want[i])));
  }
  EXPECT_GT(max_abs, 0.0);
  EXPECT_LE(max_diff, 1e-4 * max_abs);
}

TEST(LlamaPackedHead, TiedEmbeddingPackedIsLookedUpAndMultipliedPacked) {
  const fs::path dir = quantized("tied", true, "embed_tokens|layers\\.");
  const nuq::SafetensorsCheckpoint ck(dir.string());
  ASSERT_TRUE(ck.contains("model.embed_tokens.qweight"));
  ASSERT_FALSE(ck.contains("model.embed_tokens.weight"));
  const auto model = LlamaModel::load(dir.string(), {1, false});
  EXPECT_TRUE(model->config().tied_classifier);  // no lm_head of either kind
  expect_matches_decoded(dir);
}

TEST(LlamaPackedHead, SeparateClassifierPackedRunsOnThePackedKernels) {
  const fs::path dir = quantized("untied", false, "lm_head|layers\\.");
  const nuq::SafetensorsCheckpoint ck(dir.string());
  ASSERT_TRUE(ck.contains("lm_head.qweight"));
  ASSERT_TRUE(ck.contains("model.embed_tokens.weight"));
  const auto model = LlamaModel::load(dir.string(), {1, false});
  EXPECT_FALSE(model->config().tied_classifier);  // lm_head is there, packed
  expect_matches_decoded(dir);
}

TEST(LlamaPackedHead, Fp32WeightsOfAPackedEmbeddingAreRefusedNamingIt) {
  const fs::path dir = quantized("refuse", true, "embed_tokens");
  const auto model = LlamaModel::load(dir.string(), {1, false});
  try {
    (void)model->weights();
    FAIL() << "weights() returned fp32 arrays for a packed embedding";
  } catch (const nuq::Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.embed_tokens"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("packed"), std::string::npos) << e.what();
  }
  // Decoded at load, the same checkpoint has fp32 arrays.
  EXPECT_NO_THROW((void)LlamaModel::load(dir.string(), {1, true})->weights());
}

}  // namespace
