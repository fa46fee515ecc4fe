// Whole-model tasks over a text: activation statistics (`nuq calibrate`), the Fisher diagonal (`nuq
// fisher`), perplexity (`nuq eval`) and generation (examples/generate.cpp). This is the library the
// command-line tools and the Python functions nuq.calibrate, nuq.fisher, nuq.evaluate and nuq.generate
// share; the tools only parse arguments and print.
//
// Each task loads a LLaMA-family checkpoint (include/nuq/llama.hpp) and its tokenizer and reports
// progress through a callback on the calling thread. An exception thrown by the callback stops the task
// and propagates unchanged; outputs are written atomically at the very end, so a stopped task leaves
// nothing half-written (none of these tasks has intermediate state worth resuming: `nuq quantize` and
// `nuq tune` are the resumable ones). Errors name options as ArgStyle says (`--max-tokens` or
// `max_tokens`).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "nuq/error.hpp"
#include "nuq/llama.hpp"
#include "nuq/quantize.hpp"

namespace nuq {

class Tokenizer;

// Makes the backend that runs packed layers on `device` ("cuda", "cuda-bf16"); set by callers built
// with CUDA (nuq::cuda::make_linear_backend), since this library never depends on CUDA. Empty: only
// "cpu" is available.
using LinearBackendFactory = std::function<std::shared_ptr<LinearBackend>(const std::string& device)>;

// The tokenizer a task uses: `given` when not empty, else the model's own (GGUF), else tokenizer.json
// next to a safetensors checkpoint. Throws Errc::invalid_argument naming the tokenizer option when
// there is none.
std::string find_tokenizer(const LlamaModel& model, const std::string& model_path, const std::string& given,
                           ArgStyle style);

// The token ids of a text file (tokenized as one string) after skipping `skip` tokens, at most
// `max_tokens` of them (0: all); checks that the tokenizer fits the model's vocabulary of `vocab` and that
// tokens remain. As `nuq fisher` and `nuq tune` read their calibration text.
std::vector<int32_t> calibration_tokens(const Tokenizer& tok, const std::string& tok_path, int64_t vocab,
                                        const std::string& text, int64_t skip, int64_t max_tokens, ArgStyle style);

// Progress of a task that runs a text in windows (calibrate, fisher, evaluate).
struct TextTaskProgress {
  enum class Stage {
    loaded,  // model, tokenizer and text are ready; `windows` and `tokens` are set, `window` is -1
    window,  // window `window` (0-based) of `windows` is done
    disk,    // by_block: `bytes_needed` will be written to `where`, which has `bytes_free`
    block,   // by_block: block `block` of `blocks` is done (blocks before `first_block` were resumed)
  };
  Stage stage = Stage::loaded;
  int64_t window = -1, windows = 0;
  int64_t tokens = 0;       // text tokens the task runs (after skip_tokens / max_tokens)
  int64_t tokens_done = 0;  // of those, the ones in finished windows
  // fisher: the window's loss; evaluate: the perplexity of the tokens so far; calibrate: 0.
  double value = 0;
  double window_seconds = 0;   // the window just finished
  double elapsed_seconds = 0;  // since the first window started
  double load_seconds = 0;     // loading model, tokenizer and text
  const LlamaModel* model = nullptr;  // the loaded model (description, config)
  int64_t block = -1, blocks = 0, first_block = 0;  // by_block
  double block_seconds = 0;
  uint64_t bytes_needed = 0, bytes_free = 0;
  std::string where;
};
using TextTaskCallback = std::function<void(const TextTaskProgress&)>;

// ---- nuq calibrate -----------------------------------------------------------------------------------

struct CalibrateOptions {
  std::string model;      // the checkpoint to be quantized (statistics carry its tensor names)
  std::string tokenizer;  // empty: find_tokenizer
  std::string text;       // UTF-8 file, tokenized as one string
  std::string out;        // mean of x² per input column of every linear layer, for `quantize --fisher`
  std::string hessian;    // optional: the full XᵀX / tokens of every layer input, for `quantize --hessian`
  int64_t ctx = 512, max_tokens = 32768, skip_tokens = 0;  // max_tokens 0: all
  int threads = 0;
  // Run the model one decoder block at a time over all tokens instead of window by window through every
  // block: memory holds one block's weights and statistics plus the tokens' hidden states (what a model
  // larger than memory needs), the work resumes after the last finished block when run again with the
  // same inputs (`<out>.blocks/` holds it meanwhile), and `hessian` is written as a directory of
  // per-block shards with an index. Same values as the one-pass run.
  bool by_block = false;
  // With by_block and hessian: GPTQ's sequential order. Each block's linear layers are quantized with
  // these options and the block's XᵀX (error feedback) as soon as its statistics are complete, and the
  // block runs again with the quantized weights to give the next block its inputs, so that later
  // statistics see the errors of earlier blocks. `nuq quantize --hessian` with the same options then
  // reproduces those weights.
  std::optional<QuantizeOptions> sequential;
  ArgStyle arg_style = ArgStyle::cli;
};

struct CalibrateResult {
  int64_t layers = 0;          // in `out`
  int64_t tokens = 0, windows = 0;
  int64_t hessian_inputs = 0;  // distinct matrices in `hessian` (q/k/v and gate/up share one)
  int64_t hessian_layers = 0;  // layers they cover
  double seconds = 0;          // the forward passes
};

// Runs the text through the model in windows of `ctx` tokens (BOS first) and writes `out` (and
// `hessian`), both atomically after the last window.
CalibrateResult calibrate_activations(const CalibrateOptions& options, const TextTaskCallback& progress = {});

// ---- nuq fisher --------------------------------------------------------------------------------------

struct FisherOptions {
  std::string model, tokenizer, text;
  std::string out;  // Fisher statistics file (docs/sensitivity.md), written atomically
  int64_t ctx = 512, max_tokens = 16384, skip_tokens = 0;
  int threads = 0;
  ArgStyle arg_style = ArgStyle::cli;
};

struct FisherResult {
  int64_t weights = 0;  // tensors in `out`
  int64_t windows = 0, tokens = 0;
  double mean_loss = 0;
  double seconds = 0;       // the backward passes
  double load_seconds = 0;
};

// Empirical Fisher diagonal of every linear weight, one squared gradient of the mean next-token loss per
// window (collect_fisher in include/nuq/llama_grad.hpp). Packed checkpoints are decoded first.
FisherResult compute_fisher(const FisherOptions& options, const TextTaskCallback& progress = {});

// ---- the quantized KV cache in a task (`--kv-*` options) ---------------------------------------------

struct KvCacheOptions {
  std::string calibration;  // from `nuq kv-calibrate` / nuq.save_kv_calibration; empty: fp32 cache
  std::string path;         // "kernel" (default) or "roundtrip"; needs `calibration`
  std::string method = "nuq";  // or "uniform" (int per token, needs `bits`, no calibration)
  int bits = 0;                // checked against the calibration, or uniform's width; 0: unset
  double outlier_fraction = -1;  // checked against the calibration; < 0: unset
  std::string outliers_text;     // the outlier fraction as the caller wrote it, for messages
};

struct KvCacheSetup {
  std::string description;  // empty: the fp32 cache
  // Set for the kernel path: make caches with LlamaModel::new_cache(capacity, *calibration).
  std::shared_ptr<const kv::Calibration> calibration;
};

// Sets up what the options ask: the model's KV hook (path "roundtrip", method "uniform") or the
// calibration of quantized caches (path "kernel"). Checks the options against each other and the model.
KvCacheSetup install_kv_cache(LlamaModel& model, const KvCacheOptions& options, ArgStyle style);

// ---- nuq eval ----------------------------------------------------------------------------------------

struct EvalOptions {
  std::string model, tokenizer, text;
  int64_t ctx = 512;
  int64_t max_tokens = 0;  // 0: the whole text
  // > 0: feed each window in forward calls of `step` tokens, as generation does (<= 16 runs packed
  // layers through the fused decode kernels); 0: the whole window at once (prefill).
  int64_t step = 0;
  int threads = 0;
  bool decode_packed = false;  // decode packed layers to fp32 at load (the reference numbers)
  // How packed layers multiply in forward calls of <= 16 tokens (cpu::Arithmetic): "fastest" (int8
  // where the CPU has the int8 kernel, else exact), "exact", or "int8" (which implies step 16 when step
  // is 0). The prefill path (step 0 or > 16) is exact whatever this says.
  std::string arithmetic = "fastest";
  std::string device = "cpu";  // "cpu", "cuda" or "cuda-bf16" (packed layers only)
  LinearBackendFactory make_backend;
  KvCacheOptions kv;
  ArgStyle arg_style = ArgStyle::cli;
};

// The fields of `nuq eval --json`.
struct EvalResult {
  std::string model, description, tokenizer, text, kv_cache;  // kv_cache: "fp32" or the quantized cache
  // How the packed layers multiplied: "exact" or "int8" (fused kernels), "exact (prefill)", "decoded to
  // fp32" (decode_packed), the device ("cuda", "cuda-bf16"), or "none (full-precision layers)".
  std::string arithmetic;
  double linear_bits_per_weight = 0;
  int64_t ctx = 0, windows = 0, tokens_scored = 0, step = 0;
  double mean_nll = 0, perplexity = 0, tokens_per_second = 0, load_seconds = 0, seconds = 0;
};

// Perplexity over non-overlapping windows that each start with BOS (docs/llama.md).
EvalResult evaluate_perplexity(const EvalOptions& options, const TextTaskCallback& progress = {});
// `nuq eval --json`'s object, indented by `indent` (-1: one line).
std::string to_json(const EvalResult& result, int indent = 1);

// ---- generation (examples/generate.cpp) --------------------------------------------------------------

struct GenerateOptions {
  std::string model, tokenizer, prompt;
  int64_t steps = 64;       // most tokens to generate (EOS or a full cache stops earlier)
  float temperature = 0;    // 0: greedy
  uint64_t seed = 1;        // for temperature > 0
  int threads = 0;
  bool decode_packed = false;
  std::string arithmetic = "fastest";  // as in EvalOptions
  std::string device = "cpu";
  LinearBackendFactory make_backend;
  std::string kv_calibration;  // quantized KV cache with this calibration; empty: fp32
  ArgStyle arg_style = ArgStyle::cli;
};

struct GenerateProgress {
  enum class Stage {
    loaded,     // model and tokenizer ready, prompt encoded (prompt_tokens set)
    prefilled,  // the prompt ran through the model
    token,      // token `token` (text `piece`) was generated as number `step` (0-based) of at most `steps`
  };
  Stage stage = Stage::loaded;
  int64_t step = -1, steps = 0, prompt_tokens = 0;
  int32_t token = -1;
  std::string piece;
  const LlamaModel* model = nullptr;
};

struct GenerateResult {
  std::string description;  // the model's
  double linear_bits_per_weight = 0;
  LlamaConfig config;
  std::vector<int32_t> prompt_ids;  // BOS and the prompt's tokens
  std::vector<int32_t> ids;         // generated (EOS not included)
  std::string text;                 // the generated tokens decoded
  std::string arithmetic;           // of the packed layers while decoding, as EvalResult::arithmetic
  double prefill_seconds = 0, decode_seconds = 0;
  // The cache at the end.
  int64_t cache_tokens = 0, cache_capacity = 0, cache_bytes = 0;
  bool quantized_cache = false;
  int kv_bits_k = 0, kv_bits_v = 0;
  double cache_fp16_bytes = 0;  // what an fp16 cache of the same tokens would take
};

GenerateResult generate_text(const GenerateOptions& options,
                             const std::function<void(const GenerateProgress&)>& progress = {});

}  // namespace nuq
