// Element types nuq reads and writes. Names follow the safetensors spelling ("F16", "BF16", ...),
// which is also what `nuq inspect` prints.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace nuq {

enum class DType : uint8_t {
  BOOL,
  U8,
  I8,
  U16,
  I16,
  F16,
  BF16,
  U32,
  I32,
  F32,
  U64,
  I64,
  F64,
  F8_E4M3,
  F8_E5M2,
};

inline constexpr int kDTypeCount = 15;

// Size of one element in bytes.
constexpr std::size_t dtype_size(DType t) noexcept {
  switch (t) {
    case DType::BOOL:
    case DType::U8:
    case DType::I8:
    case DType::F8_E4M3:
    case DType::F8_E5M2:
      return 1;
    case DType::U16:
    case DType::I16:
    case DType::F16:
    case DType::BF16:
      return 2;
    case DType::U32:
    case DType::I32:
    case DType::F32:
      return 4;
    case DType::U64:
    case DType::I64:
    case DType::F64:
      return 8;
  }
  return 0;
}

std::string_view dtype_name(DType t) noexcept;
// Parses a safetensors dtype name; nullopt for names nuq does not know.
std::optional<DType> dtype_from_name(std::string_view name) noexcept;

constexpr bool dtype_is_float(DType t) noexcept {
  return t == DType::F16 || t == DType::BF16 || t == DType::F32 || t == DType::F64 ||
         t == DType::F8_E4M3 || t == DType::F8_E5M2;
}

}  // namespace nuq
