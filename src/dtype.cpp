#include "nuq/dtype.hpp"

#include <array>

namespace nuq {
namespace {
constexpr std::array<std::string_view, kDTypeCount> kNames = {
    "BOOL", "U8", "I8", "U16", "I16", "F16", "BF16", "U32", "I32", "F32", "U64", "I64", "F64",
    "F8_E4M3", "F8_E5M2"};
}  // namespace

std::string_view dtype_name(DType t) noexcept {
  auto i = static_cast<std::size_t>(t);
  return i < kNames.size() ? kNames[i] : std::string_view("?");
}

std::optional<DType> dtype_from_name(std::string_view name) noexcept {
  for (std::size_t i = 0; i < kNames.size(); ++i)
    if (kNames[i] == name) return static_cast<DType>(i);
  return std::nullopt;
}

}  // namespace nuq
