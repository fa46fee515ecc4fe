#include "nuq/inspect.hpp"

#include <cstring>
#include <filesystem>
#include <fstream>

#include "nuq/gguf.hpp"
#include "nuq/safetensors.hpp"

namespace nuq {

const char* checkpoint_kind_name(CheckpointKind kind) noexcept {
  switch (kind) {
    case CheckpointKind::safetensors: return "safetensors";
    case CheckpointKind::safetensors_sharded: return "safetensors (sharded)";
    case CheckpointKind::gguf: return "GGUF";
  }
  return "?";
}

CheckpointKind detect_checkpoint_kind(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::is_directory(path, ec)) {
    return fs::exists(fs::path(path) / "model.safetensors.index.json") ? CheckpointKind::safetensors_sharded
                                                                       : CheckpointKind::safetensors;
  }
  NUQ_CHECK(fs::exists(path, ec), Errc::io, "{}: no such file or directory", path);
  if (path.size() >= 5 && path.compare(path.size() - 5, 5, ".json") == 0) return CheckpointKind::safetensors_sharded;
  std::ifstream in(path, std::ios::binary);
  NUQ_CHECK(in.good(), Errc::io, "{}: cannot open", path);
  char magic[4] = {};
  in.read(magic, 4);
  if (in.gcount() == 4 && std::memcmp(magic, "GGUF", 4) == 0) return CheckpointKind::gguf;
  return CheckpointKind::safetensors;
}

format::PackedLinearView packed_view(const SafetensorsCheckpoint& ckpt, const std::string& base,
                                     const PackedTensorMeta& meta) {
  auto tensor = [&](const char* suffix, DType dtype, const Shape& shape) -> const std::byte* {
    const std::string name = base + suffix;
    NUQ_CHECK(ckpt.contains(name), Errc::invalid_file, "{}: packed layer '{}' has no tensor '{}'", ckpt.path(), base, name);
    const SafetensorsTensorInfo& info = ckpt.info(name);
    NUQ_CHECK(info.dtype == dtype && info.shape == shape, Errc::invalid_file,
              "{}: tensor '{}' is {} {} but quantization_config implies {} {}", ckpt.path(), name,
              dtype_name(info.dtype), to_string(info.shape), dtype_name(dtype), to_string(shape));
    ConstTensorView view = ckpt.tensor(name);
    NUQ_CHECK(reinterpret_cast<uintptr_t>(view.data()) % dtype_size(dtype) == 0, Errc::invalid_file,
              "{}: tensor '{}' is not aligned to its {}-byte dtype; rewrite the file with nuq", ckpt.path(), name,
              dtype_size(dtype));
    return view.data();
  };
  format::PackedLinearView v;
  v.rows = meta.rows;
  v.cols = meta.cols;
  v.bits = meta.bits;
  v.group_size = meta.group_size;
  v.nnz = meta.nnz;
  v.qweight = reinterpret_cast<const uint8_t*>(
      tensor(format::kQWeightSuffix, DType::U8, {meta.rows, format::row_bytes(meta.cols, meta.bits)}));
  v.lut = reinterpret_cast<const uint16_t*>(
      tensor(format::kLutSuffix, DType::F16, {meta.rows, meta.cols / meta.group_size, format::lut_entries(meta.bits)}));
  if (meta.nnz > 0) {
    v.sparse_row_ptr = reinterpret_cast<const int32_t*>(tensor(format::kSparseRowPtrSuffix, DType::I32, {meta.rows + 1}));
    v.sparse_col_idx = tensor(format::kSparseColIdxSuffix,
                              format::sparse_cols_are_u16(meta.cols) ? DType::U16 : DType::I32, {meta.nnz});
    v.sparse_values = reinterpret_cast<const uint16_t*>(tensor(format::kSparseValuesSuffix, DType::F16, {meta.nnz}));
  }
  return v;
}

namespace {

InspectReport inspect_safetensors(const std::string& path, const InspectOptions& options) {
  SafetensorsCheckpoint ckpt(path);
  InspectReport report;
  report.path = path;
  report.kind = ckpt.is_sharded() ? CheckpointKind::safetensors_sharded : CheckpointKind::safetensors;
  report.format_detail = ckpt.is_sharded() ? fmt::format("{} shards", ckpt.files().size()) : "single file";
  for (const auto& [k, v] : ckpt.metadata()) report.metadata.emplace_back(k, v);
  for (const std::string& name : ckpt.tensor_names()) {
    const SafetensorsTensorInfo& info = ckpt.info(name);
    InspectedTensor t{name, std::string(dtype_name(info.dtype)), info.shape, info.nbytes(), {}};
    if (ckpt.is_sharded()) t.file = std::filesystem::path(ckpt.file_of(name).path()).filename().string();
    report.total_bytes += t.nbytes;
    report.tensors.push_back(std::move(t));
  }
  // Each file carries the config of its own layers; merge them (a layer listed twice must agree).
  std::map<std::string, PackedTensorMeta> layers;
  for (const auto& file : ckpt.files()) {
    auto it = file->metadata().find(kQuantizationConfigKey);
    if (it == file->metadata().end()) continue;
    QuantizationConfig config = parse_quantization_config(it->second, file->path());
    for (auto& [name, meta] : config.layers) layers.emplace(name, meta);
  }
  for (const auto& [name, meta] : layers) {
    format::PackedLinearView view = packed_view(ckpt, name, meta);
    if (options.full_check) validate_packed(view, name);
    InspectedLayer layer{name, meta, packed_storage(meta.rows, meta.cols, meta.bits, meta.group_size, meta.nnz), 0};
    layer.bits_per_weight = bits_per_weight(layer.storage, meta.rows, meta.cols);
    report.packed_layers.push_back(std::move(layer));
  }
  return report;
}

InspectReport inspect_gguf(const std::string& path) {
  GgufFile file(path);
  InspectReport report;
  report.path = path;
  report.kind = CheckpointKind::gguf;
  report.format_detail = fmt::format("GGUF v{}, alignment {}", file.header().version, file.header().alignment);
  for (const GgufKeyValue& kv : file.metadata()) report.metadata.emplace_back(kv.key, kv.value.to_display_string());
  for (const GgufTensorInfo& info : file.tensors()) {
    const GgmlTypeTraits* traits = ggml_type_traits(uint32_t(info.type));
    report.tensors.push_back({info.name, traits ? std::string(traits->name) : "?", info.shape, info.nbytes, {}});
    report.total_bytes += info.nbytes;
  }
  return report;
}

}  // namespace

InspectReport inspect_checkpoint(const std::string& path, const InspectOptions& options) {
  return detect_checkpoint_kind(path) == CheckpointKind::gguf ? inspect_gguf(path) : inspect_safetensors(path, options);
}

}  // namespace nuq
