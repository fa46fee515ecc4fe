// Read-only GGUF (llama.cpp's checkpoint format, versions 2 and 3): header, metadata key-values,
// tensor infos, and dequantization of common ggml types to fp32. Everything is validated against the
// file's size before use, so a malformed file gives an nuq::Error naming the file, the key or tensor,
// and the problem.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "nuq/mapped_file.hpp"
#include "nuq/tensor.hpp"

namespace nuq {

// ggml tensor types (values as stored in GGUF files).
enum class GgmlType : uint32_t {
  F32 = 0,
  F16 = 1,
  Q4_0 = 2,
  Q4_1 = 3,
  Q5_0 = 6,
  Q5_1 = 7,
  Q8_0 = 8,
  Q8_1 = 9,
  Q2_K = 10,
  Q3_K = 11,
  Q4_K = 12,
  Q5_K = 13,
  Q6_K = 14,
  Q8_K = 15,
  IQ2_XXS = 16,
  IQ2_XS = 17,
  IQ3_XXS = 18,
  IQ1_S = 19,
  IQ4_NL = 20,
  IQ3_S = 21,
  IQ2_S = 22,
  IQ4_XS = 23,
  I8 = 24,
  I16 = 25,
  I32 = 26,
  I64 = 27,
  F64 = 28,
  IQ1_M = 29,
  BF16 = 30,
  TQ1_0 = 34,
  TQ2_0 = 35,
};

struct GgmlTypeTraits {
  std::string_view name;  // "Q4_1"
  uint32_t block_size;    // elements per block (1 for plain types)
  uint32_t type_size;     // bytes per block
  bool can_dequantize;    // nuq decodes it to fp32
};
// Traits for a type value read from a file; nullptr for values nuq does not know.
const GgmlTypeTraits* ggml_type_traits(uint32_t type) noexcept;

enum class GgufValueType : uint32_t {
  UINT8 = 0,
  INT8 = 1,
  UINT16 = 2,
  INT16 = 3,
  UINT32 = 4,
  INT32 = 5,
  FLOAT32 = 6,
  BOOL = 7,
  STRING = 8,
  ARRAY = 9,
  UINT64 = 10,
  INT64 = 11,
  FLOAT64 = 12,
};
std::string_view gguf_value_type_name(GgufValueType t) noexcept;

// A metadata value. Arrays hold their element type and their values (arrays of arrays are allowed).
struct GgufValue {
  GgufValueType type = GgufValueType::UINT8;
  std::variant<uint64_t, int64_t, double, bool, std::string, std::vector<GgufValue>> value;
  GgufValueType array_type = GgufValueType::UINT8;  // element type when type == ARRAY

  // Accessors throw nuq::Error (Errc::invalid_argument) naming the expected and actual types.
  uint64_t as_uint() const;   // any unsigned or non-negative signed integer
  int64_t as_int() const;     // any integer that fits int64
  double as_float() const;    // FLOAT32/FLOAT64 or any integer
  bool as_bool() const;
  const std::string& as_string() const;
  const std::vector<GgufValue>& as_array() const;
  // Short human-readable rendering: strings quoted and cut at ~60 bytes, arrays as
  // [a, b, ... (N items)] showing at most max_items elements.
  std::string to_display_string(std::size_t max_items = 8) const;
};

struct GgufKeyValue {
  std::string key;
  GgufValue value;
};

struct GgufTensorInfo {
  std::string name;
  GgmlType type = GgmlType::F32;
  std::vector<uint64_t> ne;  // dimensions as stored: ne[0] is the fastest-varying (row length)
  Shape shape;               // the same dimensions row-major (outermost first): reversed ne
  uint64_t offset = 0;       // relative to the start of the data section
  uint64_t nbytes = 0;
  int64_t numel() const { return shape.numel(); }
};

struct GgufHeader {
  uint32_t version = 0;
  uint64_t alignment = 32;  // general.alignment, default 32
  std::vector<GgufKeyValue> metadata;  // in file order
  std::vector<GgufTensorInfo> tensors;  // in file order
  uint64_t data_offset = 0;  // absolute offset of the data section

  const GgufValue* find_value(std::string_view key) const;
  const GgufTensorInfo* find_tensor(std::string_view name) const;
};

// Parses and validates a whole GGUF file image. Checks the magic, version (2 or 3), that every count,
// string and array fits in the file, known value and tensor types, power-of-two alignment, tensor
// dimensions (positive, row length a multiple of the type's block size, no overflow), tensor byte
// ranges aligned, inside the data section and not overlapping, and no duplicate keys or tensor names.
GgufHeader parse_gguf(std::span<const std::byte> file, std::string_view source);

class GgufFile {
 public:
  explicit GgufFile(const std::string& path);

  const std::string& path() const noexcept { return file_.path(); }
  const GgufHeader& header() const noexcept { return header_; }
  const std::vector<GgufKeyValue>& metadata() const noexcept { return header_.metadata; }
  const std::vector<GgufTensorInfo>& tensors() const noexcept { return header_.tensors; }
  const GgufValue* find_value(std::string_view key) const { return header_.find_value(key); }
  const GgufTensorInfo* find_tensor(std::string_view name) const { return header_.find_tensor(name); }
  // Raw (possibly quantized) bytes of a tensor, zero-copy.
  std::span<const std::byte> tensor_bytes(const GgufTensorInfo& info) const;
  // Dequantizes a tensor to a new fp32 buffer of shape info.shape. Throws Errc::unsupported naming
  // the tensor and type for types nuq does not decode.
  Buffer dequantize(std::string_view name) const;

 private:
  MappedFile file_;
  GgufHeader header_;
};

// Dequantizes n elements (a multiple of the type's block size) from `src` (n / block_size blocks)
// into dst. Supported: F32, F16, BF16, F64, I8, I16, I32, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1.
void ggml_dequantize(GgmlType type, const std::byte* src, float* dst, int64_t n);

}  // namespace nuq
