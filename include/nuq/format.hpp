// nuq's packed format for one quantized linear layer: the single definition shared by the CPU and
// CUDA code. docs/format.md describes the same layout bit for bit and says why it was chosen; keep the
// two in step (the format version below changes when the layout does).
//
// A weight matrix W of shape [rows, cols] (rows = output features, cols = input features) is stored as
//   qweight  U8  [rows, row_bytes(cols, bits)]   b-bit codebook indices, row-major, bit-planar per row
//   lut      F16 [rows, cols / group_size, 2^b]   per-row (optionally per column-group) codebook
//   sparse_row_ptr  I32 [rows + 1]                CSR part, present only when nnz > 0
//   sparse_col_idx  U16 [nnz] (cols <= 65536) or I32 [nnz] otherwise
//   sparse_values   F16 [nnz]
// and decodes as W[r, c] = lut[r, c / group_size, index(r, c)] + sparse(r, c), summed in fp32.
#pragma once

#include <cstddef>
#include <cstdint>

#include "nuq/config.hpp"

namespace nuq::format {

// Version of the layout described here and in docs/format.md, written into every checkpoint's
// quantization_config. Readers refuse versions they do not know.
inline constexpr int kVersion = 1;

// Index streams are padded to a multiple of this many columns. 64 keeps every plane of every row a
// whole number of 8-byte words (so rows are 8-byte aligned at 3 bits and 16-byte aligned at 2 and 4
// bits) while wasting nothing on the common hidden sizes (576, 1536, 4096, 11008, 14336 are all
// multiples of 64). Padded positions hold index 0 and must never contribute to a result.
inline constexpr int64_t kPackCols = 64;

inline constexpr int kMinBits = 2;
inline constexpr int kMaxBits = 4;

// How a b-bit index is split into bit planes. A 3-bit index is a 2-bit plane (its low bits) followed by
// a 1-bit plane (its top bit): each plane then packs a power-of-two number of indices per byte, so
// decoding is shifts and masks with no index straddling a byte, on SIMD lanes and GPU threads alike.
struct IndexLayout {
  int bits;           // bits per index
  int planes;         // 1 or 2
  int plane_bits[2];  // width of each plane; plane 0 holds the low bits
};

NUQ_HOST_DEVICE constexpr bool is_supported_bits(int bits) { return bits >= kMinBits && bits <= kMaxBits; }

// The one table of index layouts (a switch rather than an array so that device code can use it).
// Unsupported widths give {0, 0, {0, 0}}; host callers use checked_index_layout() for an error.
NUQ_HOST_DEVICE constexpr IndexLayout index_layout(int bits) {
  switch (bits) {
    case 2: return {2, 1, {2, 0}};
    case 3: return {3, 2, {2, 1}};
    case 4: return {4, 1, {4, 0}};
    default: return {0, 0, {0, 0}};
  }
}

NUQ_HOST_DEVICE constexpr int64_t padded_cols(int64_t cols) {
  return (cols + kPackCols - 1) / kPackCols * kPackCols;
}

// Bytes of one plane of one row.
NUQ_HOST_DEVICE constexpr int64_t plane_bytes(int64_t cols, int plane_bits) {
  return padded_cols(cols) * plane_bits / 8;
}

// Bytes of one packed row (all planes); also the row stride of qweight.
NUQ_HOST_DEVICE constexpr int64_t row_bytes(int64_t cols, int bits) {
  return padded_cols(cols) * bits / 8;
}

// Offset of plane p inside a packed row.
NUQ_HOST_DEVICE constexpr int64_t plane_offset(int64_t cols, const IndexLayout& layout, int plane) {
  return plane == 0 ? 0 : plane_bytes(cols, layout.plane_bits[0]);
}

NUQ_HOST_DEVICE constexpr int lut_entries(int bits) { return 1 << bits; }

// Sparse column indices are 16-bit whenever every column fits, halving their cost (2 of the 4 bytes
// per outlier instead of 4 of 6): at 0.45% sparsity that is 0.07 bits per weight saved.
NUQ_HOST_DEVICE constexpr bool sparse_cols_are_u16(int64_t cols) { return cols <= 65536; }

// Index of column c in a packed row (reference decoder; kernels decode whole words at once).
NUQ_HOST_DEVICE inline int unpack_index(const uint8_t* row, int64_t cols, int bits, int64_t c) {
  const IndexLayout layout = index_layout(bits);
  int value = 0;
  int shift = 0;
  for (int p = 0; p < layout.planes; ++p) {
    const int w = layout.plane_bits[p];
    const uint8_t* plane = row + plane_offset(cols, layout, p);
    const int64_t bit = c * w;
    const int field = (plane[bit >> 3] >> (bit & 7)) & ((1 << w) - 1);
    value |= field << shift;
    shift += w;
  }
  return value;
}

// Packs one row of `cols` indices (each < 2^bits) into `row` (row_bytes(cols, bits) bytes, fully
// written, padding included).
NUQ_HOST_DEVICE inline void pack_row(const uint8_t* indices, int64_t cols, int bits, uint8_t* row) {
  const IndexLayout layout = index_layout(bits);
  const int64_t total = row_bytes(cols, bits);
  for (int64_t i = 0; i < total; ++i) row[i] = 0;
  int shift = 0;
  for (int p = 0; p < layout.planes; ++p) {
    const int w = layout.plane_bits[p];
    uint8_t* plane = row + plane_offset(cols, layout, p);
    for (int64_t c = 0; c < cols; ++c) {
      const int field = (indices[c] >> shift) & ((1 << w) - 1);
      const int64_t bit = c * w;
      plane[bit >> 3] = uint8_t(plane[bit >> 3] | (field << (bit & 7)));
    }
    shift += w;
  }
}

// Non-owning description of one packed layer, as kernels receive it. Pointers are host or device
// pointers depending on the consumer. fp16 values are raw IEEE binary16 bits.
struct PackedLinearView {
  int64_t rows = 0;
  int64_t cols = 0;
  int bits = 0;
  int64_t group_size = 0;        // divides cols; == cols for one codebook per row
  const uint8_t* qweight = nullptr;  // [rows, row_bytes(cols, bits)]
  const uint16_t* lut = nullptr;     // [rows, cols / group_size, 2^bits] fp16
  int64_t nnz = 0;
  const int32_t* sparse_row_ptr = nullptr;  // [rows + 1]; may be null when nnz == 0
  const void* sparse_col_idx = nullptr;     // uint16_t or int32_t [nnz], see sparse_cols_are_u16
  const uint16_t* sparse_values = nullptr;  // [nnz] fp16

  NUQ_HOST_DEVICE constexpr int64_t groups() const { return cols / group_size; }
  NUQ_HOST_DEVICE constexpr int64_t row_stride() const { return row_bytes(cols, bits); }
};

static_assert(row_bytes(64, 2) == 16 && row_bytes(64, 3) == 24 && row_bytes(64, 4) == 32);
static_assert(row_bytes(1, 3) == 24, "a 1-column row still occupies one packing unit");
static_assert(plane_bytes(128, 2) == 32 && plane_bytes(128, 1) == 16);
static_assert(row_bytes(4096, 3) % 8 == 0 && row_bytes(4096, 4) % 16 == 0 && row_bytes(4096, 2) % 16 == 0);
static_assert(kPackCols % 64 == 0, "planes must stay whole 8-byte words");
static_assert(lut_entries(4) == 16 && lut_entries(2) == 4);
static_assert(index_layout(3).planes == 2 && index_layout(3).plane_bits[0] + index_layout(3).plane_bits[1] == 3);

// Names of the tensors of one layer in a checkpoint, from the layer's base name (the original weight's
// name without its ".weight" suffix).
inline constexpr const char* kQWeightSuffix = ".qweight";
inline constexpr const char* kLutSuffix = ".lut";
inline constexpr const char* kSparseRowPtrSuffix = ".sparse_row_ptr";
inline constexpr const char* kSparseColIdxSuffix = ".sparse_col_idx";
inline constexpr const char* kSparseValuesSuffix = ".sparse_values";

}  // namespace nuq::format
