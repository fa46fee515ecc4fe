// Backward pass through the LLaMA-family decoder of llama.hpp: the gradient of the mean next-token
// cross-entropy of one window with respect to every 2-D linear weight (q, k, v, o, gate, up, down of
// every block), and Fisher statistics built from it (docs/sensitivity.md, "Fisher from the decoder").
//
// The forward pass here re-implements LlamaModel::forward (same operations, same fp32 rounding points)
// but keeps every activation the backward pass needs; nothing is recomputed. Memory per window of n
// tokens is about n·(6·dim + 3·hidden)·4 bytes per layer plus heads·n²·4 bytes of attention
// probabilities per layer plus n·vocab·4 bytes of logits (SmolLM2-135M, n = 512: ~0.9 GB).
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "nuq/llama.hpp"

namespace nuq {

class FisherAccumulator;

// The seven linear layers of a block, in this order everywhere below.
enum class LlamaLinearKind { q, k, v, o, gate, up, down };
inline constexpr int kLlamaLinearKinds = 7;
const char* to_string(LlamaLinearKind kind);

// Dense fp32 weights of a decoder, as pointers (into a LlamaModel, or into the caller's own copies, e.g. to
// perturb one weight for a finite-difference check). A linear weight is row-major [rows, cols] and
// computes y = W x for an input x of `cols` values.
struct LlamaLinearWeights {
  std::string name;  // base name in the checkpoint's naming ("blk.0.attn_q", "model.layers.0.self_attn.q_proj")
  int64_t rows = 0, cols = 0;
  const float* data = nullptr;
};

struct LlamaBlockWeights {
  const float* attn_norm = nullptr;  // [dim]
  const float* ffn_norm = nullptr;   // [dim]
  // Checkpoint tensor names of the two gains ("model.layers.0.input_layernorm.weight", "blk.0.attn_norm.weight");
  // empty when the checkpoint has no such names (llama2.c).
  std::string attn_norm_name, ffn_norm_name;
  std::array<LlamaLinearWeights, kLlamaLinearKinds> linear;  // indexed by LlamaLinearKind
  LlamaLinearWeights& operator[](LlamaLinearKind k) { return linear[std::size_t(k)]; }
  const LlamaLinearWeights& operator[](LlamaLinearKind k) const { return linear[std::size_t(k)]; }
};

struct LlamaWeights {
  LlamaConfig config;
  const float* embedding = nullptr;   // [vocab, dim]
  const float* classifier = nullptr;  // [vocab, dim]; the embedding itself when config.tied_classifier
  const float* final_norm = nullptr;  // [dim]
  std::string final_norm_name;        // as the block gains' names
  std::vector<LlamaBlockWeights> blocks;
};

// Gradients of one window: per block and kind, a row-major [rows, cols] array like the weight.
struct LlamaGradients {
  double loss = 0;  // mean negative log-likelihood (natural log) over the scored positions
  int64_t positions = 0;
  std::vector<std::array<std::vector<float>, kLlamaLinearKinds>> linear;
  std::vector<std::array<std::vector<float>, 2>> norms;  // per block: attention and feed-forward RMSNorm gains [dim]
  std::vector<float> final_norm;                         // the final RMSNorm's gain [dim]
};

// The same in double precision (reference computations and gradient checks).
struct LlamaGradientsF64 {
  double loss = 0;
  int64_t positions = 0;
  std::vector<std::array<std::vector<double>, kLlamaLinearKinds>> linear;
};

// Computes loss and gradients for windows of one model, keeping scratch memory (activations, the
// transposed classifier) between calls. Not thread-safe; it uses `threads` worker threads itself.
class LlamaBackward {
 public:
  // Checks the weights (every pointer set, shapes consistent with the configuration) and throws
  // Errc::invalid_argument naming what is wrong. The weights must outlive this object.
  explicit LlamaBackward(LlamaWeights weights, int threads = 0);
  ~LlamaBackward();
  LlamaBackward(LlamaBackward&&) noexcept;

  const LlamaWeights& weights() const noexcept;

  // Runs inputs[0 .. n) from position 0 and scores position t against targets[t]: the loss is
  // mean_t −log softmax(logits_t)[targets[t]], and `out` receives its gradient with respect to every
  // linear weight (buffers reused when `out` already has the right sizes). fp32 arithmetic with the
  // decoder's rounding points; norms, softmax and the loss use double accumulators. Token ids outside the
  // vocabulary throw Errc::invalid_argument naming the position; so does n < 1.
  void compute(const int32_t* inputs, const int32_t* targets, int64_t n, LlamaGradients& out);

  // Distillation: the loss is the mean over positions of KL(p_t ‖ q_t), p_t = softmax of the teacher's
  // logits at position t (`teacher_logits`, [n, vocab] row-major, e.g. LlamaModel::logits of a reference
  // model on the same inputs) and q_t = softmax of this model's; `out` receives its gradient. Makes a
  // quantized model match its reference's whole next-token distribution rather than the text's one token.
  // A non-finite teacher logit throws Errc::invalid_argument naming the position.
  void compute_distillation(const int32_t* inputs, const float* teacher_logits, int64_t n, LlamaGradients& out);
  double distillation_loss(const int32_t* inputs, const float* teacher_logits, int64_t n);

  // The loss alone (forward only), fp32 as above.
  double loss(const int32_t* inputs, const int32_t* targets, int64_t n);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The same loss and gradients computed entirely in double precision (weights converted from fp32): a
// reference for checks, e.g. central finite differences, where fp32 rounding would swamp the signal.
// Unthreaded; meant for small models.
LlamaGradientsF64 llama_gradients_f64(const LlamaWeights& weights, const int32_t* inputs, const int32_t* targets,
                                      int64_t n);
double llama_loss_f64(const LlamaWeights& weights, const int32_t* inputs, const int32_t* targets, int64_t n);

// Progress of collect_fisher, called after each window: (window index, windows, its loss, seconds it took).
using FisherProgress = std::function<void(int64_t window, int64_t windows, double loss, double seconds)>;

struct FisherCollectResult {
  int64_t windows = 0;
  int64_t tokens = 0;  // predicted tokens
  double mean_loss = 0;
};

// Empirical Fisher diagonal over a token stream, one sample per window: the text is cut into the windows
// `nuq eval` uses (each window is `start` followed by ctx − 1 text tokens, and every text token is a
// target exactly once), and for each window the squared gradient of its mean loss is added to `acc`
// under "<linear name>.weight". A window whose gradient has a NaN/Inf throws Errc::invalid_argument
// naming the window, the tensor and the position, with nothing of that window added.
FisherCollectResult collect_fisher(LlamaBackward& backward, const std::vector<int32_t>& ids, int32_t start,
                                   int64_t ctx, FisherAccumulator& acc, const FisherProgress& progress = {});

}  // namespace nuq
