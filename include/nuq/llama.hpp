// A compact LLaMA-family decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU, tied or separate
// classifier) that runs real checkpoints with full-precision or nuq-packed weights on the CPU. It exists
// to prove the whole path end to end and to measure quality (`nuq eval`, examples/generate.cpp); it is
// not a serving engine. docs/llama.md lists the checkpoint layouts it reads.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "nuq/linear_cpu.hpp"

namespace nuq {

namespace kv {
struct Calibration;  // include/nuq/kv_cache.hpp (which includes this header)
}

// How RoPE pairs the dimensions of a head. llama2.c and GGUF (llama.cpp permutes Q/K rows when it
// converts) rotate adjacent pairs (2i, 2i+1); Hugging Face checkpoints rotate (i, i + head_dim/2).
enum class RopeLayout { interleaved, half_split };

struct LlamaConfig {
  int64_t dim = 0;         // model width
  int64_t hidden_dim = 0;  // SwiGLU width
  int64_t n_layers = 0;
  int64_t n_heads = 0;
  int64_t n_kv_heads = 0;
  int64_t head_dim = 0;    // dim / n_heads unless the checkpoint says otherwise
  int64_t vocab_size = 0;
  int64_t max_seq_len = 0;  // the context the model was trained for (informational)
  float norm_eps = 1e-5f;
  double rope_theta = 10000.0;
  RopeLayout rope = RopeLayout::interleaved;
  bool tied_classifier = true;  // the classifier is the token embedding
};

// Called with the input of every linear layer during forward(): `layer` is the weight's base name in
// the checkpoint's own naming (e.g. "blk.3.ffn_down" or "model.layers.3.mlp.down_proj"), x is
// [tokens, cols] row-major. Used to collect activation statistics (XᵀX) for calibration.
struct LlamaWeights;  // llama_grad.hpp

using ActivationHook = std::function<void(const std::string& layer, const float* x, int64_t tokens, int64_t cols)>;

// Called in forward() for every layer with the step's keys (before RoPE) and values, [n, n_kv_heads,
// head_dim], at positions pos0 .. pos0 + n - 1, before they are rotated and cached; may change them in
// place (e.g. pass them through a quantized KV cache's encoding, include/nuq/kv_cache.hpp).
using KvHook = std::function<void(int64_t layer, int64_t pos0, int64_t n, float* k, float* v)>;

// Runs the nuq-packed linear layers of a LlamaModel on another device (nuq::cuda::make_linear_backend,
// include/nuq/llama_cuda.hpp); norms, RoPE, attention, the embedding and the classifier stay on the CPU.
// Interfaces, not the CUDA types, cross this boundary so that the CPU library never depends on CUDA.
class LinearBackend {
 public:
  virtual ~LinearBackend() = default;
  // e.g. "CUDA device 0 (NVIDIA H100 80GB HBM3), fp16 activations"
  virtual std::string description() const = 0;
  // Copies one packed layer (host pointers, e.g. into the mapped checkpoint) to the device at load and
  // returns the id run() takes. `name` is the layer's base name, used in error messages. Throws
  // nuq::Error when the device cannot hold or run the layer.
  virtual int64_t add_layer(const std::string& name, const format::PackedLinearView& w) = 0;
  // y [n, rows] = x [n, cols] · Ŵᵀ for layer `id`; host fp32 arrays, row-major and contiguous. Returns
  // once y is written. Throws nuq::Error (an activation outside the device's activation type, a device
  // error).
  virtual void run(int64_t id, const float* x, int64_t n, float* y) = 0;
};

struct LlamaLoadOptions {
  int threads = 0;  // 0 = all cores
  // nuq-packed layers: false runs them through the packed CPU kernels (nuq::cpu::linear, the weights stay
  // packed in the memory map); true decodes them to fp32 at load with the reference dequantizer (the
  // exact numbers of the format, 32/b times the memory).
  bool decode_packed = false;
  // How packed layers multiply in the fused kernels (up to cpu::kMaxFusedBatch tokens per forward call,
  // i.e. generation); longer calls take the exact dense path whatever this says. The library keeps exact
  // (reproducible numbers everywhere); the tasks of model_tasks.hpp and their tools default to fastest.
  cpu::Arithmetic arithmetic = cpu::Arithmetic::exact;
  // Non-null: nuq-packed layers run there instead of on the CPU kernels (every call length; `arithmetic`
  // then does not apply). Cannot be combined with decode_packed; full-precision layers stay on the CPU.
  std::shared_ptr<LinearBackend> linear_backend = nullptr;
  // Full-precision weights (fp32/fp16/bf16 safetensors, GGUF F32/F16/BF16/Q8_0/Q4_x/Q5_x, llama2.c) are
  // read in place from the memory-mapped checkpoint and converted to fp32 a few rows at a time inside
  // the products, so the model takes its file's bytes, not 4 per weight; the logits are bit-identical to
  // those of an fp32 copy. true copies them to fp32 at load instead, as weights() (the backward pass)
  // needs for anything not stored as fp32.
  bool fp32_weights = false;
  // For models larger than memory: after each block of a forward pass (and after the classifier) the
  // mapped pages of its full-precision weights leave the resident set; they stay in the page cache, or
  // are read again from disk, on the next pass. Resident memory then holds about one block's weights.
  // `automatic` does so when the mapped weights exceed half of this machine's physical memory: below
  // that, keeping them resident saves re-reading them on every pass; above, a resident checkpoint would
  // be counted (and, beside the page cache and other jobs, killed) at its full size.
  enum class Release { never, after_each_block, automatic };
  Release release_weights = Release::automatic;
};

class LlamaModel {
 public:
  // Reads a llama2.c checkpoint (.bin), a GGUF file of architecture "llama", or a safetensors checkpoint
  // (file, directory or index) with Hugging Face or GGUF tensor names and full-precision or nuq-packed
  // linear layers. Hyperparameters come from the checkpoint: the llama2.c header, GGUF metadata,
  // config.json next to a safetensors checkpoint, or the gguf_metadata that `nuq quantize` carries over.
  static std::unique_ptr<LlamaModel> load(const std::string& path, const LlamaLoadOptions& options = {});
  ~LlamaModel();

  const LlamaConfig& config() const noexcept;
  // "llama2.c checkpoint, fp32 weights" / "safetensors, nuq-packed linear layers (3.38 bits/weight)".
  const std::string& description() const noexcept;
  // Average bits per weight over the linear layers of the decoder blocks, every stored byte counted
  // (32 for fp32 weights). The embedding and classifier are not included.
  double linear_bits_per_weight() const noexcept;
  int64_t linear_weight_count() const noexcept;
  // Linear layers that multiply packed (CPU kernels or a linear_backend); 0 for full-precision
  // checkpoints and with decode_packed.
  int64_t packed_layer_count() const noexcept;
  // Of those, the layers the CPU kernels multiply in int8 in forward calls of <= cpu::kMaxFusedBatch
  // tokens (cpu::fused_arithmetic of each layer under LlamaLoadOptions::arithmetic); the rest are exact.
  int64_t int8_layer_count() const;
  // The decoder block holding the linear layer with base name `base` (as in the checkpoint), or -1.
  int64_t block_of_linear(const std::string& base) const;
  // The base name of the classifier's weights as the checkpoint stores them: the embedding's when tied
  // (`model.embed_tokens`, `token_embd`), else `lm_head` / `output`. Calibration statistics of the
  // classifier's input (the final normed hidden states) go under this name, so that quantizing the
  // classifier (or a tied embedding) finds them.
  const std::string& classifier_layer() const noexcept;
  // Worker threads its products use (LlamaLoadOptions::threads resolved).
  int threads() const noexcept;
  // Where the tokenizer can be read from when it travels with the weights (GGUF metadata, a llama2.c
  // tokenizer is never inside the checkpoint): the checkpoint path, or empty.
  const std::string& embedded_tokenizer_path() const noexcept;

  struct Cache;  // per-sequence key/value cache
  // fp32 keys and values for up to `capacity` tokens, attended by the decoder's own fp32 attention.
  std::unique_ptr<Cache> new_cache(int64_t capacity) const;
  // A quantized KV cache (docs/kv-cache.md): one kv::LayerCache per layer with the given calibration
  // (from `nuq kv-calibrate`) and pages of `block_tokens`, RoPE as the model's. forward() quantizes each
  // step's pre-RoPE keys and values as it appends them (prefills in parallel) and attends with
  // kv::decode_attention over the pages, every query of a multi-token step restricted to the positions
  // up to its own. Pages are allocated as tokens arrive; `capacity` only bounds the length. Throws
  // Errc::invalid_argument when the calibration does not fit the model (layers, kv heads, head_dim) or
  // the head_dim is one the kernels do not support.
  std::unique_ptr<Cache> new_cache(int64_t capacity, const kv::Calibration& calibration, int block_tokens = 32) const;

  // Runs `n` tokens at positions cache.length() .. + n - 1, appending their keys and values to the cache
  // (which must have room), and writes the final hidden states (after the last RMSNorm), [n, dim], to
  // `hidden`. Throws nuq::Error for token ids outside the vocabulary or an overfull cache. Setting
  // cache.length to 0 starts a new sequence in the same cache; a quantized cache cannot be cut to any
  // other length (forward() throws).
  void forward(const int32_t* tokens, int64_t n, Cache& cache, float* hidden) const;
  // Logits [n, vocab] from final hidden states [n, dim].
  void logits(const float* hidden, int64_t n, float* out) const;

  // forward() in its three stages, for callers that keep the residual stream between blocks (e.g. to run
  // only the blocks after a changed layer, include/nuq/measured_sensitivity.hpp). forward() is
  // embed → forward_blocks(0, n_layers) → cache.length += n → final_norm, with the same numbers.
  // embed: x [n, dim] = the tokens' embeddings (ids outside the vocabulary throw, naming their position:
  // first_position + their index).
  void embed(const int32_t* tokens, int64_t n, float* x, int64_t first_position = 0) const;
  // Runs blocks [first, last) on the residual stream x [n, dim] in place, for positions cache.length ..
  // + n − 1, writing those blocks' keys and values into the cache; cache.length is left unchanged. A
  // quantized cache only runs every block at once.
  void forward_blocks(int64_t first, int64_t last, float* x, int64_t n, Cache& cache) const;
  // hidden [n, dim] = the final RMSNorm of x [n, dim].
  void final_norm(const float* x, int64_t n, float* hidden) const;

  // Replaces the fp32 weights [rows, cols] of the linear layer with base name `base` (as in the checkpoint,
  // e.g. "blk.3.ffn_down"), copied. Throws Errc::invalid_argument for an unknown name and Errc::unsupported
  // for a layer that runs packed. Not thread-safe against a concurrent forward().
  void set_linear_weights(const std::string& base, const float* weights);
  // A copy of the fp32 weights [rows, cols] of the linear layer `base`, decoded when packed or stored in
  // another type. Throws Errc::invalid_argument for an unknown name.
  struct LinearWeights {
    int64_t rows = 0, cols = 0;
    std::vector<float> weights;
  };
  LinearWeights linear_weights(const std::string& base) const;

  void set_activation_hook(ActivationHook hook);
  void set_kv_hook(KvHook hook);

  // The dense fp32 weights as pointers into this model, for the backward pass (llama_grad.hpp). Throws
  // Errc::unsupported when linear layers are nuq-packed and run packed (load with decode_packed = true)
  // or weights are stored in another type than fp32 (load with fp32_weights = true).
  LlamaWeights weights() const;

  // Writes the model as a Hugging Face LLaMA checkpoint: <dir>/model.safetensors (fp32, Hugging Face
  // tensor names, Q/K rows permuted to the half-split RoPE layout when the source rotates adjacent
  // pairs) and <dir>/config.json. Packed layers are written decoded. Lets llama2.c and GGUF models go
  // through `nuq quantize` and other tools.
  void save_hf(const std::string& dir) const;

  struct Impl;  // opaque; named here so the loaders in llama.cpp can fill it

 private:
  explicit LlamaModel(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// How `nuq eval`, `nuq fisher` and `nuq tune` cut a token stream into windows of `ctx` tokens: window w
// predicts ids[begin, begin + len) with begin = w·(ctx − 1), each from `start` (BOS) followed by the
// tokens before it in the window. window_input fills `input` with those len tokens and returns begin and
// len; the last window may be shorter.
struct TokenWindow {
  int64_t begin = 0, len = 0;
};
int64_t window_count(int64_t tokens, int64_t ctx);
TokenWindow window_input(const std::vector<int32_t>& ids, int32_t start, int64_t ctx, int64_t w,
                         std::vector<int32_t>& input);

struct LlamaModel::Cache {
  int64_t capacity = 0;
  int64_t length = 0;
  std::vector<float> k, v;  // fp32 cache: [layer][position][kv_head][head_dim], RoPE applied; else empty
  struct Quantized;         // per-layer kv::LayerCache, defined in llama.cpp
  std::shared_ptr<Quantized> quantized;  // null for the fp32 cache; copies of a Cache share it

  // Bytes that hold keys and values now: the fp32 arrays (sized for the whole capacity), or the quantized
  // pages in use (the last one partly filled) plus the fp16 sink copies.
  int64_t bytes() const;
};

}  // namespace nuq
