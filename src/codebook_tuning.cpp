// Codebook tuning by distillation (include/nuq/codebook_tuning.hpp, docs/quantization.md).
//
// Each packed layer's weight is W[r, c] = lut[r, c / group, idx(r, c)] + sparse(r, c) with fixed indices,
// so ∂L/∂lut[r, g, k] is the sum of ∂L/∂W over the weights of row r, group g whose index is k: the
// decoder's weight gradient (LlamaBackward) folded by index. The entries are fp16 in the checkpoint; the
// optimizer keeps fp32 copies and the decoder always runs on their fp16 roundings (a straight-through
// estimate), so what was trained on is exactly what the written checkpoint computes.
#include "nuq/codebook_tuning.hpp"

#include <fmt/format.h>

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

namespace nuq {
namespace {

namespace fs = std::filesystem;

// One packed layer under tuning.
struct TunedLayer {
  std::string base;
  int64_t rows = 0, cols = 0, group = 0, entries_per_group = 0;
  std::vector<uint8_t> index;  // [rows, cols]
  std::vector<float> lut;      // fp32 master copy [rows, groups, entries]
  std::vector<float> m, v;     // Adam moments
  std::vector<float> scale;    // per (row, group): RMS of its initial entries
  std::vector<float> weight;   // [rows, cols]: what the decoder runs on
  std::vector<std::pair<int64_t, float>> sparse;  // (flat position, fp16 value as fp32), added after the LUT

  int64_t groups() const { return cols / group; }

  // weight = fp16(lut)[index] + sparse: exactly the reference dequantizer's numbers.
  void rebuild() {
    const int64_t G = groups(), E = entries_per_group;
    std::vector<float> rounded(lut.size());
    for (std::size_t i = 0; i < lut.size(); ++i) rounded[i] = fp16_to_float(float_to_fp16(lut[i]));
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c)
        weight[std::size_t(r * cols + c)] = rounded[std::size_t((r * G + c / group) * E + index[std::size_t(r * cols + c)])];
    for (const auto& [pos, value] : sparse) weight[std::size_t(pos)] += value;
  }
};

// Adam (β1 0.9, β2 0.999) on the entries, each step scaled by its codebook's RMS.
void adam_step(TunedLayer& L, const std::vector<float>& grad_w, double lr, int64_t t) {
  const int64_t G = L.groups(), E = L.entries_per_group;
  std::vector<double> g(L.lut.size(), 0.0);
  for (int64_t r = 0; r < L.rows; ++r)
    for (int64_t c = 0; c < L.cols; ++c)
      g[std::size_t((r * G + c / L.group) * E + L.index[std::size_t(r * L.cols + c)])] +=
          double(grad_w[std::size_t(r * L.cols + c)]);
  constexpr double b1 = 0.9, b2 = 0.999, eps = 1e-12;
  const double c1 = 1 - std::pow(b1, double(t)), c2 = 1 - std::pow(b2, double(t));
  for (std::size_t i = 0; i < L.lut.size(); ++i) {
    L.m[i] = float(b1 * L.m[i] + (1 - b1) * g[i]);
    L.v[i] = float(b2 * L.v[i] + (1 - b2) * g[i] * g[i]);
    const double mh = L.m[i] / c1, vh = L.v[i] / c2;
    L.lut[i] -= float(lr * L.scale[i / std::size_t(E)] * mh / (std::sqrt(vh) + eps));
  }
}

std::unique_ptr<TunedLayer> load_layer(const SafetensorsCheckpoint& ckpt, const std::string& base,
                                       const PackedTensorMeta& meta) {
  const format::PackedLinearView view = packed_view(ckpt, base, meta);
  validate_packed(view, base);
  auto L = std::make_unique<TunedLayer>();
  L->base = base, L->rows = view.rows, L->cols = view.cols, L->group = view.group_size;
  L->entries_per_group = format::lut_entries(view.bits);
  L->index.resize(std::size_t(view.rows * view.cols));
  unpack_indices(view.qweight, view.rows, view.cols, view.bits, L->index.data());
  const std::size_t n_lut = std::size_t(view.rows * view.groups() * L->entries_per_group);
  L->lut.resize(n_lut), L->m.assign(n_lut, 0.f), L->v.assign(n_lut, 0.f);
  for (std::size_t i = 0; i < n_lut; ++i) L->lut[i] = fp16_to_float(view.lut[i]);
  L->scale.resize(n_lut / std::size_t(L->entries_per_group));
  for (std::size_t s = 0; s < L->scale.size(); ++s) {
    double sq = 0;
    for (int64_t k = 0; k < L->entries_per_group; ++k) sq += double(L->lut[s * std::size_t(L->entries_per_group) + std::size_t(k)]) * L->lut[s * std::size_t(L->entries_per_group) + std::size_t(k)];
    // A codebook of zeros (a zero row) still gets a step size from the smallest fp16 normal.
    L->scale[s] = float(std::max(std::sqrt(sq / double(L->entries_per_group)), 6.1e-5));
  }
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

constexpr const char* kStateName = ".nuq-tune-state.safetensors";
constexpr const char* kStateKey = "nuq_tune_state";

// What a resumed run must share with the run that saved the state: the same inputs and settings give
// the same sequence of steps, so a resumed run ends where an uninterrupted one would.
std::string state_settings(const std::string& packed_path, const std::string& reference_path,
                           const std::vector<int32_t>& ids, int32_t start, const CodebookTuningOptions& o) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a over the token ids
  for (int32_t id : ids)
    for (int b = 0; b < 4; ++b) h = (h ^ ((uint32_t(id) >> (8 * b)) & 0xffu)) * 1099511628211ull;
  return fmt::format("{{\"model\": \"{}\", \"reference\": \"{}\", \"tokens\": {}, \"tokens_fnv1a\": \"{:016x}\", "
                     "\"start\": {}, \"ctx\": {}, \"epochs\": {}, \"lr\": {}}}",
                     fs::weakly_canonical(packed_path).string(), fs::weakly_canonical(reference_path).string(),
                     ids.size(), h, start, o.ctx, o.epochs, o.learning_rate);
}

// The optimizer's whole state after `step` steps (fp32 entries and both moments of every layer, and
// the KL sums so far), written atomically.
void save_state(const fs::path& path, const std::string& settings, int64_t step, double first, double last,
                const std::vector<std::unique_ptr<TunedLayer>>& layers) {
  SafetensorsWriter w(path.string(), {{kStateKey, settings},
                                      {"step", std::to_string(step)},
                                      {"first_kl_sum", fmt::format("{:.17g}", first)},
                                      {"last_kl_sum", fmt::format("{:.17g}", last)}});
  for (const auto& L : layers)
    for (const char* part : {".lut", ".m", ".v"}) w.declare(L->base + part, DType::F32, Shape{int64_t(L->lut.size())});
  for (const auto& L : layers) {
    w.write(L->base + ".lut", std::as_bytes(std::span<const float>(L->lut)));
    w.write(L->base + ".m", std::as_bytes(std::span<const float>(L->m)));
    w.write(L->base + ".v", std::as_bytes(std::span<const float>(L->v)));
  }
  w.finish();
}

// Restores a state saved with the same settings; returns the step it was saved after, or 0 when there is
// none. A state saved with other settings is an error (naming the file), not silently discarded.
int64_t load_state(const fs::path& path, const std::string& settings, double& first, double& last,
                   std::vector<std::unique_ptr<TunedLayer>>& layers) {
  if (!fs::exists(path)) return 0;
  SafetensorsFile f(path.string());
  const auto it = f.metadata().find(kStateKey);
  NUQ_CHECK(it != f.metadata().end() && it->second == settings, Errc::invalid_argument,
            "{}: an interrupted tuning with other inputs or settings is in this directory; repeat that run to finish "
            "it, or delete the file to start over",
            path.string());
  for (auto& L : layers)
    for (auto [part, dst] : {std::pair{".lut", &L->lut}, std::pair{".m", &L->m}, std::pair{".v", &L->v}}) {
      const Buffer b = to_float32(f.tensor(L->base + part));
      NUQ_CHECK(std::size_t(b.shape().numel()) == dst->size(), Errc::invalid_file, "{}: '{}{}' has the wrong size",
                path.string(), L->base, part);
      std::memcpy(dst->data(), b.data(), dst->size() * sizeof(float));
    }
  first = std::stod(f.metadata().at("first_kl_sum"));
  last = std::stod(f.metadata().at("last_kl_sum"));
  for (auto& L : layers) L->rebuild();
  return std::stoll(f.metadata().at("step"));
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

  auto student = LlamaModel::load(packed_path, {options.threads, true});
  auto teacher = LlamaModel::load(reference_path, {options.threads, true});
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
  std::map<std::pair<std::size_t, int>, TunedLayer*> tuned_at;
  CodebookTuningResult result;
  for (std::size_t b = 0; b < weights.blocks.size(); ++b)
    for (int k = 0; k < kLlamaLinearKinds; ++k) {
      LlamaLinearWeights& lw = weights.blocks[b].linear[std::size_t(k)];
      const auto it = packed.find(lw.name);
      if (it == packed.end()) continue;
      layers.push_back(load_layer(ckpt, it->first, it->second));
      lw.data = layers.back()->weight.data();
      tuned_at[{b, k}] = layers.back().get();
      result.entries += int64_t(layers.back()->lut.size());
    }
  NUQ_CHECK(!layers.empty(), Errc::invalid_argument,
            "{}: none of its packed layers is a linear layer of the decoder's blocks", packed_path);
  result.layers = int64_t(layers.size());
  LlamaBackward backward(weights, options.threads);

  const int64_t per = options.ctx - 1, total = int64_t(ids.size()), windows = (total + per - 1) / per;
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
  result.resumed_steps = load_state(state_path, settings, first, last, layers);
  NUQ_CHECK(result.resumed_steps <= result.steps, Errc::invalid_file, "{}: saved after step {} of {}",
            state_path.string(), result.resumed_steps, result.steps);
  for (int64_t step = result.resumed_steps; step < result.steps; ++step) {
    const auto t0 = std::chrono::steady_clock::now();
    const int epoch = int(step / windows);
    const int64_t wi = step % windows, begin = wi * per, len = std::min(per, total - begin);
    input.assign(1, start);
    input.insert(input.end(), ids.begin() + begin, ids.begin() + begin + len - 1);
    cache->length = 0;
    teacher->forward(input.data(), len, *cache, hidden.data());
    teacher->logits(hidden.data(), len, logits.data());
    backward.compute_distillation(input.data(), logits.data(), len, g);
    NUQ_CHECK(std::isfinite(g.loss), Errc::invalid_argument, "tune: window {} (tokens {}..{}) has a loss of {}", wi, begin,
              begin + len - 1, g.loss);
    for (const auto& [at, L] : tuned_at) adam_step(*L, g.linear[at.first][std::size_t(at.second)], options.learning_rate, step + 1);
    for (auto& L : layers) L->rebuild();
    if (epoch == 0) first += g.loss * double(len);
    if (epoch == options.epochs - 1) last += g.loss * double(len);
    if (options.save_every > 0 && (step + 1) % options.save_every == 0 && step + 1 < result.steps)
      save_state(state_path, settings, step + 1, first, last, layers);
    if (progress)
      progress({step, result.steps, epoch, g.loss,
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), result.resumed_steps});
  }
  result.first_epoch_kl = first / double(total);
  result.last_epoch_kl = last / double(total);

  // Write every file of the input, each packed layer's LUT replaced.
  std::map<std::string, const TunedLayer*> by_lut;
  for (const auto& L : layers) by_lut[L->base + format::kLutSuffix] = L.get();
  const std::string record = fmt::format(
      "distillation (mean KL per position) on {} tokens in windows of {}, {} epochs, Adam lr {} x codebook RMS; KL "
      "{:.5f} -> {:.5f}",
      total, options.ctx, options.epochs, options.learning_rate, result.first_epoch_kl, result.last_epoch_kl);
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
      const auto it = by_lut.find(info.name);
      if (it == by_lut.end()) {
        w.write(info.name, file->tensor_bytes(info));
        continue;
      }
      std::vector<uint16_t> lut16(it->second->lut.size());
      for (std::size_t i = 0; i < lut16.size(); ++i) lut16[i] = float_to_fp16(it->second->lut[i]);
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
      std::string content(std::size_t(e.file_size()), '\0');
      {
        std::FILE* f = std::fopen(e.path().c_str(), "rb");
        NUQ_CHECK(f, Errc::io, "{}: cannot open", e.path().string());
        const std::size_t got = std::fread(content.data(), 1, content.size(), f);
        std::fclose(f);
        NUQ_CHECK(got == content.size(), Errc::io, "{}: short read", e.path().string());
      }
      write_file_atomically((out_dir / name).string(), content);
      result.files.push_back(name);
    }
  fs::remove(state_path, ec);
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_begin).count();
  return result;
}

}  // namespace nuq
