// What `nuq inspect` reports about a checkpoint, as data (the CLI prints it; bindings can return it).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "nuq/packed.hpp"
#include "nuq/tensor.hpp"

namespace nuq {

enum class CheckpointKind { safetensors, safetensors_sharded, gguf };
const char* checkpoint_kind_name(CheckpointKind kind) noexcept;

// Decides from the path (directory, index file) or the file's first bytes; throws naming the path when
// it is none of these.
CheckpointKind detect_checkpoint_kind(const std::string& path);

struct InspectedTensor {
  std::string name;
  std::string dtype;  // safetensors dtype name or ggml type name ("Q4_1")
  Shape shape;        // row-major
  uint64_t nbytes = 0;
  std::string file;   // shard file name for sharded checkpoints, else empty
};

struct InspectedLayer {  // a packed (quantized) layer
  std::string name;      // base name
  PackedTensorMeta meta;
  PackedStorage storage;
  double bits_per_weight = 0;
};

struct InspectReport {
  std::string path;
  CheckpointKind kind = CheckpointKind::safetensors;
  std::string format_detail;  // e.g. "GGUF v3, alignment 32" or "3 shards"
  std::vector<std::pair<std::string, std::string>> metadata;  // rendered for display
  std::vector<InspectedTensor> tensors;
  std::vector<InspectedLayer> packed_layers;  // empty for unquantized checkpoints
  uint64_t total_bytes = 0;                   // sum of tensor bytes
};

struct InspectOptions {
  // Also decode and check every packed layer completely (codebooks finite, CSR well formed, padding
  // zero). Without it only shapes and dtypes are checked against quantization_config.
  bool full_check = false;
};

// Opens, validates and summarizes a checkpoint. Throws nuq::Error naming the file and the problem.
InspectReport inspect_checkpoint(const std::string& path, const InspectOptions& options = {});

}  // namespace nuq
