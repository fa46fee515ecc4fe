// Internal: how resumable jobs (nuq quantize, nuq plan's table, nuq tune) recognise that a run started
// again has the same inputs as the one that left its partial work behind.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace nuq::detail {

// {"path": canonical path, "size", "mtime_ns"}: a file replaced or rewritten since gets another identity.
nlohmann::json file_identity(const std::string& path);

// FNV-1a over the token ids' little-endian bytes.
uint64_t token_ids_fnv1a(const std::vector<int32_t>& ids);

}  // namespace nuq::detail
