// Split-K flash decoding over the quantized KV cache (include/nuq/kv_cuda.hpp, docs/kv-cache.md).
//
// Kernel 1: one block of 4 warps per (context split, kv head, sequence). A warp takes its quarter of the
// split page by page (the page's address and the queries rotated to the page's first position, Q_page =
// R(-base) q), and the page in 16-token tiles: it copies the tile's K and V records (contiguous in the
// page) into its shared memory with 16-byte loads and decodes them there into fp16 tiles, one lookup per
// index field of two channels (keys: a RoPE pair from the pair's table, the head's scale and offset folded
// in, rotated by the in-page step in half2; values: codebook units from a shared pair table, each token's
// scale folded into P and its offset into a per-head sum), patches outlier residuals, and runs both
// products on tensor cores (mma.m16n8k16, fp32 accumulation, fragments by ldmatrix):
//   scores  S^T[t][g]  = K[t][:] · Q_page[g][:]     A = the 16-token K tile, B = the G ≤ 8 heads (padded)
//   values  O^T[c][g] += V^T[c][t] · P^T[t][g]      A = V^T (ldmatrix.trans), B = P^T (movmatrix of S^T)
// R(t) = R(base)·R(step): the base goes into the query once per page, the step into the key. Sink tokens
// are counted in fp32 by a prologue of warp 0 and masked in the tiles. Any G ≤ 8 costs the same
// instructions (the MMA's N is 8), so G is not a template argument; the head dimension and the key and
// value widths are. Kernel 2 merges a sequence's splits in split order into fp16/bf16 outputs.
//
// NOT yet run on a GPU; run in CI under emulation. What a GPU run must check, and the instruction
// budget, are in docs/kv-cache.md.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "nuq/kv_cuda.hpp"
#include "portable.cuh"

namespace nuq::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxGroup = 8;  // query heads per kv head: the MMA's N
constexpr int kTile = 16;     // tokens per warp tile: the value MMA's K, two score MMAs' N
constexpr int kKeyStride = 8;   // halves of padding per tile row (K, V, queries): ldmatrix rows hit distinct banks
constexpr int kMaxPageTokens = 64;    // the in-page RoPE steps live in shared memory: 32 KiB at head dim 128
constexpr int kMaxSinkTokens = 64;    // full-precision tokens per sequence (StreamingLLM and KVQuant keep 1-4)

// 16-bit query and output values of either type, as bits.
template <class T>
__device__ __forceinline__ float to_float(uint16_t bits) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(__ushort_as_bfloat16(bits));
  return __half2float(__ushort_as_half(bits));
}
template <class T>
__device__ __forceinline__ uint16_t from_float(float v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  return __half_as_ushort(__float2half_rn(v));
}

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  return uint32_t(__half_as_ushort(__float2half_rn(lo))) | uint32_t(__half_as_ushort(__float2half_rn(hi))) << 16;
}
__device__ __forceinline__ float half_bits_to_float(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }

// 2^x by the SFU (ex2.approx: ~2 ulp, 2^-inf = 0), without exp2f's range handling.
__device__ __forceinline__ float fast_exp2(float x) {
#if defined(NUQ_CUDA_EMULATED)
  return exp2f(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}

// 1/x by the SFU (rcp.approx: 1 ulp), without the IEEE division's slow path.
__device__ __forceinline__ float fast_reciprocal(float x) {
#if defined(NUQ_CUDA_EMULATED)
  return 1.0f / x;
#else
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}

// Half2 arithmetic on raw bits. a·b + c per half, rounded once (HFMA2), and the complex product
// k·e^{iθ} = x·(cos, sin) + y·(−sin, cos) for k = (x, y), cs = (cos, sin), ns = (−sin, cos): an HMUL2
// and an HFMA2, whose broadcasts of x and y are operand swizzles (.H0_H0, .H1_H1), not instructions.
#if defined(NUQ_CUDA_EMULATED)
__device__ __forceinline__ float half_lo(uint32_t v) { return half_bits_to_float(uint16_t(v)); }
__device__ __forceinline__ float half_hi(uint32_t v) { return half_bits_to_float(uint16_t(v >> 16)); }
__device__ __forceinline__ float fma_to_half(float a, float b, float c) {  // exact product, one rounding
  return __half2float(__float2half_rn(float(double(a) * double(b) + double(c))));
}
__device__ __forceinline__ uint32_t hfma2_bits(uint32_t a, uint32_t b, uint32_t c) {
  return pack_half2(fma_to_half(half_lo(a), half_lo(b), half_lo(c)), fma_to_half(half_hi(a), half_hi(b), half_hi(c)));
}
__device__ __forceinline__ uint32_t rotate_half2(uint32_t k, uint32_t cs, uint32_t ns) {
  const float x = half_lo(k), y = half_hi(k);
  const float t0 = fma_to_half(y, half_lo(ns), 0.0f), t1 = fma_to_half(y, half_hi(ns), 0.0f);
  return pack_half2(fma_to_half(x, half_lo(cs), t0), fma_to_half(x, half_hi(cs), t1));
}
#else
__device__ __forceinline__ __half2 as_half2(uint32_t v) { return *reinterpret_cast<const __half2*>(&v); }
__device__ __forceinline__ uint32_t as_bits(__half2 v) { return *reinterpret_cast<const uint32_t*>(&v); }
__device__ __forceinline__ uint32_t hfma2_bits(uint32_t a, uint32_t b, uint32_t c) {
  return as_bits(__hfma2(as_half2(a), as_half2(b), as_half2(c)));
}
__device__ __forceinline__ uint32_t rotate_half2(uint32_t k, uint32_t cs, uint32_t ns) {
  const __half2 k2 = as_half2(k);
  return as_bits(__hfma2(__low2half2(k2), as_half2(cs), __hmul2(__high2half2(k2), as_half2(ns))));
}
#endif

// Bits [shift, shift + 32) of hi:lo.
__device__ __forceinline__ uint32_t funnel_right(uint32_t lo, uint32_t hi, uint32_t shift) {
#if defined(NUQ_CUDA_EMULATED)
  return shift ? (lo >> shift) | (hi << (32 - shift)) : lo;
#else
  return __funnelshift_r(lo, hi, shift);
#endif
}

// Records are byte-aligned in shared memory (k_bytes may be odd): the 8 bytes at p from the three aligned
// words around them (one funnel shift per word instead of four byte loads). May read up to 4 bytes past
// p + 8, which the layout keeps inside the block's shared memory (split_layout).
__device__ __forceinline__ void load_8_bytes(const uint8_t* p, uint32_t& w0, uint32_t& w1) {
  const uint32_t misalign = uint32_t(reinterpret_cast<uintptr_t>(p) & 3);
  // Pointer arithmetic, not an integer round trip, so that the compiler still sees shared memory (LDS).
  const uint32_t* words = reinterpret_cast<const uint32_t*>(p - misalign);
  const uint32_t shift = misalign * 8, u0 = words[0], u1 = words[1], u2 = words[2];
  w0 = funnel_right(u0, u1, shift);
  w1 = funnel_right(u1, u2, shift);
}
// An fp16 value at a byte address (records are byte-aligned), converted by the hardware (HADD2.F32).
__device__ __forceinline__ float load_fp16(const uint8_t* p) { return half_bits_to_float(uint16_t(p[0] | (p[1] << 8))); }

// Byte offset (field · 4, an entry of 4 bytes) of pair R's index field in a group whose first eight bytes
// are w0, w1 (docs/kv-cache.md, "Index packing"): channels R and R + 8 share the 2B-bit field at bit 2B·R,
// which a table of pairs takes whole. One shift (a funnel shift for the 3-bit field across the two
// words) and the mask, which the lookup's LOP3 merges with the table base.
template <int B, int R>
__device__ __forceinline__ uint32_t pair_field_x4(uint32_t w0, uint32_t w1) {
  constexpr int at = 2 * B * R;
  constexpr uint32_t mask = ((1u << (2 * B)) - 1) << 2;
  uint32_t x;
  if constexpr (at + 2 * B <= 32)
    x = at >= 2 ? w0 >> (at - 2) : w0 << (2 - at);
  else if constexpr (at >= 32)
    x = at >= 34 ? w1 >> (at - 34) : w1 << (34 - at);
  else
    x = funnel_right(w0, w1, at - 2);
  return x & mask;
}

// Shared-memory addresses as 32-bit integers, for the decode's table lookups: an entry's address is
// (index bits) | (table base) — one LOP3 after the shift, where a pointer would cost a shift, a mask and an
// add — which holds because the tables sit at addresses whose low bits are zero (split_layout).
// `offset` is a compile-time byte offset added by the load itself.
__device__ __forceinline__ uint32_t shared_address(const void* p) {
#if defined(NUQ_CUDA_EMULATED)
  return uint32_t(static_cast<const unsigned char*>(p) - detail::dynamic_shared<unsigned char>());
#else
  return uint32_t(__cvta_generic_to_shared(p));
#endif
}
template <int OFFSET>
__device__ __forceinline__ uint32_t table_load(uint32_t address) {
#if defined(NUQ_CUDA_EMULATED)
  uint32_t v;
  std::memcpy(&v, detail::dynamic_shared<unsigned char>() + address + OFFSET, 4);
  return v;
#else
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1+%2];\n" : "=r"(v) : "r"(address), "n"(OFFSET));
  return v;
#endif
}
template <int OFFSET>
__device__ __forceinline__ uint32_t table_load_u16(uint32_t address) {
#if defined(NUQ_CUDA_EMULATED)
  uint16_t v;
  std::memcpy(&v, detail::dynamic_shared<unsigned char>() + address + OFFSET, 2);
  return v;
#else
  unsigned short v;
  asm volatile("ld.shared.u16 %0, [%1+%2];\n" : "=h"(v) : "r"(address), "n"(OFFSET));
  return v;
#endif
}

// Host-computed byte offsets into the block's dynamic shared memory (launch_decode).
struct SplitLayout {
  int key_table;   // key_table_bytes: the head's key tables (k_codebook[i] * k_scale[h][p] + k_offset[h][p], fp16)
  int value_pairs;  // uint32 [256]: fp16 (v_codebook[i & 15], v_codebook[i >> 4])
  int step_rotations;  // half2 pairs [block_tokens][HD / 2]: (cos, sin), (−sin, cos) of every in-page step
  int queries;     // float [G][HD]: rotated to position len - 1, storage order
  int warps;       // the warps' regions, warp_bytes each; after the token loop, the merge buffers
  int warp_bytes;
  int k_records, v_records, k_tile, v_tile, q_page, v_scale;  // offsets inside a warp region
};

struct Sizes {
  int k_index, k_bytes, v_index, v_bytes;
  int v_region;  // pages are below 2 GiB (can_implement_kv_decode), so offsets inside one are 32-bit
};

__host__ __device__ inline Sizes sizes_of(const KvDeviceCache& c) {
  Sizes s;
  s.k_index = c.head_dim * c.bits_k / 8;
  s.k_bytes = s.k_index + 3 * c.slots;
  s.v_index = c.head_dim * c.bits_v / 8;
  s.v_bytes = 4 + s.v_index + 3 * c.slots;
  s.v_region = c.n_kv_heads * c.block_tokens * s.k_bytes;
  return s;
}

// cos and sin of RoPE pair `pair` at position t: the page base times the in-page step, in fp32.
__device__ __forceinline__ void rope_at(const KvDeviceCache& c, int64_t t, int pair, int half, float& cs, float& sn) {
  const int64_t page = t / c.block_tokens, step = t % c.block_tokens;
  const float bc = c.rope_page_cos[page * half + pair], bs = c.rope_page_sin[page * half + pair];
  const float sc = c.rope_step_cos[step * half + pair], ss = c.rope_step_sin[step * half + pair];
  cs = fmaf(bc, sc, -bs * ss);
  sn = fmaf(bs, sc, bc * ss);
}

// Per warp and tile: what the decode passes share.
struct Tile {
  int start, live, step0;  // first token, tokens < length (0..16), in-page step of the first token
  int first;               // tokens before it are sink tokens (sink_prologue's), masked here
  uint8_t* k_records;  // kTile records as stored in the page
  uint8_t* v_records;
  uint16_t* k_tile;  // fp16 [kTile][HD + kKeyStride]: RoPE pair p at 2p, 2p + 1, rotated by the step
  uint16_t* v_tile;  // fp16 [kTile][HD + kKeyStride]: V in codebook units, value_position order
  float* v_scale;    // float2 [kTile]: each token's value scale and offset (patch_tile)
};

// Copies the tile's records with 16-byte loads (16 records of k_bytes are k_bytes 16-byte words; the tile
// starts at a multiple of 16 tokens inside its page, so they are aligned). Records past the length are
// not copied: whatever the buffers hold decodes to finite keys and values (table entries), and those
// tokens are masked (p = 0, no residuals, scale and offset overridden by patch_tile).
__device__ __forceinline__ void stage_records(const Sizes& sz, const uint8_t* page, int h, int block_tokens,
                                              const Tile& tile, int lane) {
  if (tile.live > 0) {
    const int first = h * block_tokens + tile.step0;
    const uint4* k_src = reinterpret_cast<const uint4*>(page + first * sz.k_bytes);
    const uint4* v_src = reinterpret_cast<const uint4*>(page + (sz.v_region + first * sz.v_bytes));
#pragma unroll 1
    for (int i = lane; i < sz.k_bytes; i += 32) reinterpret_cast<uint4*>(tile.k_records)[i] = __ldg(k_src + i);
#pragma unroll 1
    for (int i = lane; i < sz.v_bytes; i += 32) reinterpret_cast<uint4*>(tile.v_records)[i] = __ldg(v_src + i);
  }
  __syncwarp();
}

// Key tables: for 2 and 3 bits one table per RoPE pair (storage channels 16g + r and 16g + r + 8, pair
// 8g + r), entry ia | ib << KB = fp16 (cb[ia]·s_a + o_a, cb[ib]·s_b + o_b), so that one lookup gives the
// pair (4 / 16 KiB at head dim 128); at 4 bits (whose pair tables would take 64 KiB) one fp16 table per
// channel, [HD][16], and two lookups.
template <int KB>
constexpr bool kKeyPairTables = KB <= 3;
template <int KB>
constexpr int kKeyPairEntries = 1 << (2 * KB);
__host__ __device__ inline int key_table_bytes(int head_dim, int bits) {
  return bits <= 3 ? head_dim / 2 * (1 << (2 * bits)) * 4 : head_dim * 16 * 2;
}

// One lane's share of decoding a tile's records into rows of 16-bit pairs: token lane/2, index groups
// (lane % 2) + 2j. Field r of group g becomes word(g, r as a constant, field · 4) at positions
// 16g + 2r, 2r + 1 of the token's row, and a group's 8 words go out as two 16-byte stores.
template <int B, class Word, int... R>
__device__ __forceinline__ void group_words(uint32_t (&out)[8], int g, uint32_t w0, uint32_t w1, Word& word,
                                            std::integer_sequence<int, R...>) {
  ((out[R] = word(g, std::integral_constant<int, R>{}, pair_field_x4<B, R>(w0, w1))), ...);
}
template <int HD, int B, class Word>
__device__ __forceinline__ void decode_rows(const uint8_t* records, int record_bytes, uint16_t* rows, int lane,
                                            Word word) {
  constexpr int kGroups = HD / 16;
  const int tok = lane / 2;
  const uint8_t* rec = records + tok * record_bytes;
  uint4* row = reinterpret_cast<uint4*>(rows + tok * (HD + kKeyStride));
#pragma unroll
  for (int j = 0; j < (kGroups + 1) / 2; ++j) {
    const int g = 2 * j + (lane & 1);
    if (g >= kGroups) break;
    uint32_t w0, w1, out[8];
    load_8_bytes(rec + g * 2 * B, w0, w1);
    group_words<B>(out, g, w0, w1, word, std::make_integer_sequence<int, 8>{});
    row[2 * g] = make_uint4(out[0], out[1], out[2], out[3]);
    row[2 * g + 1] = make_uint4(out[4], out[5], out[6], out[7]);
  }
}

// Keys: the K tile holds RoPE pair p of the storage order (channels 16g + r and 16g + r + 8, p = 8g + r)
// as one complex number, fp16 at positions 2p, 2p + 1 (the page's queries use the same order: a dot
// product does not care about the order of its terms), rotated by the in-page step in half2. The record
// holds the pair's indices as one field.
template <int HD, int KB>
__device__ __forceinline__ void decode_keys(const Sizes& sz, const Tile& tile, const void* key_table,
                                            const uint4* step_rotations, int lane) {
  const uint4* rotations = step_rotations + (tile.step0 + lane / 2) * (HD / 4);  // two pairs per uint4
  decode_rows<HD, KB>(tile.k_records, sz.k_bytes, tile.k_tile, lane, [&](int g, auto r_c, uint32_t field) {
    constexpr int r = decltype(r_c)::value;
    uint32_t packed;
    if constexpr (kKeyPairTables<KB>) {
      // A group's 8 pair tables are contiguous: the group's base | field, pair r by the load's offset.
      const uint32_t table = shared_address(key_table) + uint32_t(g) * (8 * kKeyPairEntries<KB> * 4);
      packed = table_load<r * kKeyPairEntries<KB> * 4>(table | field);
    } else {
      // 4 bits: channel r's index is the field's low nibble, r + 8's the high one; fp16 entries.
      const uint32_t table = shared_address(key_table) + uint32_t(g) * (16 * 16 * 2);  // channel r at + 32r
      const uint32_t a = table_load_u16<32 * r>(table | (field >> 1 & 0x1eu));
      const uint32_t b = table_load_u16<32 * (r + 8)>(table | (field >> 5 & 0x1eu));
      packed = a | b << 16;
    }
    const uint4 rot = rotations[4 * g + r / 2];  // (cos, sin), (−sin, cos) of pair 8g + r, then 8g + r + 1
    return r % 2 ? rotate_half2(packed, rot.z, rot.w) : rotate_half2(packed, rot.x, rot.y);
  });
}

// Value pair table: entry ia | ib << VB = fp16 (cb[ia], cb[ib]), the two channels of one index field.
template <int VB>
constexpr int kValuePairEntries = 1 << (2 * VB);

// The V tile's order within a group of 16 channels: pair r (channels r, r + 8) at positions 2r, 2r + 1,
// as the index fields give them; the accumulators' rows follow it and are put back in model order once,
// when the warp writes its partial.
__device__ __forceinline__ int value_position(int ch) { return ch / 16 * 16 + ch % 8 * 2 + ch % 16 / 8; }
__device__ __forceinline__ int value_channel(int pos) { return pos / 16 * 16 + pos % 16 / 2 + pos % 2 * 8; }

// Values: the V tile is row-major ([token][HD + kKeyStride]), which ldmatrix.trans turns into the A
// fragments of V^T. It holds codebook values only (the token's scale goes into P and its offset into a
// per-head sum, see the token loop), so one lookup in the pair table gives two channels.
template <int HD, int VB>
__device__ __forceinline__ void decode_values(const Sizes& sz, const Tile& tile, const uint32_t* value_pairs,
                                              int lane) {
  const uint32_t pairs_at = shared_address(value_pairs);  // 1024-aligned: entry i at pairs_at | 4i
  decode_rows<HD, VB>(tile.v_records + 4, sz.v_bytes, tile.v_tile, lane,
                      [&](int, auto, uint32_t field) { return table_load<0>(pairs_at | field); });
}

__device__ __forceinline__ void add_to_half(uint16_t* p, float v) { *p = __half_as_ushort(__float2half_rn(half_bits_to_float(*p) + v)); }

// Outlier residuals (lanes 0-15 the keys of token `lane`, lanes 16-31 the values of token lane - 16; the
// slots of one token go through one lane, so two slots on one channel never race). A key residual on
// storage channel p moves both members of p's RoPE pair: it is rotated by the step like the rest of the
// key. Values hold codebook units (value = tile · scale + offset): lanes 16-31 also write their token's
// (scale, offset) to v_scale, and a value residual enters as residual / scale; a token with scale 0 gets
// scale 1 and a column of zeros first (nuq's writer stores 1 for a range of 0, src/kv_cache.cpp; pages
// written elsewhere may not). Tokens outside [first, live) — past the length, or sink tokens, which
// sink_prologue counts in full precision — are masked in the scores: scale 1, offset 0, no patching.
template <int HD>
__device__ __forceinline__ void patch_tile(const KvDeviceCache& c, const Sizes& sz, const Tile& tile,
                                           const uint2* step_rotations, int lane) {
  constexpr int kPairs = HD / 2;
  const int tok = lane % 16;
  const bool real = tok >= tile.first && tok < tile.live;
  if (lane < 16) {
    if (real) {
      const uint8_t* rec = tile.k_records + tok * sz.k_bytes + sz.k_index;
      uint32_t* row = reinterpret_cast<uint32_t*>(tile.k_tile + tok * (HD + kKeyStride));  // complex pairs
      const uint2* rotations = step_rotations + (tile.step0 + tok) * kPairs;
#pragma unroll 1
      for (int s = 0; s < c.slots; ++s) {
        const int p = rec[s];
        if (p >= HD) continue;
        // A residual on the first member of a pair is (res, 0), on the second (0, res): rotated,
        // res·(cos, sin) or res·(−sin, cos).
        const uint32_t res = uint32_t(rec[c.slots + 2 * s]) | uint32_t(rec[c.slots + 2 * s + 1]) << 8;
        const int pair = p / 16 * 8 + p % 8;
        const uint2 rot = rotations[pair];
        row[pair] = hfma2_bits(res | res << 16, p % 16 < 8 ? rot.x : rot.y, row[pair]);
      }
    }
  } else {
    const uint8_t* rec = tile.v_records + tok * sz.v_bytes;
    uint32_t so, unused;
    load_8_bytes(rec, so, unused);
    float scale = half_bits_to_float(uint16_t(so)), offset = half_bits_to_float(uint16_t(so >> 16));
    if (!real) {  // masked: p = 0, any finite scale
      scale = 1.0f;
      offset = 0.0f;
    } else if (scale == 0.0f) {
      scale = 1.0f;
#pragma unroll 1
      for (int k = 0; k < HD / 8; ++k) reinterpret_cast<uint4*>(tile.v_tile + tok * (HD + kKeyStride))[k] = make_uint4(0, 0, 0, 0);
    }
    reinterpret_cast<float2*>(tile.v_scale)[tok] = make_float2(scale, offset);
    if (real) {
      const float inv = fast_reciprocal(scale);
      rec += 4 + sz.v_index;
#pragma unroll 1
      for (int s = 0; s < c.slots; ++s) {
        const int ch = rec[s];
        if (ch < HD)
          add_to_half(tile.v_tile + tok * (HD + kKeyStride) + value_position(ch), load_fp16(rec + c.slots + 2 * s) * inv);
      }
    }
  }
}

// Sink tokens [lo, hi) of this split (tokens below sink_tokens), whose fp16 copies count instead of their
// quantized records: warp 0 starts its softmax state with them before the token loop (the tiles mask
// them), so the steady loop never replaces rows. The score of head g and sink t goes through the warp's
// scratch ([hi - lo][kMaxGroup] floats); then each lane forms the state its MMA fragments hold: the
// running maxima of heads 2tq and 2tq + 1, their shares of the sums (lanes gq = 0 take all of them), and
// O^T for channels 16mb + gq (+8) of those heads. Every warp runs the same barriers (the others with no tokens).
template <int HD>
__device__ __forceinline__ void sink_prologue(const KvDeviceCache& c, int b, int h, int G, float scale_log2,
                                              const float* queries, int lo, int hi, float* scratch, int lane,
                                              float (&m_run)[2], float (&l_run)[2], float (&acc)[HD / 16][4]) {
  constexpr int kPairs = HD / 2;
  const int gq = lane / 4, tq = lane % 4, n = max(0, hi - lo);
  const int64_t stride = int64_t(c.n_kv_heads) * HD;  // between tokens of sink_k / sink_v
  const int64_t base = (int64_t(b) * c.sink_tokens * c.n_kv_heads + h) * HD;
#pragma unroll 1
  for (int e = lane; e < n * kMaxGroup; e += 32) {
    const int t = lo + e / kMaxGroup, g = e % kMaxGroup;
    float score = -INFINITY;
    if (g < G) {
      const uint16_t* k = c.sink_k + base + t * stride;  // storage order, not rotated
      float dot = 0.0f;
#pragma unroll 1
      for (int pair = 0; pair < kPairs; ++pair) {
        const int a = pair / 8 * 16 + pair % 8;
        float cs, sn;
        rope_at(c, t, pair, kPairs, cs, sn);
        const float x = half_bits_to_float(k[a]), y = half_bits_to_float(k[a + 8]);
        dot = fmaf(queries[g * HD + a], x * cs - y * sn, dot);
        dot = fmaf(queries[g * HD + a + 8], x * sn + y * cs, dot);
      }
      score = dot * scale_log2;
    }
    scratch[e] = score;
  }
  __syncwarp();
  auto head_max = [&](int g) {
    float m = -INFINITY;
#pragma unroll 1
    for (int t = 0; t < n; ++t) m = fmaxf(m, scratch[t * kMaxGroup + g]);
    return m;
  };
  const float m_head[2] = {head_max(2 * tq), head_max(2 * tq + 1)};
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    m_run[i] = m_head[i];
    if (gq == 0 && m_head[i] != -INFINITY)  // one lane of the 8 that reduce a head's sum takes all of it
#pragma unroll 1
      for (int t = 0; t < n; ++t) l_run[i] += fast_exp2(scratch[t * kMaxGroup + 2 * tq + i] - m_head[i]);
  }
#pragma unroll 1
  for (int t = 0; t < n; ++t) {
    float p[2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
      p[i] = m_head[i] == -INFINITY ? 0.0f : fast_exp2(scratch[t * kMaxGroup + 2 * tq + i] - m_head[i]);
    const uint16_t* v = c.sink_v + base + (lo + t) * stride;  // model order
#pragma unroll
    for (int mb = 0; mb < HD / 16; ++mb)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        acc[mb][i] = fmaf(p[i % 2], half_bits_to_float(v[value_channel(16 * mb + gq + 8 * (i / 2))]), acc[mb][i]);
  }
  __syncwarp();  // the scratch is the warp's record buffer
}

// Q_page = R(-base) q for page `page`, fp16, into the warp's [kMaxGroup][HD + kKeyStride] buffer (rows
// G.. stay zero: the MMA's padding heads), from which every tile of the page loads its A fragments.
template <int HD>
__device__ __forceinline__ void page_queries(uint16_t* q_page, const KvDeviceCache& c, const float* queries, int G,
                                             int64_t page, int lane) {
  constexpr int kPairs = HD / 2;
#pragma unroll 1
  for (int e = lane; e < G * kPairs; e += 32) {
    const int g = e / kPairs, pair = e % kPairs, a = pair / 8 * 16 + pair % 8;
    const float cs = c.rope_page_cos[page * kPairs + pair], sn = c.rope_page_sin[page * kPairs + pair];
    const float xa = queries[g * HD + a], xb = queries[g * HD + a + 8];
    reinterpret_cast<uint32_t*>(q_page + g * (HD + kKeyStride))[pair] = pack_half2(fmaf(xa, cs, xb * sn), fmaf(xb, cs, -xa * sn));
  }
}

// KB, VB: key and value bits (2-4), so that every width's decode is straight-line code.
template <int HD, int KB, int VB>
__global__ void __launch_bounds__(kWarps * 32, 2)  // 2 blocks per SM: ~91 KiB of shared memory each (4-bit, head dim 128)
    split_kernel(KvDeviceCache c, int n_heads, const uint16_t* __restrict__ q, bool bf16, float scale,
                 int split_tokens, int splits, float* __restrict__ ws, SplitLayout lay) {
  constexpr int kBlocks = HD / 16;  // k-blocks of the score MMA = m-blocks of the value MMA
  unsigned char* smem = detail::dynamic_shared<unsigned char>();
  smem += (1024 - (shared_address(smem) & 1023)) & 1023;  // the layout's 1024-aligned origin
  void* key_table = smem + lay.key_table;
  uint32_t* value_pairs = reinterpret_cast<uint32_t*>(smem + lay.value_pairs);
  uint2* step_rotations = reinterpret_cast<uint2*>(smem + lay.step_rotations);
  float* queries = reinterpret_cast<float*>(smem + lay.queries);
  const int G = n_heads / c.n_kv_heads;
  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, gq = lane / 4, tq = lane % 4;
  const int len = c.lengths[b];
  const int t0 = split * split_tokens, t1 = min(len, t0 + split_tokens);
  const Sizes sz = sizes_of(c);
  const float scale_log2 = scale * 1.4426950408889634f;  // softmax in powers of 2 (log2 e)

  auto key_value = [&](int p, int i) { return fmaf(c.k_codebook[i], c.k_scale[h * HD + p], c.k_offset[h * HD + p]); };
  if constexpr (kKeyPairTables<KB>) {
    constexpr int kEntries = kKeyPairEntries<KB>;
    uint32_t* pairs = reinterpret_cast<uint32_t*>(key_table);
    for (int e = int(threadIdx.x); e < HD / 2 * kEntries; e += int(blockDim.x)) {
      const int pair = e / kEntries, ia = e % kEntries & ((1 << KB) - 1), ib = e % kEntries >> KB;
      const int a = pair / 8 * 16 + pair % 8;
      pairs[e] = pack_half2(key_value(a, ia), key_value(a + 8, ib));
    }
  } else {
    uint16_t* channels = reinterpret_cast<uint16_t*>(key_table);
    for (int e = int(threadIdx.x); e < HD * 16; e += int(blockDim.x))
      channels[e] = __half_as_ushort(__float2half_rn(key_value(e / 16, e % 16)));
  }
  for (int e = int(threadIdx.x); e < c.block_tokens * (HD / 2); e += int(blockDim.x)) {
    const float cs = c.rope_step_cos[e], sn = c.rope_step_sin[e];
    step_rotations[e] = make_uint2(pack_half2(cs, sn), pack_half2(-sn, cs));
  }
  for (int e = int(threadIdx.x); e < 256; e += int(blockDim.x))
    if (e < kValuePairEntries<VB>) value_pairs[e] = pack_half2(c.v_codebook[e & ((1 << VB) - 1)], c.v_codebook[e >> VB]);
  // Queries of this kv head's group, rotated to position len - 1, in key storage order.
  for (int e = int(threadIdx.x); e < G * (HD / 2); e += int(blockDim.x)) {
    const int g = e / (HD / 2), pair = e % (HD / 2), blk = pair / 8, r = pair % 8;
    const int pa = 16 * blk + r, pb = pa + 8;
    const uint16_t* qh = q + (int64_t(b) * n_heads + h * G + g) * HD;
    const uint16_t ua = qh[c.storage[pa]], ub = qh[c.storage[pb]];
    const float xa = bf16 ? to_float<__nv_bfloat16>(ua) : to_float<__half>(ua);
    const float xb = bf16 ? to_float<__nv_bfloat16>(ub) : to_float<__half>(ub);
    float cs, sn;
    rope_at(c, len - 1, pair, HD / 2, cs, sn);
    queries[g * HD + pa] = xa * cs - xb * sn;
    queries[g * HD + pb] = xa * sn + xb * cs;
  }
  __syncthreads();

  unsigned char* region = smem + lay.warps + warp * lay.warp_bytes;
  Tile tile;
  tile.k_records = region + lay.k_records;
  tile.v_records = region + lay.v_records;
  tile.k_tile = reinterpret_cast<uint16_t*>(region + lay.k_tile);
  tile.v_tile = reinterpret_cast<uint16_t*>(region + lay.v_tile);
  tile.v_scale = reinterpret_cast<float*>(region + lay.v_scale);
  // Heads 2tq and 2tq + 1 (the heads of this lane's accumulators): the running max, and over this lane's
  // tokens only (gq and gq + 8 of each tile), the sum of p and of p times the value offset.
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f}, offset_run[2] = {0.0f, 0.0f};
  float acc[kBlocks][4];                  // O^T[16mb + gq (+8)][heads 2tq, 2tq + 1]
#pragma unroll
  for (int j = 0; j < kBlocks; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[j][i] = 0.0f;
  uint16_t* q_page = reinterpret_cast<uint16_t*>(region + lay.q_page);
  for (int e = lane; e < kMaxGroup * (HD + kKeyStride); e += 32) q_page[e] = 0;
  sink_prologue<HD>(c, b, h, G, scale_log2, queries, t0, warp == 0 ? min(t1, c.sink_tokens) : t0,
                    reinterpret_cast<float*>(tile.k_records), lane, m_run, l_run, acc);
  // Each warp takes a contiguous quarter of the split's tiles (so that its page, and the query rotated
  // to it, changes every block_tokens / 16 tiles). Every warp runs every round (a warp past the length
  // stages nothing and its scores are masked), so all warps execute the same sequence of warp operations.
  // The tile's page and in-page step advance by counting, not by dividing.
  const int chunk = (split_tokens / kTile + kWarps - 1) / kWarps;
  const int tiles = t1 > t0 ? (t1 - t0 + kTile - 1) / kTile : 0;
  const int rounds = min(chunk, tiles);
  tile.start = t0 + warp * chunk * kTile;
  int64_t page = tile.start / c.block_tokens;
  tile.step0 = tile.start % c.block_tokens;
  const int32_t* block_table = c.block_tables + int64_t(b) * c.max_blocks;
  // One trip per page: the page's address and the query rotated to it, then the page's tiles (the
  // steady loop). A page past the length opens nothing: its tiles stage nothing and mask everything.
  for (int round = 0; round < rounds;) {
    const uint8_t* page_bytes = nullptr;
    if (t1 > tile.start) {  // warp-uniform
      page_bytes = c.pages + int64_t(block_table[page]) * c.page_stride;
      page_queries<HD>(q_page, c, queries, G, page, lane);
    }
    const int page_rounds = min(rounds - round, (c.block_tokens - tile.step0) / kTile);
    for (int in_page = 0; in_page < page_rounds; ++in_page) {
      tile.live = max(0, min(kTile, t1 - tile.start));
      tile.first = min(kTile, max(0, c.sink_tokens - tile.start));
      stage_records(sz, page_bytes, h, c.block_tokens, tile, lane);
      // Decoded even when no token is live: any record bytes give finite keys and values (table entries),
      // so the masked (p = 0) rows never bring a NaN into P·V.
      decode_keys<HD, KB>(sz, tile, key_table, reinterpret_cast<const uint4*>(step_rotations), lane);
      decode_values<HD, VB>(sz, tile, value_pairs, lane);
      __syncwarp();
      patch_tile<HD>(c, sz, tile, step_rotations, lane);
      __syncwarp();

      // Scores transposed, S^T = K·Q^T, so that the K tile fills all 16 rows of the A operand and one MMA
      // covers the tile's tokens for all 8 (padded) heads per k-block. Fragments by ldmatrix, lane L giving
      // a row address of matrix L / 8: A = K (matrices: tokens 0-7 and 8-15 of channels 16j, then of 16j + 8),
      // B = Q^T from the page's queries (matrices: heads 0-7 of channels 16j, 16j + 8, 16j + 16, 16j + 24).
      float st[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // S^T[tokens gq, gq + 8 (st[2], st[3])][heads 2tq, 2tq + 1]
      const uint16_t* q_rows = q_page + (lane % 8) * (HD + kKeyStride) + 8 * (lane / 8);
      const uint16_t* k_rows = tile.k_tile + (lane % 8 + 8 * (lane / 8 % 2)) * (HD + kKeyStride) + 8 * (lane / 16);
#pragma unroll
      for (int j = 0; j < kBlocks; j += 2) {
        uint32_t ka[4];
        detail::ldmatrix<4, false>(ka, k_rows + 16 * j);
        if (j + 1 < kBlocks) {
          uint32_t qb[4], ka1[4];
          detail::ldmatrix<4, false>(qb, q_rows + 16 * j);
          detail::ldmatrix<4, false>(ka1, k_rows + 16 * (j + 1));
          detail::mma_16816<false>(st, ka, {qb[0], qb[1]});
          detail::mma_16816<false>(st, ka1, {qb[2], qb[3]});
        } else {  // an odd last k-block (head dim 80)
          uint32_t qb[2];
          detail::ldmatrix<2, false>(qb, q_rows + 16 * j);
          detail::mma_16816<false>(st, ka, qb);
        }
      }
      // Scores in log2 units (scale · log2 e folded in): p = 2^(s - m), one MUFU.EX2 and no range handling.
      // Tokens outside [first, live) get -inf; while a head has seen no token, m is -inf and p, corr are 0
      // (exp2(-inf)), which leaves its zero sums as they are. A head's max is over the 8 lanes of one tq.
      const uint32_t live_bits = ((1u << tile.live) - 1u) & ~((1u << tile.first) - 1u);
      float mx[2];
#pragma unroll
      for (int i = 0; i < 4; ++i) st[i] = live_bits >> (gq + 8 * (i / 2)) & 1u ? st[i] * scale_log2 : -INFINITY;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        mx[i] = fmaxf(st[i], st[i + 2]);
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 4));
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 8));
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 16));
      }
      // value = tile · scale + offset: P·V = (P ∘ scale)·tile + Σ p · offset (the offset sum per head).
      const float4 so = make_float4(reinterpret_cast<const float2*>(tile.v_scale)[gq].x,
                                    reinterpret_cast<const float2*>(tile.v_scale)[gq].y,
                                    reinterpret_cast<const float2*>(tile.v_scale)[gq + 8].x,
                                    reinterpret_cast<const float2*>(tile.v_scale)[gq + 8].y);
      float corr[2], p[4];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const float m_new = fmaxf(m_run[i], mx[i]), m_safe = m_new == -INFINITY ? 0.0f : m_new;
        corr[i] = fast_exp2(m_run[i] - m_safe);
        p[i] = fast_exp2(st[i] - m_safe);
        p[i + 2] = fast_exp2(st[i + 2] - m_safe);
        l_run[i] = fmaf(l_run[i], corr[i], p[i] + p[i + 2]);
        offset_run[i] = fmaf(offset_run[i], corr[i], fmaf(p[i], so.y, p[i + 2] * so.w));
        m_run[i] = m_new;
      }
      // P^T as the value MMA's B operand (tokens 2tq.., heads gq): the transposes of this lane's rows.
      const uint32_t pb[2] = {detail::movmatrix_trans(pack_half2(p[0] * so.x, p[1] * so.x)),
                              detail::movmatrix_trans(pack_half2(p[2] * so.z, p[3] * so.z))};
      const uint16_t* v_rows = tile.v_tile + (lane % 8 + 8 * (lane / 16)) * (HD + kKeyStride) + 8 * (lane / 8 % 2);
#pragma unroll
      for (int mb = 0; mb < kBlocks; ++mb) {
        acc[mb][0] *= corr[0];
        acc[mb][1] *= corr[1];
        acc[mb][2] *= corr[0];
        acc[mb][3] *= corr[1];
        // A = V^T of channels 16mb..16mb + 15: matrices (tokens 0-7, channels +0), (0-7, +8), (8-15, +0),
        // (8-15, +8), each transposed.
        uint32_t va[4];
        detail::ldmatrix<4, true>(va, v_rows + 16 * mb);
        detail::mma_16816<false>(acc[mb], va, pb);
      }
      __syncwarp();  // the next round overwrites this one's tiles
      tile.start += kTile;
      tile.step0 += kTile;
    }
    round += page_rounds;
    tile.step0 = 0;
    ++page;
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int lanes = 4; lanes < 32; lanes *= 2) {
      l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], lanes);
      offset_run[i] += __shfl_xor_sync(0xffffffffu, offset_run[i], lanes);
    }

  // Merge the warps in order; the warp regions become the merge buffers.
  __syncthreads();
  float* wm = reinterpret_cast<float*>(smem + lay.warps);  // [kWarps][kMaxGroup]
  float* wl = wm + kWarps * kMaxGroup;                     // [kWarps][kMaxGroup]
  float* wacc = wl + kWarps * kMaxGroup;                   // [kWarps][kMaxGroup][HD]
  if (gq == 0)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      wm[warp * kMaxGroup + 2 * tq + i] = m_run[i];
      wl[warp * kMaxGroup + 2 * tq + i] = l_run[i];
    }
#pragma unroll
  for (int mb = 0; mb < kBlocks; ++mb)
#pragma unroll
    for (int i = 0; i < 4; ++i)
      wacc[(warp * kMaxGroup + 2 * tq + i % 2) * HD + value_channel(16 * mb + gq + 8 * (i / 2))] =
          acc[mb][i] + offset_run[i % 2];
  __syncthreads();
  for (int e = int(threadIdx.x); e < G * HD; e += int(blockDim.x)) {
    const int g = e / HD, ch = e % HD;
    float mx = -INFINITY;
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, wm[w * kMaxGroup + g]);
    float sum = 0, o = 0;
    for (int w = 0; w < kWarps; ++w) {
      if (wm[w * kMaxGroup + g] == -INFINITY) continue;
      const float f = fast_exp2(wm[w * kMaxGroup + g] - mx);
      sum += f * wl[w * kMaxGroup + g];
      o += f * wacc[(w * kMaxGroup + g) * HD + ch];
    }
    float* dst = ws + ((int64_t(b) * n_heads + h * G + g) * splits + split) * (HD + 2);
    if (ch == 0) {
      dst[0] = mx * 0.6931471805599453f;  // back to natural units for merge_kernel (ln 2)
      dst[1] = sum;
    }
    dst[2 + ch] = o;
  }
}

// Shared by the quantized and the fp16 kernels: both write a split's partial as (max, sum, weighted sum).
template <class T>
__global__ void merge_kernel(const int32_t* __restrict__ lengths, int hd, int n_heads, int splits, int split_tokens,
                             const float* __restrict__ ws, uint16_t* __restrict__ out) {
  const int bh = blockIdx.x, b = bh / n_heads;
  const int len = lengths[b];
  const float* src = ws + int64_t(bh) * splits * (hd + 2);
  for (int ch = threadIdx.x; ch < hd; ch += blockDim.x) {
    float mx = -INFINITY;
    for (int s = 0; s * split_tokens < len && s < splits; ++s) mx = fmaxf(mx, src[s * (hd + 2)]);
    float sum = 0, o = 0;
    for (int s = 0; s * split_tokens < len && s < splits; ++s) {
      const float* part = src + s * (hd + 2);
      if (part[0] == -INFINITY) continue;
      const float f = __expf(part[0] - mx);
      sum += f * part[1];
      o += f * part[2 + ch];
    }
    // Values are in model order: the output channel is the value channel.
    out[int64_t(bh) * hd + ch] = from_float<T>(o / sum);
  }
}

// ---- fp16/bf16 baseline ---------------------------------------------------------------------------
//
// Split-K flash decoding over an unquantized cache (keys already rotated), the baseline the quantized
// kernel is benchmarked against (bench/bench_kv_cuda.cpp). A half-warp takes one token: each of its 16
// lanes reads 8 channels of the key and the value row with one 16-byte load each, the scores of the G
// query heads are summed by 4 shuffles, and running softmax states stay in the lanes. Partials go to
// the same workspace as the quantized kernel's, merged by merge_kernel.
// Eight heads keep 2 x 64 fp32 values per lane (query and accumulator), which four blocks per SM (128
// registers) would spill to local memory: two blocks then.
template <int GMAX, int HD, class T>
__global__ void __launch_bounds__(kWarps * 32, GMAX >= 8 ? 2 : 4)
    dense_split_kernel(DenseKvDevice kv, int n_heads, const uint16_t* __restrict__ q, float scale, int split_tokens,
                       int splits, float* __restrict__ ws) {
  constexpr int kSlots = 2 * kWarps;  // half-warps of the block
  float* smem = detail::dynamic_shared<float>();
  float* sm_m = smem;                    // [kSlots][GMAX]
  float* sm_l = sm_m + kSlots * GMAX;    // [kSlots][GMAX]
  float* sm_acc = sm_l + kSlots * GMAX;  // [kSlots][GMAX][HD]
  const int G = n_heads / kv.n_kv_heads;
  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, half = lane / 16, sub = lane % 16;
  const int slot = 2 * warp + half;
  const bool active = 8 * sub < HD;  // lanes past the head dimension idle through the shuffles
  const int len = kv.lengths[b];
  const int t0 = split * split_tokens, t1 = min(len, t0 + split_tokens);

  float qv[GMAX][8];
#pragma unroll
  for (int g = 0; g < GMAX; ++g)
#pragma unroll
    for (int i = 0; i < 8; ++i)
      qv[g][i] = (g < G && active) ? to_float<T>(q[(int64_t(b) * n_heads + h * G + g) * HD + 8 * sub + i]) : 0.0f;
  float m[GMAX], l[GMAX], acc[GMAX][8];
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[g][i] = 0.0f;
  }
  const int64_t head_base = int64_t(b) * kv.seq_stride + int64_t(h) * kv.head_stride;
  // Rounds of kSlots tokens; every warp runs every round's shuffles (idle slots skip the work).
  for (int round = t0; round < t1; round += kSlots) {
    const int t = round + slot;
    const bool live = t < t1 && active;
    uint4 kr = make_uint4(0, 0, 0, 0), vr = make_uint4(0, 0, 0, 0);
    if (live) {
      kr = __ldg(reinterpret_cast<const uint4*>(kv.k + head_base + int64_t(t) * HD + 8 * sub));
      vr = __ldg(reinterpret_cast<const uint4*>(kv.v + head_base + int64_t(t) * HD + 8 * sub));
    }
    const uint32_t kw[4] = {kr.x, kr.y, kr.z, kr.w}, vw[4] = {vr.x, vr.y, vr.z, vr.w};
    float kf[8], vf[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      kf[i] = to_float<T>(uint16_t(kw[i / 2] >> (16 * (i % 2))));
      vf[i] = to_float<T>(uint16_t(vw[i / 2] >> (16 * (i % 2))));
    }
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
      if (g >= G) break;  // block-uniform
      float sc = 0.0f;
#pragma unroll
      for (int i = 0; i < 8; ++i) sc = fmaf(qv[g][i], kf[i], sc);
#pragma unroll
      for (int off = 8; off > 0; off /= 2) sc += __shfl_xor_sync(0xffffffffu, sc, off);
      if (!(t < t1)) continue;
      const float score = sc * scale;
      const float m_new = fmaxf(m[g], score);
      const float corr = m[g] == -INFINITY ? 0.0f : __expf(m[g] - m_new);
      const float w = __expf(score - m_new);
      l[g] = l[g] * corr + w;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[g][i] = fmaf(w, vf[i], acc[g][i] * corr);
      m[g] = m_new;
    }
  }
  // Merge the half-warps in order.
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    if (g >= G) break;
    if (sub == 0) {
      sm_m[slot * GMAX + g] = m[g];
      sm_l[slot * GMAX + g] = l[g];
    }
    if (active)
#pragma unroll
      for (int i = 0; i < 8; ++i) sm_acc[(slot * GMAX + g) * HD + 8 * sub + i] = acc[g][i];
  }
  __syncthreads();
  for (int e = int(threadIdx.x); e < G * HD; e += int(blockDim.x)) {
    const int g = e / HD, ch = e % HD;
    float mx = -INFINITY;
    for (int w = 0; w < kSlots; ++w) mx = fmaxf(mx, sm_m[w * GMAX + g]);
    float sum = 0.0f, o = 0.0f;
    for (int w = 0; w < kSlots; ++w) {
      if (sm_m[w * GMAX + g] == -INFINITY) continue;
      const float f = __expf(sm_m[w * GMAX + g] - mx);
      sum += f * sm_l[w * GMAX + g];
      o += f * sm_acc[(w * GMAX + g) * HD + ch];
    }
    float* dst = ws + ((int64_t(b) * n_heads + h * G + g) * splits + split) * (HD + 2);
    if (ch == 0) {
      dst[0] = mx;
      dst[1] = sum;
    }
    dst[2 + ch] = o;
  }
}

}  // namespace

int64_t kv_decode_workspace_bytes(int batch, int n_heads, int head_dim, int max_length, int split_tokens) {
  if (split_tokens <= 0 || max_length <= 0) return 0;
  const int64_t splits = (int64_t(max_length) + split_tokens - 1) / split_tokens;
  return int64_t(batch) * n_heads * splits * (head_dim + 2) * int64_t(sizeof(float));
}

Status can_implement_kv_decode(const KvDeviceCache& c, int batch, int n_heads, int max_length, int split_tokens,
                               int64_t workspace_bytes) {
  auto bad = [](std::string m) { return Status{StatusCode::invalid_argument, "kv_decode_attention: " + m}; };
  if (c.head_dim != 64 && c.head_dim != 80 && c.head_dim != 96 && c.head_dim != 128)
    return bad("head_dim " + std::to_string(c.head_dim) + " is not supported (64, 80, 96, 128)");
  for (int bits : {c.bits_k, c.bits_v})
    if (bits < 2 || bits > 4) return bad(std::to_string(bits) + " bits (supported: 2, 3, 4)");
  if (c.n_kv_heads <= 0 || n_heads <= 0 || n_heads % c.n_kv_heads != 0)
    return bad(std::to_string(n_heads) + " query heads are not a multiple of " + std::to_string(c.n_kv_heads) +
               " kv heads");
  if (n_heads / c.n_kv_heads > kMaxGroup)
    return bad("more than " + std::to_string(kMaxGroup) + " query heads per kv head");
  if (batch <= 0 || max_length <= 0 || split_tokens <= 0)
    return bad("batch, max_length and split_tokens must be positive");
  if (c.block_tokens <= 0 || c.slots < 0 || c.sink_tokens < 0)
    return bad("page size " + std::to_string(c.block_tokens) + ", outlier slots " + std::to_string(c.slots) +
               " or sink tokens " + std::to_string(c.sink_tokens) + " out of range");
  if (!c.pages || !c.block_tables || !c.lengths || !c.k_scale || !c.k_offset || !c.k_codebook || !c.v_codebook ||
      !c.storage || !c.rope_page_cos || !c.rope_page_sin || !c.rope_step_cos || !c.rope_step_sin ||
      (c.sink_tokens > 0 && (!c.sink_k || !c.sink_v)))
    return bad("a null cache pointer");
  if (c.rope_pages * c.block_tokens < max_length)
    return bad("the RoPE tables cover " + std::to_string(c.rope_pages) + " pages of " + std::to_string(c.block_tokens) +
               " tokens, fewer than max_length " + std::to_string(max_length));
  if (workspace_bytes < kv_decode_workspace_bytes(batch, n_heads, c.head_dim, max_length, split_tokens))
    return bad("workspace of " + std::to_string(workspace_bytes) + " bytes is too small (need " +
               std::to_string(kv_decode_workspace_bytes(batch, n_heads, c.head_dim, max_length, split_tokens)) + ")");
  // Warps take 16-token tiles, which must not straddle a page or a split, and copy their records with
  // 16-byte loads.
  if (c.block_tokens % kTile != 0 || c.block_tokens > kMaxPageTokens)
    return bad("page size " + std::to_string(c.block_tokens) + " tokens is not a multiple of 16 up to " +
               std::to_string(kMaxPageTokens));
  if (split_tokens % kTile != 0)
    return bad("split_tokens " + std::to_string(split_tokens) + " is not a multiple of 16");
  if (c.page_stride >= (int64_t(1) << 31))
    return bad("page_stride " + std::to_string(c.page_stride) + " bytes is 2 GiB or more");
  if (c.page_stride % 16 != 0 || reinterpret_cast<uintptr_t>(c.pages) % 16 != 0)
    return bad("pages must be 16-byte aligned with a page_stride (" + std::to_string(c.page_stride) +
               ") that is a multiple of 16");
  // sink_prologue scores the sink tokens through a warp's scratch of kMaxSinkTokens × kMaxGroup floats.
  if (c.sink_tokens > kMaxSinkTokens)
    return bad(std::to_string(c.sink_tokens) + " sink tokens (at most " + std::to_string(kMaxSinkTokens) + ")");
  return {};
}

namespace {


// One instantiation's launch (any group size up to kMaxGroup runs the same kernel; the query type is a
// run-time flag, read only outside the token loop); launch_decode picks it with with_head_dim/with_bits.
template <int HD, int KB, int VB>
Status launch_split(const KvDeviceCache& c, dim3 grid, int shared, cudaStream_t stream, int n_heads, const uint16_t* q,
                    bool bf16, float scale, int split_tokens, int splits, float* ws, const SplitLayout& lay) {
  // Above 48 KiB of dynamic shared memory a kernel must opt in (head dim 128, 32-token pages: ~87-91 KiB).
  if (Status s = detail::cuda_status(cudaFuncSetAttribute(split_kernel<HD, KB, VB>,
                                                          cudaFuncAttributeMaxDynamicSharedMemorySize, shared),
                                     "kv_decode_attention shared memory");
      !s.ok())
    return s;
  return detail::launch("kv_decode_attention split launch", split_kernel<HD, KB, VB>, grid, kWarps * 32, size_t(shared),
                        stream, c, n_heads, q, bf16, scale, split_tokens, splits, ws, lay);
}

// Run-time head dimension and widths to template arguments, for both kernels' launches
// (can_implement_* checked them; a width without a kernel is still refused, naming it).
template <class F>
Status with_head_dim(int head_dim, F&& f) {
  switch (head_dim) {
    case 64: return f(std::integral_constant<int, 64>{});
    case 80: return f(std::integral_constant<int, 80>{});
    case 96: return f(std::integral_constant<int, 96>{});
    default: return f(std::integral_constant<int, 128>{});
  }
}
template <class F>
Status with_bits(int bits, const char* what, F&& f) {
  switch (bits) {
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
  }
  return detail::invalid("kv_decode_attention: " + std::to_string(bits) + "-bit " + what + " have no kernel");
}

int round16(int64_t bytes) { return int((bytes + 15) / 16 * 16); }

// Shared memory of the split kernel: block tables, then one region per warp (records, decoded tiles),
// which after the token loop holds the warps' merge buffers.
SplitLayout split_layout(const KvDeviceCache& c, int group, int& total) {
  const Sizes sz = sizes_of(c);
  const int hd = c.head_dim;
  SplitLayout lay{};
  // Offsets count from the block's 1024-byte aligned start (split_kernel skips up to 1008 bytes to reach
  // it): the two lookup tables must sit at addresses whose low bits are zero (see table_load).
  int at = 0;
  lay.value_pairs = at;
  at += 256 * 4;
  lay.key_table = at;  // 1024-aligned, as table_load's addresses need (a table of 256 bytes at most per pair)
  at += round16(key_table_bytes(hd, c.bits_k));
  lay.step_rotations = at;
  at += round16(int64_t(c.block_tokens) * hd / 2 * 8);
  lay.queries = at;
  at += round16(int64_t(group) * hd * 4);
  int w = 0;
  lay.k_records = w;
  w += round16(int64_t(kTile) * sz.k_bytes);
  lay.v_records = w;
  w += round16(int64_t(kTile) * sz.v_bytes);
  lay.k_tile = w;
  w += round16(int64_t(kTile) * (hd + kKeyStride) * 2);
  lay.v_tile = w;
  w += round16(int64_t(kTile) * (hd + kKeyStride) * 2);
  lay.q_page = w;
  w += round16(int64_t(kMaxGroup) * (hd + kKeyStride) * 2);
  lay.v_scale = w;
  w += kTile * 8;
  // sink_prologue's scratch runs from the region's start over the record buffers and the K tile, short of
  // q_page (which holds zeros the loop relies on) at every head dimension.
  static_assert(kTile * (64 + kKeyStride) * 2 >= kMaxSinkTokens * kMaxGroup * 4, "sink scratch reaches q_page");
  const int merge = 4 * (2 * kWarps * kMaxGroup + kWarps * kMaxGroup * hd);
  lay.warp_bytes = std::max(w, round16((merge + kWarps - 1) / kWarps));
  lay.warps = at;
  total = at + kWarps * lay.warp_bytes + 1024;
  return lay;
}

template <class T>
Status launch_decode(const KvDeviceCache& c, int batch, int n_heads, const uint16_t* q, uint16_t* out, float scale,
                     int max_length, int split_tokens, float* ws, cudaStream_t stream) {
  const int G = n_heads / c.n_kv_heads;
  const int splits = (max_length + split_tokens - 1) / split_tokens;
  int shared = 0;
  const SplitLayout lay = split_layout(c, G, shared);
  const dim3 grid(unsigned(splits), unsigned(c.n_kv_heads), unsigned(batch));
  const bool bf16 = std::is_same_v<T, __nv_bfloat16>;
  const Status s = with_head_dim(c.head_dim, [&](auto hd) {
    return with_bits(c.bits_k, "keys", [&](auto kb) {
      return with_bits(c.bits_v, "values", [&](auto vb) {
        return launch_split<decltype(hd)::value, decltype(kb)::value, decltype(vb)::value>(
            c, grid, shared, stream, n_heads, q, bf16, scale, split_tokens, splits, ws, lay);
      });
    });
  });
  if (!s.ok()) return s;
  return detail::launch("kv_decode_attention merge launch", merge_kernel<T>, unsigned(batch * n_heads), 128, 0, stream,
                        c.lengths, c.head_dim, n_heads, splits, split_tokens, static_cast<const float*>(ws), out);
}

template <class T>
Status launch_dense(const DenseKvDevice& kv, int batch, int n_heads, const uint16_t* q, uint16_t* out, float scale,
                    int max_length, int split_tokens, float* ws, cudaStream_t stream) {
  const int G = n_heads / kv.n_kv_heads;
  const int gmax = G <= 1 ? 1 : G <= 2 ? 2 : G <= 4 ? 4 : 8;
  const int splits = (max_length + split_tokens - 1) / split_tokens;
  const size_t shared = sizeof(float) * size_t(2 * kWarps) * size_t(gmax) * size_t(2 + kv.head_dim);
  const dim3 grid(unsigned(splits), unsigned(kv.n_kv_heads), unsigned(batch));
  auto go = [&](auto gmax_c, auto hd_c) {
    return detail::launch("dense_kv_decode_attention split launch",
                          dense_split_kernel<decltype(gmax_c)::value, decltype(hd_c)::value, T>, grid, kWarps * 32,
                          shared, stream, kv, n_heads, q, scale, split_tokens, splits, ws);
  };
  auto with_hd = [&](auto gmax_c) { return with_head_dim(kv.head_dim, [&](auto hd_c) { return go(gmax_c, hd_c); }); };
  Status s = gmax == 1   ? with_hd(std::integral_constant<int, 1>{})
             : gmax == 2 ? with_hd(std::integral_constant<int, 2>{})
             : gmax == 4 ? with_hd(std::integral_constant<int, 4>{})
                         : with_hd(std::integral_constant<int, 8>{});
  if (!s.ok()) return s;
  return detail::launch("dense_kv_decode_attention merge launch", merge_kernel<T>, unsigned(batch * n_heads), 128, 0,
                        stream, kv.lengths, kv.head_dim, n_heads, splits, split_tokens, static_cast<const float*>(ws),
                        out);
}

}  // namespace

Status can_implement_dense_kv_decode(const DenseKvDevice& kv, int batch, int n_heads, int max_length, int split_tokens,
                                     int64_t workspace_bytes) {
  auto bad = [](std::string m) { return Status{StatusCode::invalid_argument, "dense_kv_decode_attention: " + m}; };
  if (kv.head_dim != 64 && kv.head_dim != 80 && kv.head_dim != 96 && kv.head_dim != 128)
    return bad("head_dim " + std::to_string(kv.head_dim) + " is not supported (64, 80, 96, 128)");
  if (kv.n_kv_heads <= 0 || n_heads <= 0 || n_heads % kv.n_kv_heads != 0 || n_heads / kv.n_kv_heads > kMaxGroup)
    return bad(std::to_string(n_heads) + " query heads over " + std::to_string(kv.n_kv_heads) +
               " kv heads (a multiple, at most " + std::to_string(kMaxGroup) + " per kv head)");
  if (batch <= 0 || max_length <= 0 || split_tokens <= 0) return bad("batch, max_length and split_tokens must be positive");
  if (!kv.k || !kv.v || !kv.lengths) return bad("a null k, v or lengths");
  // 16-byte loads of 8 channels: rows and strides in multiples of 8 elements.
  if (reinterpret_cast<uintptr_t>(kv.k) % 16 || reinterpret_cast<uintptr_t>(kv.v) % 16 || kv.seq_stride % 8 ||
      kv.head_stride % 8)
    return bad("k and v must be 16-byte aligned with strides of a multiple of 8 elements");
  if (kv.head_stride < int64_t(max_length) * kv.head_dim)
    return bad("head_stride " + std::to_string(kv.head_stride) + " cannot hold max_length " + std::to_string(max_length) +
               " tokens");
  if (workspace_bytes < kv_decode_workspace_bytes(batch, n_heads, kv.head_dim, max_length, split_tokens))
    return bad("workspace of " + std::to_string(workspace_bytes) + " bytes is too small (need " +
               std::to_string(kv_decode_workspace_bytes(batch, n_heads, kv.head_dim, max_length, split_tokens)) + ")");
  return {};
}

Status dense_kv_decode_attention(const DenseKvDevice& kv, int batch, int n_heads, const uint16_t* q, uint16_t* out,
                                 float scale, int max_length, int split_tokens, void* workspace, int64_t workspace_bytes,
                                 cudaStream_t stream, ActivationType type) {
  if (Status s = can_implement_dense_kv_decode(kv, batch, n_heads, max_length, split_tokens, workspace_bytes); !s.ok())
    return s;
  if (!q || !out || !workspace) return {StatusCode::invalid_argument, "dense_kv_decode_attention: null q, out or workspace"};
  auto* ws = static_cast<float*>(workspace);
  return type == ActivationType::bf16
             ? launch_dense<__nv_bfloat16>(kv, batch, n_heads, q, out, scale, max_length, split_tokens, ws, stream)
             : launch_dense<__half>(kv, batch, n_heads, q, out, scale, max_length, split_tokens, ws, stream);
}

Status kv_decode_attention(const KvDeviceCache& c, int batch, int n_heads, const uint16_t* q, uint16_t* out, float scale,
                           int max_length, int split_tokens, void* workspace, int64_t workspace_bytes,
                           cudaStream_t stream, ActivationType type) {
  if (Status s = can_implement_kv_decode(c, batch, n_heads, max_length, split_tokens, workspace_bytes); !s.ok()) return s;
  if (!q || !out || !workspace) return {StatusCode::invalid_argument, "kv_decode_attention: null q, out or workspace"};
  auto* ws = static_cast<float*>(workspace);
  return type == ActivationType::bf16
             ? launch_decode<__nv_bfloat16>(c, batch, n_heads, q, out, scale, max_length, split_tokens, ws, stream)
             : launch_decode<__half>(c, batch, n_heads, q, out, scale, max_length, split_tokens, ws, stream);
}

}  // namespace nuq::cuda

