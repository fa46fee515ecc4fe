// The fused look-up-table GEMV of nuq::cuda::linear for batches 1-16 (kernels/linear.cu), on tensor cores.
//
// Why tensor cores at batch 1: one mma.m16n8k16 does 2048 multiply-adds, so the multiplications cost a
// warp one instruction per 256 weights whatever the batch, and every instruction the H100's budget
// allows (docs/cuda-kernels.md, "Instruction budget") goes to decoding. Batches 2-16 then cost what
// batch 1 costs plus one B fragment and one mma per extra 8 batch rows. Products of 16-bit values are
// exact in fp32 and the tensor core accumulates in fp32, so fp16 activations lose nothing against the
// codebook's fp16 values; bf16 activations use bf16 weights (the codebook rounded once, as the prefill
// path rounds them for cuBLAS).
//
// Work split. A block of W warps (a power of two up to kWarps = 8, fewer when the row has fewer steps,
// so that no warp idles through the steady loop) owns one tile of 16 output rows and walks their
// columns in steps of kStepCols = 512: warp w takes steps w, w + W, ... and the warps' fp32 partials are
// summed in warp order at the end (deterministic, no atomics). In a step, lane (g = lane / 4, t = lane % 4)
// decodes rows g and g + 8 over its own contiguous span of 128 columns, so its indices arrive in two or
// four 16-byte loads per row and its activations in 16-byte loads. The mma sums over k in any order as
// long as A and B agree, so k-tile j of a step takes columns {128·t + 4·j + q}: fragment slots
// {2t, 2t+1, 2t+8, 2t+9} of lane t hold its four consecutive columns 4j .. 4j+3.
//
// Decoding, per-row codebooks: a table in shared memory per row, indexed by two 3-bit (or 2-bit)
// indices at once, holds the pair of fp16/bf16 values a register of the A fragment needs; 4-bit tables
// hold single values (a 256-entry pair table per row costs more to build than a step saves). Tables are
// "bank-partitioned": entry s of the table of row g + 8h, copy t, is the 32-bit word at byte
// s·256 + h·128 + (4g + t)·4, so the 32 lanes of a warp always read 32 different banks (no conflicts,
// whatever the indices), and the byte address of a lookup is one PRMT: the index byte of the packed
// row moved to address bits 8-15, the lane's bank offset in bits 0-7. Grouped codebooks change every
// group of columns, so lanes hold them in registers instead and look four weights up per PRMT.
//
// Steps whose columns all lie below `cols` run without checks (the steady loop the SASS report
// measures); the last round of steps checks every column and index unit, and warps without a step in
// it still execute its warp operations (mma) on zeros, so that all warps of the block run the same
// sequence of them (the emulated build requires it; a GPU would not). The sparse part follows: warp w
// takes tile rows w, w + W, ..., its lanes every 32nd nonzero of the row.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "portable.cuh"

namespace nuq::cuda::gemv {

inline constexpr int kWarps = 8;  // at most, per block
inline constexpr int kTileRows = 16;
inline constexpr int kStepCols = 512;
inline constexpr int kKTiles = kStepCols / 16;
inline constexpr int kLaneCols = kStepCols / 4;

// Warps per block for rows of `cols` columns: one per step up to kWarps, rounded up to a power of two
// (the sparse part splits the tile's 16 rows evenly over them).
inline int warps_for(int64_t cols) {
  const int64_t steps = (cols + kStepCols - 1) / kStepCols;
  int w = 1;
  while (w < kWarps && w < steps) w *= 2;
  return w;
}
inline constexpr int kUnitCols = 64;  // the packing unit of docs/format.md: a lane span is two of them

struct Params {
  const uint8_t* qweight;
  const uint16_t* lut;  // fp16 bits
  int64_t rows, cols, groups, group_size, stride, padded;
  const int32_t* row_ptr;
  const void* col_idx;
  bool col16;
  const uint16_t* values;  // fp16 bits
  int64_t nnz;
  const void* x;
  int64_t ldx;
  void* y;
  int64_t ldy;
  int batch;
};

template <class T>
inline constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;

// Index words of one row over a lane's 128-column span: the 2-bit or 4-bit plane (lo) and, for 3 bits,
// the 1-bit plane (hi), least significant column first (docs/format.md).
template <int BITS>
struct Span {
  uint32_t lo[BITS == 4 ? 16 : 8];
  uint32_t hi[BITS == 3 ? 4 : 1];
};

// Per-row tables: 64 pair entries for 3 bits (2 + 2 low bits, 1 + 1 high bits), 16 pair entries for 2
// bits, 16 single entries for 4 bits; 64 words per entry (2 row halves × 32 lanes).
template <int BITS>
inline constexpr int kTableSlots = BITS == 3 ? 64 : 16;

template <int BITS, int NT, bool GROUPED>
struct Shared {
  uint32_t table[GROUPED ? 1 : kTableSlots<BITS> * 64];
  float partial[kWarps][kTileRows][8 * NT];
  float sparse[kTileRows][8 * NT];
  uint16_t codebook[kTileRows][16];
};

__device__ __forceinline__ uint32_t to_bf16_bits(uint16_t fp16_bits) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(__half2float(__ushort_as_half(fp16_bits))));
}

template <class T>
__device__ __forceinline__ uint32_t weight_bits(uint16_t fp16_bits) {
  if constexpr (kBf16<T>) return to_bf16_bits(fp16_bits);
  return fp16_bits;
}

// The two fp16 codebook indices a table slot stands for (its byte layout is the packed row's: two
// 2-bit low parts in bits 0-3, for 3 bits the two high bits in bits 4-5).
template <int BITS>
__device__ __forceinline__ void slot_indices(int slot, int& i0, int& i1) {
  i0 = slot & 3;
  i1 = (slot >> 2) & 3;
  if constexpr (BITS == 3) {
    i0 |= ((slot >> 4) & 1) << 2;
    i1 |= ((slot >> 5) & 1) << 2;
  }
}

// Stages the tile's per-row codebooks and fills the bank-partitioned tables; ends with a barrier.
template <int BITS, int NT, class T>
__device__ void build_tables(Shared<BITS, NT, false>& sm, const Params& p, int64_t r0) {
  constexpr int E = 1 << BITS;
  for (int i = int(threadIdx.x); i < kTileRows * E; i += int(blockDim.x)) {
    const int row = i / E, e = i % E;
    sm.codebook[row][e] = r0 + row < p.rows ? p.lut[(r0 + row) * E + e] : uint16_t(0);
  }
  __syncthreads();
  for (int w = int(threadIdx.x); w < kTableSlots<BITS> * 64; w += int(blockDim.x)) {
    const int slot = w / 64, h = (w / 32) % 2, g = (w % 32) / 4;
    const uint16_t* cb = sm.codebook[g + 8 * h];
    uint32_t word;
    if constexpr (BITS == 4) {
      const uint32_t v = weight_bits<T>(cb[slot]);
      word = v | v << 16;
    } else {
      int i0, i1;
      slot_indices<BITS>(slot, i0, i1);
      word = weight_bits<T>(cb[i0]) | weight_bits<T>(cb[i1]) << 16;
    }
    sm.table[w] = word;
  }
  __syncthreads();
}

// ---- index loads ----------------------------------------------------------------------------------

template <bool VEC16, int WORDS>
__device__ __forceinline__ void load_words(uint32_t* dst, const uint8_t* src) {
  if constexpr (VEC16) {
#pragma unroll
    for (int i = 0; i < WORDS; i += 4) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(src) + i / 4);
      dst[i] = v.x, dst[i + 1] = v.y, dst[i + 2] = v.z, dst[i + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < WORDS; i += 2) {
      const uint2 v = __ldg(reinterpret_cast<const uint2*>(src) + i / 2);
      dst[i] = v.x, dst[i + 1] = v.y;
    }
  }
}

// The span of columns [col0, col0 + 128) of one row. Guarded (last round): units at or past `padded` and
// rows that do not exist read as index 0, whose weights meet zero activations.
template <int BITS, bool VEC16, bool GUARDED>
__device__ __forceinline__ void load_span(Span<BITS>& s, const Params& p, const uint8_t* row, int64_t col0,
                                          bool present) {
  constexpr int kLoUnitWords = (BITS == 4 ? 4 : 2) * kUnitCols / 32;  // words of one unit in the lo plane
  const uint8_t* lo = row + col0 * (BITS == 4 ? 4 : 2) / 8;
  const uint8_t* hi = row + p.padded / 4 + col0 / 8;
  if constexpr (!GUARDED) {
    load_words<VEC16, 2 * kLoUnitWords>(s.lo, lo);
    if constexpr (BITS == 3) load_words<VEC16, 4>(s.hi, hi);
  } else {
#pragma unroll
    for (int i = 0; i < 2 * kLoUnitWords; ++i) s.lo[i] = 0;
#pragma unroll
    for (int i = 0; i < (BITS == 3 ? 4 : 1); ++i) s.hi[i] = 0;
    if (!present || col0 >= p.padded) return;
    if (col0 + kUnitCols < p.padded) {
      load_words<VEC16, 2 * kLoUnitWords>(s.lo, lo);
      if constexpr (BITS == 3) load_words<VEC16, 4>(s.hi, hi);
    } else {
      load_words<false, kLoUnitWords>(s.lo, lo);
      if constexpr (BITS == 3) load_words<false, 2>(s.hi, hi);
    }
  }
}

// ---- decoding -------------------------------------------------------------------------------------

// PRMT selector: result byte 0 <- the lane's bank offset (byte 0 of the second operand), result byte
// 1 <- byte `b` of the index word, bytes 2 and 3 <- zero bytes of the second operand.
__device__ __forceinline__ constexpr unsigned address_selector(int b) { return 0x7604u | unsigned(b) << 4; }

template <int BITS>
struct Prepared {
  // Per lo word: the byte of each k-tile holding the table slot of its first pair (A) and second (B).
  uint32_t a[BITS == 4 ? 16 : 8], b[BITS == 4 ? 16 : 8];
};

// Index words -> slot bytes. 2 bits: slot of (c0, c1) = low nibble of the k-tile's byte, of (c2, c3) =
// high nibble. 3 bits: the same, with the two matching high-plane bits merged into bits 4-5 (the 1-bit
// plane holds a nibble per k-tile; PRMT gathers the nibbles of four k-tiles into the four bytes). 4 bits:
// per k-tile halfword n0 | n1 << 4 | n2 << 8 | n3 << 12: a = (n0, n2) bytes, b = (n1, n3) bytes.
template <int BITS>
__device__ __forceinline__ void prepare(Prepared<BITS>& q, const Span<BITS>& s) {
  uint32_t ha_even[4], ha_odd[4], hb_even[4], hb_odd[4];
  if constexpr (BITS == 3) {
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      ha_even[v] = (s.hi[v] << 4) & 0x30303030u;
      ha_odd[v] = s.hi[v] & 0x30303030u;
      hb_even[v] = (s.hi[v] << 2) & 0x30303030u;
      hb_odd[v] = (s.hi[v] >> 2) & 0x30303030u;
    }
  }
#pragma unroll
  for (int w = 0; w < (BITS == 4 ? 16 : 8); ++w) {
    q.a[w] = s.lo[w] & 0x0F0F0F0Fu;
    q.b[w] = (s.lo[w] >> 4) & 0x0F0F0F0Fu;
    if constexpr (BITS == 3) {
      const unsigned gather = (w & 1) ? 0x7362u : 0x5140u;
      q.a[w] |= __byte_perm(ha_even[w >> 1], ha_odd[w >> 1], gather);
      q.b[w] |= __byte_perm(hb_even[w >> 1], hb_odd[w >> 1], gather);
    }
  }
}

__device__ __forceinline__ uint32_t lookup(const unsigned char* table, uint32_t word, int byte, uint32_t lane_byte) {
  return *reinterpret_cast<const uint32_t*>(table + __byte_perm(word, lane_byte, address_selector(byte)));
}

// A registers (c0, c1) and (c2, c3) of one row in k-tile j, from the per-row tables.
template <int BITS>
__device__ __forceinline__ void decode_table(uint32_t& pair01, uint32_t& pair23, const Prepared<BITS>& q, int j,
                                             const unsigned char* table, uint32_t lane_byte) {
  if constexpr (BITS == 4) {
    const int w = j >> 1, byte = 2 * (j & 1);
    const uint32_t v0 = lookup(table, q.a[w], byte, lane_byte), v1 = lookup(table, q.b[w], byte, lane_byte);
    const uint32_t v2 = lookup(table, q.a[w], byte + 1, lane_byte), v3 = lookup(table, q.b[w], byte + 1, lane_byte);
    pair01 = __byte_perm(v0, v1, 0x7610u);
    pair23 = __byte_perm(v2, v3, 0x7610u);
  } else {
    pair01 = lookup(table, q.a[j >> 2], j & 3, lane_byte);
    pair23 = lookup(table, q.b[j >> 2], j & 3, lane_byte);
  }
}

// ---- decoding, grouped codebooks ------------------------------------------------------------------
//
// A lane's 128-column span is two packing units of 64 columns, and groups are multiples of 64 columns,
// so each unit of a row meets exactly one codebook. The lane keeps it in registers as two byte planes
// (the low bytes of the 2^b fp16/bf16 entries, then the high bytes) and looks four weights up at once
// with PRMT, whose selector nibbles are the weights' indices: one PRMT per plane gives the low (high)
// bytes of four weights, two more interleave them into the A registers' value pairs.

template <int BITS>
struct GroupCodebook {
  uint32_t lo[BITS == 4 ? 4 : (BITS == 3 ? 2 : 1)], hi[BITS == 4 ? 4 : (BITS == 3 ? 2 : 1)];
};

// Loads entries [0, 2^BITS) (8-byte loads: luts are 8-byte aligned) and splits them into byte planes.
template <int BITS, class T>
__device__ __forceinline__ void load_group_codebook(GroupCodebook<BITS>& cb, const uint16_t* entries) {
  constexpr int kWords = (1 << BITS) / 2;  // two entries per 32-bit word
  uint32_t w[kWords];
#pragma unroll
  for (int i = 0; i < kWords; i += 2) {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(entries) + i / 2);
    w[i] = v.x, w[i + 1] = v.y;
  }
  if constexpr (kBf16<T>) {
#pragma unroll
    for (int i = 0; i < kWords; ++i) w[i] = weight_bits<T>(uint16_t(w[i])) | weight_bits<T>(uint16_t(w[i] >> 16)) << 16;
  }
#pragma unroll
  for (int i = 0; i < kWords / 2; ++i) {
    cb.lo[i] = __byte_perm(w[2 * i], w[2 * i + 1], 0x6420u);  // low bytes of entries 4i .. 4i + 3
    cb.hi[i] = __byte_perm(w[2 * i], w[2 * i + 1], 0x7531u);
  }
}

// Two k-tiles' selectors from a 16-bit value holding their two 8-bit quads of 2-bit fields (k-tile
// 2m in the low byte): each 16-bit half becomes i0 | i1 << 4 | i2 << 8 | i3 << 12.
__device__ __forceinline__ uint32_t spread_quads(uint32_t two_bytes_in_lanes) {
  uint32_t x = (two_bytes_in_lanes | (two_bytes_in_lanes << 4)) & 0x0F0F0F0Fu;
  return (x | (x << 2)) & 0x33333333u;
}

// The four weights (c0..c3) of a k-tile of one row: `sel` holds their indices in its four low nibbles
// (only 3 bits of each are a PRMT byte index: 4-bit indices pick the plane half by bit 3).
template <int BITS>
__device__ __forceinline__ void lookup_group(uint32_t& pair01, uint32_t& pair23, const GroupCodebook<BITS>& cb,
                                             uint32_t sel) {
  uint32_t lo, hi;
  if constexpr (BITS == 2) {
    lo = __byte_perm(cb.lo[0], 0, sel);
    hi = __byte_perm(cb.hi[0], 0, sel);
  } else if constexpr (BITS == 3) {
    lo = __byte_perm(cb.lo[0], cb.lo[1], sel);
    hi = __byte_perm(cb.hi[0], cb.hi[1], sel);
  } else {
    const uint32_t s3 = sel & 0x7777u;
    // Bytes of 0xFF where the index has bit 3 set: PRMT's sign mode replicates bit 7 of the chosen byte.
    const uint32_t flags = sel & 0x8888u;
    const uint32_t upper = __byte_perm(flags << 4, flags, 0xD9C8u);
    lo = (__byte_perm(cb.lo[0], cb.lo[1], s3) & ~upper) | (__byte_perm(cb.lo[2], cb.lo[3], s3) & upper);
    hi = (__byte_perm(cb.hi[0], cb.hi[1], s3) & ~upper) | (__byte_perm(cb.hi[2], cb.hi[3], s3) & upper);
  }
  pair01 = __byte_perm(lo, hi, 0x5140u);
  pair23 = __byte_perm(lo, hi, 0x7362u);
}

// Index selectors of the 32 k-tiles of a span, two per word (k-tile 2m in the low half of word m).
template <int BITS>
__device__ __forceinline__ void group_selectors(uint32_t (&sel)[kKTiles / 2], const Span<BITS>& s) {
  if constexpr (BITS == 4) {
#pragma unroll
    for (int m = 0; m < kKTiles / 2; ++m) sel[m] = s.lo[m];  // the halfwords are already nibble indices
  } else {
#pragma unroll
    for (int w = 0; w < 8; ++w) {
      sel[2 * w] = spread_quads(__byte_perm(s.lo[w], 0, 0x4140u));
      sel[2 * w + 1] = spread_quads(__byte_perm(s.lo[w], 0, 0x4342u));
    }
    if constexpr (BITS == 3) {
      // The 1-bit plane holds a nibble per k-tile; bit q of it is bit 2 of weight q's index.
#pragma unroll
      for (int m = 0; m < kKTiles / 2; ++m) {
        const uint32_t byte = __byte_perm(s.hi[m >> 2], 0, 0x4440u | uint32_t(m & 3));
        const uint32_t z = (byte | (byte << 12)) & 0x000F000Fu;  // the two nibbles in the two halves
        sel[m] |= ((z << 2) | (z << 5) | (z << 8) | (z << 11)) & 0x44444444u;
      }
    }
  }
}

// ---- activations ----------------------------------------------------------------------------------

// x[batch_row][col .. col + 7] as four pairs: the B registers of two k-tiles. Unguarded loads read the
// 8 columns at once when VEC16; guarded ones stop at `cols` (what lies past it may not exist, and a NaN
// there would poison the sum).
template <bool VEC16, bool GUARDED>
__device__ __forceinline__ void load_activations(uint32_t (&b)[4], const Params& p, int batch_row, int64_t col) {
  const auto* x = static_cast<const uint16_t*>(p.x) + batch_row * p.ldx + col;
  if constexpr (!GUARDED && VEC16) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(x));
    b[0] = v.x, b[1] = v.y, b[2] = v.z, b[3] = v.w;
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t c = col + 2 * i;
      uint32_t pair = 0;
      if (!GUARDED || c + 1 < p.cols) {
        pair = __ldg(reinterpret_cast<const uint32_t*>(x + 2 * i));
      } else if (c < p.cols) {
        pair = __ldg(x + 2 * i);
      }
      b[i] = pair;
    }
  }
}

// ---- the kernel -----------------------------------------------------------------------------------

// What a lane reads. Rows past `rows` and batch rows past `batch` read row 0 instead: their products
// land in outputs that are never stored, and the steady loop needs no predicate or zeroing for them.
struct Lane {
  int warp, g, t;
  bool row_exists[2];     // rows g and g + 8 of the tile
  int row_index[2];       // their index (0 when they do not exist)
  int x_row[2];           // the batch row the lane's B fragment of each n-tile reads
  bool x_exists[2];
  uint32_t lane_byte[2];  // bank offset of the lane's table words, per row half
};

// One step of 512 columns: rows g and g + 8 over the lane's 128 columns, 32 mma per n-tile.
template <int BITS, int NT, bool GROUPED, bool VEC16, bool GUARDED, class T>
__device__ __forceinline__ void step(const Params& p, const Lane& L, const unsigned char* table, int64_t step_index,
                                     bool live, float (&acc)[NT][4]) {
  const int64_t col0 = step_index * kStepCols + int64_t(L.t) * kLaneCols;
  Span<BITS> span[2];
#pragma unroll
  for (int h = 0; h < 2; ++h)
    load_span<BITS, VEC16, GUARDED>(span[h], p, p.qweight + int64_t(L.row_index[h]) * p.stride, col0,
                                    live && L.row_exists[h]);
  Prepared<BITS> q[2];
  uint32_t sel[2][GROUPED ? kKTiles / 2 : 1];
  GroupCodebook<BITS> cb[2];  // per row half, of the unit the k-tiles are in (loaded at its first one)
  if constexpr (!GROUPED) {
#pragma unroll
    for (int h = 0; h < 2; ++h) prepare<BITS>(q[h], span[h]);
  } else {
#pragma unroll
    for (int h = 0; h < 2; ++h) group_selectors<BITS>(sel[h], span[h]);
  }
  uint32_t x8[NT][4];  // activations of k-tiles j and j + 1 (j even)
#pragma unroll
  for (int j = 0; j < kKTiles; ++j) {
    if (j % 2 == 0) {
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        if (!GUARDED || (live && L.x_exists[n])) {
          load_activations<VEC16, GUARDED>(x8[n], p, L.x_row[n], col0 + 4 * j);
        } else {
          x8[n][0] = x8[n][1] = x8[n][2] = x8[n][3] = 0;
        }
      }
    }
    if constexpr (GROUPED) {
      if (j % (kKTiles / 2) == 0) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          // Units past `cols` (last round) would name a group past the row's last one.
          int64_t group = (col0 + (j / (kKTiles / 2)) * kUnitCols) / p.group_size;
          if constexpr (GUARDED) group = group < p.groups ? group : p.groups - 1;
          load_group_codebook<BITS, T>(cb[h], p.lut + ((int64_t(L.row_index[h]) * p.groups + group) << BITS));
        }
      }
    }
    uint32_t a[4];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if constexpr (GROUPED) {
        lookup_group<BITS>(a[h], a[h + 2], cb[h], sel[h][j / 2] >> (16 * (j % 2)));
      } else {
        decode_table<BITS>(a[h], a[h + 2], q[h], j, table, L.lane_byte[h]);
      }
    }
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      const uint32_t b[2] = {x8[n][2 * (j % 2)], x8[n][2 * (j % 2) + 1]};
      detail::mma_16816<kBf16<T>>(acc[n], a, b);
    }
  }
}

template <class T>
__device__ __forceinline__ float activation(const Params& p, int batch_row, int64_t col) {
  const uint16_t bits = static_cast<const uint16_t*>(p.x)[batch_row * p.ldx + col];
  if constexpr (kBf16<T>) return __bfloat162float(__ushort_as_bfloat16(bits));
  return __half2float(__ushort_as_half(bits));
}

// Sparse residuals of tile rows warp, warp + W, ... into sm.sparse: lanes take every 32nd nonzero of a
// row, a fixed shuffle tree sums them. Every warp runs the same shuffles (rows past `rows` on zeros).
template <int BITS, int NT, bool GROUPED, class T>
__device__ void sparse_rows(Shared<BITS, NT, GROUPED>& sm, const Params& p, const Lane& L, int64_t r0, int warps) {
  const int lane = 4 * L.g + L.t;
#pragma unroll 1
  for (int tile_row = L.warp; tile_row < kTileRows; tile_row += warps) {
    const int64_t r = r0 + tile_row;
    float part[8 * NT];
#pragma unroll
    for (int b = 0; b < 8 * NT; ++b) part[b] = 0.0f;
    if (p.nnz > 0 && r < p.rows) {
      for (int64_t e = p.row_ptr[r] + lane; e < p.row_ptr[r + 1]; e += 32) {
        const int64_t c = p.col16 ? int64_t(static_cast<const uint16_t*>(p.col_idx)[e])
                                  : int64_t(static_cast<const int32_t*>(p.col_idx)[e]);
        const float v = __half2float(__ushort_as_half(p.values[e]));
#pragma unroll
        for (int b = 0; b < 8 * NT; ++b)
          if (b < p.batch) part[b] = fmaf(v, activation<T>(p, b, c), part[b]);
      }
    }
#pragma unroll
    for (int b = 0; b < 8 * NT; ++b) {
#pragma unroll
      for (int off = 16; off > 0; off /= 2) part[b] += __shfl_xor_sync(0xffffffffu, part[b], off);
      if (lane == 0) sm.sparse[tile_row][b] = part[b];
    }
  }
}

template <int BITS, int NT, bool GROUPED, bool VEC16, class T>
__global__ void __launch_bounds__(kWarps * 32, 2) gemv_kernel(Params p) {
  auto& sm = *detail::dynamic_shared<Shared<BITS, NT, GROUPED>>();
  const int64_t r0 = int64_t(blockIdx.x) * kTileRows;
  Lane L;
  L.warp = int(threadIdx.x) / 32;
  L.g = (int(threadIdx.x) % 32) / 4;
  L.t = int(threadIdx.x) % 4;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    L.row_exists[h] = r0 + L.g + 8 * h < p.rows;
    L.row_index[h] = L.row_exists[h] ? int(r0 + L.g + 8 * h) : 0;
    L.x_exists[h] = 8 * h + L.g < p.batch;
    L.x_row[h] = L.x_exists[h] ? 8 * h + L.g : 0;
    L.lane_byte[h] = uint32_t(h * 128 + (4 * L.g + L.t) * 4);
  }
  if constexpr (!GROUPED) build_tables<BITS, NT, T>(sm, p, r0);
  const auto* table = reinterpret_cast<const unsigned char*>(sm.table);

  float acc[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[n][i] = 0.0f;
  // 32-bit step counts (cols < 2^31 · 512): fewer registers live across the steady loop.
  const int warps = int(blockDim.x) / 32;
  const int rounds = int(p.cols / kStepCols) / warps;
  // The steady loop: every step of the round lies below `cols`.
  for (int round = 0; round < rounds; ++round)
    step<BITS, NT, GROUPED, VEC16, false, T>(p, L, table, round * warps + L.warp, true, acc);
  // At most one more round, checked (see the header comment).
  const int steps = int((p.cols + kStepCols - 1) / kStepCols), next = rounds * warps;
  if (next < steps) step<BITS, NT, GROUPED, VEC16, true, T>(p, L, table, next + L.warp, next + L.warp < steps, acc);

#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) sm.partial[L.warp][L.g + 8 * (i >> 1)][8 * n + 2 * L.t + (i & 1)] = acc[n][i];
  sparse_rows<BITS, NT, GROUPED, T>(sm, p, L, r0, warps);
  __syncthreads();

  // The outputs: the warps' partials in warp order, then the sparse part.
  for (int i = int(threadIdx.x); i < kTileRows * 16; i += int(blockDim.x)) {
    const int tile_row = i / 16, b = i % 16;
    if (b >= p.batch || b >= 8 * NT || r0 + tile_row >= p.rows) continue;
    float sum = 0.0f;
    for (int w = 0; w < warps; ++w) sum += sm.partial[w][tile_row][b];
    sum += sm.sparse[tile_row][b];
    auto* y = static_cast<uint16_t*>(p.y) + b * p.ldy + r0 + tile_row;
    if constexpr (kBf16<T>) *y = __bfloat16_as_ushort(__float2bfloat16_rn(sum));
    else *y = __half_as_ushort(__float2half_rn(sum));
  }
}

}  // namespace nuq::cuda::gemv
