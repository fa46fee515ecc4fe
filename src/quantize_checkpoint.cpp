// Whole-checkpoint quantization (include/nuq/quantize_checkpoint.hpp, docs/quantize-cli.md).
//
// The job runs in two phases so that a crash can never cost more than one layer and never corrupts
// anything:
//   1. Each selected layer is quantized on its own and saved as a small safetensors file in
//      <out>/.nuq-partial (written to a temporary name and renamed, so a file there is always whole).
//      job.json, written before any layer, fingerprints the input and every setting that affects the
//      bytes of a layer, so a resumed run can only combine layers that a fresh run would also produce.
//   2. The output files are assembled from the input (unquantized tensors, copied piece by piece from
//      the memory map) and the layer files, in input order; this phase only copies bytes, so running it
//      again after an interruption produces the same files. The partial directory goes last.
// At most one layer's fp32 weights, its sensitivities and its packed form are in memory at a time.
#include "nuq/quantize_checkpoint.hpp"


#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <regex>
#include <set>
#include <sstream>

#include "nuq/gguf.hpp"
#include "nuq/inspect.hpp"
#include "nuq/safetensors.hpp"
#include "nuq/sensitivity.hpp"
#include "nuq/version.hpp"
#include "run_identity.hpp"
#include "tensor_names.hpp"

namespace nuq {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;
using Clock = std::chrono::steady_clock;

// Copies of unquantized tensors go through memory in pieces of this size, so that an embedding table
// of several GiB never has to be resident at once.
constexpr uint64_t kCopyChunkBytes = uint64_t(64) << 20;

// Version of the partial-directory layout; a different one is never resumed.
constexpr int kPartialVersion = 1;

constexpr const char* kSingleFileName = "model.safetensors";
constexpr const char* kIndexFileName = "model.safetensors.index.json";
constexpr const char* kJobFileName = "job.json";
constexpr const char* kLayerMetadataKey = "nuq_layer";

// Small files of a Hugging Face model directory that belong with the weights; copied unchanged.
constexpr const char* kCompanionFiles[] = {
    "config.json",          "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "tokenizer.model",      "special_tokens_map.json", "vocab.json",    "merges.txt",
    "vocab.txt",            "added_tokens.json",       "chat_template.jinja",
};

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

std::string in_quotes(std::string_view s) { return fmt::format("'{}'", s); }

std::string size_text(uint64_t bytes) {
  if (bytes >= (uint64_t(1) << 30)) return fmt::format("{:.2f} GiB", double(bytes) / double(uint64_t(1) << 30));
  if (bytes >= (uint64_t(1) << 20)) return fmt::format("{:.1f} MiB", double(bytes) / double(1 << 20));
  return fmt::format("{:.1f} KiB", double(bytes) / 1024.0);
}

// ---- the input checkpoint -----------------------------------------------------------------------------

struct SourceTensor {
  std::string name;
  std::string dtype;  // as the input names it: "F32", "BF16", "Q4_1"
  Shape shape;        // row-major
  DType out_dtype = DType::F32;  // dtype when written unquantized
  bool floating = false;         // can be read as fp32 for quantization
  bool dequantize_on_copy = false;  // a block-quantized GGUF tensor, written unquantized as F32
};

// A safetensors checkpoint or a GGUF file behind one interface: list tensors, read one as fp32, or
// stream one into a writer unquantized.
class InputCheckpoint {
 public:
  explicit InputCheckpoint(const std::string& path) : path_(path), kind_(detect_checkpoint_kind(path)) {
    if (kind_ == CheckpointKind::gguf) {
      gguf_ = std::make_unique<GgufFile>(path);
      for (const GgufTensorInfo& info : gguf_->tensors()) {
        const GgmlTypeTraits* traits = ggml_type_traits(uint32_t(info.type));
        SourceTensor t{info.name, std::string(traits->name), info.shape};
        switch (info.type) {
          case GgmlType::F32: t.out_dtype = DType::F32; break;
          case GgmlType::F16: t.out_dtype = DType::F16; break;
          case GgmlType::BF16: t.out_dtype = DType::BF16; break;
          case GgmlType::I8: t.out_dtype = DType::I8; break;
          case GgmlType::I16: t.out_dtype = DType::I16; break;
          case GgmlType::I32: t.out_dtype = DType::I32; break;
          case GgmlType::I64: t.out_dtype = DType::I64; break;
          case GgmlType::F64: t.out_dtype = DType::F64; break;
          default:
            // Block-quantized ggml types have no safetensors dtype: they are written dequantized.
            NUQ_CHECK(traits->can_dequantize, Errc::unsupported,
                      "{}: tensor {} has ggml type {}, which nuq cannot decode", path, in_quotes(info.name),
                      traits->name);
            t.out_dtype = DType::F32;
            t.dequantize_on_copy = true;
        }
        t.floating = traits->can_dequantize && info.type != GgmlType::I8 && info.type != GgmlType::I16 &&
                     info.type != GgmlType::I32 && info.type != GgmlType::I64;
        tensors_.push_back(std::move(t));
      }
      files_.push_back(path);
      directory_ = fs::path(path).parent_path();
    } else {
      st_ = std::make_unique<SafetensorsCheckpoint>(path);
      for (const std::string& name : st_->tensor_names()) {
        const SafetensorsTensorInfo& info = st_->info(name);
        SourceTensor t{name, std::string(dtype_name(info.dtype)), info.shape, info.dtype};
        t.floating = info.dtype == DType::F32 || info.dtype == DType::F16 || info.dtype == DType::BF16;
        tensors_.push_back(std::move(t));
      }
      for (const auto& f : st_->files()) files_.push_back(f->path());
      directory_ = fs::is_directory(path) ? fs::path(path) : fs::path(path).parent_path();
    }
  }

  const std::string& path() const { return path_; }
  CheckpointKind kind() const { return kind_; }
  const std::vector<SourceTensor>& tensors() const { return tensors_; }
  const std::vector<std::string>& files() const { return files_; }
  const fs::path& directory() const { return directory_; }

  // Metadata worth carrying into the output: the input's own safetensors metadata, or GGUF's scalar
  // key-values (architecture, hyperparameters) as one JSON object.
  std::map<std::string, std::string> carried_metadata() const {
    std::map<std::string, std::string> out;
    if (gguf_) {
      Json j = Json::object();
      for (const GgufKeyValue& kv : gguf_->metadata()) {
        const GgufValue& v = kv.value;
        switch (v.type) {
          case GgufValueType::ARRAY: break;  // tokenizer tables: large, left in the GGUF file
          case GgufValueType::STRING: j[kv.key] = v.as_string(); break;
          case GgufValueType::BOOL: j[kv.key] = v.as_bool(); break;
          case GgufValueType::FLOAT32:
          case GgufValueType::FLOAT64: j[kv.key] = v.as_float(); break;
          case GgufValueType::INT8:
          case GgufValueType::INT16:
          case GgufValueType::INT32:
          case GgufValueType::INT64: j[kv.key] = v.as_int(); break;
          default: j[kv.key] = v.as_uint(); break;
        }
      }
      out["gguf_metadata"] = j.dump();
    } else {
      for (const auto& [k, v] : st_->metadata())
        if (k != kQuantizationConfigKey && k != "total_size") out[k] = v;
    }
    return out;
  }

  bool already_quantized() const { return st_ && st_->metadata().count(kQuantizationConfigKey); }

  Buffer read_float32(const SourceTensor& t) const {
    Buffer out = gguf_ ? gguf_->dequantize(t.name) : to_float32(st_->tensor(t.name));
    release_mapped_pages(raw_bytes(t));
    return out;
  }

  // The tensor's bytes in the input's mapping.
  std::span<const std::byte> raw_bytes(const SourceTensor& t) const {
    if (gguf_) return gguf_->tensor_bytes(*gguf_->find_tensor(t.name));
    return st_->file_of(t.name).tensor_bytes(st_->info(t.name));
  }

  // Streams tensor `t` unquantized into `writer` (declared there as t.name, t.out_dtype, t.shape).
  void copy_to(const SourceTensor& t, SafetensorsWriter& writer) const {
    if (st_) {
      const SafetensorsTensorInfo& info = st_->info(t.name);
      const std::span<const std::byte> bytes = st_->file_of(t.name).tensor_bytes(info);
      copy_in_chunks(t.name, bytes, writer);
      return;
    }
    const GgufTensorInfo& info = *gguf_->find_tensor(t.name);
    const std::span<const std::byte> bytes = gguf_->tensor_bytes(info);
    if (!t.dequantize_on_copy) {
      copy_in_chunks(t.name, bytes, writer);
      return;
    }
    // Dequantize whole rows at a time (a row is a whole number of ggml blocks).
    const GgmlTypeTraits* traits = ggml_type_traits(uint32_t(info.type));
    const int64_t row = int64_t(info.ne[0]);
    const int64_t rows = row ? t.shape.numel() / row : 0;
    const uint64_t row_in = uint64_t(row) / traits->block_size * traits->type_size;
    const int64_t rows_per_chunk = std::max<int64_t>(1, int64_t(kCopyChunkBytes / 4) / std::max<int64_t>(row, 1));
    std::vector<float> out;
    for (int64_t r0 = 0; r0 < rows; r0 += rows_per_chunk) {
      const int64_t n = std::min(rows_per_chunk, rows - r0);
      out.resize(std::size_t(n * row));
      ggml_dequantize(info.type, bytes.data() + uint64_t(r0) * row_in, out.data(), n * row);
      writer.write(t.name, std::as_bytes(std::span<const float>(out)), uint64_t(r0 * row) * 4);
      release_mapped_pages(bytes.subspan(uint64_t(r0) * row_in, uint64_t(n) * row_in));
    }
  }

  static void copy_in_chunks(const std::string& name, std::span<const std::byte> bytes, SafetensorsWriter& writer) {
    for (uint64_t off = 0; off < bytes.size(); off += kCopyChunkBytes) {
      const auto piece = bytes.subspan(off, std::min<uint64_t>(kCopyChunkBytes, bytes.size() - off));
      writer.write(name, piece, off);
      release_mapped_pages(piece);
    }
  }

 private:
  std::string path_;
  CheckpointKind kind_;
  std::unique_ptr<SafetensorsCheckpoint> st_;
  std::unique_ptr<GgufFile> gguf_;
  std::vector<SourceTensor> tensors_;
  std::vector<std::string> files_;
  fs::path directory_;
};

// ---- the plan -------------------------------------------------------------------------------------------

struct PlanEntry {
  std::optional<int> bits;
  std::optional<QuantMethod> method;
  std::optional<int64_t> group_size;
  std::optional<double> outlier_fraction, sensitive_fraction;
  std::optional<bool> outliers_per_row;
};

// {"layers": {name: {"bits": 3, "method": "nuq", "group_size": 0, "outlier_fraction": 0.004,
//  "sensitive_fraction": 0.0005, "outliers_per_row": false}}}; every field optional, unknown ones refused
// (a misspelt key would otherwise be silently ignored).
std::map<std::string, PlanEntry> load_plan(const std::string& path) {
  const Json j = Json::parse(read_small_file(path, "the plan"), nullptr, false);
  NUQ_CHECK(!j.is_discarded() && j.is_object(), Errc::invalid_file, "{}: plan is not a JSON object", path);
  auto layers = j.find("layers");
  NUQ_CHECK(layers != j.end() && layers->is_object(), Errc::invalid_file,
            "{}: plan has no \"layers\" object mapping tensor names to settings", path);
  std::map<std::string, PlanEntry> plan;
  // Plain references rather than structured bindings: clang 14 cannot capture bindings in the lambda.
  for (const auto& layer : layers->items()) {
    const std::string& name = layer.key();
    const Json& e = layer.value();
    NUQ_CHECK(e.is_object(), Errc::invalid_file, "{}: plan entry {} is not an object", path, in_quotes(name));
    PlanEntry p;
    for (const auto& setting : e.items()) {
      const std::string& key = setting.key();
      const Json& v = setting.value();
      auto bad = [&](std::string_view want) {
        fail(Errc::invalid_file, "{}: plan entry {}: \"{}\" is {}, expected {}", path, in_quotes(name), key, v.dump(),
             want);
      };
      if (key == "bits") {
        if (!v.is_number_integer() || !format::is_supported_bits(v.get<int>())) bad("2, 3 or 4");
        p.bits = v.get<int>();
      } else if (key == "method") {
        if (!v.is_string() || !(v == "nuq" || v == "kmeans" || v == "rtn")) bad("\"nuq\", \"kmeans\" or \"rtn\"");
        p.method = parse_quant_method(v.get<std::string>());
      } else if (key == "group_size") {
        if (!v.is_number_integer() || v.get<int64_t>() < 0) bad("an integer >= 0");
        p.group_size = v.get<int64_t>();
      } else if (key == "outlier_fraction" || key == "sensitive_fraction") {
        if (!v.is_number() || !(v.get<double>() >= 0 && v.get<double>() < 1)) bad("a fraction in [0, 1)");
        (key == "outlier_fraction" ? p.outlier_fraction : p.sensitive_fraction) = v.get<double>();
      } else if (key == "outliers_per_row") {
        if (!v.is_boolean()) bad("true or false");
        p.outliers_per_row = v.get<bool>();
      } else {
        fail(Errc::invalid_file,
             "{}: plan entry {}: unknown setting \"{}\" (known: bits, method, group_size, outlier_fraction, "
             "sensitive_fraction, outliers_per_row)",
             path, in_quotes(name), key);
      }
    }
    plan.emplace(name, p);
  }
  return plan;
}

// ---- layer records --------------------------------------------------------------------------------------

std::string_view to_string(SensitivitySource s) {
  switch (s) {
    case SensitivitySource::none: return "none";
    case SensitivitySource::fisher: return "fisher";
    case SensitivitySource::missing: return "missing";
  }
  return "none";
}

// The record as stored in a layer file and in quant_report.json. Doubles go through nlohmann's
// shortest round-trip formatting, so a record read back from a layer file prints identically.
Json to_json(const QuantizedTensorRecord& r) {
  return Json{{"name", r.name},
              {"base", r.base},
              {"rows", r.rows},
              {"cols", r.cols},
              {"source_dtype", r.source_dtype},
              {"bits", r.bits},
              {"method", std::string(to_string(r.method))},
              {"group_size", r.group_size},
              {"nnz", r.nnz},
              {"outliers", r.outliers},
              {"sensitive", r.sensitive},
              {"outlier_fraction", r.outlier_fraction},
              {"sensitive_fraction", r.sensitive_fraction},
              {"mse", r.mse},
              {"weighted_mse", r.weighted_mse},
              {"max_abs_error", r.max_abs_error},
              {"bits_per_weight", r.bits_per_weight},
              {"sensitivity", std::string(to_string(r.sensitivity))},
              {"error_feedback", r.error_feedback},
              {"relative_output_error", r.relative_output_error}};
}

QuantizedTensorRecord record_from_json(const Json& j) {
  QuantizedTensorRecord r;
  r.name = j.at("name").get<std::string>();
  r.base = j.at("base").get<std::string>();
  r.rows = j.at("rows").get<int64_t>();
  r.cols = j.at("cols").get<int64_t>();
  r.source_dtype = j.at("source_dtype").get<std::string>();
  r.bits = j.at("bits").get<int>();
  r.method = parse_quant_method(j.at("method").get<std::string>());
  r.group_size = j.at("group_size").get<int64_t>();
  r.nnz = j.at("nnz").get<int64_t>();
  r.outliers = j.at("outliers").get<int64_t>();
  r.sensitive = j.at("sensitive").get<int64_t>();
  r.outlier_fraction = j.at("outlier_fraction").get<double>();
  r.sensitive_fraction = j.at("sensitive_fraction").get<double>();
  r.mse = j.at("mse").get<double>();
  r.weighted_mse = j.at("weighted_mse").get<double>();
  r.max_abs_error = j.at("max_abs_error").get<double>();
  r.bits_per_weight = j.at("bits_per_weight").get<double>();
  const std::string s = j.at("sensitivity").get<std::string>();
  r.sensitivity = s == "fisher" ? SensitivitySource::fisher
                  : s == "missing" ? SensitivitySource::missing
                                   : SensitivitySource::none;
  r.error_feedback = j.value("error_feedback", false);
  r.relative_output_error = j.value("relative_output_error", 0.0);
  return r;
}

PackedTensorMeta meta_of(const QuantizedTensorRecord& r) {
  PackedTensorMeta m;
  m.bits = r.bits;
  m.rows = r.rows;
  m.cols = r.cols;
  m.group_size = r.group_size;
  m.nnz = r.nnz;
  m.method = std::string(to_string(r.method));
  m.source_dtype = r.source_dtype;
  return m;
}

// Output tensor names of a packed layer, in the order they are written.
std::vector<std::string> packed_tensor_names(const std::string& base, bool sparse) {
  std::vector<std::string> names{base + format::kQWeightSuffix, base + format::kLutSuffix};
  if (sparse)
    for (const char* s : {format::kSparseRowPtrSuffix, format::kSparseColIdxSuffix, format::kSparseValuesSuffix})
      names.push_back(base + s);
  return names;
}

// ---- the job ------------------------------------------------------------------------------------------

struct LayerJob {
  std::size_t tensor = 0;  // index into InputCheckpoint::tensors()
  std::string base;
  QuantizeOptions options;
  SensitivitySource sensitivity = SensitivitySource::none;
  std::string hessian_layer;  // the layer of the --hessian file whose XᵀX this one uses; empty: none
};

Json options_json(const QuantizeOptions& o) {
  return Json{{"method", std::string(to_string(o.method))},
              {"bits", o.bits},
              {"group_size", o.group_size},
              {"outlier_fraction", o.outlier_fraction},
              {"sensitive_fraction", o.sensitive_fraction},
              {"outliers_per_row", o.outliers_per_row},
              {"kmeans",
               {{"init", int(o.kmeans.init)},
                {"max_iterations", o.kmeans.max_iterations},
                {"dp_candidates", o.kmeans.dp_candidates},
                {"seed", o.kmeans.seed}}}};
}

// Everything that decides the bytes of a finished layer file. Thread counts and the shard size are
// left out on purpose: neither changes a layer, so a resumed run may change them.
Json job_fingerprint(const InputCheckpoint& in, const std::vector<LayerJob>& jobs, const std::string& fisher_path,
                     const SafetensorsCheckpoint* fisher, const std::string& hessian_path,
                     const std::string& tool_version) {
  Json j;
  j["partial_version"] = kPartialVersion;
  j["format_version"] = format::kVersion;
  j["tool"] = tool_version;
  Json files = Json::array();
  for (const std::string& f : in.files()) files.push_back(detail::file_identity(f));
  j["input"] = files;
  Json fisher_files = Json::array();
  if (fisher)
    for (const auto& f : fisher->files()) fisher_files.push_back(detail::file_identity(f->path()));
  j["fisher"] = fisher_path.empty() ? Json(nullptr) : fisher_files;
  // Added only when used, so that fingerprints of jobs without it (and their partial work) stay valid.
  if (!hessian_path.empty()) j["hessian"] = detail::file_identity(hessian_path);
  Json layers = Json::array();
  for (const LayerJob& job : jobs) {
    Json l{{"name", in.tensors()[job.tensor].name}, {"options", options_json(job.options)}};
    if (!job.hessian_layer.empty())
      l["error_feedback"] = Json{{"layer", job.hessian_layer},
                                 {"damping", job.options.hessian_damping},
                                 {"enabled", job.options.error_feedback}};
    layers.push_back(std::move(l));
  }
  j["layers"] = layers;
  return j;
}

// Names the first difference between two fingerprints, for an error message a user can act on.
std::string first_difference(const Json& was, const Json& now, const std::string& where = "") {
  if (was.type() != now.type()) return where.empty() ? "the job" : where;
  if (was.is_object()) {
    for (const auto& [k, v] : now.items()) {
      if (!was.contains(k)) return where + "/" + k;
      if (was[k] != v) return first_difference(was[k], v, where + "/" + k);
    }
    for (const auto& [k, v] : was.items())
      if (!now.contains(k)) return where + "/" + k;
  } else if (was.is_array()) {
    if (was.size() != now.size()) return fmt::format("{} ({} entries before, {} now)", where, was.size(), now.size());
    for (std::size_t i = 0; i < was.size(); ++i)
      if (was[i] != now[i]) return first_difference(was[i], now[i], fmt::format("{}[{}]", where, i));
  } else if (was != now) {
    return fmt::format("{} (was {}, now {})", where, was.dump(), now.dump());
  }
  return where;
}

bool matches_any(const std::vector<std::regex>& res, const std::string& name) {
  for (const std::regex& re : res)
    if (std::regex_search(name, re)) return true;
  return false;
}

std::vector<std::regex> compile_patterns(const std::vector<std::string>& patterns, const std::string& flag) {
  std::vector<std::regex> out;
  for (const std::string& p : patterns) {
    try {
      out.emplace_back(p, std::regex::ECMAScript);
    } catch (const std::regex_error& e) {
      fail(Errc::invalid_argument, "{} pattern {} is not a valid regular expression: {}", flag, in_quotes(p), e.what());
    }
  }
  return out;
}

void check_fraction(double f, std::string_view what) {
  NUQ_CHECK(f >= 0 && f < 1, Errc::invalid_argument, "{} must be a fraction in [0, 1), got {}", what, f);
}

// Removes temporary files a killed writer left behind (".<name>.tmp.<pid>.<n>", see safetensors.cpp).
void remove_stale_temporaries(const fs::path& dir) {
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string n = e.path().filename().string();
    if (n.size() > 1 && n[0] == '.' && n.find(".tmp.") != std::string::npos && e.is_regular_file())
      fs::remove(e.path(), ec);
  }
}

std::string shard_name(std::size_t i, std::size_t n) { return fmt::format("model-{:05d}-of-{:05d}.safetensors", i + 1, n); }

bool is_shard_name(const std::string& n) {
  static const std::regex re(R"(model-\d{5}-of-\d{5}\.safetensors)");
  return std::regex_match(n, re);
}

// The input's file or directory name, without the rest of its path, so that outputs do not depend on
// where the input happened to live.
std::string source_name(const std::string& input) {
  fs::path p = fs::path(input).lexically_normal();
  if (!p.has_filename()) p = p.parent_path();
  return p.filename().string();
}

// One tensor or one packed layer of the output, in output order; a layer's tensors stay in one file.
struct OutputUnit {
  std::size_t tensor = 0;           // input tensor
  std::optional<std::size_t> layer;  // index into jobs when quantized
  uint64_t bytes = 0;
};

}  // namespace

bool default_quantize_rule(std::string_view name, const Shape& shape) {
  if (shape.rank() != 2 || shape[0] < 2 || shape[1] < 2) return false;
  if (!name.ends_with(".weight")) return false;
  for (std::string_view keep : {"embed", "token_embd", "wte", "wpe", "norm", "lm_head", "classifier"})
    if (name.find(keep) != std::string_view::npos) return false;
  return name != "output.weight";
}

std::string_view default_quantize_rule_text() {
  return "2-D tensors whose names end in '.weight', except embeddings (embed, token_embd, wte, wpe), norms, "
         "and output heads (lm_head, classifier, GGUF's output.weight)";
}

namespace {

// One run of quantize_checkpoint, as the sequence of stages run() calls: check the options, open the
// inputs, choose the layers (and check everything that can be checked before hours of work), claim the
// output directory (refuse to clobber, resume or start the partial directory), quantize each layer into
// its own file, assemble the checkpoint. The members are what the stages hand on to each other.
class CheckpointRun {
 public:
  explicit CheckpointRun(const CheckpointQuantizeOptions& options)
      : options_(options),
        style_(options.arg_style),
        tool_(options.tool_version.empty() ? std::string("nuq ") + NUQ_VERSION_STRING : options.tool_version) {}

  QuantizeCheckpointResult run() {
    check_options();
    open_inputs();
    choose_layers();
    claim_output_directory();
    check_disk_space();
    quantize_layers();
    assemble_checkpoint();
    result_.seconds = seconds_since(t0_);
    report(CheckpointQuantizeProgress::Stage::done, n_jobs(), n_jobs(), options_.output_dir, 0, nullptr);
    return std::move(result_);
  }

 private:
  int64_t n_jobs() const { return int64_t(jobs_.size()); }
  const SourceTensor& tensor_of(const LayerJob& job) const { return in_->tensors()[job.tensor]; }
  std::string layer_file(std::size_t j) const {
    return (partial_ / fmt::format("layer-{:05d}.safetensors", j)).string();
  }

  void report(CheckpointQuantizeProgress::Stage stage, int64_t index, int64_t count, const std::string& name,
              double tensor_seconds, const QuantizedTensorRecord* layer) const {
    if (!options_.progress) return;
    CheckpointQuantizeProgress p;
    p.stage = stage;
    p.tensor_index = index;
    p.tensor_count = count;
    p.name = name;
    p.weights_done = weights_done_;
    p.weights_total = weights_total_;
    p.weights_resumed = weights_resumed_;
    p.elapsed_seconds = seconds_since(t0_);
    p.tensor_seconds = tensor_seconds;
    p.layer = layer;
    options_.progress(p);
  }

  void check_options() const {
    NUQ_CHECK(!options_.output_dir.empty(), Errc::invalid_argument, "no output directory given");
    NUQ_CHECK(format::is_supported_bits(options_.layer.bits), Errc::invalid_argument,
              "bits must be 2, 3 or 4, got {}", options_.layer.bits);
    check_fraction(options_.layer.outlier_fraction,
                   style_ == ArgStyle::cli ? "the outlier fraction" : "outlier_fraction");
    check_fraction(options_.layer.sensitive_fraction,
                   style_ == ArgStyle::cli ? "the sensitive fraction" : "sensitive_fraction");
    NUQ_CHECK(options_.max_shard_bytes > 0, Errc::invalid_argument, "the maximum shard size must be positive");
  }

  // The checkpoint, the plan and the statistics files, each checked as far as its header allows.
  void open_inputs() {
    in_.emplace(options_.input);
    NUQ_CHECK(!in_->already_quantized(), Errc::invalid_argument,
              "{}: this checkpoint is already quantized (it has quantization_config metadata)", options_.input);
    // config.json gets the quantization_config at the very end; a broken one is refused before any work.
    if (const fs::path config = in_->directory() / "config.json";
        in_->kind() != CheckpointKind::gguf && fs::is_regular_file(config))
      hf_config_with_quantization(read_small_file(config.string(), "a companion file"), {}, config.string());
    include_ = compile_patterns(options_.include, arg_name(style_, "--include", "include"));
    exclude_ = compile_patterns(options_.exclude, arg_name(style_, "--exclude", "exclude"));
    if (!options_.plan_path.empty()) plan_ = load_plan(options_.plan_path);
    if (!options_.fisher_path.empty()) fisher_ = std::make_unique<SafetensorsCheckpoint>(options_.fisher_path);
    if (!options_.hessian_path.empty()) {
      hessian_ = std::make_unique<StatisticsFile>(options_.hessian_path);
      NUQ_CHECK(hessian_->kind() == StatsKind::hessian && !hessian_->is_calibrate_output(), Errc::invalid_argument,
                "{}: {} needs the full XᵀX statistics of {} (this file holds {})", options_.hessian_path,
                arg_name(style_, "--hessian", "hessian"),
                arg_name(style_, "`nuq calibrate --hessian`", "nuq.calibrate(..., hessian=...)"),
                hessian_->is_calibrate_output() ? "per-column means only" : "Fisher statistics");
      NUQ_CHECK(std::isfinite(options_.hessian_damping) && options_.hessian_damping >= 0, Errc::invalid_argument,
                "{} must be finite and >= 0, got {}", arg_name(style_, "the Hessian damping", "damping"),
                options_.hessian_damping);
    }
  }

  // The plan's entry for tensor t (by its name or its base name), marked as used.
  const PlanEntry* plan_entry(const SourceTensor& t, const std::string& base) {
    for (const std::string& key : {t.name, base}) {
      auto it = plan_.find(key);
      if (it != plan_.end()) {
        plan_used_.insert(key);
        return &it->second;
      }
    }
    return nullptr;
  }

  bool selected(const SourceTensor& t, const PlanEntry* entry) {
    if (matches_any(exclude_, t.name)) {
      if (entry)
        result_.warnings.push_back(fmt::format("{} is in the plan but excluded by {}: kept unquantized", t.name,
                                               arg_name(style_, "--exclude", "exclude")));
      return false;
    }
    if (entry) {
      NUQ_CHECK(t.shape.rank() == 2, Errc::invalid_argument,
                "{}: plan entry {} names a tensor of shape {}; only 2-D weights are quantized", options_.plan_path,
                in_quotes(t.name), to_string(t.shape));
      return true;
    }
    if (!include_.empty()) return matches_any(include_, t.name) && t.shape.rank() == 2 && t.shape.numel() > 0;
    return t.floating && default_quantize_rule(t.name, t.shape);
  }

  void choose_layers() {
    job_of_.assign(in_->tensors().size(), std::nullopt);
    std::set<std::string> input_names;
    for (const SourceTensor& t : in_->tensors()) input_names.insert(t.name);
    for (std::size_t i = 0; i < in_->tensors().size(); ++i) {
      const SourceTensor& t = in_->tensors()[i];
      const std::string base = detail::weight_base(t.name);
      const PlanEntry* entry = plan_entry(t, base);
      if (!selected(t, entry)) continue;
      LayerJob job = make_job(i, base, entry);
      for (const std::string& out : packed_tensor_names(base, true))
        NUQ_CHECK(!input_names.count(out), Errc::invalid_argument,
                  "{}: quantizing {} would write {}, which the input already has", options_.input, in_quotes(t.name),
                  in_quotes(out));
      if (fisher_) check_sensitivity(t, job);
      if (hessian_) attach_hessian(t, job);
      job_of_[i] = jobs_.size();
      jobs_.push_back(std::move(job));
    }
    for (const auto& [name, entry] : plan_)
      NUQ_CHECK(plan_used_.count(name), Errc::invalid_argument, "{}: plan names {}, which is not a tensor of {}",
                options_.plan_path, in_quotes(name), options_.input);
    NUQ_CHECK(!jobs_.empty(), Errc::invalid_argument,
              "{}: no tensor selected for quantization (the default rule takes {}; use {} to choose others)",
              options_.input, default_quantize_rule_text(), arg_name(style_, "--include", "include"));
  }

  LayerJob make_job(std::size_t i, const std::string& base, const PlanEntry* entry) const {
    const SourceTensor& t = in_->tensors()[i];
    NUQ_CHECK(t.floating, Errc::unsupported,
              "{}: tensor {} has dtype {}; nuq quantizes F32, F16 and BF16 weights (and decodable GGUF types). "
              "Leave it out with {}",
              options_.input, in_quotes(t.name), t.dtype, arg_name(style_, "--exclude", "exclude"));
    LayerJob job;
    job.tensor = i;
    job.base = base;
    job.options = options_.layer;
    if (entry) {
      if (entry->bits) job.options.bits = *entry->bits;
      if (entry->method) job.options.method = *entry->method;
      if (entry->group_size) job.options.group_size = *entry->group_size;
      if (entry->outlier_fraction) job.options.outlier_fraction = *entry->outlier_fraction;
      if (entry->sensitive_fraction) job.options.sensitive_fraction = *entry->sensitive_fraction;
      if (entry->outliers_per_row) job.options.outliers_per_row = *entry->outliers_per_row;
    }
    job.options.threads = options_.threads;
    const int64_t cols = t.shape[1];
    NUQ_CHECK(job.options.group_size == 0 || cols % job.options.group_size == 0, Errc::invalid_argument,
              "{}: group size {} does not divide the {} columns of {} (shape {})", options_.input,
              job.options.group_size, cols, in_quotes(t.name), to_string(t.shape));
    return job;
  }

  // The --fisher file's tensor for t: its shape, dtype and values are checked now rather than at the layer's
  // turn, since sensitivities come from user code (NaN gradients are common) and a fixed file is a different
  // job, so a late failure would cost the work before it.
  void check_sensitivity(const SourceTensor& t, LayerJob& job) {
    if (!fisher_->contains(t.name)) {
      job.sensitivity = SensitivitySource::missing;
      result_.warnings.push_back(fmt::format("{} has no tensor {}: that layer is quantized unweighted",
                                             options_.fisher_path, in_quotes(t.name)));
      return;
    }
    const SafetensorsTensorInfo& f = fisher_->info(t.name);
    // A 1-D [cols] tensor weighs input columns (activation statistics, diag(XᵀX)) and applies to every row.
    const bool per_column = f.shape.rank() == 1 && f.shape[0] == t.shape[1];
    NUQ_CHECK(f.shape == t.shape || per_column, Errc::invalid_argument,
              "{}: sensitivity {} has shape {} but the weight in {} has shape {} (expected {} or [{}])",
              options_.fisher_path, in_quotes(t.name), to_string(f.shape), options_.input, to_string(t.shape),
              to_string(t.shape), t.shape[1]);
    NUQ_CHECK(f.dtype == DType::F32 || f.dtype == DType::F16 || f.dtype == DType::BF16, Errc::unsupported,
              "{}: sensitivity {} has dtype {}; expected F32, F16 or BF16", options_.fisher_path, in_quotes(t.name),
              dtype_name(f.dtype));
    job.sensitivity = job.options.method == QuantMethod::nuq ? SensitivitySource::fisher : SensitivitySource::none;
    if (job.sensitivity == SensitivitySource::fisher) {
      const Buffer sens = to_float32(fisher_->tensor(t.name));
      release_mapped_pages(fisher_->file_of(t.name).tensor_bytes(f));
      const float* s = sens.data_as<float>();
      const int64_t n = f.shape.numel(), cols = f.shape[f.shape.rank() - 1];
      for (int64_t k = 0; k < n; ++k)
        NUQ_CHECK(std::isfinite(s[k]) && s[k] >= 0, Errc::invalid_argument,
                  "{}: sensitivity {} at {} is {} (must be finite and >= 0)", options_.fisher_path, in_quotes(t.name),
                  per_column ? fmt::format("[{}]", k) : fmt::format("[{}, {}]", k / cols, k % cols), s[k]);
    }
    if (job.options.method != QuantMethod::nuq && !warned_ignored_sensitivity_) {
      warned_ignored_sensitivity_ = true;
      result_.warnings.push_back(fmt::format("method {} does not use sensitivities: {} is ignored for its layers",
                                             to_string(job.options.method), options_.fisher_path));
    }
  }

  // The --hessian layer whose XᵀX t's error feedback uses. Checked now, not at the layer's turn: a wrong
  // width or a full matrix missing fails before any work. The header says both; the values (20 GiB for a
  // 7B model) are checked as each is read.
  void attach_hessian(const SourceTensor& t, LayerJob& job) {
    const std::string layer = detail::weight_base(t.name);
    if (!hessian_->has_layer(layer)) {
      if (!warned_missing_hessian_) {
        warned_missing_hessian_ = true;
        result_.warnings.push_back(fmt::format("{} has no statistics for {} (and maybe others): those layers are "
                                               "rounded without error feedback",
                                               options_.hessian_path, in_quotes(layer)));
      }
      return;
    }
    job.hessian_layer = hessian_->resolve(layer);
    NUQ_CHECK(hessian_->has_hessian_matrix(layer, t.shape[1]), Errc::invalid_argument,
              "{}: layer {} has only the diagonal of XᵀX; error feedback needs the full matrix (nuq "
              "calibrate --hessian)", options_.hessian_path, in_quotes(layer));
    job.options.hessian_damping = options_.hessian_damping;
    job.options.error_feedback = options_.error_feedback;
  }

  // The output directory: refuse to clobber, then resume the partial directory or start it.
  void claim_output_directory() {
    out_dir_ = fs::path(options_.output_dir);
    std::error_code ec;
    fs::create_directories(out_dir_, ec);
    NUQ_CHECK(!ec && fs::is_directory(out_dir_), Errc::io, "{}: cannot create the output directory: {}",
              options_.output_dir, ec.message());
    for (const std::string& f : in_->files())
      NUQ_CHECK(!fs::equivalent(fs::path(f).parent_path().empty() ? fs::path(".") : fs::path(f).parent_path(),
                                out_dir_, ec),
                Errc::invalid_argument, "{}: the output directory holds the input checkpoint {}; choose another",
                options_.output_dir, f);
    partial_ = out_dir_ / kPartialDirName;
    for (const auto& e : fs::directory_iterator(out_dir_)) {
      // A previous run died while deleting its finished partial directory.
      const std::string n = e.path().filename().string();
      if (n.rfind(std::string(kPartialDirName) + ".done", 0) == 0) fs::remove_all(e.path(), ec);
    }
    remove_stale_temporaries(out_dir_);
    const bool complete_exists = !fs::exists(partial_) && (fs::exists(out_dir_ / kSingleFileName) ||
                                                           fs::exists(out_dir_ / kIndexFileName));
    NUQ_CHECK(!complete_exists || options_.force, Errc::invalid_argument,
              "{} already holds a quantized checkpoint; pass {} to replace it", options_.output_dir,
              flag_name(style_, "--force", "force"));
    if (options_.restart) fs::remove_all(partial_);
    open_partial_directory();
  }

  void open_partial_directory() {
    const Json fingerprint =
        job_fingerprint(*in_, jobs_, options_.fisher_path, fisher_.get(), options_.hessian_path, tool_);
    const fs::path job_file = partial_ / kJobFileName;
    if (fs::exists(partial_) && !fs::exists(job_file)) {
      // job.json is written before any layer, so a partial directory without it holds no work.
      fs::remove_all(partial_);
    }
    if (fs::exists(partial_)) {
      // Nothing finished there (a run that failed on its first layer): nothing to lose by starting over.
      bool has_layers = false;
      for (const auto& e : fs::directory_iterator(partial_))
        has_layers |= e.path().filename().string().rfind("layer-", 0) == 0;
      if (!has_layers) fs::remove_all(partial_);
    }
    if (fs::exists(partial_)) {
      const Json was = Json::parse(read_small_file(job_file.string(), "the saved job"), nullptr, false);
      NUQ_CHECK(!was.is_discarded(), Errc::invalid_file,
                "{}: unreadable; rerun with {} to discard the unfinished work", job_file.string(),
                flag_name(style_, "--restart", "restart"));
      NUQ_CHECK(was == fingerprint, Errc::invalid_argument,
                "{} holds unfinished work from a run with different input or settings (first difference: {}); "
                "rerun with the same settings to resume it, or with {} to discard it",
                options_.output_dir, first_difference(was, fingerprint), flag_name(style_, "--restart", "restart"));
    } else {
      std::error_code ec;
      fs::create_directories(partial_, ec);
      NUQ_CHECK(!ec, Errc::io, "{}: cannot create {}: {}", options_.output_dir, partial_.string(), ec.message());
      write_file_atomically(job_file.string(), fingerprint.dump(1) + "\n");
    }
    remove_stale_temporaries(partial_);
  }

  // Refuses before the first layer when what is left to write cannot fit: the layer files not yet in the
  // partial directory, then the whole checkpoint beside them (they are removed only once it is complete).
  // Hours into a large model is the wrong time to find out.
  void check_disk_space() const {
    uint64_t layers_left = 0, checkpoint = 0;
    int64_t files_left = 0;
    for (std::size_t i = 0; i < in_->tensors().size(); ++i) {
      const SourceTensor& t = in_->tensors()[i];
      if (!job_of_[i]) {
        checkpoint += uint64_t(t.shape.numel()) * dtype_size(t.out_dtype);
        continue;
      }
      const uint64_t bytes = estimated_layer_bytes(jobs_[*job_of_[i]], t);
      checkpoint += bytes;
      if (!fs::exists(layer_file(*job_of_[i]))) {
        layers_left += bytes;
        ++files_left;
      }
    }
    const uint64_t need = layers_left + checkpoint;
    std::error_code ec;
    const fs::space_info space = fs::space(out_dir_, ec);
    if (options_.progress) {
      CheckpointQuantizeProgress p;
      p.stage = CheckpointQuantizeProgress::Stage::disk;
      p.tensor_count = n_jobs();
      p.name = options_.output_dir;
      p.bytes_needed = need;
      p.bytes_free = ec ? 0 : space.available;
      options_.progress(p);
    }
    NUQ_CHECK(ec || space.available >= need, Errc::io,
              "{}: quantizing needs about {} of disk ({} layer files still to write, then the checkpoint of {} "
              "beside them), only {} are free; nothing was written",
              options_.output_dir, size_text(need), files_left, size_text(checkpoint), size_text(space.available));
  }

  // A layer's packed bytes with its sparse entries at the fractions asked for (the quantizer keeps about
  // that many), plus a few KiB for its file's header and its entry in the checkpoint's metadata.
  static uint64_t estimated_layer_bytes(const LayerJob& job, const SourceTensor& t) {
    const int64_t rows = t.shape[0], cols = t.shape[1];
    const double fraction = job.options.outlier_fraction +
                            (job.sensitivity == SensitivitySource::fisher ? job.options.sensitive_fraction : 0.0);
    const int64_t nnz = int64_t(std::ceil(fraction * double(rows * cols)));
    const int64_t group = job.options.group_size > 0 ? job.options.group_size : cols;
    return packed_storage(rows, cols, job.options.bits, group, nnz).total() + 4096;
  }

  // Phase 1: each layer into its own file in the partial directory, or taken from there when an earlier
  // run finished it.
  void quantize_layers() {
    for (const LayerJob& job : jobs_) weights_total_ += tensor_of(job).shape.numel();
    result_.layers.resize(jobs_.size());
    for (std::size_t j = 0; j < jobs_.size(); ++j)
      if (!resume_layer(j)) quantize_layer(j);
  }

  // A finished layer from an interrupted run. Files there are complete by construction; a damaged one
  // (disk trouble) is checked fully and redone rather than trusted.
  bool resume_layer(std::size_t j) {
    const LayerJob& job = jobs_[j];
    const SourceTensor& t = tensor_of(job);
    const std::string part = layer_file(j);
    if (!fs::exists(part)) return false;
    std::error_code ec;
    try {
      SafetensorsCheckpoint ck(part);
      const auto it = ck.metadata().find(kLayerMetadataKey);
      NUQ_CHECK(it != ck.metadata().end(), Errc::invalid_file, "{}: no layer record", part);
      QuantizedTensorRecord r = record_from_json(Json::parse(it->second));
      NUQ_CHECK(r.name == t.name && r.base == job.base, Errc::invalid_file, "{}: holds {}, expected {}", part, r.name,
                t.name);
      validate_packed(packed_view(ck, r.base, meta_of(r)), r.base);
      r.resumed = true;
      weights_done_ += t.shape.numel();
      weights_resumed_ += t.shape.numel();
      result_.layers[j] = std::move(r);
      report(CheckpointQuantizeProgress::Stage::resumed, int64_t(j), n_jobs(), t.name, 0, &result_.layers[j]);
      return true;
    } catch (const Error& e) {
      result_.warnings.push_back(fmt::format("{}: damaged ({}); quantizing {} again", part, e.what(), t.name));
    } catch (const nlohmann::json::exception& e) {
      result_.warnings.push_back(fmt::format("{}: damaged ({}); quantizing {} again", part, e.what(), t.name));
    }
    fs::remove(part, ec);
    return false;
  }

  // The sensitivity the quantizer weighs t's weights by: the --fisher tensor, a per-column one repeated
  // over the rows; empty when the layer has none.
  Buffer sensitivity_of(const LayerJob& job, const SourceTensor& t) const {
    if (job.sensitivity != SensitivitySource::fisher) return {};
    const SafetensorsTensorInfo& f = fisher_->info(t.name);
    Buffer sens = to_float32(fisher_->tensor(t.name));
    release_mapped_pages(fisher_->file_of(t.name).tensor_bytes(f));
    if (f.shape.rank() != 1) return sens;
    Buffer full(DType::F32, t.shape);
    for (int64_t r = 0; r < t.shape[0]; ++r)
      std::memcpy(full.data_as<float>() + r * t.shape[1], sens.data_as<float>(), std::size_t(t.shape[1]) * 4);
    return full;
  }

  void quantize_layer(std::size_t j) {
    const LayerJob& job = jobs_[j];
    const SourceTensor& t = tensor_of(job);
    report(CheckpointQuantizeProgress::Stage::start, int64_t(j), n_jobs(), t.name, 0, nullptr);
    const Clock::time_point t1 = Clock::now();
    const Buffer weight = in_->read_float32(t);
    const Buffer sens = sensitivity_of(job, t);
    std::vector<double> xtx;
    QuantizeOptions layer_options = job.options;
    if (!job.hessian_layer.empty()) {
      xtx = hessian_->hessian_matrix(job.hessian_layer, t.shape[1]);
      layer_options.hessian = xtx.data();
    }
    QuantizeReport rep;
    PackedLinear packed;
    try {
      packed = quantize_linear(weight.data_as<float>(), sens.nbytes() ? sens.data_as<float>() : nullptr, t.shape[0],
                               t.shape[1], t.shape[1], layer_options, t.name, &rep);
    } catch (const Error& e) {
      throw Error(e.code(), fmt::format("{}: {}", options_.input, e.what()));
    }
    QuantizedTensorRecord& r = result_.layers[j];
    r = layer_record(job, t, packed, rep);
    write_layer_file(layer_file(j), r, packed);
    r.seconds = seconds_since(t1);
    weights_done_ += t.shape.numel();
    report(CheckpointQuantizeProgress::Stage::quantized, int64_t(j), n_jobs(), t.name, r.seconds, &r);
  }

  static QuantizedTensorRecord layer_record(const LayerJob& job, const SourceTensor& t, const PackedLinear& packed,
                                            const QuantizeReport& rep) {
    QuantizedTensorRecord r;
    r.name = t.name;
    r.base = job.base;
    r.rows = packed.rows;
    r.cols = packed.cols;
    r.source_dtype = t.dtype;
    r.bits = packed.bits;
    r.method = job.options.method;
    r.group_size = packed.group_size;
    r.nnz = packed.nnz();
    r.outliers = rep.outliers;
    r.sensitive = rep.sensitive;
    r.outlier_fraction = job.options.outlier_fraction;
    r.sensitive_fraction = job.sensitivity == SensitivitySource::fisher ? job.options.sensitive_fraction : 0.0;
    r.mse = rep.mse;
    r.weighted_mse = rep.weighted_mse;
    r.max_abs_error = rep.max_abs_error;
    r.bits_per_weight = rep.bits_per_weight;
    r.sensitivity = job.sensitivity;
    r.error_feedback = !job.hessian_layer.empty() && job.options.error_feedback;
    r.relative_output_error = rep.relative_output_error;
    return r;
  }

  static void write_layer_file(const std::string& path, const QuantizedTensorRecord& r, const PackedLinear& packed) {
    SafetensorsWriter w(path, {{kLayerMetadataKey, to_json(r).dump()}});
    const std::vector<std::string> names = packed_tensor_names(r.base, r.nnz > 0);
    const Buffer* parts[] = {&packed.qweight, &packed.lut, &packed.sparse_row_ptr, &packed.sparse_col_idx,
                             &packed.sparse_values};
    for (std::size_t k = 0; k < names.size(); ++k) w.declare(names[k], parts[k]->dtype(), parts[k]->shape());
    for (std::size_t k = 0; k < names.size(); ++k) w.write(names[k], {parts[k]->data(), parts[k]->nbytes()});
    w.finish();
  }

  // Phase 2: the checkpoint from the layer files and the copied tensors, then the partial directory retired.
  void assemble_checkpoint() {
    parts_.resize(jobs_.size());
    for (std::size_t j = 0; j < jobs_.size(); ++j) parts_[j] = std::make_unique<SafetensorsFile>(layer_file(j));
    plan_shards();
    all_.extra["tool"] = tool_;
    all_.extra["source"] = source_name(options_.input);
    all_.extra["default_method"] = std::string(to_string(options_.layer.method));
    all_.extra["default_bits"] = std::to_string(options_.layer.bits);
    for (const QuantizedTensorRecord& r : result_.layers) all_.layers[r.base] = meta_of(r);
    // quant_report.json goes first: the checkpoint files are what marks the output as usable.
    write_quant_report();
    write_shards();
    write_companion_files();
    remove_replaced_files();
    retire_partial_directory();
  }

  // Output units (a quantized layer's tensors, or a copied tensor) in input order, cut greedily into
  // shards: a new file starts when the next unit would overflow the current one.
  void plan_shards() {
    for (std::size_t i = 0; i < in_->tensors().size(); ++i) {
      OutputUnit u;
      u.tensor = i;
      u.layer = job_of_[i];
      if (u.layer) {
        for (const SafetensorsTensorInfo& info : parts_[*u.layer]->tensors()) u.bytes += info.nbytes();
      } else {
        const SourceTensor& t = in_->tensors()[i];
        u.bytes = uint64_t(t.shape.numel()) * dtype_size(t.out_dtype);
      }
      units_.push_back(u);
    }
    shards_.assign(1, {});
    uint64_t shard_bytes = 0;
    for (std::size_t k = 0; k < units_.size(); ++k) {
      if (!shards_.back().empty() && shard_bytes + units_[k].bytes > options_.max_shard_bytes) {
        shards_.emplace_back();
        shard_bytes = 0;
      }
      shards_.back().push_back(k);
      shard_bytes += units_[k].bytes;
    }
  }

  void write_quant_report() {
    Json rep;
    rep["tool"] = tool_;
    rep["source"] = all_.extra["source"];
    Json layers = Json::array();
    uint64_t bytes = 0;
    int64_t weights = 0;
    for (const QuantizedTensorRecord& r : result_.layers) {
      layers.push_back(to_json(r));
      bytes += packed_storage(r.rows, r.cols, r.bits, r.group_size, r.nnz).total();
      weights += r.rows * r.cols;
    }
    rep["layers"] = layers;
    rep["quantized_weights"] = weights;
    rep["quantized_bytes"] = bytes;
    rep["average_bits_per_weight"] = weights ? 8.0 * double(bytes) / double(weights) : 0.0;
    result_.quantized_weights = weights;
    result_.average_bits_per_weight = weights ? 8.0 * double(bytes) / double(weights) : 0.0;
    write_file_atomically((out_dir_ / kQuantReportName).string(), rep.dump(1) + "\n");
  }

  void write_shards() {
    const std::map<std::string, std::string> carried = in_->carried_metadata();
    std::vector<std::pair<std::string, std::string>> weight_map;
    uint64_t total_tensor_bytes = 0;
    for (std::size_t s = 0; s < shards_.size(); ++s) {
      const std::string file = shards_.size() == 1 ? kSingleFileName : shard_name(s, shards_.size());
      report(CheckpointQuantizeProgress::Stage::assemble, int64_t(s), int64_t(shards_.size()), file, 0, nullptr);
      total_tensor_bytes += write_shard(file, shards_[s], carried, weight_map);
      result_.files.push_back(file);
    }
    if (shards_.size() > 1) {
      write_safetensors_index((out_dir_ / kIndexFileName).string(), weight_map, total_tensor_bytes,
                              {{kQuantizationConfigKey, to_json(all_)}});
      result_.files.push_back(kIndexFileName);
    }
  }

  // One output file: its quantization_config names the layers it holds. Returns the tensor bytes written.
  uint64_t write_shard(const std::string& file, const std::vector<std::size_t>& unit_indices,
                       const std::map<std::string, std::string>& carried,
                       std::vector<std::pair<std::string, std::string>>& weight_map) {
    QuantizationConfig config;
    config.extra = all_.extra;
    for (std::size_t k : unit_indices)
      if (units_[k].layer)
        config.layers[result_.layers[*units_[k].layer].base] = meta_of(result_.layers[*units_[k].layer]);
    std::map<std::string, std::string> metadata = carried;
    metadata["format"] = "pt";
    metadata[kQuantizationConfigKey] = to_json(config);
    SafetensorsWriter w((out_dir_ / file).string(), metadata);
    for (std::size_t k : unit_indices) {
      const SourceTensor& t = in_->tensors()[units_[k].tensor];
      if (units_[k].layer) {
        for (const SafetensorsTensorInfo& info : parts_[*units_[k].layer]->tensors()) {
          w.declare(info.name, info.dtype, info.shape);
          weight_map.emplace_back(info.name, file);
        }
      } else {
        w.declare(t.name, t.out_dtype, t.shape);
        weight_map.emplace_back(t.name, file);
      }
    }
    uint64_t bytes = 0;
    for (std::size_t k : unit_indices) {
      const SourceTensor& t = in_->tensors()[units_[k].tensor];
      if (units_[k].layer) {
        const SafetensorsFile& p = *parts_[*units_[k].layer];
        for (const SafetensorsTensorInfo& info : p.tensors()) {
          w.write(info.name, p.tensor_bytes(info));
          release_mapped_pages(p.tensor_bytes(info));
        }
      } else {
        in_->copy_to(t, w);
        ++result_.tensors_copied;
      }
      bytes += units_[k].bytes;
    }
    w.finish();
    result_.output_bytes += w.file_size();
    return bytes;
  }

  void write_companion_files() {
    for (const char* name : kCompanionFiles) {
      const fs::path src = in_->directory() / name;
      if (in_->kind() == CheckpointKind::gguf || !fs::is_regular_file(src)) continue;
      std::string text = read_small_file(src.string(), "a companion file");
      // transformers finds the quantization method in config.json, not in the safetensors metadata.
      if (std::string_view(name) == "config.json") text = hf_config_with_quantization(text, all_, src.string());
      write_file_atomically((out_dir_ / name).string(), text);
      result_.files.push_back(name);
    }
  }

  // Files of an earlier checkpoint in this directory (replaced with --force) that the new one does not have.
  void remove_replaced_files() {
    const std::set<std::string> written(result_.files.begin(), result_.files.end());
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(out_dir_)) {
      const std::string n = e.path().filename().string();
      if ((n == kSingleFileName || n == kIndexFileName || is_shard_name(n)) && !written.count(n))
        fs::remove(e.path(), ec);
    }
    result_.files.push_back(kQuantReportName);
  }

  // Renaming first makes the removal atomic as far as a restart can tell.
  void retire_partial_directory() {
    parts_.clear();
    const fs::path done = out_dir_ / (std::string(kPartialDirName) + ".done");
    std::error_code ec;
    fs::rename(partial_, done, ec);
    NUQ_CHECK(!ec, Errc::io, "{}: cannot retire {}: {}", options_.output_dir, partial_.string(), ec.message());
    fs::remove_all(done, ec);
  }

  const CheckpointQuantizeOptions& options_;
  const ArgStyle style_;
  const std::string tool_;
  const Clock::time_point t0_ = Clock::now();
  QuantizeCheckpointResult result_;
  // Inputs.
  std::optional<InputCheckpoint> in_;
  std::vector<std::regex> include_, exclude_;
  std::map<std::string, PlanEntry> plan_;
  std::set<std::string> plan_used_;
  std::unique_ptr<SafetensorsCheckpoint> fisher_;
  std::unique_ptr<StatisticsFile> hessian_;
  bool warned_ignored_sensitivity_ = false, warned_missing_hessian_ = false;
  // The layers to quantize, and which of them (if any) each input tensor is.
  std::vector<LayerJob> jobs_;
  std::vector<std::optional<std::size_t>> job_of_;
  // Output.
  fs::path out_dir_, partial_;
  int64_t weights_total_ = 0, weights_done_ = 0, weights_resumed_ = 0;
  std::vector<std::unique_ptr<SafetensorsFile>> parts_;  // the layer files, while assembling
  std::vector<OutputUnit> units_;
  std::vector<std::vector<std::size_t>> shards_;  // unit indices per output file
  QuantizationConfig all_;
};

}  // namespace

QuantizeCheckpointResult quantize_checkpoint(const CheckpointQuantizeOptions& options) {
  return CheckpointRun(options).run();
}

}  // namespace nuq
