// Text generation with nuq's LLaMA-family decoder: load a checkpoint (llama2.c, GGUF, safetensors, full
// precision or nuq-packed), encode a prompt, sample greedily or with a temperature, report tokens/s. The
// generation itself is nuq::generate_text (include/nuq/model_tasks.hpp), which nuq.generate runs too.
//
//   nuq_generate --model stories260K.bin --tokenizer tok512.bin --prompt "Once upon a time" --steps 64
//   nuq_generate --model quantized/SmolLM2/ --tokenizer SmolLM2.gguf --prompt "The capital of France is"
//
// --kv-calibration FILE (from `nuq kv-calibrate`) generates on a quantized KV cache (decode attention
// over the quantized pages) and reports its bytes against fp32 and fp16 caches.
//
// --device cuda (or cuda-bf16) runs the nuq-packed linear layers on the GPU (include/nuq/llama_cuda.hpp),
// the rest of the decoder on the CPU; builds without CUDA refuse it.
//
// --logits-out FILE --tokens 1,403,407 writes the logits of those tokens (fp32, [n, vocab]) instead;
// the tests compare them with an independent NumPy implementation.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "nuq/error.hpp"
#include "nuq/kv_cache.hpp"
#include "nuq/llama.hpp"
#include "nuq/model_tasks.hpp"
#ifdef NUQ_WITH_CUDA
#include "nuq/llama_cuda.hpp"
#endif
#include "nuq/safetensors.hpp"
#include "nuq/tokenizer.hpp"

namespace {

struct Args {
  std::string model, tokenizer, prompt = "Once upon a time", logits_out, tokens, tokenize, kv_calibration,
      device = "cpu", arithmetic = "fastest";
  int steps = 64, threads = 0;
  float temperature = 0.0f;
  bool decode_packed = false;
  uint64_t seed = 1;
};

[[noreturn]] void usage(const char* argv0) {
  std::fprintf(stderr,
               "usage: %s --model PATH [--tokenizer PATH] [--prompt TEXT] [--steps N] [--temperature T] [--seed S]\n"
               "          [--threads N] [--decode-packed | --arithmetic fastest|exact|int8 | --int8]\n"
               "          [--device cpu|cuda|cuda-bf16] [--kv-calibration FILE]\n"
               "          [--logits-out FILE --tokens ID,ID,...] [--tokenizer PATH --tokenize FILE]\n",
               argv0);
  std::exit(2);
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    if (k == "--decode-packed") {
      a.decode_packed = true;
      continue;
    }
    if (k == "--int8") {  // same as --arithmetic int8
      a.arithmetic = "int8";
      continue;
    }
    if (i + 1 >= argc) usage(argv[0]);
    const std::string v = argv[++i];
    if (k == "--model") a.model = v;
    else if (k == "--tokenizer") a.tokenizer = v;
    else if (k == "--prompt") a.prompt = v;
    else if (k == "--steps") a.steps = std::stoi(v);
    else if (k == "--temperature") a.temperature = std::stof(v);
    else if (k == "--seed") a.seed = std::stoull(v);
    else if (k == "--threads") a.threads = std::stoi(v);
    else if (k == "--logits-out") a.logits_out = v;
    else if (k == "--tokens") a.tokens = v;
    else if (k == "--tokenize") a.tokenize = v;
    else if (k == "--kv-calibration") a.kv_calibration = v;
    else if (k == "--device") a.device = v;
    else if (k == "--arithmetic") a.arithmetic = v;
    else usage(argv[0]);
  }
  if (a.model.empty() && a.tokenize.empty()) usage(argv[0]);
  return a;
}

// CUDA linear backends for --device cuda / cuda-bf16 in a build with CUDA; empty otherwise.
nuq::LinearBackendFactory backend_factory() {
#ifdef NUQ_WITH_CUDA
  return [](const std::string& device) -> std::shared_ptr<nuq::LinearBackend> {
    return nuq::cuda::make_linear_backend(device == "cuda" ? nuq::cuda::ActivationType::f16
                                                           : nuq::cuda::ActivationType::bf16);
  };
#else
  return nullptr;
#endif
}

int run(const Args& a) {
  if (!a.tokenize.empty()) {
    // Token ids of a whole file, space-separated: for comparisons with reference tokenizers.
    auto tok = nuq::Tokenizer::load(a.tokenizer);
    for (int32_t id : tok->encode(nuq::read_small_file(a.tokenize, "the text"))) std::printf("%d ", id);
    std::printf("\n");
    return 0;
  }
  const bool int8 = a.arithmetic == "int8";
  if (int8 && a.decode_packed) {
    std::fprintf(stderr, "error: --int8 applies to the packed kernels; it cannot be combined with --decode-packed\n");
    return 2;
  }
  if (!a.logits_out.empty()) {
    // The forward pass of generate_text, by hand: the same arithmetic choice (packed layers only).
    const std::optional<nuq::cpu::Arithmetic> arithmetic = nuq::cpu::arithmetic_from_string(a.arithmetic);
    NUQ_CHECK(arithmetic.has_value(), nuq::Errc::invalid_argument, "--arithmetic {}: expected fastest, exact or int8",
              a.arithmetic);
    nuq::LlamaLoadOptions load{a.threads, a.decode_packed, *arithmetic};
    if (a.device != "cpu") {
      NUQ_CHECK(a.device == "cuda" || a.device == "cuda-bf16", nuq::Errc::invalid_argument,
                "--device {}: expected cpu, cuda or cuda-bf16", a.device);
      NUQ_CHECK(!a.decode_packed && !int8, nuq::Errc::invalid_argument,
                "--device {} runs the packed layers on the GPU; --decode-packed and --int8 are CPU options", a.device);
      const auto make = backend_factory();
      NUQ_CHECK(make != nullptr, nuq::Errc::unsupported, "--device {}: this nuq_generate was built without CUDA",
                a.device);
      load.linear_backend = make(a.device);
    }
    auto model = nuq::LlamaModel::load(a.model, load);
    const nuq::LlamaConfig& c = model->config();
    std::vector<float> hidden, logits;
    std::optional<nuq::kv::Calibration> kv_calibration;
    if (!a.kv_calibration.empty()) kv_calibration = nuq::kv::load_calibration(a.kv_calibration);
    auto new_cache = [&](int64_t capacity) {
      return kv_calibration ? model->new_cache(capacity, *kv_calibration) : model->new_cache(capacity);
    };
    std::vector<int32_t> ids;
    std::stringstream ss(a.tokens);
    for (std::string t; std::getline(ss, t, ',');) ids.push_back(int32_t(std::stol(t)));
    NUQ_CHECK(!ids.empty(), nuq::Errc::invalid_argument, "--logits-out needs --tokens");
    auto cache = new_cache(int64_t(ids.size()));
    hidden.resize(ids.size() * std::size_t(c.dim));
    logits.resize(ids.size() * std::size_t(c.vocab_size));
    model->forward(ids.data(), int64_t(ids.size()), *cache, hidden.data());
    model->logits(hidden.data(), int64_t(ids.size()), logits.data());
    std::ofstream out(a.logits_out, std::ios::binary);
    out.write(reinterpret_cast<const char*>(logits.data()), std::streamsize(logits.size() * 4));
    NUQ_CHECK(out.good(), nuq::Errc::io, "{}: cannot write", a.logits_out);
    return 0;
  }

  nuq::GenerateOptions g;
  g.model = a.model;
  g.tokenizer = a.tokenizer;
  g.prompt = a.prompt;
  g.steps = a.steps;
  g.temperature = a.temperature;
  g.seed = a.seed;
  g.threads = a.threads;
  g.decode_packed = a.decode_packed;
  g.arithmetic = a.arithmetic;
  g.device = a.device;
  g.make_backend = backend_factory();
  g.kv_calibration = a.kv_calibration;
  const nuq::GenerateResult r = nuq::generate_text(g, [&](const nuq::GenerateProgress& p) {
    using Stage = nuq::GenerateProgress::Stage;
    if (p.stage == Stage::loaded) {
      const nuq::LlamaConfig& c = p.model->config();
      std::fprintf(stderr, "%s: %s, %lld layers, dim %lld; linear layers %.3f bits/weight\n", a.model.c_str(),
                   p.model->description().c_str(), (long long)c.n_layers, (long long)c.dim,
                   p.model->linear_bits_per_weight());
    } else if (p.stage == Stage::prefilled) {
      std::printf("%s", a.prompt.c_str());
    } else {
      std::printf("%s", p.piece.c_str());
    }
    std::fflush(stdout);
  });
  std::printf("\n");
  const int generated = int(r.ids.size());
  std::fprintf(stderr,
               "prompt: %zu tokens in %.3f s (%.1f tokens/s); generated %d tokens in %.3f s (%.1f tokens/s; packed "
               "layers: %s)\n",
               r.prompt_ids.size(), r.prefill_seconds, double(r.prompt_ids.size()) / r.prefill_seconds, generated,
               r.decode_seconds, generated ? double(generated) / r.decode_seconds : 0.0, r.arithmetic.c_str());
  if (r.quantized_cache)
    std::fprintf(stderr,
                 "KV cache: quantized (%d-bit keys / %d-bit values), %lld tokens in %lld bytes of pages and sink "
                 "copies = %.1f%% of fp16 (%.0f bytes), %.1f%% of fp32 (%.0f bytes)\n",
                 r.kv_bits_k, r.kv_bits_v, (long long)r.cache_tokens, (long long)r.cache_bytes,
                 100.0 * double(r.cache_bytes) / r.cache_fp16_bytes, r.cache_fp16_bytes,
                 50.0 * double(r.cache_bytes) / r.cache_fp16_bytes, 2 * r.cache_fp16_bytes);
  else
    std::fprintf(stderr, "KV cache: fp32, %lld tokens in %.0f bytes (%lld allocated for %lld)\n",
                 (long long)r.cache_tokens, 2 * r.cache_fp16_bytes, (long long)r.cache_bytes,
                 (long long)r.cache_capacity);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse(argc, argv));
  } catch (const nuq::Error& e) {
    std::fprintf(stderr, "nuq_generate: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "nuq_generate: %s\n", e.what());
    return 2;
  }
}
