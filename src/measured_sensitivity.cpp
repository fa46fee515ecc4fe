// Measured sensitivity: the output divergence of a changed decoder and the per-layer table of it
// (include/nuq/measured_sensitivity.hpp, docs/sensitivity.md "Measured sensitivity").
#include "nuq/measured_sensitivity.hpp"


#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>

#include "dense_ops.hpp"
#include "nuq/error.hpp"
#include "nuq/inspect.hpp"
#include "nuq/llama.hpp"
#include "nuq/llama_grad.hpp"
#include "nuq/packed.hpp"
#include "nuq/quantize_checkpoint.hpp"
#include "nuq/safetensors.hpp"
#include "nuq/version.hpp"
#include "plan_inputs.hpp"
#include "run_identity.hpp"

namespace nuq {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;
using Clock = std::chrono::steady_clock;

constexpr int64_t kLogitRows = 32;  // positions whose logits are held at once: 32 × vocab floats
constexpr int kTableVersion = 1;
constexpr const char* kStatsKey = "nuq_stats";
constexpr const char* kLayerKey = "nuq_table_layer";

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// log Σ_v exp(z_v). The exponentials come from Eigen's vectorized float exp (a vocabulary of 50k entries
// per position makes a scalar exp a real share of the cost) and are summed in double by blocks; `e`
// receives exp(z_v − max z).
double log_sum_exp(const float* z, int64_t V, float* e, double* sum_out = nullptr) {
  const Eigen::Map<const Eigen::ArrayXf> a(z, V);
  const float mx = a.maxCoeff();
  Eigen::Map<Eigen::ArrayXf> ex(e, V);
  ex = (a - mx).exp();
  double s = 0;
  for (int64_t i = 0; i < V; i += 512) s += double(ex.segment(i, std::min<int64_t>(512, V - i)).sum());
  if (sum_out) *sum_out = s;
  return double(mx) + std::log(s);
}

// Σ p_v z_v in double (four chains, so the order is fixed and the loop pipelines).
double dot(const float* p, const float* z, int64_t V) {
  double s[4] = {0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 4 <= V; i += 4)
    for (int k = 0; k < 4; ++k) s[k] += double(p[i + k]) * double(z[i + k]);
  for (; i < V; ++i) s[0] += double(p[i]) * double(z[i]);
  return (s[0] + s[1]) + (s[2] + s[3]);
}

// Runs fn(position, logits, scratch) for every row of hidden [n, dim]: logits kLogitRows rows at a time,
// the rows of each batch spread over the threads (each row's work is independent, so the results do not
// depend on the thread count).
template <class Fn>
void for_each_logit_row(const LlamaModel& model, const float* hidden, int64_t n, int64_t first_position, Fn fn) {
  const int64_t V = model.config().vocab_size, D = model.config().dim;
  std::vector<float> logits(std::size_t(kLogitRows * V));
  for (int64_t r0 = 0; r0 < n; r0 += kLogitRows) {
    const int64_t rows = std::min(kLogitRows, n - r0);
    model.logits(hidden + r0 * D, rows, logits.data());
    detail::dense_parallel_for(model.threads(), rows, 1, [&](int64_t a, int64_t b) {
      std::vector<float> scratch(static_cast<std::size_t>(V));
      for (int64_t i = a; i < b; ++i) fn(first_position + r0 + i, &logits[std::size_t(i * V)], scratch.data());
    });
  }
}

}  // namespace

// ---- windows ------------------------------------------------------------------------------------------------

int64_t CalibrationWindows::positions() const {
  int64_t n = 0;
  for (const auto& t : targets) n += int64_t(t.size());
  return n;
}

CalibrationWindows calibration_windows(const std::vector<int32_t>& ids, int32_t start, int64_t ctx, int64_t first,
                                       int64_t count) {
  const int64_t total = window_count(int64_t(ids.size()), ctx);
  NUQ_CHECK(first >= 0 && first <= total, Errc::invalid_argument, "window {} of {} tokens in windows of {}", first,
            ids.size(), ctx);
  const int64_t last = count < 0 ? total : std::min(total, first + count);
  CalibrationWindows w;
  std::vector<int32_t> input;
  for (int64_t i = first; i < last; ++i) {
    const TokenWindow tw = window_input(ids, start, ctx, i, input);
    w.inputs.push_back(input);
    w.targets.emplace_back(ids.begin() + tw.begin, ids.begin() + tw.begin + tw.len);
  }
  return w;
}

CalibrationWindows select_windows(const CalibrationWindows& all, const std::vector<int64_t>& which) {
  CalibrationWindows w;
  for (int64_t i : which) {
    NUQ_CHECK(i >= 0 && i < all.size(), Errc::invalid_argument, "window {} of {}", i, all.size());
    w.inputs.push_back(all.inputs[std::size_t(i)]);
    w.targets.push_back(all.targets[std::size_t(i)]);
  }
  return w;
}

// ---- the meter ---------------------------------------------------------------------------------------------

struct DivergenceMeter::Impl {
  LlamaModel* model = nullptr;
  CalibrationWindows windows;
  int64_t V = 0, D = 0, L = 0;
  // Reference probabilities rounded to float, p̃, and per position Σ p̃ log p and Σ p̃ in double: then
  // KL = Σ p̃ (log p − log q) = neg_entropy − (Σ p̃ z − lse(z) · mass) needs only one pass over the
  // model's logits z, and stays accurate to ~1e-12 where a difference of two float entropies would not.
  std::vector<float> p;
  std::vector<double> neg_entropy, mass;
  double reference_nll = 0;
  std::vector<std::vector<float>> states;  // per window: [L + 1, n, D], the stream entering each block
  std::unique_ptr<LlamaModel::Cache> cache;

  void init(LlamaModel& m, CalibrationWindows w) {
    model = &m;
    windows = std::move(w);
    NUQ_CHECK(windows.size() > 0 && windows.positions() > 0, Errc::invalid_argument, "divergence: no calibration windows");
    V = m.config().vocab_size, D = m.config().dim, L = m.config().n_layers;
    int64_t longest = 0;
    for (const auto& in : windows.inputs) longest = std::max<int64_t>(longest, int64_t(in.size()));
    cache = m.new_cache(longest);
  }

  std::vector<float> final_hidden_of_states() const {
    std::vector<float> hidden;
    for (std::size_t w = 0; w < states.size(); ++w) {
      const int64_t n = int64_t(windows.inputs[w].size());
      std::vector<float> h(std::size_t(n * D));
      model->final_norm(&states[w][std::size_t(L * n * D)], n, h.data());
      hidden.insert(hidden.end(), h.begin(), h.end());
    }
    return hidden;
  }

  int64_t window_offset(std::size_t w) const {
    int64_t at = 0;
    for (std::size_t i = 0; i < w; ++i) at += int64_t(windows.targets[i].size());
    return at;
  }

  void set_reference(const std::vector<float>& hidden) {
    const int64_t P = windows.positions();
    NUQ_CHECK(int64_t(hidden.size()) == P * D, Errc::invalid_argument,
              "divergence: {} reference hidden values for {} positions of width {}", hidden.size(), P, D);
    p.assign(std::size_t(P * V), 0.f);
    neg_entropy.assign(std::size_t(P), 0.0);
    mass.assign(std::size_t(P), 0.0);
    std::vector<double> nll(static_cast<std::size_t>(P));
    for (std::size_t w = 0; w < windows.inputs.size(); ++w) {
      const int64_t at = window_offset(w), n = int64_t(windows.targets[w].size());
      for_each_logit_row(*model, &hidden[std::size_t(at * D)], n, at, [&](int64_t pos, const float* z, float* e) {
        double s = 0;
        const double lse = log_sum_exp(z, V, e, &s);
        float* pp = &p[std::size_t(pos * V)];
        for (int64_t v = 0; v < V; ++v) pp[v] = float(double(e[v]) / s);
        double m = 0;
        for (int64_t v = 0; v < V; ++v) m += double(pp[v]);
        mass[std::size_t(pos)] = m;
        neg_entropy[std::size_t(pos)] = dot(pp, z, V) - lse * m;
        nll[std::size_t(pos)] = lse - double(z[windows.targets[w][std::size_t(pos - at)]]);
      });
    }
    reference_nll = 0;
    for (double x : nll) reference_nll += x;
    reference_nll /= double(P);
  }

  void capture() {
    states.resize(windows.inputs.size());
    for (std::size_t w = 0; w < windows.inputs.size(); ++w) {
      const int64_t n = int64_t(windows.inputs[w].size());
      std::vector<float>& s = states[w];
      s.resize(std::size_t((L + 1) * n * D));
      model->embed(windows.inputs[w].data(), n, s.data());
      cache->length = 0;
      for (int64_t b = 0; b < L; ++b) {
        float* next = &s[std::size_t((b + 1) * n * D)];
        std::memcpy(next, &s[std::size_t(b * n * D)], std::size_t(n * D) * sizeof(float));
        model->forward_blocks(b, b + 1, next, n, *cache);
      }
    }
  }

  Divergence measure(int64_t first) {
    NUQ_CHECK(first >= 0 && first <= L, Errc::invalid_argument, "divergence: block {} of {}", first, L);
    const int64_t P = windows.positions();
    std::vector<double> kl(static_cast<std::size_t>(P)), nll(static_cast<std::size_t>(P));
    std::vector<float> x, hidden;
    for (std::size_t w = 0; w < windows.inputs.size(); ++w) {
      const int64_t n = int64_t(windows.inputs[w].size()), at = window_offset(w);
      const float* in = &states[w][std::size_t(first * n * D)];
      x.assign(in, in + n * D);
      hidden.resize(std::size_t(n * D));
      cache->length = 0;
      model->forward_blocks(first, L, x.data(), n, *cache);
      model->final_norm(x.data(), n, hidden.data());
      for_each_logit_row(*model, hidden.data(), n, at, [&](int64_t pos, const float* z, float* e) {
        const double lse = log_sum_exp(z, V, e);
        const std::size_t i = std::size_t(pos);
        kl[i] = neg_entropy[i] - (dot(&p[i * std::size_t(V)], z, V) - lse * mass[i]);
        nll[i] = lse - double(z[windows.targets[w][std::size_t(pos - at)]]);
      });
    }
    Divergence d;
    for (std::size_t w = 0; w < windows.targets.size(); ++w) {
      const int64_t at = window_offset(w), n = int64_t(windows.targets[w].size());
      double k = 0, l = 0;
      for (int64_t i = at; i < at + n; ++i) k += kl[std::size_t(i)], l += nll[std::size_t(i)];
      d.kl += k, d.nll += l;
      d.window_kl.push_back(k / double(n));
      d.window_nll.push_back(l / double(n));
    }
    d.kl /= double(P);
    d.nll /= double(P);
    NUQ_CHECK(std::isfinite(d.kl) && std::isfinite(d.nll), Errc::invalid_argument,
              "divergence: the model's output is not finite (KL {}, NLL {})", d.kl, d.nll);
    return d;
  }
};

DivergenceMeter::DivergenceMeter(LlamaModel& model, CalibrationWindows windows) : impl_(std::make_unique<Impl>()) {
  impl_->init(model, std::move(windows));
  impl_->capture();
  impl_->set_reference(impl_->final_hidden_of_states());
}

DivergenceMeter::DivergenceMeter(LlamaModel& model, CalibrationWindows windows,
                                 const std::vector<float>& reference_hidden)
    : impl_(std::make_unique<Impl>()) {
  impl_->init(model, std::move(windows));
  impl_->set_reference(reference_hidden);
  impl_->capture();
}

DivergenceMeter::~DivergenceMeter() = default;
const CalibrationWindows& DivergenceMeter::windows() const { return impl_->windows; }
double DivergenceMeter::reference_nll() const { return impl_->reference_nll; }
void DivergenceMeter::capture() { impl_->capture(); }
Divergence DivergenceMeter::measure(int64_t first) { return impl_->measure(first); }

std::vector<float> reference_hidden_states(LlamaModel& model, const CalibrationWindows& windows) {
  const int64_t D = model.config().dim;
  std::vector<float> hidden;
  hidden.reserve(std::size_t(windows.positions() * D));
  for (const auto& in : windows.inputs) {
    auto cache = model.new_cache(int64_t(in.size()));
    std::vector<float> h(in.size() * std::size_t(D));
    model.forward(in.data(), int64_t(in.size()), *cache, h.data());
    hidden.insert(hidden.end(), h.begin(), h.end());
  }
  return hidden;
}

// ---- the table ---------------------------------------------------------------------------------------------

namespace detail {

std::vector<int64_t> decoder_blocks(const LlamaModel& model, const std::vector<std::string>& bases,
                                    const std::string& model_path) {
  std::vector<int64_t> out;
  for (const std::string& base : bases) {
    const int64_t block = model.block_of_linear(base);
    NUQ_CHECK(block >= 0, Errc::invalid_argument,
              "{}: '{}' is not a linear layer of the decoder's blocks, so its effect on the output cannot be measured",
              model_path, base);
    out.push_back(block);
  }
  return out;
}

}  // namespace detail

namespace {

Json checkpoint_identity(const std::string& path) {
  Json files = Json::array();
  if (detect_checkpoint_kind(path) == CheckpointKind::gguf) {
    files.push_back(detail::file_identity(path));
  } else {
    const SafetensorsCheckpoint ck(path);
    for (const auto& f : ck.files()) files.push_back(detail::file_identity(f->path()));
  }
  return files;
}

Json config_json(const LayerConfig& c) {
  return Json{{"bits", c.bits},
              {"method", std::string(to_string(c.method))},
              {"group_size", c.group_size},
              {"outlier_fraction", c.outlier_fraction},
              {"sensitive_fraction", c.sensitive_fraction},
              {"outliers_per_row", c.outliers_per_row}};
}

LayerConfig config_from_json(const Json& j) {
  LayerConfig c;
  c.bits = j.at("bits").get<int>();
  c.method = parse_quant_method(j.at("method").get<std::string>());
  c.group_size = j.at("group_size").get<int64_t>();
  c.outlier_fraction = j.at("outlier_fraction").get<double>();
  c.sensitive_fraction = j.at("sensitive_fraction").get<double>();
  c.outliers_per_row = j.at("outliers_per_row").get<bool>();
  return c;
}

// Everything that decides the bytes of the table; thread counts are left out (they change nothing).
Json table_fingerprint(const MeasuredTableOptions& o, const std::vector<LayerConfig>& candidates,
                       const CalibrationWindows& windows) {
  Json j;
  j["table_version"] = kTableVersion;
  j["format_version"] = format::kVersion;
  j["tool"] = std::string(NUQ_VERSION_STRING);
  j["model"] = checkpoint_identity(o.model);
  j["stats"] = o.stats_path.empty() ? Json(nullptr) : detail::file_identity(o.stats_path);
  j["hessian"] = o.hessian_path.empty() ? Json(nullptr) : detail::file_identity(o.hessian_path);
  j["damping"] = o.damping;
  j["ctx"] = o.ctx;
  j["windows"] = windows.size();
  j["positions"] = windows.positions();
  j["start"] = o.start;
  j["tokens"] = o.ids.size();
  j["tokens_fnv"] = fmt::format("{:016x}", detail::token_ids_fnv1a(o.ids));
  Json cs = Json::array();
  for (const LayerConfig& c : candidates) cs.push_back(config_json(c));
  j["candidates"] = cs;
  return j;
}

// One layer's measurements: per applicable candidate, its index in the candidate list, packed layer, KL and
// NLL increase.
struct LayerMeasurement {
  std::vector<int> config;
  std::vector<PackedLinear> packed;
  std::vector<double> kl, nll;
};

LayerMeasurement measure_layer(LlamaModel& model, DivergenceMeter& meter, int64_t block, const detail::ModelTensor& t,
                               const float* weight, const detail::QuantizerSteering& steering,
                               const std::vector<LayerConfig>& candidates, int threads) {
  const int64_t rows = t.shape[0], cols = t.shape[1];
  const std::string base = detail::weight_base(t.name);
  const detail::QuantizerSteering::Layer inputs = steering.load(t);
  const LayerStatistics stats = inputs.statistics();
  std::vector<float> decoded(std::size_t(rows * cols));
  LayerMeasurement m;
  for (std::size_t k = 0; k < candidates.size(); ++k) {
    if (!candidate_applies(candidates[k], cols)) continue;
    PackedLinear packed = quantize_candidate(weight, rows, cols, stats, candidates[k], threads, t.name);
    dequantize_reference(packed.view(), decoded.data());
    model.set_linear_weights(base, decoded.data());
    const Divergence d = meter.measure(block);
    m.config.push_back(int(k));
    m.kl.push_back(std::max(d.kl, 0.0));  // KL >= 0; a negative value is rounding around zero
    m.nll.push_back(d.nll - meter.reference_nll());
    m.packed.push_back(std::move(packed));
  }
  model.set_linear_weights(base, weight);
  NUQ_CHECK(!m.config.empty(), Errc::invalid_argument,
            "no candidate applies to '{}' (shape {}): every candidate group size fails to divide {} columns", t.name,
            to_string(t.shape), cols);
  return m;
}

std::vector<std::string> packed_names(const std::string& base, bool sparse) {
  std::vector<std::string> n{base + format::kQWeightSuffix, base + format::kLutSuffix};
  if (sparse)
    for (const char* s : {format::kSparseRowPtrSuffix, format::kSparseColIdxSuffix, format::kSparseValuesSuffix})
      n.push_back(base + s);
  return n;
}

std::string candidate_base(const std::string& base, int config) { return fmt::format("{}.candidate{}", base, config); }

ConstTensorView f64_view(const std::vector<double>& v) {
  return ConstTensorView(reinterpret_cast<const std::byte*>(v.data()), DType::F64, Shape{int64_t(v.size())});
}

// A finished layer in the partial directory: the values and the packed candidates (named as in the table).
void write_layer_file(const std::string& path, int64_t index, const detail::ModelTensor& t, const LayerMeasurement& m) {
  const std::string base = detail::weight_base(t.name);
  Json record{{"index", index}, {"name", t.name}, {"rows", t.shape[0]}, {"cols", t.shape[1]}};
  Json cs = Json::array();
  for (std::size_t i = 0; i < m.config.size(); ++i)
    cs.push_back(Json{{"config", m.config[i]},
                      {"bits", m.packed[i].bits},
                      {"group_size", m.packed[i].group_size},
                      {"nnz", m.packed[i].nnz()}});
  record["candidates"] = cs;
  std::vector<std::pair<std::string, ConstTensorView>> views{{base + ".kl", f64_view(m.kl)},
                                                             {base + ".nll", f64_view(m.nll)}};
  for (std::size_t i = 0; i < m.config.size(); ++i) {
    const PackedLinear& p = m.packed[i];
    const Buffer* parts[] = {&p.qweight, &p.lut, &p.sparse_row_ptr, &p.sparse_col_idx, &p.sparse_values};
    const std::vector<std::string> names = packed_names(candidate_base(base, m.config[i]), p.nnz() > 0);
    for (std::size_t k = 0; k < names.size(); ++k) views.emplace_back(names[k], parts[k]->view());
  }
  write_safetensors(path, views, {{kLayerKey, record.dump()}});
}

// Reads a finished layer file back (values only), or nullopt when it is not a whole, matching one.
std::optional<Json> read_layer_record(const std::string& path, int64_t index, const std::string& name) {
  try {
    const SafetensorsCheckpoint ck(path);
    const auto it = ck.metadata().find(kLayerKey);
    if (it == ck.metadata().end()) return std::nullopt;
    Json r = Json::parse(it->second);
    if (r.at("index").get<int64_t>() != index || r.at("name").get<std::string>() != name) return std::nullopt;
    return r;
  } catch (const Error&) {
    return std::nullopt;
  } catch (const Json::exception&) {
    return std::nullopt;
  }
}

// The partial directory: created with the fingerprint, or checked against it.
void prepare_partial(const fs::path& partial, const Json& fingerprint, bool restart, const std::string& out) {
  std::error_code ec;
  const fs::path job = partial / "job.json";
  if (restart || (fs::exists(partial) && !fs::exists(job))) fs::remove_all(partial, ec);
  if (fs::exists(partial)) {
    const Json was = Json::parse(read_small_file(job.string(), "the saved table job"), nullptr, false);
    NUQ_CHECK(!was.is_discarded() && was == fingerprint, Errc::invalid_argument,
              "{} holds unfinished measurements of another model, text or candidate set; rerun with the same inputs "
              "to resume them, or remove that directory (nuq plan --restart)",
              partial.string());
    return;
  }
  fs::create_directories(partial, ec);
  NUQ_CHECK(!ec, Errc::io, "{}: cannot create {}: {}", out, partial.string(), ec.message());
  write_file_atomically(job.string(), fingerprint.dump(1) + "\n");
}

// The table from the layer files: values and packed candidates streamed one tensor at a time.
void assemble_table(const std::string& out, const std::vector<std::string>& layer_files, Json meta) {
  std::vector<std::unique_ptr<SafetensorsFile>> files;
  Json layers = Json::array();
  for (const std::string& f : layer_files) {
    files.push_back(std::make_unique<SafetensorsFile>(f));
    Json r = Json::parse(files.back()->metadata().at(kLayerKey));
    r.erase("index");
    layers.push_back(std::move(r));
  }
  meta["layers"] = layers;
  SafetensorsWriter w(out, {{kStatsKey, meta.dump()}});
  for (const auto& f : files)
    for (const SafetensorsTensorInfo& t : f->tensors()) w.declare(t.name, t.dtype, t.shape);
  for (const auto& f : files)
    for (const SafetensorsTensorInfo& t : f->tensors()) {
      const std::span<const std::byte> bytes = f->tensor_bytes(t);
      w.write(t.name, bytes);
    }
  w.finish();
}

// The fingerprint a finished table was measured under, or null.
Json stored_fingerprint(const std::string& path) {
  try {
    const SafetensorsCheckpoint ck(path);
    const auto it = ck.metadata().find(kStatsKey);
    if (it == ck.metadata().end()) return nullptr;
    const Json j = Json::parse(it->second, nullptr, false);
    return j.is_object() && j.contains("fingerprint") ? j["fingerprint"] : Json(nullptr);
  } catch (const Error&) {
    return nullptr;
  }
}

}  // namespace

bool measure_sensitivity_table(const MeasuredTableOptions& o, const std::string& out) {
  const detail::ModelReader reader(o.model);
  NUQ_CHECK(!reader.tensors().empty(), Errc::invalid_argument, "{}: no tensor to plan (the default rule takes {})",
            o.model, default_quantize_rule_text());
  const detail::QuantizerSteering steering(o.stats_path, o.hessian_path, o.damping);
  steering.check(reader.tensors());
  const std::vector<LayerConfig> candidates =
      o.candidates.empty() ? make_candidates({2, 3, 4}, {0.0, 0.0045}, {QuantMethod::nuq}, {0}, steering.steers())
                           : o.candidates;
  NUQ_CHECK(o.windows >= 1 && o.ctx >= 2, Errc::invalid_argument, "the table needs at least one window of 2 tokens");
  CalibrationWindows windows = calibration_windows(o.ids, o.start, o.ctx, 0, o.windows);
  NUQ_CHECK(windows.size() == o.windows, Errc::invalid_argument,
            "{}: {} calibration tokens make {} windows of {}, the table needs {}", o.text, o.ids.size(),
            windows.size(), o.ctx, o.windows);
  const Json fingerprint = table_fingerprint(o, candidates, windows);
  if (!o.restart && fs::exists(out) && stored_fingerprint(out) == fingerprint) return false;
  const fs::path partial = out + ".partial";
  prepare_partial(partial, fingerprint, o.restart, out);

  LlamaLoadOptions load;
  load.threads = o.threads;
  const auto model = LlamaModel::load(o.model, load);
  std::vector<std::string> bases;
  for (const auto& t : reader.tensors()) bases.push_back(detail::weight_base(t.name));
  const std::vector<int64_t> blocks = detail::decoder_blocks(*model, bases, o.model);
  DivergenceMeter meter(*model, windows);

  const int64_t count = int64_t(reader.tensors().size());
  std::vector<std::string> files;
  for (int64_t i = 0; i < count; ++i) {
    const detail::ModelTensor& t = reader.tensors()[std::size_t(i)];
    const std::string file = (partial / fmt::format("layer-{:05d}.safetensors", i)).string();
    files.push_back(file);
    MeasuredTableProgress p;
    p.index = i, p.count = count, p.name = t.name;
    std::vector<CandidateEvaluation> evals;
    std::vector<double> nll;
    if (const std::optional<Json> r = read_layer_record(file, i, t.name)) {
      p.resumed = true;
    } else {
      const auto t0 = Clock::now();
      const Buffer w = reader.read(t);
      LayerMeasurement m;
      try {
        m = measure_layer(*model, meter, blocks[std::size_t(i)], t, w.data_as<float>(), steering, candidates, o.threads);
      } catch (const Error& e) {
        throw Error(e.code(), fmt::format("{}: {}", o.model, e.what()));
      }
      write_layer_file(file, i, t, m);
      for (std::size_t k = 0; k < m.config.size(); ++k) {
        CandidateEvaluation e;
        e.config = candidates[std::size_t(m.config[k])];
        e.bytes = packed_storage(t.shape[0], t.shape[1], m.packed[k].bits, m.packed[k].group_size, m.packed[k].nnz()).total();
        e.omega = m.kl[k];
        e.bits_per_weight = 8.0 * double(e.bytes) / double(t.shape.numel());
        e.nnz = m.packed[k].nnz();
        evals.push_back(e);
      }
      nll = m.nll;
      p.seconds = seconds_since(t0);
      p.candidates = &evals;
      p.nll = &nll;
    }
    if (o.progress) o.progress(p);
  }

  Json meta = fingerprint;
  meta["fingerprint"] = fingerprint;
  meta["kind"] = "kl";
  meta["version"] = kTableVersion;
  meta["model"] = o.model;
  meta["stats"] = o.stats_path.empty() ? Json(nullptr) : Json(o.stats_path);
  meta["hessian"] = o.hessian_path.empty() ? Json(nullptr) : Json(o.hessian_path);
  meta["text"] = o.text;
  meta["reference_nll"] = meter.reference_nll();
  assemble_table(out, files, meta);
  std::error_code ec;
  fs::remove_all(partial, ec);
  return true;
}

// ---- reading a table ------------------------------------------------------------------------------------

bool is_divergence_table(const std::string& path) {
  try {
    const SafetensorsCheckpoint ck(path);
    const auto it = ck.metadata().find(kStatsKey);
    if (it == ck.metadata().end()) return false;
    const Json j = Json::parse(it->second, nullptr, false);
    return j.is_object() && j.value("kind", "") == "kl";
  } catch (const Error&) {
    return false;
  }
}

struct DivergenceTable::Impl {
  std::string path, model, stats, hessian;
  double damping = 0.01, reference_nll = 0;
  int64_t positions = 0, weights = 0;
  std::unique_ptr<SafetensorsCheckpoint> file;
  std::vector<Layer> layers;
  std::vector<std::vector<format::PackedLinearView>> packed;
};

DivergenceTable::DivergenceTable(const std::string& path) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.path = path;
  m.file = std::make_unique<SafetensorsCheckpoint>(path);
  const auto it = m.file->metadata().find(kStatsKey);
  NUQ_CHECK(it != m.file->metadata().end(), Errc::invalid_file, "{}: not a measured sensitivity table (no \"{}\")", path,
            kStatsKey);
  const Json j = Json::parse(it->second, nullptr, false);
  NUQ_CHECK(j.is_object() && j.value("kind", "") == "kl", Errc::invalid_file,
            "{}: not a measured sensitivity table (\"{}\" kind is not \"kl\")", path, kStatsKey);
  NUQ_CHECK(j.value("version", 0) == kTableVersion, Errc::unsupported, "{}: table version {} (this nuq reads {})", path,
            j.value("version", 0), kTableVersion);
  try {
    m.model = j.at("model").get<std::string>();
    m.stats = j.at("stats").is_null() ? "" : j.at("stats").get<std::string>();
    m.hessian = j.at("hessian").is_null() ? "" : j.at("hessian").get<std::string>();
    m.damping = j.at("damping").get<double>();
    m.positions = j.at("positions").get<int64_t>();
    m.reference_nll = j.at("reference_nll").get<double>();
    std::vector<LayerConfig> configs;
    for (const Json& c : j.at("candidates")) configs.push_back(config_from_json(c));
    for (const Json& r : j.at("layers")) {
      Layer l;
      l.name = r.at("name").get<std::string>();
      l.base = detail::weight_base(l.name);
      l.rows = r.at("rows").get<int64_t>();
      l.cols = r.at("cols").get<int64_t>();
      const auto values = [&](const std::string& suffix) {
        const ConstTensorView v = m.file->tensor(l.base + suffix);
        NUQ_CHECK(v.dtype() == DType::F64 && v.shape().rank() == 1 && v.shape()[0] == int64_t(r.at("candidates").size()),
                  Errc::invalid_file, "{}: tensor '{}{}' has the wrong dtype or shape", path, l.base, suffix);
        return std::vector<double>(v.data_as<double>(), v.data_as<double>() + v.shape()[0]);
      };
      const std::vector<double> kl = values(".kl");
      l.nll = values(".nll");
      std::vector<format::PackedLinearView> views;
      for (std::size_t k = 0; k < kl.size(); ++k) {
        const Json& c = r.at("candidates")[k];
        const int config = c.at("config").get<int>();
        NUQ_CHECK(config >= 0 && std::size_t(config) < configs.size(), Errc::invalid_file,
                  "{}: layer '{}' names candidate {} of {}", path, l.name, config, configs.size());
        PackedTensorMeta pm;
        pm.bits = c.at("bits").get<int>();
        pm.rows = l.rows, pm.cols = l.cols;
        pm.group_size = c.at("group_size").get<int64_t>();
        pm.nnz = c.at("nnz").get<int64_t>();
        pm.method = std::string(to_string(configs[std::size_t(config)].method));
        pm.source_dtype = "F32";
        const std::string cb = candidate_base(l.base, config);
        views.push_back(packed_view(*m.file, cb, pm));
        validate_packed(views.back(), cb);
        NUQ_CHECK(std::isfinite(kl[k]) && kl[k] >= 0, Errc::invalid_file, "{}: layer '{}' candidate {} has KL {}", path,
                  l.name, config, kl[k]);
        CandidateEvaluation e;
        e.config = configs[std::size_t(config)];
        e.bytes = packed_storage(l.rows, l.cols, pm.bits, pm.group_size, pm.nnz).total();
        e.omega = kl[k];
        e.bits_per_weight = 8.0 * double(e.bytes) / double(l.rows * l.cols);
        e.nnz = pm.nnz;
        l.candidates.push_back(e);
      }
      m.weights += l.rows * l.cols;
      m.layers.push_back(std::move(l));
      m.packed.push_back(std::move(views));
    }
  } catch (const Json::exception& e) {
    fail(Errc::invalid_file, "{}: malformed table metadata: {}", path, e.what());
  }
  NUQ_CHECK(!m.layers.empty(), Errc::invalid_file, "{}: the table has no layers", path);
}

DivergenceTable::~DivergenceTable() = default;
const std::string& DivergenceTable::path() const { return impl_->path; }
const std::string& DivergenceTable::model() const { return impl_->model; }
const std::string& DivergenceTable::stats_path() const { return impl_->stats; }
const std::string& DivergenceTable::hessian_path() const { return impl_->hessian; }
double DivergenceTable::damping() const { return impl_->damping; }
int64_t DivergenceTable::positions() const { return impl_->positions; }
double DivergenceTable::reference_nll() const { return impl_->reference_nll; }
const std::vector<DivergenceTable::Layer>& DivergenceTable::layers() const { return impl_->layers; }
int64_t DivergenceTable::weights() const { return impl_->weights; }
format::PackedLinearView DivergenceTable::packed(std::size_t l, std::size_t c) const {
  NUQ_CHECK(l < impl_->packed.size() && c < impl_->packed[l].size(), Errc::invalid_argument,
            "table layer {} candidate {} does not exist", l, c);
  return impl_->packed[l][c];
}

}  // namespace nuq
