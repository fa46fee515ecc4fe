// Split-K flash decoding over the quantized KV cache (include/nuq/kv_cuda.hpp, docs/kv-cache.md).
//
// Kernel 1: one block per (context split, kv head, sequence); its warps take the split's tokens in turn,
// decode a key into shared memory (codebook, per-channel scale/offset, fp16 outlier residuals, fp16 sink),
// rotate it (RoPE from fp32 tables: page base times in-page step, no double precision), score it against
// the G query heads of the kv head (warp reductions), and fold value rows (dequantized per lane) into
// running softmax states kept in registers; the warps' states are merged in warp order and written as the
// split's partial (max, sum, weighted sum). Kernel 2 merges a sequence's splits in split order into
// fp16/bf16 outputs. Group size and head dimension are template arguments, so that the per-lane states are
// registers (no local memory); the launcher is the one place where run-time values become them.
//
// NOT yet run on a GPU; run in CI under emulation. What a GPU run must check, and what is left to make it
// fast (tensor cores for grouped queries, 16-byte record loads), is listed in docs/kv-cache.md.
#include <cuda_runtime.h>

#include <cmath>
#include <string>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "nuq/half.hpp"
#include "nuq/kv_cuda.hpp"
#include "portable.cuh"

namespace nuq::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxGroup = 8;      // query heads per kv head held in registers

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

// cos and sin of RoPE pair `pair` at position t: the page base times the in-page step, in fp32.
__device__ __forceinline__ void rope_at(const KvDeviceCache& c, int64_t t, int pair, int half, float& cs, float& sn) {
  const int64_t page = t / c.block_tokens, step = t % c.block_tokens;
  const float bc = c.rope_page_cos[page * half + pair], bs = c.rope_page_sin[page * half + pair];
  const float sc = c.rope_step_cos[step * half + pair], ss = c.rope_step_sin[step * half + pair];
  cs = fmaf(bc, sc, -bs * ss);
  sn = fmaf(bs, sc, bc * ss);
}

__device__ inline float load_fp16(const uint8_t* p) { return fp16_to_float(uint16_t(p[0] | (p[1] << 8))); }

// Index of channel p: groups of 16 channels in 2b bytes (docs/kv-cache.md, "Index packing").
__device__ inline int field(const uint8_t* rec, int p, int b) {
  const uint8_t* g = rec + (p / 16) * 2 * b;
  const int r = p % 16;
  const uint32_t lo = uint32_t(g[0]) | uint32_t(g[1]) << 8 | uint32_t(g[2]) << 16 | uint32_t(g[3]) << 24;
  if (b == 2) return int(lo >> (2 * r)) & 3;
  if (b == 3) return (int(lo >> (2 * r)) & 3) | (((g[4 + r / 8] >> (r % 8)) & 1) << 2);
  const uint32_t hi = uint32_t(g[4]) | uint32_t(g[5]) << 8 | uint32_t(g[6]) << 16 | uint32_t(g[7]) << 24;
  return int(((r % 2) ? hi : lo) >> (4 * (r / 2))) & 15;
}

struct Sizes {
  int k_index, k_bytes, v_index, v_bytes;
  int64_t v_region;
};

__device__ inline Sizes sizes_of(const KvDeviceCache& c) {
  Sizes s;
  s.k_index = c.head_dim * c.bits_k / 8;
  s.k_bytes = s.k_index + 3 * c.slots;
  s.v_index = c.head_dim * c.bits_v / 8;
  s.v_bytes = 4 + s.v_index + 3 * c.slots;
  s.v_region = int64_t(c.n_kv_heads) * c.block_tokens * s.k_bytes;
  return s;
}

// GMAX bounds the group size G = n_heads / n_kv_heads (1, 2, 4 or 8: per-lane states are GMAX registers).
template <int GMAX, int HD, class T>
__global__ void __launch_bounds__(kWarps * 32, 4)
    split_kernel(KvDeviceCache c, int n_heads, const uint16_t* __restrict__ q, float scale, int split_tokens,
                 int splits, float* __restrict__ ws) {
  constexpr int kPerLane = (HD + 31) / 32;  // value channels lane + 32j of a lane
  float* smem = detail::dynamic_shared<float>();
  constexpr int hd = HD;
  const int G = n_heads / c.n_kv_heads;
  float* qs = smem;                          // [G][hd], storage order, rotated
  float* kw = qs + G * hd;                   // [kWarps][hd]
  float* wm = kw + kWarps * hd;              // [kWarps][G]
  float* wl = wm + kWarps * G;               // [kWarps][G]
  float* wacc = wl + kWarps * G;             // [kWarps][G][hd]
  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int len = c.lengths[b];
  const int t0 = split * split_tokens, t1 = min(len, t0 + split_tokens);
  const Sizes sz = sizes_of(c);

  // Queries of this kv head's group, rotated to position len - 1, in key storage order.
  for (int e = threadIdx.x; e < G * (hd / 2); e += blockDim.x) {
    const int g = e / (hd / 2), pair = e % (hd / 2), blk = pair / 8, r = pair % 8;
    const int pa = 16 * blk + r, pb = pa + 8;
    const uint16_t* qh = q + (int64_t(b) * n_heads + h * G + g) * hd;
    const float xa = to_float<T>(qh[c.storage[pa]]), xb = to_float<T>(qh[c.storage[pb]]);
    float cs, sn;
    rope_at(c, len - 1, pair, hd / 2, cs, sn);
    qs[g * hd + pa] = xa * cs - xb * sn;
    qs[g * hd + pb] = xa * sn + xb * cs;
  }
  __syncthreads();

  float m[GMAX], l[GMAX], acc[GMAX][kPerLane];
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    m[g] = -INFINITY;
    l[g] = 0;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) acc[g][j] = 0;
  }
  float* kbuf = kw + warp * hd;
  // Warps take the split's tokens in turn. In the last round some warps may have no token left: they
  // still run every shuffle and barrier of the round and only skip the work, so that all warps of the
  // block execute the same sequence of warp operations (the emulated build requires it; kernels/emulation).
  for (int round = t0; round < t1; round += kWarps) {
    const int t = round + warp;
    const bool live = t < t1;
    const uint8_t* page = live ? c.pages + int64_t(c.block_tables[int64_t(b) * c.max_blocks + t / c.block_tokens]) * c.page_stride : nullptr;
    const int tin = t % c.block_tokens;
    const uint8_t* krec = live ? page + (int64_t(h) * c.block_tokens + tin) * sz.k_bytes : nullptr;
    const uint8_t* vrec = live ? page + sz.v_region + (int64_t(h) * c.block_tokens + tin) * sz.v_bytes : nullptr;
    const bool sink = t < c.sink_tokens;
    const int64_t sink_at = ((int64_t(b) * c.sink_tokens + t) * c.n_kv_heads + h) * hd;
    if (live)
      for (int p = lane; p < hd; p += 32)
        kbuf[p] = sink ? fp16_to_float(c.sink_k[sink_at + p])
                       : fmaf(c.k_codebook[field(krec, p, c.bits_k)], c.k_scale[h * hd + p], c.k_offset[h * hd + p]);
    __syncwarp();
    if (live && !sink && lane == 0)
      for (int s = 0; s < c.slots; ++s) kbuf[krec[sz.k_index + s]] += load_fp16(krec + sz.k_index + c.slots + 2 * s);
    __syncwarp();
    float part[GMAX];
#pragma unroll
    for (int g = 0; g < GMAX; ++g) part[g] = 0;
    float vrow[kPerLane];
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) vrow[j] = 0;
    if (live) {
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        const int p = lane + 32 * j;
        if (p >= hd) continue;
        const int pair = p / 16 * 8 + p % 8;
        const bool first = p % 16 < 8;
        float cs, sn;
        rope_at(c, t, pair, hd / 2, cs, sn);
        const float x = kbuf[p], y = kbuf[first ? p + 8 : p - 8];
        const float r = first ? x * cs - y * sn : y * sn + x * cs;
#pragma unroll
        for (int g = 0; g < GMAX; ++g)
          if (g < G) part[g] += qs[g * hd + p] * r;
      }
      const float vs = sink ? 1.0f : load_fp16(vrec), vo = sink ? 0.0f : load_fp16(vrec + 2);
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        const int ch = lane + 32 * j;
        if (ch >= hd) continue;
        if (sink) {
          vrow[j] = fp16_to_float(c.sink_v[sink_at + ch]);
        } else {
          vrow[j] = fmaf(c.v_codebook[field(vrec + 4, ch, c.bits_v)], vs, vo);
          for (int s = 0; s < c.slots; ++s)
            if (vrec[4 + sz.v_index + s] == ch) vrow[j] += load_fp16(vrec + 4 + sz.v_index + c.slots + 2 * s);
        }
      }
    }
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
      if (g >= G) break;  // block-uniform: every warp runs the same shuffles
      float sum = part[g];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      if (!live) continue;
      const float score = sum * scale;
      const float m_new = fmaxf(m[g], score);
      const float corr = m[g] == -INFINITY ? 0.0f : __expf(m[g] - m_new);
      const float w = __expf(score - m_new);
      l[g] = l[g] * corr + w;
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) acc[g][j] = acc[g][j] * corr + w * vrow[j];
      m[g] = m_new;
    }
    __syncwarp();
  }
  // Merge the warps in order.
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    if (g >= G) break;
    if (lane == 0) {
      wm[warp * G + g] = m[g];
      wl[warp * G + g] = l[g];
    }
#pragma unroll
    for (int j = 0; j < kPerLane; ++j)
      if (lane + 32 * j < hd) wacc[(warp * G + g) * hd + lane + 32 * j] = acc[g][j];
  }
  __syncthreads();
  for (int e = threadIdx.x; e < G * hd; e += blockDim.x) {
    const int g = e / hd, ch = e % hd;
    float mx = -INFINITY;
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, wm[w * G + g]);
    float sum = 0, o = 0;
    for (int w = 0; w < kWarps; ++w) {
      if (wm[w * G + g] == -INFINITY) continue;
      const float f = __expf(wm[w * G + g] - mx);
      sum += f * wl[w * G + g];
      o += f * wacc[(w * G + g) * hd + ch];
    }
    float* dst = ws + ((int64_t(b) * n_heads + h * G + g) * splits + split) * (hd + 2);
    if (ch == 0) {
      dst[0] = mx;
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
template <int GMAX, int HD, class T>
__global__ void __launch_bounds__(kWarps * 32, 4)
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
  return {};
}

namespace {

// The one place where the run-time group size, head dimension and query type become template arguments.
template <int GMAX, int HD, class T>
Status launch_split(const KvDeviceCache& c, dim3 grid, size_t shared, cudaStream_t stream, int n_heads, const uint16_t* q,
                    float scale, int split_tokens, int splits, float* ws) {
  return detail::launch("kv_decode_attention split launch", split_kernel<GMAX, HD, T>, grid, kWarps * 32, shared, stream,
                        c, n_heads, q, scale, split_tokens, splits, ws);
}

template <int GMAX, class T>
Status launch_split_hd(const KvDeviceCache& c, dim3 grid, size_t shared, cudaStream_t stream, int n_heads,
                       const uint16_t* q, float scale, int split_tokens, int splits, float* ws) {
  switch (c.head_dim) {
    case 64: return launch_split<GMAX, 64, T>(c, grid, shared, stream, n_heads, q, scale, split_tokens, splits, ws);
    case 80: return launch_split<GMAX, 80, T>(c, grid, shared, stream, n_heads, q, scale, split_tokens, splits, ws);
    case 96: return launch_split<GMAX, 96, T>(c, grid, shared, stream, n_heads, q, scale, split_tokens, splits, ws);
    default: return launch_split<GMAX, 128, T>(c, grid, shared, stream, n_heads, q, scale, split_tokens, splits, ws);
  }
}

template <class T>
Status launch_decode(const KvDeviceCache& c, int batch, int n_heads, const uint16_t* q, uint16_t* out, float scale,
                     int max_length, int split_tokens, float* ws, cudaStream_t stream) {
  const int G = n_heads / c.n_kv_heads, hd = c.head_dim;
  const int splits = (max_length + split_tokens - 1) / split_tokens;
  const size_t shared = sizeof(float) * size_t(G * hd + kWarps * hd + 2 * kWarps * G + kWarps * G * hd);
  const dim3 grid(unsigned(splits), unsigned(c.n_kv_heads), unsigned(batch));
  Status s;
  if (G <= 1) s = launch_split_hd<1, T>(c, grid, shared, stream, n_heads, q, scale, split_tokens, splits, ws);
  else if (G <= 2) s = launch_split_hd<2, T>(c, grid, shared, stream, n_heads, q, scale, split_tokens, splits, ws);
  else if (G <= 4) s = launch_split_hd<4, T>(c, grid, shared, stream, n_heads, q, scale, split_tokens, splits, ws);
  else s = launch_split_hd<8, T>(c, grid, shared, stream, n_heads, q, scale, split_tokens, splits, ws);
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
  auto with_hd = [&](auto gmax_c) {
    switch (kv.head_dim) {
      case 64: return go(gmax_c, std::integral_constant<int, 64>{});
      case 80: return go(gmax_c, std::integral_constant<int, 80>{});
      case 96: return go(gmax_c, std::integral_constant<int, 96>{});
      default: return go(gmax_c, std::integral_constant<int, 128>{});
    }
  };
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
