// Host-side operations on nuq's packed layer format (include/nuq/format.hpp, docs/format.md):
// packing and unpacking indices, validation, the reference dequantizer, storage accounting and the
// quantization_config metadata.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "nuq/format.hpp"
#include "nuq/tensor.hpp"

namespace nuq {

// Throws Errc::invalid_argument naming the width unless bits is 2, 3 or 4.
format::IndexLayout checked_index_layout(int bits);

// Packs a row-major [rows, cols] array of indices (each < 2^bits; checked, the first offending position
// is named) into qweight layout: rows * format::row_bytes(cols, bits) bytes.
void pack_indices(const uint8_t* indices, int64_t rows, int64_t cols, int bits, uint8_t* packed);
// Inverse of pack_indices.
void unpack_indices(const uint8_t* packed, int64_t rows, int64_t cols, int bits, uint8_t* indices);

// Checks a packed layer for internal consistency: supported bits, group size dividing cols, non-null
// pointers, finite codebooks and sparse values, CSR row pointers monotone from 0 to nnz, sparse columns
// in range and strictly increasing within each row, padding indices zero. Errors name `layer` and the
// offending row/column/entry. O(size of the packed data).
void validate_packed(const format::PackedLinearView& layer, std::string_view layer_name);

// The reference dequantizer, the definition every kernel is tested against: writes W (row-major
// [rows, cols], fp32) with W[r,c] = fp32(lut[r, c/group_size, index(r,c)]) + fp32(sparse(r,c)).
void dequantize_reference(const format::PackedLinearView& layer, float* out);

// Bytes a packed layer occupies in a checkpoint, by part, and bits per weight with every part counted.
struct PackedStorage {
  uint64_t qweight = 0;
  uint64_t lut = 0;
  uint64_t sparse = 0;  // row pointers + column indices + values
  uint64_t total() const { return qweight + lut + sparse; }
};
PackedStorage packed_storage(int64_t rows, int64_t cols, int bits, int64_t group_size, int64_t nnz);
double bits_per_weight(const PackedStorage& storage, int64_t rows, int64_t cols);

// An owning packed layer (the quantizers produce these; tests build them by hand).
struct PackedLinear {
  int64_t rows = 0, cols = 0, group_size = 0;
  int bits = 0;
  Buffer qweight;         // U8  [rows, row_bytes]
  Buffer lut;             // F16 [rows, groups, 2^bits]
  Buffer sparse_row_ptr;  // I32 [rows + 1] (empty when nnz == 0)
  Buffer sparse_col_idx;  // U16 or I32 [nnz]
  Buffer sparse_values;   // F16 [nnz]

  PackedLinear() = default;
  // Allocates zeroed storage for the given geometry.
  PackedLinear(int64_t rows, int64_t cols, int bits, int64_t group_size, int64_t nnz);
  int64_t nnz() const { return sparse_values.shape().rank() ? sparse_values.shape()[0] : 0; }
  format::PackedLinearView view() const;
};

// Per-layer entry of the quantization_config metadata (docs/format.md, "Checkpoint metadata").
struct PackedTensorMeta {
  int bits = 0;
  int64_t rows = 0, cols = 0, group_size = 0, nnz = 0;
  std::string method;        // "nuq", "kmeans", "rtn", ...
  std::string source_dtype;  // dtype of the weight before quantization, e.g. "F32"
};

struct QuantizationConfig {
  int format_version = format::kVersion;
  std::map<std::string, PackedTensorMeta> layers;  // base name -> entry
  std::map<std::string, std::string> extra;        // free-form string settings (tool version, options)
};

// Key under which the config is stored in a safetensors file's __metadata__.
inline constexpr const char* kQuantizationConfigKey = "quantization_config";

std::string to_json(const QuantizationConfig& config);
// Throws Errc::invalid_file naming `source` for malformed JSON or missing fields, and Errc::unsupported
// for a format_version this build does not read.
QuantizationConfig parse_quantization_config(std::string_view json, std::string_view source);

// A Hugging Face config.json (`config_json`, read from `source`) with its `quantization_config` set to
// `config` for the whole model, plus the summary transformers users read at a glance: `bits` (null when
// layers differ), `group_size` (0: one codebook per row; null when layers differ) and `sparse_fraction`
// (stored sparse values over quantized weights). transformers dispatches `from_pretrained` on its
// quant_method "nuq" (python/nuq/hf.py). Throws Errc::invalid_file naming `source` when it is not a
// JSON object.
std::string hf_config_with_quantization(std::string_view config_json, const QuantizationConfig& config,
                                        std::string_view source);

}  // namespace nuq

namespace nuq {
class SafetensorsCheckpoint;

// The packed layer `base` of a checkpoint as a zero-copy view, after checking that its tensors exist
// with the dtypes and shapes `meta` implies and are aligned for their dtypes. Errors name the layer and
// the tensor. The view lives as long as the checkpoint.
format::PackedLinearView packed_view(const SafetensorsCheckpoint& checkpoint, const std::string& base,
                                     const PackedTensorMeta& meta);
}  // namespace nuq
