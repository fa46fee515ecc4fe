#include "nuq/gguf.hpp"

#include <algorithm>
#include <array>
#include <bit>
#include <cstring>
#include <limits>
#include <numeric>
#include <unordered_map>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

#include <fmt/ranges.h>

#include "cpu_features.hpp"
#include "nuq/error.hpp"
#include "nuq/half.hpp"

// GGUF stores everything little-endian and nuq decodes with plain loads; big-endian GGUF files (and
// hosts) would need byte swapping that nothing here does.
static_assert(std::endian::native == std::endian::little, "the GGUF reader assumes a little-endian host");

namespace nuq {

// ---- ggml types ----------------------------------------------------------------------------------------

namespace {

struct TypeRow {
  uint32_t value;
  GgmlTypeTraits traits;
};

// Block and type sizes as ggml defines them (ggml-common.h). They agree with gguf-py's
// GGML_QUANT_SIZES except for Q8_1, which gguf-py still lists with the old fp32 scales (40 bytes);
// ggml's block_q8_1 has two fp16 halves and 32 int8 (36 bytes).
// MXFP4, NVFP4 and Q1_0 have no GgmlType enumerator yet, but knowing their sizes lets nuq parse
// (and list) files that contain them.
constexpr std::array kTypes = {
    TypeRow{0, {"F32", 1, 4, true}},
    TypeRow{1, {"F16", 1, 2, true}},
    TypeRow{2, {"Q4_0", 32, 18, true}},
    TypeRow{3, {"Q4_1", 32, 20, true}},
    TypeRow{6, {"Q5_0", 32, 22, true}},
    TypeRow{7, {"Q5_1", 32, 24, true}},
    TypeRow{8, {"Q8_0", 32, 34, true}},
    TypeRow{9, {"Q8_1", 32, 36, false}},
    TypeRow{10, {"Q2_K", 256, 84, false}},
    TypeRow{11, {"Q3_K", 256, 110, false}},
    TypeRow{12, {"Q4_K", 256, 144, false}},
    TypeRow{13, {"Q5_K", 256, 176, false}},
    TypeRow{14, {"Q6_K", 256, 210, false}},
    TypeRow{15, {"Q8_K", 256, 292, false}},
    TypeRow{16, {"IQ2_XXS", 256, 66, false}},
    TypeRow{17, {"IQ2_XS", 256, 74, false}},
    TypeRow{18, {"IQ3_XXS", 256, 98, false}},
    TypeRow{19, {"IQ1_S", 256, 50, false}},
    TypeRow{20, {"IQ4_NL", 32, 18, false}},
    TypeRow{21, {"IQ3_S", 256, 110, false}},
    TypeRow{22, {"IQ2_S", 256, 82, false}},
    TypeRow{23, {"IQ4_XS", 256, 136, false}},
    TypeRow{24, {"I8", 1, 1, true}},
    TypeRow{25, {"I16", 1, 2, true}},
    TypeRow{26, {"I32", 1, 4, true}},
    TypeRow{27, {"I64", 1, 8, false}},
    TypeRow{28, {"F64", 1, 8, true}},
    TypeRow{29, {"IQ1_M", 256, 56, false}},
    TypeRow{30, {"BF16", 1, 2, true}},
    TypeRow{34, {"TQ1_0", 256, 54, false}},
    TypeRow{35, {"TQ2_0", 256, 66, false}},
    TypeRow{39, {"MXFP4", 32, 17, false}},
    TypeRow{40, {"NVFP4", 64, 36, false}},
    TypeRow{41, {"Q1_0", 128, 18, false}},
};

std::string type_label(uint32_t type) {
  if (const GgmlTypeTraits* t = ggml_type_traits(type)) return std::string(t->name);
  return fmt::format("type {}", type);
}

}  // namespace

const GgmlTypeTraits* ggml_type_traits(uint32_t type) noexcept {
  for (const TypeRow& row : kTypes)
    if (row.value == type) return &row.traits;
  return nullptr;
}

// ---- metadata values -------------------------------------------------------------------------------------

std::string_view gguf_value_type_name(GgufValueType t) noexcept {
  switch (t) {
    case GgufValueType::UINT8: return "UINT8";
    case GgufValueType::INT8: return "INT8";
    case GgufValueType::UINT16: return "UINT16";
    case GgufValueType::INT16: return "INT16";
    case GgufValueType::UINT32: return "UINT32";
    case GgufValueType::INT32: return "INT32";
    case GgufValueType::FLOAT32: return "FLOAT32";
    case GgufValueType::BOOL: return "BOOL";
    case GgufValueType::STRING: return "STRING";
    case GgufValueType::ARRAY: return "ARRAY";
    case GgufValueType::UINT64: return "UINT64";
    case GgufValueType::INT64: return "INT64";
    case GgufValueType::FLOAT64: return "FLOAT64";
  }
  return "unknown";
}

namespace {

bool is_unsigned(GgufValueType t) {
  return t == GgufValueType::UINT8 || t == GgufValueType::UINT16 || t == GgufValueType::UINT32 ||
         t == GgufValueType::UINT64;
}
bool is_signed(GgufValueType t) {
  return t == GgufValueType::INT8 || t == GgufValueType::INT16 || t == GgufValueType::INT32 ||
         t == GgufValueType::INT64;
}

[[noreturn]] void wrong_type(const GgufValue& v, std::string_view expected) {
  fail(Errc::invalid_argument, "GGUF value: expected {}, got {} {}", expected, gguf_value_type_name(v.type),
       v.to_display_string());
}

std::string quote_string(std::string_view s) {
  constexpr std::size_t kMaxBytes = 60;
  std::size_t n = std::min(s.size(), kMaxBytes);
  // Cut on a character boundary so that the rendering stays valid UTF-8.
  if (n < s.size())
    while (n > 0 && (static_cast<unsigned char>(s[n]) & 0xC0) == 0x80) --n;
  std::string out = "\"";
  for (char ch : s.substr(0, n)) {
    switch (ch) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (static_cast<unsigned char>(ch) < 0x20)
          out += fmt::format("\\x{:02x}", static_cast<unsigned char>(ch));
        else
          out += ch;
    }
  }
  if (n < s.size()) return out + fmt::format("...\" ({} bytes)", s.size());
  return out + "\"";
}

}  // namespace

uint64_t GgufValue::as_uint() const {
  if (is_unsigned(type)) return std::get<uint64_t>(value);
  if (is_signed(type) && std::get<int64_t>(value) >= 0) return uint64_t(std::get<int64_t>(value));
  wrong_type(*this, "an unsigned integer");
}

int64_t GgufValue::as_int() const {
  if (is_signed(type)) return std::get<int64_t>(value);
  if (is_unsigned(type) && std::get<uint64_t>(value) <= uint64_t(std::numeric_limits<int64_t>::max()))
    return int64_t(std::get<uint64_t>(value));
  wrong_type(*this, "an integer that fits int64");
}

double GgufValue::as_float() const {
  if (type == GgufValueType::FLOAT32 || type == GgufValueType::FLOAT64) return std::get<double>(value);
  if (is_unsigned(type)) return double(std::get<uint64_t>(value));
  if (is_signed(type)) return double(std::get<int64_t>(value));
  wrong_type(*this, "a number");
}

bool GgufValue::as_bool() const {
  if (type == GgufValueType::BOOL) return std::get<bool>(value);
  wrong_type(*this, "BOOL");
}

const std::string& GgufValue::as_string() const {
  if (type == GgufValueType::STRING) return std::get<std::string>(value);
  wrong_type(*this, "STRING");
}

const std::vector<GgufValue>& GgufValue::as_array() const {
  if (type == GgufValueType::ARRAY) return std::get<std::vector<GgufValue>>(value);
  wrong_type(*this, "ARRAY");
}

std::string GgufValue::to_display_string(std::size_t max_items) const {
  switch (type) {
    case GgufValueType::UINT8:
    case GgufValueType::UINT16:
    case GgufValueType::UINT32:
    case GgufValueType::UINT64:
      return fmt::format("{}", std::get<uint64_t>(value));
    case GgufValueType::INT8:
    case GgufValueType::INT16:
    case GgufValueType::INT32:
    case GgufValueType::INT64:
      return fmt::format("{}", std::get<int64_t>(value));
    case GgufValueType::FLOAT32:
      // Printed as a float so that 1e-5 reads "1e-05", not its double expansion.
      return fmt::format("{}", float(std::get<double>(value)));
    case GgufValueType::FLOAT64:
      return fmt::format("{}", std::get<double>(value));
    case GgufValueType::BOOL:
      return std::get<bool>(value) ? "true" : "false";
    case GgufValueType::STRING:
      return quote_string(std::get<std::string>(value));
    case GgufValueType::ARRAY: {
      const auto& items = std::get<std::vector<GgufValue>>(value);
      std::string out = "[";
      const std::size_t shown = std::min(items.size(), max_items);
      for (std::size_t i = 0; i < shown; ++i) {
        if (i) out += ", ";
        out += items[i].to_display_string(max_items);
      }
      if (shown < items.size()) out += fmt::format("{}... ({} items)", shown ? ", " : "", items.size());
      return out + "]";
    }
  }
  return "?";
}

const GgufValue* GgufHeader::find_value(std::string_view key) const {
  for (const GgufKeyValue& kv : metadata)
    if (kv.key == key) return &kv.value;
  return nullptr;
}

const GgufTensorInfo* GgufHeader::find_tensor(std::string_view name) const {
  for (const GgufTensorInfo& t : tensors)
    if (t.name == name) return &t;
  return nullptr;
}

// ---- parsing ---------------------------------------------------------------------------------------------

namespace {

constexpr int kMaxArrayDepth = 4;
constexpr uint64_t kMinKeyValueBytes = 12;    // key length (8) + value type (4), before the value
constexpr uint64_t kMinTensorInfoBytes = 24;  // name length (8) + n_dims (4) + type (4) + offset (8)
constexpr uint32_t kMaxDims = 4;              // GGML_MAX_DIMS
constexpr uint32_t kMaxValueType = uint32_t(GgufValueType::FLOAT64);

// Smallest encoding of one value of a type, to bound array counts by the bytes left.
uint64_t min_value_bytes(GgufValueType t) {
  switch (t) {
    case GgufValueType::UINT8:
    case GgufValueType::INT8:
    case GgufValueType::BOOL:
      return 1;
    case GgufValueType::UINT16:
    case GgufValueType::INT16:
      return 2;
    case GgufValueType::UINT32:
    case GgufValueType::INT32:
    case GgufValueType::FLOAT32:
      return 4;
    case GgufValueType::UINT64:
    case GgufValueType::INT64:
    case GgufValueType::FLOAT64:
    case GgufValueType::STRING:
      return 8;
    case GgufValueType::ARRAY:
      return 12;
  }
  return 1;
}

// Reads little-endian fields from the file image, naming the file and the current item (`ctx`,
// e.g. "key 'general.name'") in every error so that a truncated file says where it broke.
class Reader {
 public:
  Reader(std::span<const std::byte> file, std::string_view source) : file_(file), source_(source) {}

  std::size_t pos() const { return pos_; }
  std::size_t remaining() const { return file_.size() - pos_; }
  std::string_view source() const { return source_; }

  template <class T>
  T read(const std::string& ctx, std::string_view what) {
    need(sizeof(T), ctx, what);
    T v;
    std::memcpy(&v, file_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }

  std::string read_string(const std::string& ctx, std::string_view what) {
    const uint64_t len = read<uint64_t>(ctx, what);
    NUQ_CHECK(len <= remaining(), Errc::invalid_file,
              "{}: {}: {} of {} bytes runs past the end of the file ({} bytes remain at offset {})", source_,
              ctx, what, len, remaining(), pos_);
    std::string s(reinterpret_cast<const char*>(file_.data() + pos_), std::size_t(len));
    pos_ += std::size_t(len);
    return s;
  }

  void need(std::size_t n, const std::string& ctx, std::string_view what) const {
    NUQ_CHECK(n <= remaining(), Errc::invalid_file,
              "{}: {}: file ends while reading {} ({} bytes needed at offset {}, file is {} bytes)", source_,
              ctx, what, n, pos_, file_.size());
  }

 private:
  std::span<const std::byte> file_;
  std::string_view source_;
  std::size_t pos_ = 0;
};

GgufValueType read_value_type(Reader& r, const std::string& ctx, std::string_view what) {
  const uint32_t raw = r.read<uint32_t>(ctx, what);
  NUQ_CHECK(raw <= kMaxValueType, Errc::invalid_file, "{}: {}: unknown value type {} in {}", r.source(), ctx,
            raw, what);
  return GgufValueType(raw);
}

GgufValue read_value(Reader& r, GgufValueType type, int depth, const std::string& ctx) {
  GgufValue v;
  v.type = type;
  switch (type) {
    case GgufValueType::UINT8: v.value = uint64_t(r.read<uint8_t>(ctx, "a UINT8 value")); break;
    case GgufValueType::INT8: v.value = int64_t(r.read<int8_t>(ctx, "an INT8 value")); break;
    case GgufValueType::UINT16: v.value = uint64_t(r.read<uint16_t>(ctx, "a UINT16 value")); break;
    case GgufValueType::INT16: v.value = int64_t(r.read<int16_t>(ctx, "an INT16 value")); break;
    case GgufValueType::UINT32: v.value = uint64_t(r.read<uint32_t>(ctx, "a UINT32 value")); break;
    case GgufValueType::INT32: v.value = int64_t(r.read<int32_t>(ctx, "an INT32 value")); break;
    case GgufValueType::UINT64: v.value = r.read<uint64_t>(ctx, "a UINT64 value"); break;
    case GgufValueType::INT64: v.value = r.read<int64_t>(ctx, "an INT64 value"); break;
    case GgufValueType::FLOAT32: v.value = double(r.read<float>(ctx, "a FLOAT32 value")); break;
    case GgufValueType::FLOAT64: v.value = r.read<double>(ctx, "a FLOAT64 value"); break;
    case GgufValueType::BOOL: v.value = r.read<uint8_t>(ctx, "a BOOL value") != 0; break;
    case GgufValueType::STRING: v.value = r.read_string(ctx, "a string value"); break;
    case GgufValueType::ARRAY: {
      NUQ_CHECK(depth < kMaxArrayDepth, Errc::invalid_file, "{}: {}: arrays nested more than {} levels deep",
                r.source(), ctx, kMaxArrayDepth);
      v.array_type = read_value_type(r, ctx, "the array element type");
      const uint64_t count = r.read<uint64_t>(ctx, "the array length");
      // Bound the count by the bytes left before reserving, so that a corrupt length fails here
      // instead of asking for terabytes.
      const uint64_t min_bytes = min_value_bytes(v.array_type);
      NUQ_CHECK(count <= r.remaining() / min_bytes, Errc::invalid_file,
                "{}: {}: array of {} {} items cannot fit in the {} bytes left in the file", r.source(), ctx,
                count, gguf_value_type_name(v.array_type), r.remaining());
      std::vector<GgufValue> items;
      items.reserve(std::size_t(count));
      for (uint64_t i = 0; i < count; ++i) items.push_back(read_value(r, v.array_type, depth + 1, ctx));
      v.value = std::move(items);
      break;
    }
  }
  return v;
}

void check_alignment_key(const GgufValue& v, const std::string& ctx, std::string_view source) {
  NUQ_CHECK(v.type == GgufValueType::UINT32, Errc::invalid_file, "{}: {}: must be a UINT32, not {}", source, ctx,
            gguf_value_type_name(v.type));
  const uint64_t a = std::get<uint64_t>(v.value);
  NUQ_CHECK(std::has_single_bit(a), Errc::invalid_file, "{}: {}: alignment {} is not a power of two", source, ctx,
            a);
}

}  // namespace

GgufHeader parse_gguf(std::span<const std::byte> file, std::string_view source) {
  Reader r(file, source);
  GgufHeader h;
  const std::string header_ctx = "header";

  r.need(4, header_ctx, "the magic");
  NUQ_CHECK(std::memcmp(file.data(), "GGUF", 4) == 0, Errc::invalid_file,
            "{}: not a GGUF file (magic bytes {:02x} {:02x} {:02x} {:02x}, expected \"GGUF\")", source,
            uint8_t(file[0]), uint8_t(file[1]), uint8_t(file[2]), uint8_t(file[3]));
  r.read<uint32_t>(header_ctx, "the magic");
  h.version = r.read<uint32_t>(header_ctx, "the version");
  if (h.version != 2 && h.version != 3) {
    // A big-endian writer's version 3 reads as 0x03000000 here.
    const uint32_t swapped = __builtin_bswap32(h.version);
    NUQ_CHECK(!(swapped == 2 || swapped == 3), Errc::unsupported,
              "{}: big-endian GGUF files (version {}) are not supported", source, swapped);
    fail(Errc::unsupported, "{}: GGUF version {} is not supported (nuq reads versions 2 and 3)", source,
         h.version);
  }
  const uint64_t n_tensors = r.read<uint64_t>(header_ctx, "the tensor count");
  const uint64_t n_kv = r.read<uint64_t>(header_ctx, "the metadata count");
  NUQ_CHECK(n_kv <= r.remaining() / kMinKeyValueBytes, Errc::invalid_file,
            "{}: header: {} metadata entries cannot fit in the {} bytes left in the file", source, n_kv,
            r.remaining());
  NUQ_CHECK(n_tensors <= (r.remaining() - n_kv * kMinKeyValueBytes) / kMinTensorInfoBytes, Errc::invalid_file,
            "{}: header: {} tensor infos (and {} metadata entries) cannot fit in the {} bytes left in the file",
            source, n_tensors, n_kv, r.remaining());

  // Keys and names are indexed by views into the vectors' own strings, which never move because both
  // vectors are reserved up front.
  h.metadata.reserve(std::size_t(n_kv));
  std::unordered_map<std::string_view, std::size_t> key_index;
  for (uint64_t i = 0; i < n_kv; ++i) {
    std::string ctx = fmt::format("metadata entry #{}", i);
    std::string key = r.read_string(ctx, "the key");
    ctx = fmt::format("key '{}'", key);
    const GgufValueType type = read_value_type(r, ctx, "the value type");
    GgufValue value = read_value(r, type, 0, ctx);
    if (key == "general.alignment") {
      check_alignment_key(value, ctx, source);
      h.alignment = std::get<uint64_t>(value.value);
    }
    GgufKeyValue& kv = h.metadata.emplace_back(GgufKeyValue{std::move(key), std::move(value)});
    const auto [it, inserted] = key_index.emplace(kv.key, i);
    NUQ_CHECK(inserted, Errc::invalid_file, "{}: key '{}' appears twice (metadata entries #{} and #{})", source,
              kv.key, it->second, i);
  }

  NUQ_CHECK(n_tensors <= r.remaining() / kMinTensorInfoBytes, Errc::invalid_file,
            "{}: header: {} tensor infos cannot fit in the {} bytes left in the file", source, n_tensors,
            r.remaining());
  h.tensors.reserve(std::size_t(n_tensors));
  std::unordered_map<std::string_view, std::size_t> name_index;
  for (uint64_t i = 0; i < n_tensors; ++i) {
    std::string ctx = fmt::format("tensor info #{}", i);
    GgufTensorInfo t;
    t.name = r.read_string(ctx, "the tensor name");
    ctx = fmt::format("tensor '{}'", t.name);
    const uint32_t n_dims = r.read<uint32_t>(ctx, "the number of dimensions");
    NUQ_CHECK(n_dims >= 1 && n_dims <= kMaxDims, Errc::invalid_file,
              "{}: {}: {} dimensions (GGUF allows 1 to {})", source, ctx, n_dims, kMaxDims);
    for (uint32_t d = 0; d < n_dims; ++d) t.ne.push_back(r.read<uint64_t>(ctx, "a dimension"));
    const uint32_t raw_type = r.read<uint32_t>(ctx, "the tensor type");
    t.offset = r.read<uint64_t>(ctx, "the data offset");

    int64_t numel = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      // Empty tensors are rejected: no real checkpoint has one, and a zero here is far more likely
      // to be corruption than intent.
      NUQ_CHECK(t.ne[d] != 0, Errc::invalid_file, "{}: {}: dimension ne[{}] is 0 (empty tensors are not accepted)",
                source, ctx, d);
      NUQ_CHECK(t.ne[d] <= uint64_t(std::numeric_limits<int64_t>::max()) &&
                    !__builtin_mul_overflow(numel, int64_t(t.ne[d]), &numel),
                Errc::invalid_file, "{}: {}: dimensions [{}] overflow the element count", source, ctx,
                fmt::join(t.ne, ", "));
    }
    const GgmlTypeTraits* traits = ggml_type_traits(raw_type);
    NUQ_CHECK(traits != nullptr, Errc::unsupported, "{}: {}: unknown ggml type {}", source, ctx, raw_type);
    t.type = GgmlType(raw_type);
    NUQ_CHECK(t.ne[0] % traits->block_size == 0, Errc::invalid_file,
              "{}: {}: row length ne[0] = {} is not a multiple of the {} block size {}", source, ctx, t.ne[0],
              traits->name, traits->block_size);
    NUQ_CHECK(!__builtin_mul_overflow(uint64_t(numel) / traits->block_size, uint64_t(traits->type_size), &t.nbytes),
              Errc::invalid_file, "{}: {}: byte size of {} {} elements overflows", source, ctx, numel, traits->name);
    NUQ_CHECK(t.offset % h.alignment == 0, Errc::invalid_file,
              "{}: {}: data offset {} is not a multiple of the alignment {}", source, ctx, t.offset, h.alignment);
    for (uint32_t d = n_dims; d-- > 0;) t.shape.push_back(int64_t(t.ne[d]));

    GgufTensorInfo& stored = h.tensors.emplace_back(std::move(t));
    const auto [it, inserted] = name_index.emplace(stored.name, i);
    NUQ_CHECK(inserted, Errc::invalid_file, "{}: tensor '{}' appears twice (tensor infos #{} and #{})", source,
              stored.name, it->second, i);
  }

  const uint64_t end_of_infos = r.pos();
  h.data_offset = (end_of_infos + h.alignment - 1) / h.alignment * h.alignment;

  const uint64_t size = file.size();
  for (const GgufTensorInfo& t : h.tensors) {
    uint64_t begin = 0, end = 0;
    const bool fits = !__builtin_add_overflow(h.data_offset, t.offset, &begin) &&
                      !__builtin_add_overflow(begin, t.nbytes, &end) && end <= size;
    if (!fits) {
      if (begin >= h.data_offset && end >= begin)
        fail(Errc::invalid_file, "{}: tensor '{}': data [{}, {}) runs past the end of the file ({} bytes)", source,
             t.name, begin, end, size);
      fail(Errc::invalid_file,
           "{}: tensor '{}': data at offset {} + {} of {} bytes runs past the end of the file ({} bytes)", source,
           t.name, h.data_offset, t.offset, t.nbytes, size);
    }
  }

  // Every range is non-empty, so after sorting by start a tensor overlaps an earlier one exactly when
  // it starts before the furthest end seen so far.
  std::vector<std::size_t> order(h.tensors.size());
  std::iota(order.begin(), order.end(), std::size_t(0));
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    return h.tensors[a].offset < h.tensors[b].offset || (h.tensors[a].offset == h.tensors[b].offset && a < b);
  });
  const GgufTensorInfo* furthest = nullptr;
  for (std::size_t idx : order) {
    const GgufTensorInfo& t = h.tensors[idx];
    if (furthest && t.offset < furthest->offset + furthest->nbytes) {
      const uint64_t base = h.data_offset;
      fail(Errc::invalid_file, "{}: tensors '{}' [{}, {}) and '{}' [{}, {}) overlap", source, furthest->name,
           base + furthest->offset, base + furthest->offset + furthest->nbytes, t.name, base + t.offset,
           base + t.offset + t.nbytes);
    }
    if (!furthest || t.offset + t.nbytes > furthest->offset + furthest->nbytes) furthest = &t;
  }
  return h;
}

// ---- dequantization --------------------------------------------------------------------------------------

namespace {

inline float load_fp16(const std::byte* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return fp16_to_float(h);
}

inline uint32_t load_u32(const std::byte* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

template <class T>
void convert_plain(const std::byte* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    T v;
    std::memcpy(&v, src + i * int64_t(sizeof(T)), sizeof(T));
    dst[i] = float(v);
  }
}

// The fp16/bf16 bulk converters want aligned uint16_t input; mapped tensors may sit at any address.
void convert_half(const std::byte* src, float* dst, int64_t n, bool bf16) {
  constexpr int64_t kChunk = 4096;
  uint16_t tmp[kChunk];
  for (int64_t i = 0; i < n; i += kChunk) {
    const int64_t m = std::min(kChunk, n - i);
    std::memcpy(tmp, src + 2 * i, std::size_t(2 * m));
    if (bf16)
      convert_bf16_to_float(tmp, dst + i, std::size_t(m));
    else
      convert_fp16_to_float(tmp, dst + i, std::size_t(m));
  }
}

// In all block formats below the scale d is an fp16 (11 significant bits) and the quant an integer
// of at most 8 bits, so q * d is exact in fp32. That makes the results bit-identical to ggml and to
// gguf-py whether or not the compiler fuses q * d + m into an FMA.

void dequant_q8_0(const std::byte* src, float* dst, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b, src += 34, dst += 32) {
    const float d = load_fp16(src);
    for (int j = 0; j < 32; ++j) dst[j] = float(static_cast<int8_t>(src[2 + j])) * d;
  }
}

// Q4: byte j holds element j in its low nibble and element j + 16 in its high nibble.
void dequant_q4_0(const std::byte* src, float* dst, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b, src += 18, dst += 32) {
    const float d = load_fp16(src);
    for (int j = 0; j < 16; ++j) {
      const auto q = static_cast<uint8_t>(src[2 + j]);
      dst[j] = float(int(q & 0x0F) - 8) * d;
      dst[j + 16] = float(int(q >> 4) - 8) * d;
    }
  }
}

void dequant_q4_1(const std::byte* src, float* dst, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b, src += 20, dst += 32) {
    const float d = load_fp16(src);
    const float m = load_fp16(src + 2);
    for (int j = 0; j < 16; ++j) {
      const auto q = static_cast<uint8_t>(src[4 + j]);
      dst[j] = float(q & 0x0F) * d + m;
      dst[j + 16] = float(q >> 4) * d + m;
    }
  }
}

// Q5: as Q4, plus a 32-bit little-endian word whose bit i is the fifth (top) bit of element i.
void dequant_q5_0(const std::byte* src, float* dst, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b, src += 22, dst += 32) {
    const float d = load_fp16(src);
    const uint32_t qh = load_u32(src + 2);
    for (int j = 0; j < 16; ++j) {
      const auto q = static_cast<uint8_t>(src[6 + j]);
      const int lo = int(q & 0x0F) | int((qh >> j) & 1u) << 4;
      const int hi = int(q >> 4) | int((qh >> (j + 16)) & 1u) << 4;
      dst[j] = float(lo - 16) * d;
      dst[j + 16] = float(hi - 16) * d;
    }
  }
}

void dequant_q5_1(const std::byte* src, float* dst, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b, src += 24, dst += 32) {
    const float d = load_fp16(src);
    const float m = load_fp16(src + 2);
    const uint32_t qh = load_u32(src + 4);
    for (int j = 0; j < 16; ++j) {
      const auto q = static_cast<uint8_t>(src[8 + j]);
      const int lo = int(q & 0x0F) | int((qh >> j) & 1u) << 4;
      const int hi = int(q >> 4) | int((qh >> (j + 16)) & 1u) << 4;
      dst[j] = float(lo) * d + m;
      dst[j + 16] = float(hi) * d + m;
    }
  }
}

// AVX-512 versions of the three block types most GGUF models store (the decoder converts weights as it
// multiplies, so for generation this conversion is on the critical path: SmolLM2's Q4_1 file decoded
// at 28 tokens/s with the loops above against 50 with an fp32 copy). Same arithmetic, same bits: q·d is
// exact, so FMA or not gives the scalar loops' results.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define NUQ_GGUF_AVX512 1
// GCC 12 warns about the deliberately undefined pass-through operands inside its own AVX-512 headers.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
__attribute__((target("avx512f,f16c"))) inline __m512 block_scale(const std::byte* p) {
  return _mm512_set1_ps(load_fp16(p));
}

__attribute__((target("avx512f,f16c"))) void dequant_q8_0_avx512(const std::byte* src, float* dst, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b, src += 34, dst += 32) {
    const __m512 d = block_scale(src);
    for (int h = 0; h < 2; ++h) {
      const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 + 16 * h));
      _mm512_storeu_ps(dst + 16 * h, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), d));
    }
  }
}

template <bool kWithMin>
__attribute__((target("avx512f,f16c"))) void dequant_q4_avx512(const std::byte* src, float* dst, int64_t nb) {
  constexpr int kQuants = kWithMin ? 4 : 2, kBlock = kWithMin ? 20 : 18;
  const __m512i low = _mm512_set1_epi32(0x0F);
  for (int64_t b = 0; b < nb; ++b, src += kBlock, dst += 32) {
    const __m512 d = block_scale(src);
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + kQuants)));
    __m512i lo = _mm512_and_si512(q, low), hi = _mm512_srli_epi32(q, 4);
    if constexpr (kWithMin) {
      const __m512 m = block_scale(src + 2);
      _mm512_storeu_ps(dst, _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), d, m));
      _mm512_storeu_ps(dst + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), d, m));
    } else {
      const __m512i eight = _mm512_set1_epi32(8);
      lo = _mm512_sub_epi32(lo, eight);
      hi = _mm512_sub_epi32(hi, eight);
      _mm512_storeu_ps(dst, _mm512_mul_ps(_mm512_cvtepi32_ps(lo), d));
      _mm512_storeu_ps(dst + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(hi), d));
    }
  }
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

bool use_avx512() {
#if NUQ_GGUF_AVX512
  static const bool yes = detail::cpu_features().avx512f && detail::cpu_features().f16c;
  return yes;
#else
  return false;
#endif
}

}  // namespace

void ggml_dequantize(GgmlType type, const std::byte* src, float* dst, int64_t n) {
  const GgmlTypeTraits* traits = ggml_type_traits(uint32_t(type));
  NUQ_CHECK(traits != nullptr, Errc::unsupported, "ggml_dequantize: unknown ggml type {}", uint32_t(type));
  NUQ_CHECK(traits->can_dequantize, Errc::unsupported,
            "ggml_dequantize: nuq cannot dequantize {} (supported: F32, F16, BF16, F64, I8, I16, I32, Q8_0, Q4_0, "
            "Q4_1, Q5_0, Q5_1)",
            traits->name);
  NUQ_CHECK(n >= 0 && n % traits->block_size == 0, Errc::invalid_argument,
            "ggml_dequantize: {} elements is not a whole number of {} blocks of {}", n, traits->name,
            traits->block_size);
  if (n == 0) return;
  const int64_t nb = n / traits->block_size;
  switch (type) {
    case GgmlType::F32: std::memcpy(dst, src, std::size_t(n) * 4); break;
    case GgmlType::F16: convert_half(src, dst, n, false); break;
    case GgmlType::BF16: convert_half(src, dst, n, true); break;
    case GgmlType::F64: convert_plain<double>(src, dst, n); break;
    case GgmlType::I8: convert_plain<int8_t>(src, dst, n); break;
    case GgmlType::I16: convert_plain<int16_t>(src, dst, n); break;
    case GgmlType::I32: convert_plain<int32_t>(src, dst, n); break;
#if NUQ_GGUF_AVX512
    case GgmlType::Q8_0: use_avx512() ? dequant_q8_0_avx512(src, dst, nb) : dequant_q8_0(src, dst, nb); break;
    case GgmlType::Q4_0: use_avx512() ? dequant_q4_avx512<false>(src, dst, nb) : dequant_q4_0(src, dst, nb); break;
    case GgmlType::Q4_1: use_avx512() ? dequant_q4_avx512<true>(src, dst, nb) : dequant_q4_1(src, dst, nb); break;
#else
    case GgmlType::Q8_0: dequant_q8_0(src, dst, nb); break;
    case GgmlType::Q4_0: dequant_q4_0(src, dst, nb); break;
    case GgmlType::Q4_1: dequant_q4_1(src, dst, nb); break;
#endif
    case GgmlType::Q5_0: dequant_q5_0(src, dst, nb); break;
    case GgmlType::Q5_1: dequant_q5_1(src, dst, nb); break;
    default: fail(Errc::internal, "ggml_dequantize: {} is marked decodable but has no decoder", traits->name);
  }
}

// ---- files -----------------------------------------------------------------------------------------------

GgufFile::GgufFile(const std::string& path) : file_(path), header_(parse_gguf(file_.bytes(), path)) {}

std::span<const std::byte> GgufFile::tensor_bytes(const GgufTensorInfo& info) const {
  const uint64_t size = file_.size();
  const uint64_t begin = header_.data_offset + info.offset;
  // Guards against an info that came from another file; this file's own infos were checked in parsing.
  NUQ_CHECK(info.offset <= size && begin >= header_.data_offset && begin <= size && info.nbytes <= size - begin,
            Errc::invalid_argument, "{}: tensor '{}': data [{}, +{}) is outside this file ({} bytes)", path(),
            info.name, begin, info.nbytes, size);
  return file_.bytes().subspan(std::size_t(begin), std::size_t(info.nbytes));
}

Buffer GgufFile::dequantize(std::string_view name) const {
  const GgufTensorInfo* info = find_tensor(name);
  NUQ_CHECK(info != nullptr, Errc::invalid_argument, "{}: no tensor named '{}'", path(), name);
  const GgmlTypeTraits* traits = ggml_type_traits(uint32_t(info->type));
  NUQ_CHECK(traits && traits->can_dequantize, Errc::unsupported,
            "{}: tensor '{}': nuq cannot dequantize type {}", path(), name, type_label(uint32_t(info->type)));
  Buffer out(DType::F32, info->shape);
  ggml_dequantize(info->type, tensor_bytes(*info).data(), out.data_as<float>(), info->numel());
  return out;
}

}  // namespace nuq
