// Codebook tuning by distillation (include/nuq/codebook_tuning.hpp, docs/quantization.md).
//
// Each packed layer's weight is W[r, c] = lut[r, c / group, idx(r, c)] + sparse(r, c); for fixed indices,
// ∂L/∂lut[r, g, k] is the sum of ∂L/∂W over the weights of row r, group g whose index is k: the decoder's
// weight gradient (LlamaBackward) folded by index. With tune_indices the indices move too
// (TunedLayer::reassign). The entries are fp16 in the checkpoint; the optimizer keeps fp32 copies and the
// decoder always runs on their fp16 roundings (a straight-through estimate), so what was trained on is
// exactly what the written checkpoint computes.
#include "nuq/codebook_tuning.hpp"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstring>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <map>
#include <memory>
#include <set>

#include "nuq/error.hpp"
#include "nuq/half.hpp"
#include "nuq/llama.hpp"
#include "nuq/llama_grad.hpp"
#include "nuq/packed.hpp"
#include "nuq/safetensors.hpp"
#include "nuq/tensor.hpp"
#include "cpu/thread_pool.hpp"
#include "dense_ops.hpp"
#include "run_identity.hpp"

namespace nuq {
namespace {

namespace fs = std::filesystem;

// Values under Adam (β1 0.9, β2 0.999): fp32 masters with their moments, and each block of `block`
// consecutive values has a scale (its initial RMS) that multiplies the step, so that a learning rate means
// the same for codebooks and gains of any magnitude.
struct AdamParams {
  std::string key;  // names the values in the saved state
  std::vector<float> value, m, v, scale;
  int64_t block = 1;

  void init(std::string k, std::vector<float> initial, int64_t block_size) {
    key = std::move(k), value = std::move(initial), block = block_size;
    m.assign(value.size(), 0.f), v.assign(value.size(), 0.f);
    scale.resize(value.size() / std::size_t(block));
    for (std::size_t s = 0; s < scale.size(); ++s) {
      double sq = 0;
      for (int64_t k2 = 0; k2 < block; ++k2) sq += double(value[s * std::size_t(block) + std::size_t(k2)]) * value[s * std::size_t(block) + std::size_t(k2)];
      // An all-zero block (a zero row) still gets a step size, that of the smallest fp16 normal.
      scale[s] = float(std::max(std::sqrt(sq / double(block)), 6.1e-5));
    }
  }

  template <class Gradient>
  void step(const Gradient& g, double lr, int64_t t) {
    constexpr double b1 = 0.9, b2 = 0.999, eps = 1e-12;
    const double c1 = 1 - std::pow(b1, double(t)), c2 = 1 - std::pow(b2, double(t));
    for (std::size_t i = 0; i < value.size(); ++i) {
      const double gi = double(g[i]);
      m[i] = float(b1 * m[i] + (1 - b1) * gi);
      v[i] = float(b2 * v[i] + (1 - b2) * gi * gi);
      value[i] -= float(lr * scale[i / std::size_t(block)] * (m[i] / c1) / (std::sqrt(v[i] / c2) + eps));
    }
  }
};

// One packed layer under tuning: the LUT entries are the parameters, and with tune_indices also each
// weight's offset from its entry.
struct TunedLayer {
  std::string base;
  int64_t rows = 0, cols = 0, group = 0, entries_per_group = 0;
  int bits = 0;
  std::size_t block = 0, kind = 0;  // where its gradient is in LlamaGradients::linear
  std::vector<uint8_t> index;  // [rows, cols]
  AdamParams lut;              // [rows, groups, entries]
  // With tune_indices: the straight-through weight is lut[index] + offset (fp32 masters), so it moves
  // with its entry and by its own gradient; `fixed` marks the weights of the sparse part, whose index
  // stays (their value is the sparse entry's business). `input_index` counts the changes at the end.
  AdamParams offset;  // [rows, cols]
  std::vector<uint8_t> fixed, input_index;
  std::vector<float> weight;   // [rows, cols]: what the decoder runs on
  std::vector<std::pair<int64_t, float>> sparse;  // (flat position, fp16 value as fp32), added after the LUT

  int64_t groups() const { return cols / group; }

  // weight = fp16(lut)[index] + sparse: exactly the reference dequantizer's numbers.
  void rebuild() {
    const int64_t G = groups(), E = entries_per_group;
    std::vector<float> rounded(lut.value.size());
    for (std::size_t i = 0; i < rounded.size(); ++i) rounded[i] = fp16_to_float(float_to_fp16(lut.value[i]));
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c)
        weight[std::size_t(r * cols + c)] = rounded[std::size_t((r * G + c / group) * E + index[std::size_t(r * cols + c)])];
    for (const auto& [pos, value] : sparse) weight[std::size_t(pos)] += value;
  }

  void init_offsets() {
    offset.init(base + "/offset", std::vector<float>(index.size(), 0.f), group);
    // A zero offset has no scale of its own; it steps in units of its codebook's RMS, as the entries do
    // (the weights of one row and group are contiguous, one offset block per codebook).
    offset.scale = lut.scale;
    fixed.assign(index.size(), 0);
    for (const auto& [pos, value] : sparse) fixed[std::size_t(pos)] = 1;
    input_index = index;
  }

  // Each weight reads the entry nearest to its straight-through value. Only a weight whose offset is
  // at least half its codebook's smallest gap between entries can have a nearer one, so the others are
  // skipped without a search.
  //
  // Why straight-through rather than a discrete step chosen by a quadratic model of the loss (mean
  // gradient plus Fisher curvature per weight, PV-tuning's V step): that was tried. Each layer's proposed
  // moves did lower the window's loss as predicted, but all layers' moves together overshot (moves
  // predicted to remove more than the whole KL raised it from 0.25 to 1.15), and even capped to a small
  // predicted decrease they raised the held-out KL on stories260K. The straight-through offsets move a
  // weight only after many steps agree, interleaved with the codebooks' own steps.
  void reassign() {
    const int64_t G = groups(), E = entries_per_group;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t gi = 0; gi < G; ++gi) {
        const float* entry = &lut.value[std::size_t((r * G + gi) * E)];
        float gap = INFINITY;
        for (int64_t a = 0; a < E; ++a)
          for (int64_t b = a + 1; b < E; ++b) gap = std::min(gap, std::fabs(entry[a] - entry[b]));
        for (int64_t c = gi * group; c < (gi + 1) * group; ++c) {
          const std::size_t i = std::size_t(r * cols + c);
          float& off = offset.value[i];
          if (fixed[i] || !(std::fabs(off) >= 0.5f * gap)) continue;
          const float target = entry[index[i]] + off;
          int64_t best = index[i];
          for (int64_t k = 0; k < E; ++k)
            if (std::fabs(target - entry[k]) < std::fabs(target - entry[best])) best = k;
          off = target - entry[best];
          index[i] = uint8_t(best);
        }
      }
  }

  int64_t changed() const {
    int64_t n = 0;
    for (std::size_t i = 0; i < index.size(); ++i) n += index[i] != input_index[i];
    return n;
  }

  // ∂L/∂lut from ∂L/∂W: the sum over the weights that read each entry.
  std::vector<double> fold(const std::vector<float>& grad_w) const {
    const int64_t G = groups(), E = entries_per_group;
    std::vector<double> g(lut.value.size(), 0.0);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c)
        g[std::size_t((r * G + c / group) * E + index[std::size_t(r * cols + c)])] += double(grad_w[std::size_t(r * cols + c)]);
    return g;
  }
};

// An RMSNorm gain (a full-precision tensor of the checkpoint), tuned with the codebooks when asked.
struct TunedGain {
  DType dtype = DType::F32;  // as stored; the decoder runs on the value rounded to it
  AdamParams gain;
  std::vector<float> used;

  void rebuild() {
    used.resize(gain.value.size());
    for (std::size_t i = 0; i < used.size(); ++i)
      used[i] = dtype == DType::F16    ? fp16_to_float(float_to_fp16(gain.value[i]))
                : dtype == DType::BF16 ? bf16_to_float(float_to_bf16(gain.value[i]))
                                       : gain.value[i];
  }
  std::vector<std::byte> stored_bytes() const {
    std::vector<std::byte> out(used.size() * dtype_size(dtype));
    for (std::size_t i = 0; i < used.size(); ++i) {
      if (dtype == DType::F32) std::memcpy(&out[i * 4], &used[i], 4);
      else {
        const uint16_t h = dtype == DType::F16 ? float_to_fp16(used[i]) : float_to_bf16(used[i]);
        std::memcpy(&out[i * 2], &h, 2);
      }
    }
    return out;
  }
};

std::unique_ptr<TunedLayer> load_layer(const SafetensorsCheckpoint& ckpt, const std::string& base,
                                       const PackedTensorMeta& meta) {
  const format::PackedLinearView view = packed_view(ckpt, base, meta);
  validate_packed(view, base);
  auto L = std::make_unique<TunedLayer>();
  L->base = base, L->rows = view.rows, L->cols = view.cols, L->group = view.group_size, L->bits = view.bits;
  L->entries_per_group = format::lut_entries(view.bits);
  L->index.resize(std::size_t(view.rows * view.cols));
  unpack_indices(view.qweight, view.rows, view.cols, view.bits, L->index.data());
  std::vector<float> lut(std::size_t(view.rows * view.groups() * L->entries_per_group));
  for (std::size_t i = 0; i < lut.size(); ++i) lut[i] = fp16_to_float(view.lut[i]);
  L->lut.init(base + format::kLutSuffix, std::move(lut), L->entries_per_group);
  for (int64_t r = 0; r < view.rows; ++r)
    for (int32_t j = view.nnz ? view.sparse_row_ptr[r] : 0; j < (view.nnz ? view.sparse_row_ptr[r + 1] : 0); ++j) {
      const int64_t c = format::sparse_cols_are_u16(view.cols) ? int64_t(static_cast<const uint16_t*>(view.sparse_col_idx)[j])
                                                               : int64_t(static_cast<const int32_t*>(view.sparse_col_idx)[j]);
      L->sparse.emplace_back(r * view.cols + c, fp16_to_float(view.sparse_values[j]));
    }
  L->weight.resize(std::size_t(view.rows * view.cols));
  L->rebuild();
  return L;
}

// A gain as the checkpoint stores it, after checking that it is the one the decoder loaded.
std::unique_ptr<TunedGain> load_gain(const SafetensorsCheckpoint& ckpt, const std::string& name, const float* loaded,
                                     int64_t dim) {
  NUQ_CHECK(!name.empty() && ckpt.contains(name), Errc::invalid_argument,
            "tune: the checkpoint has no RMSNorm gain tensor '{}' to tune", name);
  const Buffer b = to_float32(ckpt.tensor(name));
  NUQ_CHECK(b.shape().numel() == dim, Errc::invalid_file, "tune: '{}' has {} values, expected {}", name, b.shape().numel(), dim);
  const float* v = reinterpret_cast<const float*>(b.data());
  for (int64_t i = 0; i < dim; ++i)
    NUQ_CHECK(v[i] == loaded[i], Errc::invalid_file, "tune: '{}' is not the gain the decoder loaded (entry {})", name, i);
  auto G = std::make_unique<TunedGain>();
  G->dtype = ckpt.info(name).dtype;
  G->gain.init(name, std::vector<float>(v, v + dim), dim);
  G->rebuild();
  return G;
}

constexpr const char* kStateName = ".nuq-tune-state.safetensors";
constexpr const char* kStateKey = "nuq_tune_state";

// What a resumed run must share with the run that saved the state: the same inputs and settings give
// the same sequence of steps, so a resumed run ends where an uninterrupted one would.
std::string state_settings(const std::string& packed_path, const std::string& reference_path,
                           const std::vector<int32_t>& ids, int32_t start, const CodebookTuningOptions& o) {
  const uint64_t h = detail::token_ids_fnv1a(ids);
  return fmt::format("{{\"model\": \"{}\", \"reference\": \"{}\", \"tokens\": {}, \"tokens_fnv1a\": \"{:016x}\", "
                     "\"start\": {}, \"ctx\": {}, \"epochs\": {}, \"lr\": {}, \"norms\": {}, \"indices\": {}, "
                     "\"index_lr\": {}}}",
                     fs::weakly_canonical(packed_path).string(), fs::weakly_canonical(reference_path).string(),
                     ids.size(), h, start, o.ctx, o.epochs, o.learning_rate, o.tune_norms, o.tune_indices,
                     o.tune_indices ? o.index_learning_rate : 0.0);
}

// Index arrays (with tune_indices) saved beside the Adam parameters, by name.
using IndexArrays = std::vector<std::pair<std::string, std::vector<uint8_t>*>>;

// The optimizer's whole state after `step` steps (fp32 entries and both moments of every layer, the
// indices when they are tuned, and the KL sums so far), written atomically.
void save_state(const fs::path& path, const std::string& settings, int64_t step, double first, double last,
                const std::vector<AdamParams*>& params, const IndexArrays& indices) {
  SafetensorsWriter w(path.string(), {{kStateKey, settings},
                                      {"step", std::to_string(step)},
                                      {"first_kl_sum", fmt::format("{:.17g}", first)},
                                      {"last_kl_sum", fmt::format("{:.17g}", last)}});
  for (const AdamParams* p : params)
    for (const char* part : {"/value", "/m", "/v"}) w.declare(p->key + part, DType::F32, Shape{int64_t(p->value.size())});
  for (const auto& [key, index] : indices) w.declare(key, DType::U8, Shape{int64_t(index->size())});
  for (const AdamParams* p : params) {
    w.write(p->key + "/value", std::as_bytes(std::span<const float>(p->value)));
    w.write(p->key + "/m", std::as_bytes(std::span<const float>(p->m)));
    w.write(p->key + "/v", std::as_bytes(std::span<const float>(p->v)));
  }
  for (const auto& [key, index] : indices) w.write(key, std::as_bytes(std::span<const uint8_t>(*index)));
  w.finish();
}

// Restores a state saved with the same settings; returns the step it was saved after, or 0 when there is
// none. A state saved with other settings is an error (naming the file), not silently discarded.
int64_t load_state(const fs::path& path, const std::string& settings, double& first, double& last,
                   const std::vector<AdamParams*>& params, const IndexArrays& indices) {
  if (!fs::exists(path)) return 0;
  SafetensorsFile f(path.string());
  const auto it = f.metadata().find(kStateKey);
  NUQ_CHECK(it != f.metadata().end() && it->second == settings, Errc::invalid_argument,
            "{}: an interrupted tuning with other inputs or settings is in this directory; repeat that run to finish "
            "it, or delete the file to start over",
            path.string());
  for (AdamParams* p : params)
    for (auto [part, dst] : {std::pair{"/value", &p->value}, std::pair{"/m", &p->m}, std::pair{"/v", &p->v}}) {
      const Buffer b = to_float32(f.tensor(p->key + part));
      NUQ_CHECK(std::size_t(b.shape().numel()) == dst->size(), Errc::invalid_file, "{}: '{}{}' has the wrong size",
                path.string(), p->key, part);
      std::memcpy(dst->data(), b.data(), dst->size() * sizeof(float));
    }
  for (const auto& [key, index] : indices) {
    const SafetensorsTensorInfo* info = f.find(key);
    NUQ_CHECK(info && info->dtype == DType::U8 && info->nbytes() == index->size(), Errc::invalid_file,
              "{}: '{}' is missing or not {} bytes of U8", path.string(), key, index->size());
    const std::span<const std::byte> b = f.tensor_bytes(*info);
    std::memcpy(index->data(), b.data(), b.size());
  }
  first = std::stod(f.metadata().at("first_kl_sum"));
  last = std::stod(f.metadata().at("last_kl_sum"));
  return std::stoll(f.metadata().at("step"));
}

// config.json's quantization_config (transformers reads it, see hf_config_with_quantization) records the
// tuning as the safetensors metadata does; other companion files are copied as they are.
std::string with_tuning_recorded(const std::string& name, std::string text, const std::string& record) {
  if (name != "config.json") return text;
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object() || !j.contains(kQuantizationConfigKey) || !j[kQuantizationConfigKey].is_object()) return text;
  j[kQuantizationConfigKey]["extra"]["codebook_tuning"] = record;
  return j.dump(2) + "\n";
}

}  // namespace

CodebookTuningResult tune_codebooks(const std::string& packed_path, const std::string& reference_path,
                                    const std::vector<int32_t>& ids, int32_t start, const std::string& output_dir,
                                    const CodebookTuningOptions& options,
                                    const std::function<void(const CodebookTuningProgress&)>& progress) {
  const auto t_begin = std::chrono::steady_clock::now();
  NUQ_CHECK(options.ctx >= 2, Errc::invalid_argument, "tune: the window length must be at least 2 tokens, got {}",
            options.ctx);
  NUQ_CHECK(options.epochs >= 1, Errc::invalid_argument, "tune: epochs must be at least 1, got {}", options.epochs);
  NUQ_CHECK(std::isfinite(options.learning_rate) && options.learning_rate > 0, Errc::invalid_argument,
            "tune: the learning rate must be a positive number, got {}", options.learning_rate);
  NUQ_CHECK(!options.tune_indices || (std::isfinite(options.index_learning_rate) && options.index_learning_rate > 0),
            Errc::invalid_argument, "tune: the index learning rate must be a positive number, got {}",
            options.index_learning_rate);
  NUQ_CHECK(!ids.empty(), Errc::invalid_argument, "tune: no calibration tokens");
  const fs::path out_dir = fs::absolute(output_dir);
  const fs::path in_dir = fs::is_directory(packed_path) ? fs::absolute(packed_path) : fs::absolute(packed_path).parent_path();
  NUQ_CHECK(fs::weakly_canonical(out_dir) != fs::weakly_canonical(in_dir), Errc::invalid_argument,
            "tune: the output directory {} is the input's; write the tuned checkpoint elsewhere", out_dir.string());

  SafetensorsCheckpoint ckpt(packed_path);
  std::map<std::string, PackedTensorMeta> packed;
  for (const auto& file : ckpt.files()) {
    const auto it = file->metadata().find(kQuantizationConfigKey);
    if (it == file->metadata().end()) continue;
    for (const auto& [base, meta] : parse_quantization_config(it->second, file->path()).layers) packed[base] = meta;
  }
  NUQ_CHECK(!packed.empty(), Errc::invalid_argument, "{}: has no nuq-packed layer to tune", packed_path);

  // The backward pass reads fp32 arrays: packed layers decoded, other weights copied to fp32.
  LlamaLoadOptions load{options.threads, true};
  load.fp32_weights = true;
  auto student = LlamaModel::load(packed_path, load);
  auto teacher = LlamaModel::load(reference_path, load);
  const LlamaConfig &cs = student->config(), &ct = teacher->config();
  NUQ_CHECK(cs.dim == ct.dim && cs.n_layers == ct.n_layers && cs.vocab_size == ct.vocab_size &&
                cs.n_heads == ct.n_heads && cs.n_kv_heads == ct.n_kv_heads && cs.hidden_dim == ct.hidden_dim,
            Errc::invalid_argument,
            "tune: {} (dim {}, {} layers, vocabulary {}) is not a model of the same shape as {} (dim {}, {} layers, "
            "vocabulary {})",
            reference_path, ct.dim, ct.n_layers, ct.vocab_size, packed_path, cs.dim, cs.n_layers, cs.vocab_size);
  for (int32_t id : ids)
    NUQ_CHECK(id >= 0 && id < cs.vocab_size, Errc::invalid_argument, "tune: token id {} is outside the vocabulary of {}",
              id, cs.vocab_size);

  // The student's linear weights point at the tuned layers' buffers, which change in place every step.
  LlamaWeights weights = student->weights();
  std::vector<std::unique_ptr<TunedLayer>> layers;
  CodebookTuningResult result;
  for (std::size_t b = 0; b < weights.blocks.size(); ++b)
    for (int k = 0; k < kLlamaLinearKinds; ++k) {
      LlamaLinearWeights& lw = weights.blocks[b].linear[std::size_t(k)];
      const auto it = packed.find(lw.name);
      if (it == packed.end()) continue;
      layers.push_back(load_layer(ckpt, it->first, it->second));
      lw.data = layers.back()->weight.data();
      layers.back()->block = b, layers.back()->kind = std::size_t(k);
      result.entries += int64_t(layers.back()->lut.value.size());
    }
  // Gains: per block {attention, feed-forward}, then the final one; the decoder runs on their copies.
  std::vector<std::unique_ptr<TunedGain>> gains;
  if (options.tune_norms) {
    for (LlamaBlockWeights& bw : weights.blocks)
      for (auto [name, ptr] : {std::pair{&bw.attn_norm_name, &bw.attn_norm}, std::pair{&bw.ffn_norm_name, &bw.ffn_norm}}) {
        gains.push_back(load_gain(ckpt, *name, *ptr, cs.dim));
        *ptr = gains.back()->used.data();
      }
    gains.push_back(load_gain(ckpt, weights.final_norm_name, weights.final_norm, cs.dim));
    weights.final_norm = gains.back()->used.data();
  }
  std::vector<AdamParams*> params;
  IndexArrays index_arrays;
  for (auto& L : layers) params.push_back(&L->lut);
  if (options.tune_indices)
    for (auto& L : layers) {
      L->init_offsets();
      params.push_back(&L->offset);
      index_arrays.emplace_back(L->base + "/index", &L->index);
    }
  for (auto& G : gains) params.push_back(&G->gain);
  NUQ_CHECK(!layers.empty(), Errc::invalid_argument,
            "{}: none of its packed layers is a linear layer of the decoder's blocks", packed_path);
  result.layers = int64_t(layers.size());
  LlamaBackward backward(weights, options.threads);
  const int threads = cpu::detail::resolve_threads(options.threads);

  const int64_t total = int64_t(ids.size()), windows = window_count(total, options.ctx);
  result.windows = windows, result.tokens = total, result.steps = windows * options.epochs;
  auto cache = teacher->new_cache(options.ctx);
  std::vector<float> hidden(std::size_t(options.ctx * ct.dim)), logits(std::size_t(options.ctx * ct.vocab_size));
  std::vector<int32_t> input;
  LlamaGradients g;
  double first = 0, last = 0;
  std::error_code ec;
  fs::create_directories(out_dir, ec);
  NUQ_CHECK(!ec, Errc::io, "{}: cannot create: {}", out_dir.string(), ec.message());
  const fs::path state_path = out_dir / kStateName;
  const std::string settings = state_settings(packed_path, reference_path, ids, start, options);
  result.resumed_steps = load_state(state_path, settings, first, last, params, index_arrays);
  for (auto& L : layers) L->rebuild();
  for (auto& G : gains) G->rebuild();
  NUQ_CHECK(result.resumed_steps <= result.steps, Errc::invalid_file, "{}: saved after step {} of {}",
            state_path.string(), result.resumed_steps, result.steps);
  for (int64_t step = result.resumed_steps; step < result.steps; ++step) {
    const auto t0 = std::chrono::steady_clock::now();
    const int epoch = int(step / windows);
    const int64_t wi = step % windows;
    const auto [begin, len] = window_input(ids, start, options.ctx, wi, input);
    cache->length = 0;
    teacher->forward(input.data(), len, *cache, hidden.data());
    teacher->logits(hidden.data(), len, logits.data());
    backward.compute_distillation(input.data(), logits.data(), len, g);
    NUQ_CHECK(std::isfinite(g.loss), Errc::invalid_argument, "tune: window {} (tokens {}..{}) has a loss of {}", wi, begin,
              begin + len - 1, g.loss);
    // Cosine decay to zero after a linear warm-up over the first 5% of the steps: single-window gradients
    // are noisy, and the shrinking steps average that noise out at the end.
    const double warm = std::max<double>(1.0, 0.05 * double(result.steps));
    const double lr = options.learning_rate * std::min(1.0, double(step + 1) / warm) * 0.5 *
                      (1 + std::cos(3.14159265358979323846 * double(step) / double(result.steps)));
    const double index_lr = lr * options.index_learning_rate / options.learning_rate;
    // Layers are independent, so they update in parallel (each one's arithmetic, and so the result,
    // does not depend on the thread count): folding, Adam and rebuilding touch every weight (on
    // SmolLM2 with --indices a step went from 5.4 to 5.1 s).
    detail::dense_parallel_for(threads, int64_t(layers.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        TunedLayer& L = *layers[std::size_t(u)];
        const std::vector<float>& grad_w = g.linear[L.block][L.kind];
        L.lut.step(L.fold(grad_w), lr, step + 1);
        if (options.tune_indices) {
          L.offset.step(grad_w, index_lr, step + 1);
          L.reassign();
        }
        L.rebuild();
      }
    });
    for (std::size_t i = 0; i < gains.size(); ++i) {
      const std::vector<float>& gg = i + 1 == gains.size() ? g.final_norm : g.norms[i / 2][i % 2];
      gains[i]->gain.step(std::vector<double>(gg.begin(), gg.end()), lr, step + 1);
    }
    for (auto& G : gains) G->rebuild();
    if (epoch == 0) first += g.loss * double(len);
    if (epoch == options.epochs - 1) last += g.loss * double(len);
    if (options.save_every > 0 && (step + 1) % options.save_every == 0 && step + 1 < result.steps)
      save_state(state_path, settings, step + 1, first, last, params, index_arrays);
    if (progress)
      progress({step, result.steps, epoch, g.loss,
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), result.resumed_steps});
  }
  if (options.tune_indices)
    for (const auto& L : layers) result.indices_changed += L->changed();
  result.first_epoch_kl = first / double(total);
  result.last_epoch_kl = last / double(total);

  // Write every file of the input, each packed layer's LUT replaced.
  std::map<std::string, const TunedLayer*> by_lut, by_qweight;
  for (const auto& L : layers) by_lut[L->base + format::kLutSuffix] = L.get();
  if (options.tune_indices)
    for (const auto& L : layers) by_qweight[L->base + format::kQWeightSuffix] = L.get();
  std::map<std::string, const TunedGain*> by_gain;
  for (const auto& G : gains) by_gain[G->gain.key] = G.get();
  const std::string record = fmt::format(
      "distillation (mean KL per position) on {} tokens in windows of {}, {} epochs, Adam lr {} x RMS, cosine decay; "
      "{}{}; KL {:.5f} -> {:.5f}",
      total, options.ctx, options.epochs, options.learning_rate,
      gains.empty() ? "codebooks" : "codebooks and RMSNorm gains",
      options.tune_indices ? fmt::format(", indices (straight-through, lr {} x RMS; {} changed)", options.index_learning_rate,
                                         result.indices_changed)
                           : std::string(),
      result.first_epoch_kl, result.last_epoch_kl);
  std::set<std::string> written;
  for (const auto& file : ckpt.files()) {
    std::map<std::string, std::string> metadata = file->metadata();
    if (const auto it = metadata.find(kQuantizationConfigKey); it != metadata.end()) {
      QuantizationConfig config = parse_quantization_config(it->second, file->path());
      config.extra["codebook_tuning"] = record;
      it->second = to_json(config);
    }
    const std::string name = fs::path(file->path()).filename().string();
    SafetensorsWriter w((out_dir / name).string(), metadata);
    for (const SafetensorsTensorInfo& info : file->tensors()) w.declare(info.name, info.dtype, info.shape);
    for (const SafetensorsTensorInfo& info : file->tensors()) {
      if (const auto gt = by_gain.find(info.name); gt != by_gain.end()) {
        w.write(info.name, gt->second->stored_bytes());
        continue;
      }
      if (const auto qt = by_qweight.find(info.name); qt != by_qweight.end()) {
        const TunedLayer& L = *qt->second;
        std::vector<uint8_t> packed_bytes(info.nbytes());
        NUQ_CHECK(format::row_bytes(L.cols, L.bits) * L.rows == int64_t(info.nbytes()), Errc::invalid_file,
                  "{}: '{}' has {} bytes, expected {}", file->path(), info.name, info.nbytes(),
                  format::row_bytes(L.cols, L.bits) * L.rows);
        pack_indices(L.index.data(), L.rows, L.cols, L.bits, packed_bytes.data());
        w.write(info.name, std::as_bytes(std::span<const uint8_t>(packed_bytes)));
        continue;
      }
      const auto it = by_lut.find(info.name);
      if (it == by_lut.end()) {
        w.write(info.name, file->tensor_bytes(info));
        continue;
      }
      std::vector<uint16_t> lut16(it->second->lut.value.size());
      for (std::size_t i = 0; i < lut16.size(); ++i) lut16[i] = float_to_fp16(it->second->lut.value[i]);
      NUQ_CHECK(info.nbytes() == lut16.size() * 2, Errc::invalid_file, "{}: '{}' has {} bytes, expected {}",
                file->path(), info.name, info.nbytes(), lut16.size() * 2);
      w.write(info.name, std::as_bytes(std::span<const uint16_t>(lut16)));
    }
    w.finish();
    written.insert(name);
    result.files.push_back(name);
  }
  // Small companion files of a directory checkpoint (config.json, tokenizer, index, report).
  if (fs::is_directory(packed_path))
    for (const auto& e : fs::directory_iterator(in_dir)) {
      const std::string name = e.path().filename().string();
      if (!e.is_regular_file() || written.count(name) || e.path().extension() == ".safetensors" ||
          e.file_size() > (64u << 20))
        continue;
      const std::string text = read_small_file(e.path().string(), "a companion file");
      write_file_atomically((out_dir / name).string(), with_tuning_recorded(name, text, record));
      result.files.push_back(name);
    }
  fs::remove(state_path, ec);
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_begin).count();
  return result;
}

}  // namespace nuq
