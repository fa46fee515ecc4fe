// The int8 LUT GEMV (LinearOptions::arithmetic == int8) for AVX-512 with VNNI and VBMI. Built with
// those instruction sets for this file only (CMakeLists.txt); called only after the dispatcher has
// checked the CPU has them. docs/cpu-kernels.md ("int8 path") explains the arithmetic.
//
// Why it is faster than the exact kernel: a row's int8 codebook fits a 64-byte register, so one vpermb
// turns 64 indices into 64 codebook bytes and one vpdpbusd multiplies them with 64 int8 activations
// into int32 lanes — a few instructions per 64 weights, where the exact kernel spends a shift, a
// vpermps and an FMA per 16. The tables are laid out so that vpermb reads each index where the packed
// byte already holds it (see TableMap): decoding needs no masking, and 3-bit top bits are merged in
// with one vpternlogd per 64 indices.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>

#include <array>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "linear_kernel.hpp"

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || !defined(__AVX512VNNI__) || \
    !defined(__AVX512VBMI__)
#error "linear_int8_avx512.cpp must be compiled with -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mavx512vbmi"
#endif

namespace nuq::cpu::detail {
namespace {

inline float h2f(uint16_t h) { return _cvtsh_ss(h); }

#include "linear_kernel.inl"

constexpr int kMaxTile = 8;  // batch rows per pass: 8 float accumulators + the decoded vectors

// Index-to-table maps for vpermb. vpermb reads the low 6 bits of each index byte and ignores bits 6-7,
// so a 64-entry table can ignore any bits it likes: each map below names which byte bits carry the
// 2-bit (or 4-bit) field and which one carries the 3-bit top bit, and sends every other combination to
// the same entry. That lets the kernel look up a field where it already sits in the byte, instead of
// shifting it down and masking it first (the AND per 64 indices of a vpshufb table).
struct TableMap {
  int field_shift;  // bit position of the low field (2 or 4 bits wide)
  int top_bit;      // bit position of the 3-bit top bit, or -1
};

template <int BITS>
constexpr std::array<TableMap, 4> table_maps() {
  if constexpr (BITS == 2) {
    // v0..v2 read fields 0..2 of the byte in place; v3 reads field 3 from the byte shifted right by 2.
    return {{{0, -1}, {2, -1}, {4, -1}, {4, -1}}};
  } else if constexpr (BITS == 4) {
    // Low nibble in place; high nibble from the byte shifted right by 2.
    return {{{0, -1}, {2, -1}, {0, -1}, {2, -1}}};
  } else {
    // Field t sits at bits 2-3 (t = 0: after a left shift by 2; t = 1: in place) or 4-5 (t = 2: in
    // place; t = 3: after a right shift by 2); the top bits of a byte's 4 columns arrive as bits 0-3 of
    // a second byte, merged in below the field (t = 0, 1) or between (t = 2, 3).
    return {{{2, 0}, {2, 1}, {4, 2}, {4, 3}}};
  }
}

template <int BITS>
inline __m512i table_index_vector(TableMap m) {
  alignas(64) uint8_t idx[64];
  constexpr int field_mask = BITS == 4 ? 15 : 3;
  for (int i = 0; i < 64; ++i) {
    int k = (i >> m.field_shift) & field_mask;
    if (m.top_bit >= 0) k |= ((i >> m.top_bit) & 1) << 2;
    idx[i] = uint8_t(k);
  }
  return _mm512_load_si512(idx);
}

// The 4 index maps of BITS, built once (a function-local static): every row's tables are then one vpermb
// of its codebook each.
template <int BITS>
struct TableIndices {
  __m512i map[4];
  TableIndices() {
    constexpr auto maps = table_maps<BITS>();
    for (int t = 0; t < 4; ++t) map[t] = table_index_vector<BITS>(maps[t]);
  }
};

// Every (row, group) codebook of rows [r0, r1) as unsigned bytes q + 128 (16 bytes each, the first E
// used) and its scale s, converted in one pass before any row is multiplied. q = round-to-nearest-even(
// c / s), as linear_int8_ref computes it; the +128 makes the table unsigned for vpdpbusd, and the
// dispatcher's xoffset removes it again. Converted up front because each conversion is a long
// dependency chain (fp16 → max → divide → round) that, done at the top of its row, delays the row's
// first block; here the chains of consecutive codebooks overlap, and 3-bit codebooks go two at a time.
// That weighs on narrow rows (SmolLM2's 576 columns are 2¼ blocks), not on 4096-wide ones. A caller
// that keeps a cpu::Int8Codebooks of the layer (the same bytes, converted once) skips this altogether.
struct CodebookView {
  const uint8_t* codes;  // [row - first_row][group][16]
  const float* scales;   // [row - first_row][group]
  int64_t first_row;
};

template <int BITS>
CodebookView int8_codebooks(const KernelArgs& a, int64_t r0, int64_t r1) {
  constexpr int E = 1 << BITS;
  thread_local std::vector<uint8_t> codes;
  thread_local std::vector<float> scales;
  const int64_t n = (r1 - r0) * a.groups;
  codes.resize(size_t(n * 16));
  scales.resize(size_t(n));
  // Plain pointers: the byte stores below may alias anything, so through the thread_local vectors the
  // compiler would reload their data pointers (a thread-local access) on every codebook.
  uint8_t* const code_out = codes.data();
  float* const scale_out = scales.data();
  const uint16_t* lut = a.lut + r0 * a.groups * E;
  int64_t i = 0;
  if constexpr (E == 8) {
    // Two 3-bit codebooks per register: each 8-lane half reduces to its own maximum (within 128-bit
    // lanes, then across the pair of them), so one division and conversion serve both.
    const __m512 smallest = _mm512_set1_ps(int8_codebook_scale(0.0f));
    for (; i + 2 <= n; i += 2) {
      const __m512 c = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lut + i * E)));
      __m512 m = _mm512_abs_ps(c);
      m = _mm512_max_ps(m, _mm512_permute_ps(m, 0x4E));
      m = _mm512_max_ps(m, _mm512_permute_ps(m, 0xB1));
      m = _mm512_max_ps(m, _mm512_shuffle_f32x4(m, m, 0xB1));
      // int8_codebook_scale per lane: max/127, the smallest normal float for an all-zero codebook.
      const __m512 scale = _mm512_mask_div_ps(smallest, _mm512_cmp_ps_mask(m, _mm512_setzero_ps(), _CMP_GT_OQ), m,
                                              _mm512_set1_ps(127.0f));
      const __m128i q = _mm_xor_si128(_mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_div_ps(c, scale))),
                                      _mm_set1_epi8(char(0x80)));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(code_out + 16 * i), q);
      _mm_storel_epi64(reinterpret_cast<__m128i*>(code_out + 16 * (i + 1)), _mm_unpackhi_epi64(q, q));
      scale_out[i] = _mm512_cvtss_f32(scale);
      scale_out[i + 1] = _mm512_cvtss_f32(_mm512_shuffle_f32x4(scale, scale, 0x02));
    }
  }
  for (; i < n; ++i) {
    const __m512 c = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(__mmask16((1u << E) - 1), lut + i * E));
    const float s = int8_codebook_scale(_mm512_reduce_max_ps(_mm512_abs_ps(c)));
    const __m128i q = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_div_ps(c, _mm512_set1_ps(s))));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(code_out + 16 * i), _mm_xor_si128(q, _mm_set1_epi8(char(0x80))));
    scale_out[i] = s;
  }
  return {code_out, scale_out, r0};
}

// A codebook's 4 vpermb tables (table_maps).
template <int BITS>
inline void int8_tables(const uint8_t* codes, const TableIndices<BITS>& maps, __m512i tables[4]) {
  const __m512i c = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
  for (int t = 0; t < 4; ++t) tables[t] = _mm512_permutexvar_epi8(maps.map[t], c);
}

// What every row of a layer shares, worked out once per task instead of once per block: where the
// 1-bit plane starts, how many blocks lie wholly inside the stored row, and the load masks of the one
// block that does not (rows are padded to 64 columns, blocks are 256).
struct RowGeometry {
  int64_t hi_offset;     // bytes from a row's start to its 1-bit plane (3 bits)
  int64_t full_blocks;   // blocks read with plain loads; a block after them is the tail
  __mmask64 lo_tail[2];  // the tail block's low-plane bytes, per 64-byte half (the second: 4 bits)
  __mmask32 hi_tail;     // and its 1-bit plane bytes
};

template <int BITS>
RowGeometry row_geometry(const KernelArgs& a) {
  auto first = [](int64_t n) {  // a mask of the first n of 64 bytes
    return n <= 0 ? __mmask64(0) : n >= 64 ? ~__mmask64(0) : (~__mmask64(0)) >> (64 - n);
  };
  const int64_t tail_cols = a.padded % 256;  // 0, 64, 128 or 192
  const int64_t lo_tail_bytes = tail_cols * (BITS == 4 ? 4 : 2) / 8;
  RowGeometry geo{};
  geo.hi_offset = a.padded / 4;
  geo.full_blocks = a.padded / 256;
  geo.lo_tail[0] = first(lo_tail_bytes);
  geo.lo_tail[1] = first(lo_tail_bytes - 64);
  geo.hi_tail = __mmask32(first(tail_cols / 8));
  return geo;
}

// The 4 looked-up vectors (table bytes) of block k of a row, in the activation order of Int8Args:
// lane l of vector t holds column 4l + t (2 and 3 bits) or 128h + 2l + (t & 1) for t = 2h + (t & 1)
// (4 bits), i.e. what the old shift-and-mask decode produced, so the activation layout is unchanged.
// TAIL: the block runs past the stored row; masked loads read what is there and zeros beyond (masked-off
// bytes are never touched, so they cannot fault), and those columns meet zero activations.
template <int BITS, bool TAIL>
inline void lookup_block(const RowGeometry& geo, const uint8_t* row, int64_t k, const __m512i tables[4],
                         __m512i v[4]) {
  constexpr int LO = BITS == 4 ? 128 : 64;  // low-plane bytes per 256 columns
  const uint8_t* lo = row + k * LO;
  auto load_lo = [&](int half) {
    return TAIL ? _mm512_maskz_loadu_epi8(geo.lo_tail[half], lo + 64 * half) : _mm512_loadu_si512(lo + 64 * half);
  };
  // 16-bit shifts move bits across the two bytes of a word, but only into bit positions the tables
  // ignore (vpermb never reads bits 6-7; the select below takes the top bits from elsewhere).
  if constexpr (BITS == 4) {
    for (int h = 0; h < 2; ++h) {
      const __m512i w = load_lo(h);
      v[2 * h] = _mm512_permutexvar_epi8(w, tables[0]);
      v[2 * h + 1] = _mm512_permutexvar_epi8(_mm512_srli_epi16(w, 2), tables[1]);
    }
  } else if constexpr (BITS == 2) {
    const __m512i w = load_lo(0);
    v[0] = _mm512_permutexvar_epi8(w, tables[0]);
    v[1] = _mm512_permutexvar_epi8(w, tables[1]);
    v[2] = _mm512_permutexvar_epi8(w, tables[2]);
    v[3] = _mm512_permutexvar_epi8(_mm512_srli_epi16(w, 2), tables[3]);
  } else {
    const __m512i w = load_lo(0);
    // The top bits of these 256 columns are 32 bytes of the 1-bit plane, byte m holding columns
    // 8m .. 8m + 7, i.e. the columns of low-plane bytes 2m (bits 0-3) and 2m + 1 (bits 4-7). Widened to
    // 4 bytes per 64-bit lane, one vpmultishiftqb puts the nibble of low-plane byte l into bits 0-3 of
    // byte l (byte j of a lane takes the 8 bits from bit 4j).
    const uint8_t* hi = row + geo.hi_offset + k * 32;
    const __m256i hi_bytes = TAIL ? _mm256_maskz_loadu_epi8(geo.hi_tail, hi)
                                  : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi));
    const __m512i top = _mm512_multishift_epi64_epi8(_mm512_set1_epi64(0x1C1814100C080400LL),
                                                     _mm512_cvtepu32_epi64(hi_bytes));
    // select(mask, a, b) = mask ? a : b per bit (vpternlogd 0xCA).
    auto select = [](__m512i mask, __m512i a, __m512i b) { return _mm512_ternarylogic_epi32(mask, a, b, 0xCA); };
    const __m512i bits23 = _mm512_set1_epi8(0x0C), bits45 = _mm512_set1_epi8(0x30);
    v[0] = _mm512_permutexvar_epi8(select(bits23, _mm512_slli_epi16(w, 2), top), tables[0]);
    v[1] = _mm512_permutexvar_epi8(select(bits23, w, top), tables[1]);
    v[2] = _mm512_permutexvar_epi8(select(bits45, w, top), tables[2]);
    v[3] = _mm512_permutexvar_epi8(select(bits45, _mm512_srli_epi16(w, 2), top), tables[3]);
  }
}

// Rows [r, r + R) for batch rows [b0, b0 + BT): per block, each row's 4 looked-up vectors meet each
// batch row's 4 activation vectors in vpdpbusd (exact int32: at most 16 products of 255·127 per lane),
// then one conversion and one FMA with the block's activation scale d, read as an embedded broadcast.
// The codebook scale s is constant over a group, so it multiplies the group's sum once (a horizontal
// sum per group; once per row with per-row codebooks) instead of costing a scalar multiply and a broadcast per block and batch row. A row's result is that
// total minus s·xoffset, which takes the +128 of the table out again (Σ (q+128)·xq·d = Σ q·xq·d +
// 128·Σ xq·d). Every row adds its blocks in column order into its own accumulators whatever R and BT
// are, so results do not depend on how rows or batch rows are grouped.
template <int BITS, int BT, int R>
inline void gemv_rows_int8(const Int8Args& g, const RowGeometry& geo, const TableIndices<BITS>& maps,
                           const CodebookView& books, int64_t r, int64_t b0, float* out) {
  const KernelArgs& a = g.layer;
  constexpr int LO = BITS == 4 ? 128 : 64;  // low-plane bytes per block
  // Up to 2 batch rows, two interleaved vpdpbusd chains per block hide the instruction's latency; from 3
  // on the batch rows themselves are independent chains.
  constexpr bool kTwoChains = BT <= 2;
  const uint8_t* rows[R];
  float total[R][BT], offset[R][BT];
  for (int i = 0; i < R; ++i) {
    rows[i] = a.qweight + (r + i) * a.stride;
    for (int b = 0; b < BT; ++b) total[i][b] = offset[i][b] = 0.0f;
  }
  for (int64_t grp = 0; grp < a.groups; ++grp) {
    float s[R];
    __m512i tables[R][4];
    __m512 acc[R][BT];
    for (int i = 0; i < R; ++i) {
      const int64_t book = (r + i - books.first_row) * a.groups + grp;
      int8_tables<BITS>(books.codes + 16 * book, maps, tables[i]);
      s[i] = books.scales[book];
      for (int b = 0; b < BT; ++b) {
        acc[i][b] = _mm512_setzero_ps();
        offset[i][b] += s[i] * g.xoffset[(b0 + b) * a.groups + grp];
      }
    }
    auto block = [&](int64_t k, auto tail) {
      __m512i v[R][4];
      for (int i = 0; i < R; ++i) {
        // Every cache line of the weights is requested 16 KiB ahead of the pass, as in the exact kernel
        // (docs/cpu-kernels.md): the hardware prefetchers alone leave the loads waiting on DRAM. The
        // distance counts from the end of the R rows in flight (16 KiB past row i itself would land in
        // rows this pass is already reading), and both 3-bit planes use it, so that over consecutive
        // passes the prefetched windows tile the matrix (the 1-bit plane follows the 2-bit plane in each
        // row record).
        const uint8_t* ahead = rows[i] + R * a.stride + 16384;
        __builtin_prefetch(ahead + k * LO, 0, 3);
        if constexpr (BITS == 4) __builtin_prefetch(ahead + k * LO + 64, 0, 3);
        if constexpr (BITS == 3)
          if (k % 2 == 0) __builtin_prefetch(ahead + geo.hi_offset + k * 32, 0, 3);
        lookup_block<BITS, decltype(tail)::value>(geo, rows[i], k, tables[i], v[i]);
      }
      for (int b = 0; b < BT; ++b) {
        const int8_t* xq = g.xq + (k * a.batch + b0 + b) * 256;
        const float* d = g.xscale + k * a.batch + b0 + b;
        for (int i = 0; i < R; ++i) {
          __m512i dot;
          if constexpr (kTwoChains) {
            __m512i i0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v[i][0], _mm512_loadu_si512(xq));
            __m512i i1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v[i][1], _mm512_loadu_si512(xq + 64));
            i0 = _mm512_dpbusd_epi32(i0, v[i][2], _mm512_loadu_si512(xq + 128));
            i1 = _mm512_dpbusd_epi32(i1, v[i][3], _mm512_loadu_si512(xq + 192));
            dot = _mm512_add_epi32(i0, i1);
          } else {
            dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v[i][0], _mm512_loadu_si512(xq));
            for (int t = 1; t < 4; ++t) dot = _mm512_dpbusd_epi32(dot, v[i][t], _mm512_loadu_si512(xq + 64 * t));
          }
          acc[i][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(*d), acc[i][b]);
        }
      }
    };
    const int64_t k0 = grp * g.blocks_per_group;
    const int64_t k1 = k0 + g.blocks_per_group < g.blocks ? k0 + g.blocks_per_group : g.blocks;
    const int64_t full_end = k1 < geo.full_blocks ? k1 : geo.full_blocks;
    for (int64_t k = k0; k < full_end; ++k) block(k, std::false_type{});
    for (int64_t k = full_end > k0 ? full_end : k0; k < k1; ++k) block(k, std::true_type{});
    for (int i = 0; i < R; ++i)
      for (int b = 0; b < BT; ++b) total[i][b] += s[i] * _mm512_reduce_add_ps(acc[i][b]);
  }
  for (int i = 0; i < R; ++i)
    for (int b = 0; b < BT; ++b) out[i * BT + b] = total[i][b] - offset[i][b];
}

// Rows per pass, measured on 4096 × 14336 (docs/benchmarks.md): two rows share each activation load.
// At batch 1-2 that lifts the compute-bound 2- and 3-bit kernels by about a fifth, while the 4-bit
// kernel is bound by DRAM and streams best one row at a time. From 3 batch rows on a row's activations
// (BT × 256 bytes per block) no longer stay in L1 beside the weights and each row pass streams them
// from L2: two rows per pass halve that traffic (the batch figures in docs/benchmarks.md were measured
// with it); more rows would not leave registers for R·BT accumulators and R·4 decoded vectors.
constexpr int int8_rows_per_pass(int bits, int bt) { return bits != 4 || bt > 2 ? 2 : 1; }

template <int BITS, int BT>
void gemv_tile_int8(const Int8Args& g, const RowGeometry& geo, const TableIndices<BITS>& maps,
                    const CodebookView& books, int64_t r0, int64_t r1, int64_t b0) {
  const KernelArgs& a = g.layer;
  constexpr int R = int8_rows_per_pass(BITS, BT);
  for (int64_t r = r0; r < r1;) {
    float sum[R * BT];
    int n = 1;
    if (r + R <= r1) {
      gemv_rows_int8<BITS, BT, R>(g, geo, maps, books, r, b0, sum);
      n = R;
    } else {
      gemv_rows_int8<BITS, BT, 1>(g, geo, maps, books, r, b0, sum);
    }
    for (int i = 0; i < n; ++i) {
      if (a.nnz > 0) {
        for (int64_t k = a.row_ptr[r + i]; k < a.row_ptr[r + i + 1]; ++k) {
          const float v = h2f(a.values[k]);
          const int64_t c = sparse_column(a, k);
          for (int b = 0; b < BT; ++b) sum[i * BT + b] += v * a.x[(b0 + b) * a.ldx + c];
        }
      }
      for (int b = 0; b < BT; ++b) a.y[(b0 + b) * a.ldy + r + i] = sum[i * BT + b];
    }
    r += n;
  }
}

template <int BITS, int... T>
inline void int8_tile_switch(int bt, std::integer_sequence<int, T...>, const Int8Args& g, const RowGeometry& geo,
                             const TableIndices<BITS>& maps, const CodebookView& books, int64_t r0, int64_t r1,
                             int64_t b0) {
  const bool done =
      ((bt == T + 1 ? (gemv_tile_int8<BITS, T + 1>(g, geo, maps, books, r0, r1, b0), true) : false) || ...);
  if (!done) kernel_unsupported("int8 batch tile", bt);
}

}  // namespace

void gemv_rows_int8_avx512(const Int8Args& g, int64_t r0, int64_t r1) {
  with_bits(g.layer.bits, [&](auto bc) {
    constexpr int BITS = decltype(bc)::value;
    static const TableIndices<BITS> maps;
    const RowGeometry geo = row_geometry<BITS>(g.layer);
    const CodebookView books =
        g.book_codes ? CodebookView{g.book_codes, g.book_scales, 0} : int8_codebooks<BITS>(g.layer, r0, r1);
    for (int64_t b0 = 0; b0 < g.layer.batch; b0 += kMaxTile) {
      const int bt = int(g.layer.batch - b0 < kMaxTile ? g.layer.batch - b0 : kMaxTile);
      int8_tile_switch<BITS>(bt, std::make_integer_sequence<int, kMaxTile>{}, g, geo, maps, books, r0, r1, b0);
    }
  });
}

}  // namespace nuq::cpu::detail
