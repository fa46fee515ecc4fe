#pragma once

#include <string>
#include <string_view>

namespace nuq::detail {

// A weight's base name: the name its packed tensors and its activation statistics share
// (`model.layers.0.mlp.up_proj.weight` → `model.layers.0.mlp.up_proj`). Names without the suffix are
// already bases (GGUF-style names, statistics keys) and come back unchanged.
inline std::string weight_base(std::string_view name) {
  constexpr std::string_view kSuffix = ".weight";
  if (name.ends_with(kSuffix)) name.remove_suffix(kSuffix.size());
  return std::string(name);
}

}  // namespace nuq::detail
