#include "run_identity.hpp"

#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "nuq/error.hpp"

namespace nuq::detail {

nlohmann::json file_identity(const std::string& path) {
  struct stat st {};
  NUQ_CHECK(::stat(path.c_str(), &st) == 0, Errc::io, "{}: cannot stat: {}", path, std::strerror(errno));
  const int64_t mtime_ns = int64_t(st.st_mtim.tv_sec) * 1'000'000'000 + st.st_mtim.tv_nsec;
  return nlohmann::json{{"path", std::filesystem::weakly_canonical(path).string()},
                        {"size", uint64_t(st.st_size)},
                        {"mtime_ns", mtime_ns}};
}

uint64_t token_ids_fnv1a(const std::vector<int32_t>& ids) {
  uint64_t h = 1469598103934665603ull;
  for (int32_t id : ids)
    for (int b = 0; b < 4; ++b) h = (h ^ ((uint32_t(id) >> (8 * b)) & 0xffu)) * 1099511628211ull;
  return h;
}

}  // namespace nuq::detail
