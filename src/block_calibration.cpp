// `nuq calibrate --by-block` (include/nuq/model_tasks.hpp, CalibrateOptions::by_block): the calibration
// tokens' hidden states are kept for the whole text, and the model runs one decoder block at a time over
// all of them, so that only one block's weights (mapped, released after use) and one block's statistics
// are in memory at once — what lets a 7B model's XᵀX (32 blocks × ~690 MB) be collected in a few GiB.
// The numbers are those of the one-pass run: every layer sees the same inputs, window after window.
#include "block_calibration.hpp"

#include <fmt/format.h>

#include <chrono>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>

#include "activation_statistics.hpp"
#include "nuq/error.hpp"
#include "nuq/mapped_file.hpp"
#include "tensor_names.hpp"
#include "nuq/packed.hpp"
#include "nuq/quantize.hpp"
#include "nuq/safetensors.hpp"
#include "nuq/sensitivity.hpp"
#include "run_identity.hpp"

namespace nuq::detail {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;
using Clock = std::chrono::steady_clock;

constexpr int kStateVersion = 1;

std::string block_file(const char* prefix, int64_t block) { return fmt::format("{}-{:05d}.safetensors", prefix, block); }
std::string hidden_file(int64_t next_block) { return fmt::format("hidden-{:05d}.f32", next_block); }

// The calibration windows laid end to end, as the one-pass run cuts them (window_input): window w's
// inputs, BOS first, are rows [offset[w], offset[w + 1]) of the hidden states.
struct Windows {
  std::vector<int32_t> tokens;
  std::vector<int64_t> offset{0};
};

Windows cut_windows(const std::vector<int32_t>& ids, int32_t bos, int64_t ctx) {
  Windows w;
  std::vector<int32_t> input;
  for (int64_t i = 0, n = window_count(int64_t(ids.size()), ctx); i < n; ++i) {
    window_input(ids, bos, ctx, i, input);
    w.tokens.insert(w.tokens.end(), input.begin(), input.end());
    w.offset.push_back(int64_t(w.tokens.size()));
  }
  return w;
}

Json sequential_options(const std::optional<QuantizeOptions>& q) {
  if (!q) return nullptr;
  return {{"method", std::string(to_string(q->method))}, {"bits", q->bits},
          {"group_size", q->group_size},               {"outlier_fraction", q->outlier_fraction},
          {"outliers_per_row", q->outliers_per_row},   {"damping", q->hessian_damping}};
}

Json fingerprint(const CalibrateOptions& o, const std::vector<int32_t>& ids) {
  return {{"version", kStateVersion},        {"model", file_identity(o.model)},
          {"tokens", ids.size()},            {"token_ids_fnv1a", token_ids_fnv1a(ids)},
          {"ctx", o.ctx},                    {"hessian", !o.hessian.empty()},
          {"skip_tokens", o.skip_tokens},    {"sequential", sequential_options(o.sequential)}};
}

// Refuses before anything is written when the blocks still to run need more disk than there is.
void check_disk(const CalibrateOptions& o, const LlamaConfig& c, int64_t first_block, uint64_t hidden_bytes,
                const fs::path& work, const BlockProgress& progress) {
  const int64_t blocks = c.n_layers - first_block;
  // The XᵀX of the blocks still to run and the classifier's (in the last block's shard).
  const uint64_t xtx = hessian_bytes(c) - uint64_t(first_block) * hessian_bytes_per_block(c);
  const uint64_t need = 2 * hidden_bytes + (o.hessian.empty() ? 0 : xtx);
  std::error_code ec;
  const fs::space_info space = fs::space(work, ec);
  if (progress.plan) progress.plan(need, ec ? 0 : space.available, work.string());
  NUQ_CHECK(ec || space.available >= need, Errc::io,
            "{}: calibrating {} more blocks needs {:.2f} GiB (hidden states, XᵀX shards), only {:.2f} GiB are free",
            work.string(), blocks, double(need) / (1 << 30), double(space.available) / (1 << 30));
}

// Where an earlier run with the same inputs stopped: the next block, with `x` holding the hidden states
// after the blocks before it. Anything else in the work directory is discarded.
int64_t resume_point(const fs::path& work, const Json& want, std::vector<float>& x) {
  std::error_code ec;
  const fs::path state = work / "state.json";
  if (fs::exists(state)) {
    const Json j = Json::parse(read_small_file(state.string(), "the calibration state"), nullptr, false);
    if (j.is_object() && j.value("fingerprint", Json()) == want && j.contains("next_block")) {
      const int64_t next = j["next_block"].get<int64_t>();
      const fs::path hidden = work / hidden_file(next);
      if (fs::exists(hidden) && fs::file_size(hidden) == x.size() * sizeof(float)) {
        const MappedFile f(hidden.string());
        std::memcpy(x.data(), f.data(), f.size());
        return next;
      }
    }
  }
  fs::remove_all(work, ec);
  fs::create_directories(work, ec);
  NUQ_CHECK(!ec, Errc::io, "{}: cannot create the work directory: {}", work.string(), ec.message());
  return 0;
}

// Runs block `b` over every window, its statistics collected by the activation hook when `stats` is
// given (the sequential order's second run, through the quantized block, only moves `x` on).
void run_block(LlamaModel& model, int64_t b, const Windows& w, std::vector<float>& x, LlamaModel::Cache& cache,
               ActivationStatistics* stats) {
  if (stats)
    model.set_activation_hook(
        [stats](const std::string& layer, const float* in, int64_t n, int64_t cols) { stats->add(layer, in, n, cols); });
  const int64_t dim = model.config().dim;
  for (std::size_t i = 0; i + 1 < w.offset.size(); ++i) {
    cache.length = 0;
    model.forward_blocks(b, b + 1, x.data() + w.offset[i] * dim, w.offset[i + 1] - w.offset[i], cache);
  }
  model.set_activation_hook(nullptr);
}

// The classifier's input, the final normed hidden states of every window, into the last block's
// statistics (after the sequential order has replaced that block: the classifier then sees the outputs
// of the quantized blocks), in the order the one-pass run adds them.
void add_classifier_input(const LlamaModel& model, const Windows& w, const std::vector<float>& x,
                          ActivationStatistics& stats) {
  const int64_t dim = model.config().dim;
  std::vector<float> hidden;
  for (std::size_t i = 0; i + 1 < w.offset.size(); ++i) {
    const int64_t n = w.offset[i + 1] - w.offset[i];
    hidden.resize(std::size_t(n * dim));
    model.final_norm(x.data() + w.offset[i] * dim, n, hidden.data());
    stats.add(model.classifier_layer(), hidden.data(), n, dim);
  }
}

// Sequential order: block b's layers quantized with its XᵀX and replaced by their dequantized weights.
// The matrix is rounded to F32 first, as its shard stores it, so that `nuq quantize --hessian` with the
// same options finds the same weights.
void quantize_block(LlamaModel& model, const ActivationStatistics& stats, const QuantizeOptions& q) {
  for (const std::string& base : stats.layers()) {
    LlamaModel::LinearWeights w = model.linear_weights(base);
    std::vector<double> xtx = stats.hessian().matrix(stats.hessian().resolve(base));
    for (double& v : xtx) v = double(float(v));
    QuantizeOptions o = q;
    o.hessian = xtx.data();
    const PackedLinear packed = quantize_linear(w.weights.data(), nullptr, w.rows, w.cols, w.cols, o, base);
    dequantize_reference(packed.view(), w.weights.data());
    model.set_linear_weights(base, w.weights.data());
  }
}

// Block b's statistics, then the hidden states after it, then the state naming them: a run killed at any
// point resumes from a consistent block.
void save_block(const fs::path& work, int64_t b, const ActivationStatistics& stats, const std::vector<float>& x,
                const Json& fp, bool full) {
  stats.save_means((work / block_file("means", b)).string(), {});
  if (full) stats.hessian().save((work / block_file("xtx", b)).string());
  write_file_atomically((work / hidden_file(b + 1)).string(),
                        std::string_view(reinterpret_cast<const char*>(x.data()), x.size() * sizeof(float)));
  write_file_atomically((work / "state.json").string(), Json{{"fingerprint", fp}, {"next_block", b + 1}}.dump(1));
  std::error_code ec;
  fs::remove(work / hidden_file(b), ec);
}

// o.out from the per-block means: the tensors and metadata of the one-pass file, in its order.
int64_t write_means(const fs::path& work, int64_t blocks, const CalibrateOptions& o, const std::vector<int32_t>& ids) {
  std::map<std::string, std::vector<float>> means;  // by layer, as ActivationStatistics orders them
  for (int64_t b = 0; b < blocks; ++b) {
    const SafetensorsFile f((work / block_file("means", b)).string());
    for (const auto& t : f.tensors()) {
      const ConstTensorView v = f.tensor(t.name);
      const auto* p = reinterpret_cast<const float*>(v.data());
      means[detail::weight_base(t.name)].assign(p, p + v.shape().numel());
    }
  }
  std::vector<std::pair<std::string, ConstTensorView>> views;
  for (const auto& [layer, m] : means)
    views.emplace_back(layer + ".weight", ConstTensorView(reinterpret_cast<const std::byte*>(m.data()), DType::F32,
                                                          Shape{int64_t(m.size())}));
  write_safetensors(o.out, views,
                    {{"nuq_statistics", "activation_mean_square"},
                     {"tokens", std::to_string(ids.size())},
                     {"text", fs::path(o.text).filename().string()},
                     {"skip_tokens", std::to_string(o.skip_tokens)}});
  return int64_t(views.size());
}

// o.hessian as a directory: the per-block shards moved in, then an index whose metadata merges their
// counts and aliases (StatisticsFile and HessianAccumulator::load read it like one file). An earlier
// index goes first, so that the directory is never taken for complete while shards are replaced.
void write_hessian(const fs::path& work, int64_t blocks, const std::string& dir, const Json& sequential,
                   CalibrateResult& r) {
  const fs::path out(dir);
  std::error_code ec;
  fs::create_directories(out, ec);
  NUQ_CHECK(!ec, Errc::io, "{}: cannot create the directory: {}", dir, ec.message());
  fs::remove(out / "model.safetensors.index.json", ec);
  Json merged;
  std::vector<std::pair<std::string, std::string>> tensor_to_file;
  uint64_t total = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    const std::string name = block_file("xtx", b);
    // A run killed while moving shards left the earlier ones moved already; their work copies are gone.
    if (fs::exists(work / name) || !fs::exists(out / name)) fs::rename(work / name, out / name, ec);
    NUQ_CHECK(!ec, Errc::io, "{}: cannot move {} into it: {}", dir, name, ec.message());
    const SafetensorsFile f((out / name).string());
    const Json meta = Json::parse(f.metadata().at(kStatsMetadataKey));
    if (merged.is_null()) merged = meta;
    for (const char* key : {"counts", "aliases"}) merged[key].update(meta[key]);
    for (const auto& t : f.tensors()) {
      tensor_to_file.emplace_back(t.name, name);
      total += t.nbytes();
    }
    r.hessian_inputs += int64_t(meta["counts"].size());
    r.hessian_layers += int64_t(meta["counts"].size() + meta["aliases"].size());
  }
  std::map<std::string, std::string> metadata{{kStatsMetadataKey, merged.dump()}};
  if (!sequential.is_null()) metadata["nuq_sequential"] = sequential.dump();
  write_safetensors_index((out / "model.safetensors.index.json").string(), tensor_to_file, total, metadata);
}

}  // namespace

uint64_t hessian_bytes_per_block(const LlamaConfig& c) {
  uint64_t total = 0;
  for (int64_t cols : {c.dim, c.n_heads * c.head_dim, c.dim, c.hidden_dim}) total += uint64_t(cols * (cols + 1)) * 4;
  return total;
}

uint64_t hessian_bytes(const LlamaConfig& c) {
  return uint64_t(c.n_layers) * hessian_bytes_per_block(c) + uint64_t(c.dim * (c.dim + 1)) * 4;
}

void calibrate_blocks(LlamaModel& model, int32_t bos, const std::vector<int32_t>& ids, const CalibrateOptions& o,
                      const BlockProgress& progress, CalibrateResult& r) {
  NUQ_CHECK(!o.sequential || !o.hessian.empty(), Errc::invalid_argument,
            "the sequential order quantizes each block with its XᵀX: it needs the Hessian statistics");
  NUQ_CHECK(o.hessian.empty() || !fs::is_regular_file(o.hessian), Errc::invalid_argument,
            "{}: is a file; calibrating by block writes the Hessian statistics as a directory of per-block shards",
            o.hessian);
  const LlamaConfig& c = model.config();
  const Windows w = cut_windows(ids, bos, o.ctx);
  r.windows = int64_t(w.offset.size()) - 1;
  std::vector<float> x(w.tokens.size() * std::size_t(c.dim));
  const fs::path work = o.out + ".blocks";
  const Json fp = fingerprint(o, ids);
  const int64_t first = resume_point(work, fp, x);
  check_disk(o, c, first, x.size() * sizeof(float), work, progress);
  if (first == 0)
    for (std::size_t i = 0; i + 1 < w.offset.size(); ++i)
      model.embed(w.tokens.data() + w.offset[i], w.offset[i + 1] - w.offset[i], x.data() + w.offset[i] * c.dim);
  auto cache = model.new_cache(o.ctx);
  for (int64_t b = first; b < c.n_layers; ++b) {
    const auto t0 = Clock::now();
    const std::vector<float> inputs = o.sequential ? x : std::vector<float>();
    ActivationStatistics stats(!o.hessian.empty());
    run_block(model, b, w, x, *cache, &stats);
    if (o.sequential) {
      quantize_block(model, stats, *o.sequential);
      x = inputs;
      run_block(model, b, w, x, *cache, nullptr);  // the next block's inputs, through the quantized block
    }
    if (b + 1 == c.n_layers) add_classifier_input(model, w, x, stats);
    save_block(work, b, stats, x, fp, !o.hessian.empty());
    if (progress.block)
      progress.block(b, c.n_layers, first, std::chrono::duration<double>(Clock::now() - t0).count());
  }
  r.layers = write_means(work, c.n_layers, o, ids);
  if (!o.hessian.empty()) write_hessian(work, c.n_layers, o.hessian, sequential_options(o.sequential), r);
  std::error_code ec;
  fs::remove_all(work, ec);
}

}  // namespace nuq::detail
