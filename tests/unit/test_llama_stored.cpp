// The decoder on weights as stored (LlamaLoadOptions::fp32_weights = false, the default): fp32 llama2.c
// files, fp16/bf16 safetensors and GGUF blocks are read in place from the mapping and converted a slab of
// rows at a time inside the products. Conversion is exact and the tiles see the same values in the same
// order, so the logits must equal, bit for bit, those of the same checkpoint copied to fp32 at load, with
// and without release_weights, for a prefill and for single-token steps.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "nuq/error.hpp"
#include "nuq/half.hpp"
#include "nuq/llama.hpp"
#include "nuq/llama_grad.hpp"
#include "nuq/safetensors.hpp"
#include "random_llama.hpp"
#include "test_paths.hpp"

namespace {

namespace fs = std::filesystem;
using nuq::LlamaLoadOptions;
using nuq::LlamaModel;

const fs::path& work_dir() {
  static const fs::path dir = [] {
    fs::path d = fs::temp_directory_path() / ("nuq_llama_stored_" + std::to_string(::getpid()));
    fs::create_directories(d);
    nuq::testing::write_random_llama2c(d / "random.bin");
    LlamaLoadOptions copy;
    copy.fp32_weights = true;
    LlamaModel::load((d / "random.bin").string(), copy)->save_hf((d / "f32").string());
    return d;
  }();
  return dir;
}

// The fp32 Hugging Face checkpoint rewritten with every tensor in `dtype` (F16 or BF16).
fs::path half_checkpoint(nuq::DType dtype) {
  const fs::path out = work_dir() / std::string(nuq::dtype_name(dtype));
  if (fs::exists(out / "model.safetensors")) return out;
  fs::create_directories(out);
  const nuq::SafetensorsCheckpoint src((work_dir() / "f32").string());
  std::vector<std::vector<uint16_t>> halves;
  std::vector<std::pair<std::string, nuq::ConstTensorView>> views;
  halves.reserve(src.tensor_names().size());
  for (const std::string& name : src.tensor_names()) {
    const nuq::ConstTensorView t = src.tensor(name);
    const auto n = std::size_t(t.shape().numel());
    std::vector<float> f(n);
    std::memcpy(f.data(), t.data(), n * sizeof(float));
    auto& h = halves.emplace_back(n);
    if (dtype == nuq::DType::BF16) nuq::convert_float_to_bf16(f.data(), h.data(), n);
    else nuq::convert_float_to_fp16(f.data(), h.data(), n);
    views.emplace_back(name, nuq::ConstTensorView(reinterpret_cast<const std::byte*>(h.data()), dtype, t.shape()));
  }
  nuq::write_safetensors((out / "model.safetensors").string(), views);
  fs::copy_file(work_dir() / "f32" / "config.json", out / "config.json");
  return out;
}

// Logits of a 13-token prefill followed by 3 single-token steps (the fused batch path and the
// generation path), concatenated.
std::vector<float> logits_of(const LlamaModel& model, const std::vector<int32_t>& tokens) {
  const int64_t vocab = model.config().vocab_size, dim = model.config().dim;
  auto cache = model.new_cache(64);
  std::vector<float> out, hidden, logits;
  auto run = [&](const int32_t* t, int64_t n) {
    hidden.resize(std::size_t(n * dim));
    logits.resize(std::size_t(n * vocab));
    model.forward(t, n, *cache, hidden.data());
    model.logits(hidden.data(), n, logits.data());
    out.insert(out.end(), logits.begin(), logits.end());
  };
  run(tokens.data(), 13);
  for (std::size_t i = 13; i < tokens.size(); ++i) run(&tokens[i], 1);
  return out;
}

std::vector<int32_t> some_tokens(int64_t vocab) {
  std::vector<int32_t> t;
  for (int i = 0; i < 16; ++i) t.push_back(int32_t((i * 37 + 11) % vocab));
  return t;
}

void expect_in_place_equals_copy(const std::string& path) {
  LlamaLoadOptions copy, in_place, released;
  copy.threads = in_place.threads = released.threads = 2;
  copy.fp32_weights = true;
  in_place.release_weights = LlamaLoadOptions::Release::never;
  released.release_weights = LlamaLoadOptions::Release::after_each_block;
  const auto reference = LlamaModel::load(path, copy);
  const std::vector<int32_t> tokens = some_tokens(reference->config().vocab_size);
  const std::vector<float> want = logits_of(*reference, tokens);
  for (const LlamaLoadOptions& o : {in_place, released}) {
    const std::vector<float> got = logits_of(*LlamaModel::load(path, o), tokens);
    ASSERT_EQ(got.size(), want.size());
    EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)), 0)
        << path << (o.release_weights == LlamaLoadOptions::Release::after_each_block ? " (released)" : "")
        << ": logits differ from the fp32 copy's";
  }
}

TEST(LlamaStored, Llama2cFp32InPlaceEqualsCopy) { expect_in_place_equals_copy((work_dir() / "random.bin").string()); }

TEST(LlamaStored, SafetensorsFp32InPlaceEqualsCopy) { expect_in_place_equals_copy((work_dir() / "f32").string()); }

TEST(LlamaStored, SafetensorsF16InPlaceEqualsCopy) {
  expect_in_place_equals_copy(half_checkpoint(nuq::DType::F16).string());
}

TEST(LlamaStored, SafetensorsBf16InPlaceEqualsCopy) {
  expect_in_place_equals_copy(half_checkpoint(nuq::DType::BF16).string());
}

// `automatic` releases only what would not fit comfortably: a model of a few MB keeps its pages.
TEST(LlamaStored, AutomaticReleaseKeepsSmallModelsResident) {
  const std::string path = (work_dir() / "random.bin").string();
  const std::string released = ", mapped pages released after each block";
  LlamaLoadOptions o;
  EXPECT_EQ(o.release_weights, LlamaLoadOptions::Release::automatic);
  EXPECT_EQ(LlamaModel::load(path, o)->description().find(released), std::string::npos);
  o.release_weights = LlamaLoadOptions::Release::after_each_block;
  EXPECT_NE(LlamaModel::load(path, o)->description().find(released), std::string::npos);
}

// A real GGUF file of quantized blocks (Q4_1 and the types beside it), read in place.
TEST(LlamaStored, GgufBlocksInPlaceEqualsCopy) {
  const auto models = nuq::testing::models_dir();
  const fs::path gguf = models ? *models / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf" : fs::path();
  if (!models || !fs::exists(gguf)) GTEST_SKIP() << "SmolLM2 GGUF absent (scripts/fetch-models.sh)";
  expect_in_place_equals_copy(gguf.string());
}

TEST(LlamaStored, HalfWeightsInPlaceRefuseTheBackwardPassAndNameTheOption) {
  const std::string bf16 = half_checkpoint(nuq::DType::BF16).string();
  try {
    (void)LlamaModel::load(bf16)->weights();
    FAIL() << "weights() of bf16 weights read in place should throw";
  } catch (const nuq::Error& e) {
    EXPECT_EQ(e.code(), nuq::Errc::unsupported);
    EXPECT_NE(std::string(e.what()).find("fp32_weights"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("BF16"), std::string::npos) << e.what();
  }
  LlamaLoadOptions copy;
  copy.fp32_weights = true;
  const auto model = LlamaModel::load(bf16, copy);
  EXPECT_EQ(model->weights().blocks.size(), std::size_t(model->config().n_layers));
  // fp32 in the mapping needs no copy for the backward pass either.
  EXPECT_NO_THROW((void)LlamaModel::load((work_dir() / "random.bin").string())->weights());
}

// Replacing a layer's weights (measured sensitivity, tuning) gives it an fp32 copy; the others stay mapped.
TEST(LlamaStored, ReplacedLayerRunsItsNewWeights) {
  const std::string bf16 = half_checkpoint(nuq::DType::BF16).string();
  LlamaLoadOptions copy;
  copy.fp32_weights = true;
  const auto a = LlamaModel::load(bf16), b = LlamaModel::load(bf16, copy);
  const nuq::LlamaWeights wb = b->weights();
  const nuq::LlamaLinearWeights& down = wb.blocks[1].linear[6];
  std::vector<float> w(down.data, down.data + down.rows * down.cols);
  for (float& x : w) x *= 0.5f;
  a->set_linear_weights(down.name, w.data());
  b->set_linear_weights(down.name, w.data());
  const std::vector<int32_t> tokens = some_tokens(a->config().vocab_size);
  const std::vector<float> got = logits_of(*a, tokens), want = logits_of(*b, tokens);
  EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)), 0);
  EXPECT_NE(got, logits_of(*LlamaModel::load(bf16), tokens));
}

}  // namespace
