// Fisher and Hessian accumulators and the Hutchinson trace estimator (include/nuq/sensitivity.hpp,
// include/nuq/hutchinson.hpp, docs/sensitivity.md).
#include "nuq/sensitivity.hpp"

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <nlohmann/json.hpp>
#include <random>

#include "nuq/error.hpp"
#include "nuq/hutchinson.hpp"
#include "nuq/safetensors.hpp"

namespace nuq {
namespace {

using Json = nlohmann::json;

constexpr int kStatsVersion = 1;
constexpr const char* kXtxSuffix = ".xtx";
constexpr const char* kXtxDiagSuffix = ".xtx_diag";

// The nuq_stats object of a statistics file, checked for the expected kind.
Json read_stats_metadata(const SafetensorsCheckpoint& file, const std::string& path, StatsKind want) {
  const auto it = file.metadata().find(kStatsMetadataKey);
  NUQ_CHECK(it != file.metadata().end(), Errc::invalid_file,
            "{}: no \"{}\" metadata: not a nuq statistics file (docs/sensitivity.md)", path, kStatsMetadataKey);
  const Json j = Json::parse(it->second, nullptr, false);
  NUQ_CHECK(!j.is_discarded() && j.is_object() && j.contains("kind") && j["kind"].is_string() &&
                j.contains("counts") && j["counts"].is_object(),
            Errc::invalid_file, "{}: malformed \"{}\" metadata: {}", path, kStatsMetadataKey, it->second);
  NUQ_CHECK(j.value("version", 0) == kStatsVersion, Errc::unsupported, "{}: statistics version {} (this build reads {})",
            path, j.value("version", 0), kStatsVersion);
  NUQ_CHECK(j["kind"] == to_string(want), Errc::invalid_argument, "{}: holds {} statistics, expected {}", path,
            j["kind"].get<std::string>(), to_string(want));
  return j;
}

int64_t count_of(const Json& meta, const std::string& name, const std::string& path) {
  const Json& counts = meta["counts"];
  const auto it = counts.find(name);
  NUQ_CHECK(it != counts.end() && it->is_number_integer() && it->get<int64_t>() > 0, Errc::invalid_file,
            "{}: no positive sample count for '{}' in the \"{}\" metadata", path, name, kStatsMetadataKey);
  return it->get<int64_t>();
}

// Tensor values as doubles (F32, F16, BF16 or F64), each checked finite (and >= 0 when asked).
std::vector<double> read_values(const SafetensorsCheckpoint& file, const std::string& path, const std::string& name,
                                bool non_negative) {
  const SafetensorsTensorInfo& info = file.info(name);
  std::vector<double> out(std::size_t(info.shape.numel()));
  if (info.dtype == DType::F64) {
    const auto bytes = file.file_of(name).tensor_bytes(info);
    std::memcpy(out.data(), bytes.data(), out.size() * sizeof(double));
  } else {
    NUQ_CHECK(info.dtype == DType::F32 || info.dtype == DType::F16 || info.dtype == DType::BF16, Errc::unsupported,
              "{}: statistics tensor '{}' has dtype {}; expected F32, F16, BF16 or F64", path, name,
              dtype_name(info.dtype));
    const Buffer f = to_float32(file.tensor(name));
    const float* p = f.data_as<float>();
    for (std::size_t i = 0; i < out.size(); ++i) out[i] = p[i];
  }
  const int64_t last = info.shape.rank() ? info.shape[info.shape.rank() - 1] : 1;
  for (std::size_t i = 0; i < out.size(); ++i)
    NUQ_CHECK(std::isfinite(out[i]) && (!non_negative || out[i] >= 0), Errc::invalid_argument,
              "{}: statistics tensor '{}' at [{}, {}] is {} (must be finite{})", path, name, int64_t(i) / last,
              int64_t(i) % last, out[i], non_negative ? " and >= 0" : "");
  return out;
}

// Streams tensors computed one at a time into a safetensors file (so a 7B model's statistics never
// need a second copy in memory).
struct PendingTensor {
  std::string name;
  Shape shape;
  std::function<void(std::vector<std::byte>&)> fill;  // writes the tensor's bytes
};

void write_stats_file(const std::string& path, DType dtype, std::vector<PendingTensor> tensors, const Json& meta) {
  SafetensorsWriter w(path, {{kStatsMetadataKey, meta.dump()}, {"format", "pt"}});
  for (const PendingTensor& t : tensors) w.declare(t.name, dtype, t.shape);
  std::vector<std::byte> bytes;
  for (const PendingTensor& t : tensors) {
    t.fill(bytes);
    w.write(t.name, bytes);
  }
  w.finish();
}

template <class T>
void store_scaled(const double* src, std::size_t n, double scale, std::vector<std::byte>& out) {
  out.resize(n * sizeof(T));
  T* dst = reinterpret_cast<T*>(out.data());
  for (std::size_t i = 0; i < n; ++i) dst[i] = T(src[i] * scale);
}

// The mean [n, n] matrix from a column-major upper triangle of sums, written straight into the file's
// type: the full matrix in double (8n² bytes, 6.6 GB for a 28672-wide input) is never built.
template <class T>
void store_symmetric(const std::vector<double>& upper, int64_t n, double scale, std::vector<std::byte>& out) {
  out.resize(std::size_t(n * n) * sizeof(T));
  T* dst = reinterpret_cast<T*>(out.data());
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = 0; i <= j; ++i) dst[i * n + j] = dst[j * n + i] = T(upper[std::size_t(i + j * n)] * scale);
}

}  // namespace

std::string_view to_string(StatsKind kind) { return kind == StatsKind::fisher ? "fisher" : "hessian"; }

constexpr const char* kCalibrateKey = "nuq_statistics";
constexpr const char* kCalibrateValue = "activation_mean_square";

bool is_calibrate_file(const SafetensorsCheckpoint& file) {
  const auto it = file.metadata().find(kCalibrateKey);
  return !file.metadata().count(kStatsMetadataKey) && it != file.metadata().end() && it->second == kCalibrateValue;
}

StatsKind detect_stats_kind(const std::string& path) {
  const SafetensorsCheckpoint file(path);
  if (is_calibrate_file(file)) return StatsKind::hessian;
  const auto it = file.metadata().find(kStatsMetadataKey);
  NUQ_CHECK(it != file.metadata().end(), Errc::invalid_file,
            "{}: no \"{}\" metadata: not a nuq statistics file (docs/sensitivity.md)", path, kStatsMetadataKey);
  const Json j = Json::parse(it->second, nullptr, false);
  NUQ_CHECK(!j.is_discarded() && j.is_object() && j.contains("kind"), Errc::invalid_file,
            "{}: malformed \"{}\" metadata", path, kStatsMetadataKey);
  if (j["kind"] == "fisher") return StatsKind::fisher;
  if (j["kind"] == "hessian") return StatsKind::hessian;
  fail(Errc::invalid_file, "{}: unknown statistics kind {} (expected \"fisher\" or \"hessian\")", path, j["kind"].dump());
}

// ---- Fisher ---------------------------------------------------------------------------------------------

void FisherAccumulator::add(const std::string& name, const float* grad, const Shape& shape) {
  const int64_t n = shape.numel();
  NUQ_CHECK(n > 0 && grad, Errc::invalid_argument, "Fisher accumulator: gradient of '{}' is empty (shape {})", name,
            to_string(shape));
  auto it = entries_.find(name);
  if (it != entries_.end())
    NUQ_CHECK(it->second.shape == shape, Errc::invalid_argument,
              "Fisher accumulator: gradient of '{}' has shape {}, earlier batches had {}", name, to_string(shape),
              to_string(it->second.shape));
  const int64_t last = shape[shape.rank() - 1];
  // Checked before anything is added, so a bad batch can be skipped without corrupting the sums.
  for (int64_t i = 0; i < n; ++i)
    NUQ_CHECK(std::isfinite(grad[i]), Errc::invalid_argument,
              "Fisher accumulator: gradient of '{}' is {} at [{}, {}] (shape {})", name, grad[i], i / last, i % last,
              to_string(shape));
  if (it == entries_.end()) {
    it = entries_.emplace(name, Entry{shape, 0, std::vector<double>(std::size_t(n), 0.0)}).first;
  }
  double* s = it->second.sum.data();
  for (int64_t i = 0; i < n; ++i) s[i] += double(grad[i]) * double(grad[i]);
  ++it->second.count;
}

void FisherAccumulator::merge(const FisherAccumulator& other) {
  for (const auto& [name, e] : other.entries_) {
    auto it = entries_.find(name);
    if (it != entries_.end())
      NUQ_CHECK(it->second.shape == e.shape, Errc::invalid_argument,
                "Fisher merge: '{}' has shape {} in one run and {} in the other", name, to_string(it->second.shape),
                to_string(e.shape));
  }
  for (const auto& [name, e] : other.entries_) {
    auto [it, inserted] = entries_.emplace(name, e);
    if (inserted) continue;
    for (std::size_t i = 0; i < e.sum.size(); ++i) it->second.sum[i] += e.sum[i];
    it->second.count += e.count;
  }
}

const FisherAccumulator::Entry& FisherAccumulator::entry(std::string_view name) const {
  const auto it = entries_.find(name);
  NUQ_CHECK(it != entries_.end(), Errc::invalid_argument, "Fisher statistics have no tensor '{}'", name);
  return it->second;
}

bool FisherAccumulator::contains(std::string_view name) const { return entries_.find(name) != entries_.end(); }

std::vector<std::string> FisherAccumulator::names() const {
  std::vector<std::string> out;
  for (const auto& [name, e] : entries_) out.push_back(name);
  return out;
}

const Shape& FisherAccumulator::shape(std::string_view name) const { return entry(name).shape; }
int64_t FisherAccumulator::count(std::string_view name) const { return entry(name).count; }
const std::vector<double>& FisherAccumulator::sum(std::string_view name) const { return entry(name).sum; }

std::vector<float> FisherAccumulator::mean(std::string_view name) const {
  const Entry& e = entry(name);
  std::vector<float> out(e.sum.size());
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = float(e.sum[i] / double(e.count));
  return out;
}

void FisherAccumulator::save(const std::string& path) const {
  Json meta{{"kind", "fisher"}, {"version", kStatsVersion}, {"value", "mean"}, {"counts", Json::object()}};
  std::vector<PendingTensor> tensors;
  for (const auto& [name, e] : entries_) {
    meta["counts"][name] = e.count;
    const Entry* p = &e;
    tensors.push_back({name, e.shape, [p](std::vector<std::byte>& out) {
                         store_scaled<float>(p->sum.data(), p->sum.size(), 1.0 / double(p->count), out);
                       }});
  }
  write_stats_file(path, DType::F32, std::move(tensors), meta);
}

FisherAccumulator FisherAccumulator::load(const std::string& path) {
  const SafetensorsCheckpoint file(path);
  const Json meta = read_stats_metadata(file, path, StatsKind::fisher);
  FisherAccumulator acc;
  for (const std::string& name : file.tensor_names()) {
    const int64_t count = count_of(meta, name, path);
    std::vector<double> v = read_values(file, path, name, true);
    for (double& x : v) x *= double(count);
    acc.entries_.emplace(name, Entry{file.info(name).shape, count, std::move(v)});
  }
  return acc;
}

// ---- Hessian --------------------------------------------------------------------------------------------

void HessianAccumulator::add(const std::string& name, const float* X, int64_t tokens, int64_t cols, int64_t ldx) {
  NUQ_CHECK(!aliases_.count(name), Errc::invalid_argument,
            "Hessian accumulator: '{}' is an alias of '{}'; add its input under that name", name,
            aliases_.find(name)->second);
  NUQ_CHECK(tokens >= 0 && cols > 0 && ldx >= cols && (X || tokens == 0), Errc::invalid_argument,
            "Hessian accumulator: bad activation batch for '{}': {} tokens x {} columns, row stride {}", name, tokens,
            cols, ldx);
  auto it = entries_.find(name);
  if (it != entries_.end())
    NUQ_CHECK(it->second.cols == cols, Errc::invalid_argument,
              "Hessian accumulator: input of '{}' has {} columns, earlier batches had {}", name, cols, it->second.cols);
  if (tokens == 0) return;
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t c = 0; c < cols; ++c)
      NUQ_CHECK(std::isfinite(X[t * ldx + c]), Errc::invalid_argument,
                "Hessian accumulator: input of '{}' is {} at token {}, column {} ({} tokens x {} columns)", name,
                X[t * ldx + c], t, c, tokens, cols);
  if (it == entries_.end()) {
    Entry e;
    e.cols = cols;
    e.full = !diagonal_only_;
    e.diag_sum.assign(std::size_t(cols), 0.0);
    if (e.full) e.sum.assign(std::size_t(cols * cols), 0.0);
    it = entries_.emplace(name, std::move(e)).first;
  }
  Entry& e = it->second;
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t c = 0; c < cols; ++c) e.diag_sum[c] += double(X[t * ldx + c]) * double(X[t * ldx + c]);
  if (e.full) {
    // Rank-k updates of the upper triangle in fp64, a block of tokens at a time (U = Xᵀ of the block).
    constexpr int64_t kBlock = 256;
    Eigen::Map<Eigen::MatrixXd> H(e.sum.data(), cols, cols);
    Eigen::MatrixXd U(cols, std::min(tokens, kBlock));
    for (int64_t t0 = 0; t0 < tokens; t0 += kBlock) {
      const int64_t n = std::min(kBlock, tokens - t0);
      if (n != U.cols()) U.resize(cols, n);
      for (int64_t t = 0; t < n; ++t)
        for (int64_t c = 0; c < cols; ++c) U(c, t) = double(X[(t0 + t) * ldx + c]);
      H.selfadjointView<Eigen::Upper>().rankUpdate(U);
    }
  }
  e.count += tokens;
}

void HessianAccumulator::alias(const std::string& name, const std::string& same_input_as) {
  NUQ_CHECK(name != same_input_as, Errc::invalid_argument, "Hessian accumulator: '{}' cannot be an alias of itself",
            name);
  NUQ_CHECK(!entries_.count(name), Errc::invalid_argument,
            "Hessian accumulator: '{}' already holds statistics of its own; it cannot become an alias", name);
  NUQ_CHECK(!aliases_.count(same_input_as), Errc::invalid_argument,
            "Hessian accumulator: '{}' is itself an alias; point '{}' at '{}' instead", same_input_as, name,
            aliases_.find(same_input_as)->second);
  const auto it = aliases_.find(name);
  NUQ_CHECK(it == aliases_.end() || it->second == same_input_as, Errc::invalid_argument,
            "Hessian accumulator: '{}' is already an alias of '{}', not '{}'", name,
            it == aliases_.end() ? "" : it->second, same_input_as);
  for (const auto& [a, target] : aliases_)
    NUQ_CHECK(target != name, Errc::invalid_argument,
              "Hessian accumulator: '{}' is the target of alias '{}'; it cannot become an alias itself", name, a);
  aliases_[name] = same_input_as;
}

void HessianAccumulator::merge(const HessianAccumulator& other) {
  for (const auto& [name, e] : other.entries_) {
    NUQ_CHECK(!aliases_.count(name), Errc::invalid_argument,
              "Hessian merge: '{}' holds statistics in one run and is an alias in the other", name);
    auto it = entries_.find(name);
    if (it == entries_.end()) continue;
    NUQ_CHECK(it->second.cols == e.cols, Errc::invalid_argument,
              "Hessian merge: input of '{}' has {} columns in one run and {} in the other", name, it->second.cols,
              e.cols);
  }
  for (const auto& [a, target] : other.aliases_) {
    NUQ_CHECK(!entries_.count(a), Errc::invalid_argument,
              "Hessian merge: '{}' holds statistics in one run and is an alias in the other", a);
    const auto it = aliases_.find(a);
    NUQ_CHECK(it == aliases_.end() || it->second == target, Errc::invalid_argument,
              "Hessian merge: '{}' is an alias of '{}' in one run and of '{}' in the other", a,
              it == aliases_.end() ? "" : it->second, target);
  }
  for (const auto& [name, e] : other.entries_) {
    auto [it, inserted] = entries_.emplace(name, e);
    if (inserted) continue;
    Entry& mine = it->second;
    for (std::size_t i = 0; i < e.diag_sum.size(); ++i) mine.diag_sum[i] += e.diag_sum[i];
    if (mine.full && e.full) {
      for (std::size_t i = 0; i < e.sum.size(); ++i) mine.sum[i] += e.sum[i];
    } else {
      // One run kept only the diagonal: the merged matrix would be incomplete, so keep the diagonal.
      mine.full = false;
      mine.sum.clear();
    }
    mine.count += e.count;
  }
  for (const auto& [a, target] : other.aliases_) aliases_[a] = target;
  if (other.diagonal_only_) diagonal_only_ = true;
  if (diagonal_only_)
    for (auto& [name, e] : entries_) {
      e.full = false;
      e.sum.clear();
      e.sum.shrink_to_fit();
    }
}

std::string HessianAccumulator::resolve(std::string_view name) const {
  const auto it = aliases_.find(name);
  return it == aliases_.end() ? std::string(name) : it->second;
}

const HessianAccumulator::Entry& HessianAccumulator::entry(std::string_view name) const {
  const std::string target = resolve(name);
  const auto it = entries_.find(target);
  NUQ_CHECK(it != entries_.end(), Errc::invalid_argument, "Hessian statistics have no layer '{}'{}", name,
            target == name ? std::string() : fmt::format(" (alias of '{}')", target));
  return it->second;
}

bool HessianAccumulator::contains(std::string_view name) const { return entries_.count(resolve(name)) > 0; }

std::vector<std::string> HessianAccumulator::names() const {
  std::vector<std::string> out;
  for (const auto& [name, e] : entries_) out.push_back(name);
  return out;
}

int64_t HessianAccumulator::cols(std::string_view name) const { return entry(name).cols; }
int64_t HessianAccumulator::count(std::string_view name) const { return entry(name).count; }
bool HessianAccumulator::has_matrix(std::string_view name) const { return entry(name).full; }

double HessianAccumulator::trace(std::string_view name) const {
  const Entry& e = entry(name);
  double t = 0;
  for (double d : e.diag_sum) t += d;
  return t / double(e.count);
}

std::vector<double> HessianAccumulator::diagonal(std::string_view name) const {
  const Entry& e = entry(name);
  std::vector<double> out(e.diag_sum);
  for (double& d : out) d /= double(e.count);
  return out;
}

std::vector<double> HessianAccumulator::matrix(std::string_view name) const {
  const Entry& e = entry(name);
  NUQ_CHECK(e.full, Errc::invalid_argument,
            "Hessian statistics of '{}' hold only the diagonal (collected with diagonal_only)", name);
  const int64_t n = e.cols;
  std::vector<double> out(std::size_t(n * n));
  const double scale = 1.0 / double(e.count);
  // The column-major upper triangle (row i <= column j) is the valid half.
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = 0; i <= j; ++i) out[i * n + j] = out[j * n + i] = e.sum[i + j * n] * scale;
  return out;
}

void HessianAccumulator::save(const std::string& path, DType dtype) const {
  NUQ_CHECK(dtype == DType::F32 || dtype == DType::F64, Errc::invalid_argument,
            "{}: Hessian statistics are saved as F32 or F64, not {}", path, dtype_name(dtype));
  Json meta{{"kind", "hessian"},    {"version", kStatsVersion},    {"value", "mean"},
            {"counts", Json::object()}, {"aliases", Json::object()}, {"diagonal_only", diagonal_only_}};
  std::vector<PendingTensor> tensors;
  for (const auto& [name, e] : entries_) {
    meta["counts"][name] = e.count;
    const Entry* p = &e;
    const double scale = 1.0 / double(e.count);
    if (e.full) {
      tensors.push_back({name + kXtxSuffix, Shape{e.cols, e.cols}, [p, scale, dtype](std::vector<std::byte>& out) {
                           if (dtype == DType::F64)
                             store_symmetric<double>(p->sum, p->cols, scale, out);
                           else
                             store_symmetric<float>(p->sum, p->cols, scale, out);
                         }});
    }
    tensors.push_back({name + kXtxDiagSuffix, Shape{e.cols}, [p, scale, dtype](std::vector<std::byte>& out) {
                         if (dtype == DType::F64)
                           store_scaled<double>(p->diag_sum.data(), p->diag_sum.size(), scale, out);
                         else
                           store_scaled<float>(p->diag_sum.data(), p->diag_sum.size(), scale, out);
                       }});
  }
  for (const auto& [a, target] : aliases_) meta["aliases"][a] = target;
  write_stats_file(path, dtype, std::move(tensors), meta);
}

HessianAccumulator HessianAccumulator::load(const std::string& path) {
  const SafetensorsCheckpoint file(path);
  const Json meta = read_stats_metadata(file, path, StatsKind::hessian);
  HessianAccumulator acc(meta.value("diagonal_only", false));
  for (const std::string& tname : file.tensor_names()) {
    NUQ_CHECK(tname.ends_with(kXtxDiagSuffix) || tname.ends_with(kXtxSuffix), Errc::invalid_file,
              "{}: unexpected tensor '{}' in Hessian statistics (expected <layer>.xtx and <layer>.xtx_diag)", path,
              tname);
    if (!tname.ends_with(kXtxDiagSuffix)) continue;
    const std::string name = tname.substr(0, tname.size() - std::string_view(kXtxDiagSuffix).size());
    const Shape& ds = file.info(tname).shape;
    NUQ_CHECK(ds.rank() == 1 && ds[0] > 0, Errc::invalid_file, "{}: '{}' has shape {}, expected [cols]", path, tname,
              to_string(ds));
    Entry e;
    e.cols = ds[0];
    e.count = count_of(meta, name, path);
    e.diag_sum = read_values(file, path, tname, true);
    for (double& d : e.diag_sum) d *= double(e.count);
    const std::string xtx = name + kXtxSuffix;
    if (file.contains(xtx) && !acc.diagonal_only_) {
      const Shape& ms = file.info(xtx).shape;
      NUQ_CHECK(ms == Shape({e.cols, e.cols}), Errc::invalid_file, "{}: '{}' has shape {}, expected [{}, {}]", path, xtx,
                to_string(ms), e.cols, e.cols);
      const std::vector<double> m = read_values(file, path, xtx, false);
      e.full = true;
      e.sum.resize(m.size());
      for (int64_t j = 0; j < e.cols; ++j)
        for (int64_t i = 0; i < e.cols; ++i) e.sum[i + j * e.cols] = m[i * e.cols + j] * double(e.count);
    }
    acc.entries_.emplace(name, std::move(e));
  }
  for (const std::string& tname : file.tensor_names())
    if (tname.ends_with(kXtxSuffix))
      NUQ_CHECK(acc.entries_.count(tname.substr(0, tname.size() - std::string_view(kXtxSuffix).size())),
                Errc::invalid_file, "{}: '{}' has no matching '{}{}'", path, tname,
                tname.substr(0, tname.size() - std::string_view(kXtxSuffix).size()), kXtxDiagSuffix);
  if (meta.contains("aliases") && meta["aliases"].is_object())
    for (const auto& [a, target] : meta["aliases"].items()) {
      NUQ_CHECK(target.is_string() && acc.entries_.count(target.get<std::string>()), Errc::invalid_file,
                "{}: alias '{}' points to {}, which has no statistics in the file", path, a, target.dump());
      acc.aliases_[a] = target.get<std::string>();
    }
  return acc;
}

// ---- streaming reader -----------------------------------------------------------------------------

StatisticsFile::StatisticsFile(const std::string& path)
    : path_(path), kind_(detect_stats_kind(path)), file_(std::make_unique<SafetensorsCheckpoint>(path)) {
  calibrate_ = is_calibrate_file(*file_);
  if (calibrate_) return;
  const Json meta = read_stats_metadata(*file_, path, kind_);
  if (kind_ == StatsKind::hessian && meta.contains("aliases") && meta["aliases"].is_object())
    for (const auto& [a, target] : meta["aliases"].items()) {
      NUQ_CHECK(target.is_string(), Errc::invalid_file, "{}: alias '{}' is {}, expected a layer name", path, a,
                target.dump());
      aliases_[a] = target.get<std::string>();
    }
}

StatisticsFile::~StatisticsFile() = default;
StatisticsFile::StatisticsFile(StatisticsFile&&) noexcept = default;

bool StatisticsFile::has_fisher(std::string_view name) const {
  return kind_ == StatsKind::fisher && file_->contains(name);
}

std::vector<float> StatisticsFile::fisher(std::string_view name, const Shape& shape) const {
  NUQ_CHECK(kind_ == StatsKind::fisher, Errc::invalid_argument, "{}: holds Hessian statistics, not Fisher", path_);
  NUQ_CHECK(file_->contains(name), Errc::invalid_argument, "{}: no Fisher tensor '{}'", path_, name);
  const std::string n(name);
  const SafetensorsTensorInfo& info = file_->info(n);
  NUQ_CHECK(info.shape == shape, Errc::invalid_argument, "{}: Fisher tensor '{}' has shape {} but the weight has shape {}",
            path_, name, to_string(info.shape), to_string(shape));
  const std::vector<double> v = read_values(*file_, path_, n, true);
  release_mapped_pages(file_->file_of(n).tensor_bytes(info));
  return std::vector<float>(v.begin(), v.end());
}

std::string StatisticsFile::resolve(std::string_view base) const {
  const auto it = aliases_.find(base);
  return it == aliases_.end() ? std::string(base) : it->second;
}

std::string StatisticsFile::diag_name(std::string_view base) const {
  return resolve(base) + (calibrate_ ? ".weight" : kXtxDiagSuffix);
}

bool StatisticsFile::has_layer(std::string_view base) const {
  return kind_ == StatsKind::hessian && file_->contains(diag_name(base));
}

bool StatisticsFile::has_hessian_matrix(std::string_view base, int64_t cols) const {
  NUQ_CHECK(kind_ == StatsKind::hessian, Errc::invalid_argument, "{}: holds Fisher statistics, not Hessian", path_);
  const std::string name = resolve(base) + kXtxSuffix;
  if (calibrate_ || !file_->contains(name)) return false;
  const SafetensorsTensorInfo& info = file_->info(name);
  NUQ_CHECK(info.shape == Shape({cols, cols}), Errc::invalid_argument,
            "{}: '{}' has shape {} but layer '{}' has {} input columns", path_, name, to_string(info.shape), base, cols);
  return true;
}

std::vector<double> StatisticsFile::hessian_matrix(std::string_view base, int64_t cols) const {
  if (!has_hessian_matrix(base, cols)) return {};
  const std::string name = resolve(base) + kXtxSuffix;
  const SafetensorsTensorInfo& info = file_->info(name);
  std::vector<double> v = read_values(*file_, path_, name, false);
  release_mapped_pages(file_->file_of(name).tensor_bytes(info));
  return v;
}

std::vector<double> StatisticsFile::hessian_diagonal(std::string_view base, int64_t cols) const {
  NUQ_CHECK(kind_ == StatsKind::hessian, Errc::invalid_argument, "{}: holds Fisher statistics, not Hessian", path_);
  const std::string name = diag_name(base);
  NUQ_CHECK(file_->contains(name), Errc::invalid_argument, "{}: no Hessian statistics for layer '{}'{}", path_, base,
            resolve(base) == base ? std::string() : fmt::format(" (alias of '{}')", resolve(base)));
  const SafetensorsTensorInfo& info = file_->info(name);
  NUQ_CHECK(info.shape == Shape({cols}), Errc::invalid_argument,
            "{}: '{}' has shape {} but layer '{}' has {} input columns", path_, name, to_string(info.shape), base, cols);
  return read_values(*file_, path_, name, true);
}

// ---- Hutchinson ---------------------------------------------------------------------------------------

TraceEstimate hutchinson_trace(const HessianVectorProduct& hvp, int64_t n, const HutchinsonOptions& options) {
  NUQ_CHECK(n > 0, Errc::invalid_argument, "Hutchinson: dimension must be positive, got {}", n);
  NUQ_CHECK(bool(hvp), Errc::invalid_argument, "Hutchinson: no Hessian-vector product given");
  NUQ_CHECK(options.min_probes >= 1 && options.max_probes >= options.min_probes, Errc::invalid_argument,
            "Hutchinson: need 1 <= min_probes ({}) <= max_probes ({})", options.min_probes, options.max_probes);
  NUQ_CHECK(options.rel_tolerance >= 0 && std::isfinite(options.rel_tolerance), Errc::invalid_argument,
            "Hutchinson: relative tolerance must be finite and >= 0, got {}", options.rel_tolerance);
  // mt19937_64 is specified bit for bit by the standard, so the probes are the same on every platform.
  std::mt19937_64 rng(options.seed);
  std::vector<float> v(static_cast<std::size_t>(n)), hv(static_cast<std::size_t>(n));
  TraceEstimate est;
  double mean = 0, m2 = 0;  // Welford's running mean and sum of squared deviations
  for (int64_t k = 1; k <= options.max_probes; ++k) {
    for (int64_t i = 0; i < n; i += 64) {
      uint64_t bits = rng();
      for (int64_t j = i; j < std::min(n, i + 64); ++j, bits >>= 1) v[j] = (bits & 1) ? 1.0f : -1.0f;
    }
    std::fill(hv.begin(), hv.end(), 0.0f);
    hvp(v.data(), hv.data());
    double sample = 0;
    for (int64_t i = 0; i < n; ++i) sample += double(v[i]) * double(hv[i]);
    NUQ_CHECK(std::isfinite(sample), Errc::invalid_argument,
              "Hutchinson: probe {} gave vᵀHv = {} (the Hessian-vector product returned NaN/Inf)", k, sample);
    const double delta = sample - mean;
    mean += delta / double(k);
    m2 += delta * (sample - mean);
    est.probes = k;
    est.trace = mean;
    est.standard_error = k > 1 ? std::sqrt(m2 / double(k - 1) / double(k)) : 0.0;
    if (k >= options.min_probes && est.standard_error <= options.rel_tolerance * std::abs(mean)) {
      est.converged = true;
      break;
    }
  }
  return est;
}

}  // namespace nuq
