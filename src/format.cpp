#include <cmath>
#include <cstring>
#include <set>

#include <nlohmann/json.hpp>

#include "nuq/half.hpp"
#include "nuq/packed.hpp"

namespace nuq {

format::IndexLayout checked_index_layout(int bits) {
  NUQ_CHECK(format::is_supported_bits(bits), Errc::invalid_argument, "unsupported index width {} bits (nuq packs 2, 3 or 4)",
            bits);
  return format::index_layout(bits);
}

void pack_indices(const uint8_t* indices, int64_t rows, int64_t cols, int bits, uint8_t* packed) {
  checked_index_layout(bits);
  const int64_t stride = format::row_bytes(cols, bits);
  const int limit = 1 << bits;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = indices + r * cols;
    for (int64_t c = 0; c < cols; ++c)
      NUQ_CHECK(row[c] < limit, Errc::invalid_argument, "pack_indices: index {} at row {}, column {} does not fit in {} bits",
                int(row[c]), r, c, bits);
    format::pack_row(row, cols, bits, packed + r * stride);
  }
}

void unpack_indices(const uint8_t* packed, int64_t rows, int64_t cols, int bits, uint8_t* indices) {
  checked_index_layout(bits);
  const int64_t stride = format::row_bytes(cols, bits);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      indices[r * cols + c] = uint8_t(format::unpack_index(packed + r * stride, cols, bits, c));
}

namespace {
int64_t sparse_col(const format::PackedLinearView& l, int64_t k) {
  if (format::sparse_cols_are_u16(l.cols)) return static_cast<const uint16_t*>(l.sparse_col_idx)[k];
  return static_cast<const int32_t*>(l.sparse_col_idx)[k];
}
}  // namespace

void validate_packed(const format::PackedLinearView& l, std::string_view name) {
  checked_index_layout(l.bits);
  NUQ_CHECK(l.rows > 0 && l.cols > 0, Errc::invalid_argument, "{}: empty shape [{}, {}]", name, l.rows, l.cols);
  NUQ_CHECK(l.group_size > 0 && l.cols % l.group_size == 0, Errc::invalid_argument,
            "{}: group size {} does not divide the {} columns", name, l.group_size, l.cols);
  NUQ_CHECK(l.qweight && l.lut, Errc::invalid_argument, "{}: qweight or lut is missing", name);
  NUQ_CHECK(l.nnz >= 0, Errc::invalid_argument, "{}: negative nnz {}", name, l.nnz);

  const int64_t lut_count = l.rows * l.groups() * format::lut_entries(l.bits);
  for (int64_t i = 0; i < lut_count; ++i) {
    const float v = fp16_to_float(l.lut[i]);
    NUQ_CHECK(std::isfinite(v), Errc::invalid_file, "{}: codebook entry {} of row {} is {}", name,
              i % format::lut_entries(l.bits), i / (l.groups() * format::lut_entries(l.bits)), v);
  }
  // Padding must be zero: kernels that decode whole words rely on it contributing index 0 only, and a
  // non-zero pad is a sign of a writer that disagrees with this layout.
  const int64_t stride = l.row_stride();
  for (int64_t r = 0; r < l.rows; ++r)
    for (int64_t c = l.cols; c < format::padded_cols(l.cols); ++c)
      NUQ_CHECK(format::unpack_index(l.qweight + r * stride, l.cols, l.bits, c) == 0, Errc::invalid_file,
                "{}: padding index at row {}, column {} is not zero", name, r, c);

  if (l.nnz == 0 && l.sparse_row_ptr == nullptr) return;
  NUQ_CHECK(l.sparse_row_ptr != nullptr, Errc::invalid_argument, "{}: {} sparse values but no row pointers", name, l.nnz);
  NUQ_CHECK(l.nnz == 0 || (l.sparse_col_idx && l.sparse_values), Errc::invalid_argument,
            "{}: sparse column indices or values missing", name);
  NUQ_CHECK(l.sparse_row_ptr[0] == 0, Errc::invalid_file, "{}: sparse_row_ptr[0] is {}, not 0", name, l.sparse_row_ptr[0]);
  NUQ_CHECK(l.sparse_row_ptr[l.rows] == l.nnz, Errc::invalid_file, "{}: sparse_row_ptr[{}] is {} but there are {} values",
            name, l.rows, l.sparse_row_ptr[l.rows], l.nnz);
  for (int64_t r = 0; r < l.rows; ++r) {
    const int64_t begin = l.sparse_row_ptr[r], end = l.sparse_row_ptr[r + 1];
    NUQ_CHECK(begin <= end, Errc::invalid_file, "{}: sparse_row_ptr decreases at row {} ({} > {})", name, r, begin, end);
    int64_t previous = -1;
    for (int64_t k = begin; k < end; ++k) {
      const int64_t c = sparse_col(l, k);
      NUQ_CHECK(c > previous && c < l.cols, Errc::invalid_file,
                "{}: sparse entry {} in row {} has column {} (columns must increase within a row and be < {})", name, k, r, c,
                l.cols);
      previous = c;
      const float v = fp16_to_float(l.sparse_values[k]);
      NUQ_CHECK(std::isfinite(v), Errc::invalid_file, "{}: sparse value at row {}, column {} is {}", name, r, c, v);
    }
  }
}

void dequantize_reference(const format::PackedLinearView& l, float* out) {
  const int entries = format::lut_entries(l.bits);
  const int64_t stride = l.row_stride();
  for (int64_t r = 0; r < l.rows; ++r) {
    const uint8_t* row = l.qweight + r * stride;
    for (int64_t c = 0; c < l.cols; ++c) {
      const int64_t g = c / l.group_size;
      const int idx = format::unpack_index(row, l.cols, l.bits, c);
      out[r * l.cols + c] = fp16_to_float(l.lut[(r * l.groups() + g) * entries + idx]);
    }
    if (l.nnz > 0)
      for (int64_t k = l.sparse_row_ptr[r]; k < l.sparse_row_ptr[r + 1]; ++k)
        out[r * l.cols + sparse_col(l, k)] += fp16_to_float(l.sparse_values[k]);
  }
}

PackedStorage packed_storage(int64_t rows, int64_t cols, int bits, int64_t group_size, int64_t nnz) {
  checked_index_layout(bits);
  NUQ_CHECK(group_size > 0 && cols % group_size == 0, Errc::invalid_argument,
            "group size {} does not divide the {} columns", group_size, cols);
  PackedStorage s;
  s.qweight = uint64_t(rows) * uint64_t(format::row_bytes(cols, bits));
  s.lut = uint64_t(rows) * uint64_t(cols / group_size) * uint64_t(format::lut_entries(bits)) * 2u;
  if (nnz > 0) {
    const uint64_t col_bytes = format::sparse_cols_are_u16(cols) ? 2 : 4;
    s.sparse = uint64_t(rows + 1) * 4u + uint64_t(nnz) * (col_bytes + 2u);
  }
  return s;
}

double bits_per_weight(const PackedStorage& storage, int64_t rows, int64_t cols) {
  return 8.0 * double(storage.total()) / (double(rows) * double(cols));
}

PackedLinear::PackedLinear(int64_t rows_, int64_t cols_, int bits_, int64_t group_size_, int64_t nnz)
    : rows(rows_), cols(cols_), group_size(group_size_), bits(bits_) {
  checked_index_layout(bits);
  NUQ_CHECK(rows > 0 && cols > 0, Errc::invalid_argument, "packed layer shape [{}, {}] is empty", rows, cols);
  NUQ_CHECK(group_size > 0 && cols % group_size == 0, Errc::invalid_argument,
            "group size {} does not divide the {} columns", group_size, cols);
  qweight = Buffer(DType::U8, {rows, format::row_bytes(cols, bits)});
  lut = Buffer(DType::F16, {rows, cols / group_size, format::lut_entries(bits)});
  if (nnz > 0) {
    sparse_row_ptr = Buffer(DType::I32, {rows + 1});
    sparse_col_idx = Buffer(format::sparse_cols_are_u16(cols) ? DType::U16 : DType::I32, {nnz});
    sparse_values = Buffer(DType::F16, {nnz});
  }
}

format::PackedLinearView PackedLinear::view() const {
  format::PackedLinearView v;
  v.rows = rows;
  v.cols = cols;
  v.bits = bits;
  v.group_size = group_size;
  v.qweight = qweight.data_as<uint8_t>();
  v.lut = lut.data_as<uint16_t>();
  v.nnz = nnz();
  if (v.nnz > 0) {
    v.sparse_row_ptr = sparse_row_ptr.data_as<int32_t>();
    v.sparse_col_idx = sparse_col_idx.data();
    v.sparse_values = sparse_values.data_as<uint16_t>();
  }
  return v;
}

namespace {
// The quantization_config object; to_json writes it, hf_config_with_quantization extends it.
nlohmann::json config_object(const QuantizationConfig& config) {
  nlohmann::json j;
  j["quant_method"] = "nuq";
  j["format_version"] = config.format_version;
  nlohmann::json layers = nlohmann::json::object();
  for (const auto& [name, m] : config.layers) {
    layers[name] = {{"bits", m.bits},     {"rows", m.rows},     {"cols", m.cols},
                    {"group_size", m.group_size}, {"nnz", m.nnz}, {"method", m.method},
                    {"source_dtype", m.source_dtype}};
  }
  j["layers"] = std::move(layers);
  if (!config.extra.empty()) j["extra"] = config.extra;
  return j;
}
}  // namespace

std::string to_json(const QuantizationConfig& config) { return config_object(config).dump(); }

QuantizationConfig parse_quantization_config(std::string_view text, std::string_view source) {
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  NUQ_CHECK(j.is_object(), Errc::invalid_file, "{}: quantization_config is not a JSON object", source);
  auto get_int = [&](const nlohmann::json& o, const char* key, std::string_view where) -> int64_t {
    auto it = o.find(key);
    NUQ_CHECK(it != o.end() && it->is_number_integer(), Errc::invalid_file,
              "{}: quantization_config{}: '{}' is missing or not an integer", source, where, key);
    return it->get<int64_t>();
  };
  auto get_string = [&](const nlohmann::json& o, const char* key, std::string_view where) -> std::string {
    auto it = o.find(key);
    if (it == o.end()) return {};
    NUQ_CHECK(it->is_string(), Errc::invalid_file, "{}: quantization_config{}: '{}' is not a string", source, where, key);
    return it->get<std::string>();
  };
  NUQ_CHECK(get_string(j, "quant_method", "") == "nuq", Errc::unsupported,
            "{}: quantization_config has quant_method '{}', not 'nuq'", source, get_string(j, "quant_method", ""));
  QuantizationConfig config;
  config.format_version = int(get_int(j, "format_version", ""));
  NUQ_CHECK(config.format_version == format::kVersion, Errc::unsupported,
            "{}: packed format version {} is not supported by this build (it reads version {})", source,
            config.format_version, format::kVersion);
  if (auto it = j.find("layers"); it != j.end()) {
    NUQ_CHECK(it->is_object(), Errc::invalid_file, "{}: quantization_config 'layers' is not an object", source);
    for (const auto& [name, o] : it->items()) {
      const std::string where = " layer '" + name + "'";
      NUQ_CHECK(o.is_object(), Errc::invalid_file, "{}: quantization_config{} is not an object", source, where);
      PackedTensorMeta m;
      m.bits = int(get_int(o, "bits", where));
      m.rows = get_int(o, "rows", where);
      m.cols = get_int(o, "cols", where);
      m.group_size = get_int(o, "group_size", where);
      m.nnz = get_int(o, "nnz", where);
      m.method = get_string(o, "method", where);
      m.source_dtype = get_string(o, "source_dtype", where);
      NUQ_CHECK(format::is_supported_bits(m.bits), Errc::unsupported, "{}: layer '{}' has {} bits (nuq packs 2, 3, 4)",
                source, name, m.bits);
      NUQ_CHECK(m.rows > 0 && m.cols > 0 && m.group_size > 0 && m.cols % m.group_size == 0 && m.nnz >= 0,
                Errc::invalid_file, "{}: layer '{}' has inconsistent geometry rows {} cols {} group_size {} nnz {}", source,
                name, m.rows, m.cols, m.group_size, m.nnz);
      config.layers.emplace(name, std::move(m));
    }
  }
  if (auto it = j.find("extra"); it != j.end() && it->is_object())
    for (const auto& [k, v] : it->items()) config.extra[k] = v.is_string() ? v.get<std::string>() : v.dump();
  return config;
}

namespace {
nlohmann::json quantization_summary(const QuantizationConfig& config) {
  std::set<int> bits;
  std::set<int64_t> groups;  // 0 stands for "one codebook per row"
  int64_t weights = 0, nnz = 0;
  for (const auto& [name, m] : config.layers) {
    bits.insert(m.bits);
    groups.insert(m.group_size == m.cols ? 0 : m.group_size);
    weights += m.rows * m.cols;
    nnz += m.nnz;
  }
  nlohmann::json j = config_object(config);
  j["bits"] = bits.size() == 1 ? nlohmann::json(*bits.begin()) : nlohmann::json(nullptr);
  j["group_size"] = groups.size() == 1 ? nlohmann::json(*groups.begin()) : nlohmann::json(nullptr);
  j["sparse_fraction"] = weights ? double(nnz) / double(weights) : 0.0;
  return j;
}
}  // namespace

std::string hf_config_with_quantization(std::string_view config_json, const QuantizationConfig& config,
                                        std::string_view source) {
  nlohmann::json j = nlohmann::json::parse(config_json, nullptr, /*allow_exceptions=*/false);
  NUQ_CHECK(j.is_object(), Errc::invalid_file, "{}: not a JSON object (a Hugging Face config.json)", source);
  j[kQuantizationConfigKey] = quantization_summary(config);
  return j.dump(2) + "\n";
}

}  // namespace nuq
