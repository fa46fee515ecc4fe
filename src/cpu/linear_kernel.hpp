// Internal interface between the dispatcher (src/cpu/linear.cpp, built for baseline x86-64) and the
// kernels built with wider instruction sets (src/cpu/linear_avx2.cpp, linear_avx512.cpp).
//
// The arguments are plain fields computed by the dispatcher, so that the AVX translation units call no
// inline function of another header: an inline function emitted by an AVX-512 translation unit can be
// the copy the linker keeps for the whole program, which would then fault on a CPU without AVX-512.
// For the same reason everything those units define lives in an anonymous namespace, except the
// entry points below.
#pragma once

#include <cstdint>

namespace nuq::cpu::detail {

struct KernelArgs {
  // The layer (see include/nuq/format.hpp).
  const uint8_t* qweight;
  const uint16_t* lut;
  int64_t rows, cols, group_size, groups;
  int64_t stride;  // bytes per packed row
  int64_t padded;  // columns stored per row
  int bits;
  int64_t nnz;
  const int32_t* row_ptr;
  const void* col_idx;
  bool col16;  // column indices are uint16_t (else int32_t)
  const uint16_t* values;
  // Activations and outputs.
  const float* x;
  int64_t ldx;
  float* y;
  int64_t ldy;
  int64_t batch;
  // Activations reordered to the kernels' lane order: batch tiles of max_tile(lanes) rows (the last
  // one shorter), each [chunk][step][tile row][lanes], where (chunk k, step s, batch b, lane l) holds
  // x[b, k·lanes·per_word + l·per_word + s] (0 past cols) and per_word is the number of low-plane
  // fields in a 32-bit word (8 at 4 bits, 16 at 2 and 3 bits). Tile t starts at float
  // t·max_tile·chunks·lanes·per_word.
  const float* xr;
  int lanes;
  // Every chunk of lanes·per_word columns lies inside one codebook group (the fast path); otherwise
  // each row is decoded to fp32 first (scratch must hold cols floats).
  bool aligned;
};

// Rows [r0, r1) of Y for every batch row; scratch: at least cols floats owned by the caller's thread.
void gemv_rows_avx2(const KernelArgs& args, int64_t r0, int64_t r1, float* scratch);
void gemv_rows_avx512(const KernelArgs& args, int64_t r0, int64_t r1, float* scratch);

// The int8 path (LinearOptions::arithmetic == int8). Activations are quantized by the dispatcher
// (src/cpu/linear_int8.cpp) into blocks of 256 columns, each stored as 4 vectors of 64 int8 in the
// order the kernel decodes weights (docs/cpu-kernels.md, "int8 path"):
//   4 bits: vector 2h+t, byte 4w+j = column 128h + 8w + 2j + t
//   2 and 3 bits: vector t, byte 4w+j = column 16w + 4j + t
struct Int8Args {
  KernelArgs layer;        // layer, x/ldx (for the sparse part), y/ldy, batch
  // Block-major, so that the batch rows' activations of one block, which the kernel reads again for
  // every row, are one contiguous run (its gain alone was within this VM's run-to-run spread).
  const int8_t* xq;        // [blocks][batch][4][64]
  const float* xscale;     // [blocks][batch]: d, the block's activation scale
  const float* xoffset;    // [batch][groups]: 128 · Σ_{blocks k of g} d_k Σ xq over k (see the kernel)
  int64_t blocks;          // ceil(cols / 256)
  int64_t blocks_per_group;
  // The layer's codebooks converted ahead (cpu::Int8Codebooks: [rows][groups][16] bytes q + 128 and
  // [rows][groups] scales), or null: the kernel converts its rows' codebooks itself.
  const uint8_t* book_codes;
  const float* book_scales;
};
void gemv_rows_int8_avx512(const Int8Args& args, int64_t r0, int64_t r1);
// The int8 scale of a codebook of n fp16 values: max|c|/127, or the smallest normal float when all are 0
// (any positive scale gives codes of 0; the kernel multiplies codes + 128 and subtracts 128·s·Σ d·xq
// again, and with s = 1 that cancellation left an error of about 128·Σ|x|·2⁻²⁴ in a row whose sparse
// entries are all it holds; a tiny s leaves none). Shared definition
// for the kernel and the reference (both divide by it and round to nearest even). `static`: every unit
// gets its own copy, so the AVX-512 unit's cannot serve the baseline code (see the top of this file).
static inline float int8_codebook_scale(float max_abs) {
  return max_abs > 0.0f ? max_abs / 127.0f : 1.17549435e-38f;  // FLT_MIN
}

// Columns of one chunk for `lanes` 32-bit lanes (fields per word × lanes).
constexpr int64_t chunk_cols(int bits, int lanes) { return int64_t(lanes) * (bits == 4 ? 8 : 16); }

// Batch rows one pass of the kernel keeps in registers (the layout of xr follows it): with 16 lanes up
// to 2 output rows × 8 batch rows of accumulators (16 of AVX-512's 32 registers), with 8 lanes 1 × 8
// (8 of AVX2's 16).
constexpr int max_tile(int /*lanes*/) { return 8; }

// Whether the AVX-512 kernel would run the layer with 16 or 8 lanes: 16 unless that breaks chunk
// alignment with the codebook groups and 8 keeps it (e.g. 3 bits with groups of 128).
int avx512_lanes(int bits, int64_t cols, int64_t group_size);

inline bool chunks_aligned(int bits, int lanes, int64_t cols, int64_t group_size) {
  return group_size == cols || group_size % chunk_cols(bits, lanes) == 0;
}

// Fails loudly (nuq::Error) for a run-time value a kernel table has no entry for. Defined in the
// baseline translation unit so that the AVX units need no fmt.
[[noreturn]] void kernel_unsupported(const char* what, long long value);

}  // namespace nuq::cpu::detail
