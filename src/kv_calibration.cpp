// KV-cache calibration: per-channel key ranges with outlier thresholds, the per-layer non-uniform
// datatypes for keys and values (weighted 1-D k-means, src/kmeans1d.cpp), optional Q-Norm, and the
// safetensors file they are kept in.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>

#include "kv_internal.hpp"
#include "nuq/error.hpp"
#include "nuq/half.hpp"
#include "nuq/quantize.hpp"
#include "nuq/safetensors.hpp"

namespace nuq::kv {
namespace {

constexpr const char* kFormat = "nuq-kv-calibration/1";

// Fits a 2^bits codebook to normalized samples (weights nullable) and applies Q-Norm if asked.
std::vector<float> fit_codebook(const std::vector<float>& x, const std::vector<float>& w, int bits, bool q_norm,
                                int iterations) {
  const int k = 1 << bits;
  std::vector<float> cb(size_t(k), 0.0f);
  if (x.empty()) {
    for (int j = 0; j < k; ++j) cb[size_t(j)] = -1.0f + 2.0f * float(j) / float(k - 1);
    return cb;
  }
  SortedWeightedPoints points;
  points.assign(x.data(), w.empty() ? nullptr : w.data(), int64_t(x.size()));
  KMeansOptions opt;
  opt.max_iterations = iterations;
  kmeans_1d(points, k, opt, cb.data());
  if (q_norm) {
    // KVQuant's Q-Norm: shift and scale the datatype so that the dequantized samples have the mean and
    // standard deviation of the samples themselves (quantization shrinks the spread).
    double s = 0, ss = 0, qs = 0, qss = 0;
    for (float v : x) {
      const double qv = cb[size_t(detail::nearest_entry(cb.data(), k, v))];
      s += v, ss += double(v) * v, qs += qv, qss += qv * qv;
    }
    const double n = double(x.size());
    const double mu = s / n, sd = std::sqrt(std::max(0.0, ss / n - mu * mu));
    const double qmu = qs / n, qsd = std::sqrt(std::max(0.0, qss / n - qmu * qmu));
    if (qsd > 0)
      for (auto& c : cb) c = float(mu + (double(c) - qmu) * sd / qsd);
  }
  return cb;
}

void check_samples(const float* x, int64_t count, const char* what, bool sensitivity) {
  for (int64_t i = 0; i < count; ++i)
    NUQ_CHECK(std::isfinite(x[i]) && (!sensitivity || x[i] >= 0), Errc::invalid_argument,
              "KV calibration: {} sample {} is {}{}", what, i, x[i], sensitivity ? " (must be finite and >= 0)" : "");
}

}  // namespace

LayerCalibration calibrate_layer(const float* k, const float* v, const float* k_sens, const float* v_sens,
                                 int64_t tokens, int64_t n_kv_heads, int64_t head_dim,
                                 const CalibrationOptions& o) {
  NUQ_CHECK(k != nullptr && v != nullptr, Errc::invalid_argument, "KV calibration: keys or values are null");
  NUQ_CHECK(tokens > 0 && n_kv_heads > 0 && head_dim > 0 && head_dim % 2 == 0, Errc::invalid_argument,
            "KV calibration: bad shape [{} tokens, {} kv heads, head_dim {}]", tokens, n_kv_heads, head_dim);
  for (int b : {o.bits_k, o.bits_v})
    NUQ_CHECK(b >= 2 && b <= 4, Errc::invalid_argument, "KV calibration: {} bits (supported: 2, 3, 4)", b);
  NUQ_CHECK(o.outlier_fraction >= 0 && o.outlier_fraction <= 0.25, Errc::invalid_argument,
            "KV calibration: outlier fraction {} must be in [0, 0.25]", o.outlier_fraction);
  const int64_t width = n_kv_heads * head_dim, count = tokens * width;
  check_samples(k, count, "key", false);
  check_samples(v, count, "value", false);
  if (k_sens) check_samples(k_sens, count, "key sensitivity", true);
  if (v_sens) check_samples(v_sens, count, "value sensitivity", true);

  Calibration common;
  common.outlier_fraction = o.outlier_fraction;
  const int slots = common.outlier_slots(head_dim);
  LayerCalibration cal;
  cal.n_kv_heads = n_kv_heads;
  cal.head_dim = head_dim;
  cal.bits_k = o.bits_k;
  cal.bits_v = o.bits_v;
  cal.k_scale.resize(size_t(width));
  cal.k_offset.resize(size_t(width));

  // Per-channel key range between the f/2 and 1 - f/2 quantiles: the thresholds beyond which a value
  // counts as an outlier of its channel, so the dense datatype is spent on the bulk of the values.
  std::vector<float> col(static_cast<size_t>(tokens));
  for (int64_t c = 0; c < width; ++c) {
    for (int64_t t = 0; t < tokens; ++t) col[size_t(t)] = k[t * width + c];
    std::sort(col.begin(), col.end());
    const double f = o.outlier_fraction / 2;
    const auto at = [&](double q) { return col[size_t(std::llround(q * double(tokens - 1)))]; };
    const float lo = at(f), hi = at(1 - f);
    const float mag = std::max({std::fabs(lo), std::fabs(hi), 1e-6f});
    cal.k_offset[size_t(c)] = 0.5f * (lo + hi);
    cal.k_scale[size_t(c)] = std::max(0.5f * (hi - lo), 1e-4f * mag);
  }

  // Normalized samples outside each vector's outlier slots feed the datatypes, with the same selection
  // rules as the cache (kv_cache.cpp), so the codebooks see what they will encode.
  std::vector<float> kx, kw, vx, vw;
  kx.reserve(size_t(count));
  vx.reserve(size_t(count));
  std::vector<float> norm(static_cast<size_t>(head_dim));
  std::vector<int> out(static_cast<size_t>(std::max(slots, 1)));
  std::unique_ptr<bool[]> flag(new bool[size_t(head_dim)]);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t h = 0; h < n_kv_heads; ++h) {
      const int64_t base = t * width + h * head_dim;
      for (int64_t i = 0; i < head_dim; ++i)
        norm[size_t(i)] = (k[base + i] - cal.k_offset[size_t(h * head_dim + i)]) / cal.k_scale[size_t(h * head_dim + i)];
      detail::select_outliers(norm.data(), head_dim, 0.0f, slots, out.data());
      std::fill(flag.get(), flag.get() + head_dim, false);
      for (int s = 0; s < slots; ++s) flag[size_t(out[size_t(s)])] = true;
      for (int64_t i = 0; i < head_dim; ++i)
        if (!flag[size_t(i)]) {
          kx.push_back(norm[size_t(i)]);
          if (k_sens) kw.push_back(k_sens[base + i]);
        }
      const float* vv = v + base;
      double mean = 0;
      for (int64_t i = 0; i < head_dim; ++i) mean += vv[i];
      detail::select_outliers(vv, head_dim, float(mean / double(head_dim)), slots, out.data());
      std::fill(flag.get(), flag.get() + head_dim, false);
      for (int s = 0; s < slots; ++s) flag[size_t(out[size_t(s)])] = true;
      uint16_t s16, o16;
      detail::value_normalization(vv, head_dim, flag.get(), s16, o16);
      const float vs = fp16_to_float(s16), vo = fp16_to_float(o16);
      for (int64_t i = 0; i < head_dim; ++i)
        if (!flag[size_t(i)]) {
          vx.push_back((vv[i] - vo) / vs);
          if (v_sens) vw.push_back(v_sens[base + i]);
        }
    }
  cal.k_codebook = fit_codebook(kx, kw, o.bits_k, o.q_norm, o.kmeans_iterations);
  cal.v_codebook = fit_codebook(vx, vw, o.bits_v, o.q_norm, o.kmeans_iterations);
  return cal;
}

void save_calibration(const Calibration& cal, const std::string& path) {
  std::vector<std::pair<std::string, ConstTensorView>> tensors;
  for (size_t l = 0; l < cal.layers.size(); ++l) {
    const auto& c = cal.layers[l];
    const int64_t width = c.n_kv_heads * c.head_dim;
    NUQ_CHECK(c.k_scale.size() == size_t(width) && c.k_offset.size() == size_t(width) &&
                  c.k_codebook.size() == size_t(1) << c.bits_k && c.v_codebook.size() == size_t(1) << c.bits_v,
              Errc::invalid_argument, "save KV calibration: layer {} has inconsistent sizes", l);
    const std::string p = "layers." + std::to_string(l) + ".";
    auto view = [](const std::vector<float>& x, Shape shape) {
      return ConstTensorView(reinterpret_cast<const std::byte*>(x.data()), DType::F32, shape);
    };
    tensors.emplace_back(p + "k_scale", view(c.k_scale, {c.n_kv_heads, c.head_dim}));
    tensors.emplace_back(p + "k_offset", view(c.k_offset, {c.n_kv_heads, c.head_dim}));
    tensors.emplace_back(p + "k_codebook", view(c.k_codebook, {int64_t(c.k_codebook.size())}));
    tensors.emplace_back(p + "v_codebook", view(c.v_codebook, {int64_t(c.v_codebook.size())}));
  }
  write_safetensors(path, tensors,
                    {{"format", kFormat},
                     {"layers", std::to_string(cal.layers.size())},
                     {"outlier_fraction", fmt::format("{}", cal.outlier_fraction)},
                     {"sink_tokens", std::to_string(cal.sink_tokens)},
                     {"q_norm", cal.q_norm ? "1" : "0"}});
}

Calibration load_calibration(const std::string& path) {
  SafetensorsFile file(path);
  const auto& meta = file.metadata();
  auto get = [&](const char* key) -> const std::string& {
    auto it = meta.find(key);
    NUQ_CHECK(it != meta.end(), Errc::invalid_file, "{}: not a KV calibration: metadata has no \"{}\"", path, key);
    return it->second;
  };
  NUQ_CHECK(get("format") == kFormat, Errc::invalid_file, "{}: format \"{}\" is not {}", path, get("format"), kFormat);
  Calibration cal;
  try {
    cal.outlier_fraction = std::stod(get("outlier_fraction"));
    cal.sink_tokens = std::stoi(get("sink_tokens"));
    cal.q_norm = get("q_norm") == "1";
    const long layers = std::stol(get("layers"));
    NUQ_CHECK(layers >= 0 && layers < 100000, Errc::invalid_file, "{}: {} layers", path, layers);
    cal.layers.resize(size_t(layers));
  } catch (const std::logic_error&) {
    fail(Errc::invalid_file, "{}: unreadable number in the metadata", path);
  }
  NUQ_CHECK(cal.outlier_fraction >= 0 && cal.outlier_fraction <= 0.25 && cal.sink_tokens >= 0, Errc::invalid_file,
            "{}: outlier fraction {} or sink tokens {} out of range", path, cal.outlier_fraction, cal.sink_tokens);
  auto read = [&](const std::string& name, int rank) {
    const auto* info = file.find(name);
    NUQ_CHECK(info != nullptr, Errc::invalid_file, "{}: tensor {} is missing", path, name);
    NUQ_CHECK(info->dtype == DType::F32 && info->shape.rank() == rank, Errc::invalid_file,
              "{}: {}: expected F32 of rank {}, found shape {}", path, name, rank, to_string(info->shape));
    const auto bytes = file.tensor_bytes(*info);
    std::vector<float> x(bytes.size() / 4);
    std::memcpy(x.data(), bytes.data(), x.size() * 4);
    for (size_t i = 0; i < x.size(); ++i)
      NUQ_CHECK(std::isfinite(x[i]), Errc::invalid_file, "{}: {}: element {} is {}", path, name, i, x[i]);
    return std::make_pair(x, info->shape);
  };
  for (size_t l = 0; l < cal.layers.size(); ++l) {
    auto& c = cal.layers[l];
    const std::string p = "layers." + std::to_string(l) + ".";
    auto [scale, shape] = read(p + "k_scale", 2);
    auto [offset, oshape] = read(p + "k_offset", 2);
    NUQ_CHECK(shape == oshape, Errc::invalid_file, "{}: {}k_scale {} and k_offset {} differ in shape", path, p,
              to_string(shape), to_string(oshape));
    c.n_kv_heads = shape[0];
    c.head_dim = shape[1];
    for (float s : scale) NUQ_CHECK(s > 0, Errc::invalid_file, "{}: {}k_scale holds {} (must be > 0)", path, p, s);
    c.k_scale = std::move(scale);
    c.k_offset = std::move(offset);
    c.k_codebook = read(p + "k_codebook", 1).first;
    c.v_codebook = read(p + "v_codebook", 1).first;
    auto bits_of = [&](size_t n, const char* what) {
      NUQ_CHECK(n == 4 || n == 8 || n == 16, Errc::invalid_file, "{}: {}{} has {} entries (4, 8 or 16 expected)",
                path, p, what, n);
      return n == 4 ? 2 : n == 8 ? 3 : 4;
    };
    c.bits_k = bits_of(c.k_codebook.size(), "k_codebook");
    c.bits_v = bits_of(c.v_codebook.size(), "v_codebook");
  }
  return cal;
}

}  // namespace nuq::kv
