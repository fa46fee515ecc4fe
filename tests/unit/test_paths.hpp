// Where tests find real data. Tests that need it skip with a reason when it is absent, because nuq is
// also built where ../shared is not mounted and the model packages are not installed.
#pragma once

#include <cstdlib>
#include <filesystem>
#include <optional>
#include <string>

namespace nuq::testing {

// ../shared/data beside the project, or $NUQ_SHARED_DATA.
inline std::optional<std::filesystem::path> shared_data_dir() {
  namespace fs = std::filesystem;
  if (const char* env = std::getenv("NUQ_SHARED_DATA"); env && *env) {
    if (fs::is_directory(env)) return fs::path(env);
    return std::nullopt;
  }
  fs::path p = fs::path(NUQ_SOURCE_DIR).parent_path() / "shared" / "data";
  if (fs::is_directory(p)) return p;
  return std::nullopt;
}

// Real models extracted by scripts/fetch-models.sh: $NUQ_MODELS_DIR, else $HOME/.cache/nuq/models.
inline std::optional<std::filesystem::path> models_dir() {
  namespace fs = std::filesystem;
  fs::path p;
  if (const char* env = std::getenv("NUQ_MODELS_DIR"); env && *env)
    p = env;
  else if (const char* home = std::getenv("HOME"); home && *home)
    p = fs::path(home) / ".cache" / "nuq" / "models";
  else
    return std::nullopt;
  if (fs::is_directory(p)) return p;
  return std::nullopt;
}

}  // namespace nuq::testing
