// The LLaMA-family decoder of include/nuq/llama.hpp: loaders for llama2.c, GGUF and safetensors
// checkpoints (full precision or nuq-packed), and a straightforward forward pass.
#include "nuq/llama.hpp"

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>

#include "cpu/thread_pool.hpp"
#include "cpu_features.hpp"
#include "dense_ops.hpp"
#include "nuq/error.hpp"
#include "nuq/gguf.hpp"
#include "nuq/inspect.hpp"
#include "nuq/kv_cache.hpp"
#include "nuq/linear_cpu.hpp"
#include "nuq/llama_grad.hpp"
#include "nuq/mapped_file.hpp"
#include "nuq/packed.hpp"
#include "nuq/safetensors.hpp"
#include "nuq/tensor.hpp"
#include "tensor_names.hpp"

namespace nuq {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;

// Splits [0, n) into at most `threads` contiguous chunks (aligned to `grain`) on the CPU kernels' persistent
// pool: a decode step runs ~7 matrix products per layer, too short to pay for starting threads.
void parallel_for(int threads, int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  const int64_t chunks = std::min<int64_t>(threads, (n + grain - 1) / grain);
  if (chunks <= 1) return fn(0, n);
  struct Context {
    const std::function<void(int64_t, int64_t)>* fn;
    int64_t n, per;
  } ctx{&fn, n, ((n + grain - 1) / grain + chunks - 1) / chunks * grain};
  cpu::detail::parallel_for(chunks, threads, [](void* c, int64_t t, int) {
    const auto& x = *static_cast<Context*>(c);
    const int64_t b = std::min(x.n, t * x.per), e = std::min(x.n, (t + 1) * x.per);
    if (b < e) (*x.fn)(b, e);
  }, &ctx);
}

// ---- dense fp32 products Y = X·Wᵀ ------------------------------------------------------------------
// Both X rows and W rows are contiguous along the reduction, so the kernels are tiles of dot products:
// NT tokens × NR weight rows held in registers, each W row read once per NT tokens. The library is
// built for baseline x86-64, so the wide versions are compiled per function with target attributes and
// chosen at run time.

// Horizontal sum by halving: one sum per output, so at k = 576 (SmolLM2) it is a real share of a tile;
// adding the 16 lanes through memory one after another made SmolLM2's prefill 8–10% slower (528 vs
// 570–580 tokens/s, `nuq eval --max-tokens 1022`). GCC 12 warns
// about the deliberately undefined pass-through operands inside its own AVX-512 headers
// (_mm512_undefined_ps), not about this code.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
__attribute__((target("avx512f,fma"))) inline float hsum512(__m512 v) {
  v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(1, 0, 3, 2)));
  v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(2, 3, 0, 1)));
  v = _mm512_add_ps(v, _mm512_permute_ps(v, _MM_SHUFFLE(1, 0, 3, 2)));
  v = _mm512_add_ps(v, _mm512_permute_ps(v, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm512_cvtss_f32(v);
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

template <int NT, int NR>
__attribute__((target("avx512f,fma"))) void tile_avx512(const float* x, int64_t ldx, const float* w, int64_t ldw,
                                                        int64_t k, float* y, int64_t ldy) {
  __m512 acc[NT][NR];
  for (int i = 0; i < NT; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 16 <= k; c += 16) {
    __m512 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = _mm512_loadu_ps(w + j * ldw + c);
    for (int i = 0; i < NT; ++i) {
      const __m512 xv = _mm512_loadu_ps(x + i * ldx + c);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  if (c < k) {
    const __mmask16 m = __mmask16((1u << (k - c)) - 1);
    __m512 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = _mm512_maskz_loadu_ps(m, w + j * ldw + c);
    for (int i = 0; i < NT; ++i) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, x + i * ldx + c);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < NT; ++i)
    for (int j = 0; j < NR; ++j) y[i * ldy + j] = hsum512(acc[i][j]);
}

__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int NT, int NR>
__attribute__((target("avx2,fma"))) void tile_avx2(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t k,
                                                   float* y, int64_t ldy) {
  __m256 acc[NT][NR];
  for (int i = 0; i < NT; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= k; c += 8) {
    __m256 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = _mm256_loadu_ps(w + j * ldw + c);
    for (int i = 0; i < NT; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + i * ldx + c);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < NT; ++i)
    for (int j = 0; j < NR; ++j) {
      float s = hsum256(acc[i][j]);
      for (int64_t cc = c; cc < k; ++cc) s += x[i * ldx + cc] * w[j * ldw + cc];
      y[i * ldy + j] = s;
    }
}

template <int NT, int NR>
void tile_scalar(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t k, float* y, int64_t ldy) {
  for (int i = 0; i < NT; ++i)
    for (int j = 0; j < NR; ++j) {
      float s = 0;
      for (int64_t c = 0; c < k; ++c) s += x[i * ldx + c] * w[j * ldw + c];
      y[i * ldy + j] = s;
    }
}

enum class Simd { scalar, avx2, avx512 };

Simd detect_simd() {
  const auto& f = detail::cpu_features();
  if (f.avx512f && f.fma) return Simd::avx512;
  if (f.avx2 && f.fma) return Simd::avx2;
  return Simd::scalar;
}

template <int NT, int NR>
void tile(Simd s, const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t k, float* y, int64_t ldy) {
  switch (s) {
    case Simd::avx512: return tile_avx512<NT, NR>(x, ldx, w, ldw, k, y, ldy);
    case Simd::avx2: return tile_avx2<NT, NR>(x, ldx, w, ldw, k, y, ldy);
    case Simd::scalar: return tile_scalar<NT, NR>(x, ldx, w, ldw, k, y, ldy);
  }
}

// Rows [r0, r1) of Y = X·Wᵀ: X [n, k] (stride ldx), W [rows, k] (stride ldw), Y [n, ldy]. Every output is
// one tile's sum whatever the number of tokens in the call, so a prefill and the same tokens fed in steps
// of any length get bit-identical products (tests rely on it, e.g. a quantized-cache prefill vs steps).
void matmul_rows(Simd s, const float* x, int64_t n, int64_t ldx, const float* w, int64_t ldw, int64_t k, int64_t r0,
                 int64_t r1, float* y, int64_t ldy) {
  using Tile = void (*)(Simd, const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t);
  static constexpr Tile tiles[4][4] = {
      {tile<1, 1>, tile<1, 2>, tile<1, 3>, tile<1, 4>},
      {tile<2, 1>, tile<2, 2>, tile<2, 3>, tile<2, 4>},
      {tile<3, 1>, tile<3, 2>, tile<3, 3>, tile<3, 4>},
      {tile<4, 1>, tile<4, 2>, tile<4, 3>, tile<4, 4>},
  };
  for (int64_t r = r0; r < r1; r += 4) {
    const int nr = int(std::min<int64_t>(4, r1 - r));
    for (int64_t t = 0; t < n; t += 4) {
      const int nt = int(std::min<int64_t>(4, n - t));
      tiles[nt - 1][nr - 1](s, x + t * ldx, ldx, w + r * ldw, ldw, k, y + t * ldy + r, ldy);
    }
  }
}

// out[i] = Σ_j p[j] · v[j·ldv + i] for i < d: attention's P·V for one query and head, V rows contiguous.
void weighted_sum_tail(const float* p, int64_t len, const float* v, int64_t ldv, int64_t i0, int64_t d, float* out) {
  for (int64_t i = i0; i < d; ++i) {
    float s = 0;
    for (int64_t j = 0; j < len; ++j) s += p[j] * v[j * ldv + i];
    out[i] = s;
  }
}

__attribute__((target("avx512f,fma"))) void weighted_sum_avx512(const float* p, int64_t len, const float* v,
                                                                  int64_t ldv, int64_t d, float* out) {
  // Up to 64 output channels per pass stay in registers while the rows stream by.
  for (int64_t i0 = 0; i0 < d; i0 += 64) {
    __mmask16 m[4];
    __m512 acc[4];
    for (int c = 0; c < 4; ++c) {
      const int64_t left = std::clamp<int64_t>(d - i0 - 16 * c, 0, 16);
      m[c] = __mmask16((1u << left) - 1);
      acc[c] = _mm512_setzero_ps();
    }
    for (int64_t j = 0; j < len; ++j) {
      const __m512 pj = _mm512_set1_ps(p[j]);
      const float* row = v + j * ldv + i0;
      for (int c = 0; c < 4; ++c) acc[c] = _mm512_fmadd_ps(pj, _mm512_maskz_loadu_ps(m[c], row + 16 * c), acc[c]);
    }
    for (int c = 0; c < 4; ++c) _mm512_mask_storeu_ps(out + i0 + 16 * c, m[c], acc[c]);
  }
}

__attribute__((target("avx2,fma"))) void weighted_sum_avx2(const float* p, int64_t len, const float* v, int64_t ldv,
                                                           int64_t d, float* out) {
  int64_t i0 = 0;
  for (; i0 + 32 <= d; i0 += 32) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t j = 0; j < len; ++j) {
      const __m256 pj = _mm256_set1_ps(p[j]);
      for (int c = 0; c < 4; ++c) acc[c] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + j * ldv + i0 + 8 * c), acc[c]);
    }
    for (int c = 0; c < 4; ++c) _mm256_storeu_ps(out + i0 + 8 * c, acc[c]);
  }
  weighted_sum_tail(p, len, v, ldv, i0, d, out);
}

void weighted_sum(Simd s, const float* p, int64_t len, const float* v, int64_t ldv, int64_t d, float* out) {
  switch (s) {
    case Simd::avx512: return weighted_sum_avx512(p, len, v, ldv, d, out);
    case Simd::avx2: return weighted_sum_avx2(p, len, v, ldv, d, out);
    case Simd::scalar: return weighted_sum_tail(p, len, v, ldv, 0, d, out);
  }
}

// Causal attention of n new tokens at positions pos0 .. pos0 + n − 1 over a cache of pos0 + n keys and
// values ([position][kv head][head_dim], RoPE applied), written to att [n, n_heads · head_dim]. Work items
// are (block of up to 16 tokens, head): the block's scores come from the dense tiles (each key row read
// once per 4 tokens), then per token a softmax over its own prefix and P·V. Blocks are visited first,
// last, second, second-to-last... so that the contiguous chunks parallel_for hands each thread carry
// similar amounts of the triangular work.
void causal_attention(Simd simd, int threads, const float* q, int64_t n, int64_t pos0, const float* kc,
                      const float* vc, const LlamaConfig& c, float* att) {
  const int64_t hd = c.head_dim, qd = c.n_heads * hd, kvd = c.n_kv_heads * hd, group = c.n_heads / c.n_kv_heads;
  constexpr int64_t kBlock = 16;
  const int64_t blocks = (n + kBlock - 1) / kBlock, ctx = pos0 + n;
  const float scale = float(1.0 / std::sqrt(double(hd)));
  parallel_for(threads, blocks * c.n_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(std::size_t(kBlock * ctx));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item % c.n_heads, k = item / c.n_heads, kvh = h / group;
      const int64_t block = k % 2 == 0 ? k / 2 : blocks - 1 - k / 2;
      const int64_t t0 = block * kBlock, t1 = std::min(n, t0 + kBlock), keys = pos0 + t1;
      matmul_rows(simd, q + t0 * qd + h * hd, t1 - t0, qd, kc + kvh * hd, kvd, hd, 0, keys, scores.data(), ctx);
      for (int64_t t = t0; t < t1; ++t) {
        float* s = &scores[std::size_t((t - t0) * ctx)];
        const int64_t len = pos0 + t + 1;
        float mx = -INFINITY;
        for (int64_t j = 0; j < len; ++j) mx = std::max(mx, s[j] *= scale);
        float sum = 0;
        for (int64_t j = 0; j < len; ++j) sum += s[j] = std::exp(s[j] - mx);
        const float inv = 1.0f / sum;
        for (int64_t j = 0; j < len; ++j) s[j] *= inv;
        weighted_sum(simd, s, len, vc + kvh * hd, kvd, hd, att + t * qd + h * hd);
      }
    }
  });
}

// ---- weights -------------------------------------------------------------------------------------------

// A weight matrix read in place from the checkpoint's mapping, in the type it is stored in. Products
// convert a few rows at a time to fp32 right before the tiles use them (exactly: fp16/bf16 widen, ggml
// blocks decode as ggml does), so a model costs its file's bytes instead of 4 per weight, and the numbers
// are those of the same model converted to fp32 at load: the tiles see the same values in the same order.
struct StoredMatrix {
  const std::byte* data = nullptr;
  GgmlType type = GgmlType::F32;
  uint64_t row_bytes = 0;

  // fp32 rows that need no conversion (llama2.c files, fp32 safetensors): the tiles read the mapping.
  bool fp32_in_place() const {
    return type == GgmlType::F32 && reinterpret_cast<uintptr_t>(data) % alignof(float) == 0;
  }
  std::span<const std::byte> bytes(int64_t rows) const { return {data, std::size_t(row_bytes * uint64_t(rows))}; }
};

// Rows [r0, r1) of a packed layer as a layer of their own, for decoding a few rows at a time. The sparse
// row pointers keep indexing the whole layer's column and value arrays (decoders read the nonzeros of
// row r from row_ptr[r] to row_ptr[r + 1]), so nothing is copied.
format::PackedLinearView packed_rows(const format::PackedLinearView& w, int64_t r0, int64_t r1) {
  format::PackedLinearView s = w;
  s.rows = r1 - r0;
  s.qweight = w.qweight + r0 * w.row_stride();
  s.lut = w.lut + r0 * w.groups() * format::lut_entries(w.bits);
  if (w.nnz > 0) {
    s.sparse_row_ptr = w.sparse_row_ptr + r0;
    s.nnz = int64_t(w.sparse_row_ptr[r1]) - w.sparse_row_ptr[r0];
    if (s.nnz == 0) s.sparse_row_ptr = nullptr, s.sparse_col_idx = nullptr, s.sparse_values = nullptr;
  }
  return s;
}

struct Linear {
  std::string name;  // base name in the checkpoint's naming
  int64_t rows = 0, cols = 0;
  std::vector<float> dense;  // [rows, cols] fp32 copy (LlamaLoadOptions::fp32_weights, replaced weights)
  std::optional<StoredMatrix> stored;  // else the checkpoint's own bytes (Impl::keep_alive holds the mapping)
  std::optional<format::PackedLinearView> packed;  // or a nuq-packed layer in the mapping, run by the packed kernels
  int64_t backend_id = -1;  // LinearBackend::add_layer's id when `packed` runs on Impl::backend
  // `packed`'s codebooks as int8 arithmetic uses them, converted once at load (prepare_int8_codebooks)
  // when that arithmetic runs the layer; the kernel would otherwise convert them on every call.
  std::shared_ptr<const cpu::Int8Codebooks> int8_codebooks;
  uint64_t stored_bytes = 0;  // in the checkpoint (packed layers: every part counted)

  // W's fp32 rows as they lie in memory, or null when they have to be converted (or decoded) first.
  const float* fp32_in_place() const {
    if (!dense.empty()) return dense.data();
    if (stored && stored->fp32_in_place()) return reinterpret_cast<const float*>(stored->data);
    return nullptr;
  }
  // Rows [r0, r1) as fp32: in place when possible, else converted (or decoded, bit-identical to the
  // reference dequantizer) into `scratch` ((r1 − r0)·cols floats).
  const float* fp32_rows(int64_t r0, int64_t r1, float* scratch) const {
    if (const float* w = fp32_in_place()) return w + r0 * cols;
    if (packed) {
      cpu::dequantize_dense(packed_rows(*packed, r0, r1), scratch, cols, {1, std::nullopt});
      return scratch;
    }
    NUQ_CHECK(stored.has_value(), Errc::internal, "layer '{}' has no full-precision weights", name);
    ggml_dequantize(stored->type, stored->data + uint64_t(r0) * stored->row_bytes, scratch, (r1 - r0) * cols);
    return scratch;
  }
  // W as fp32, decoded when packed (for exports).
  std::vector<float> decoded() const {
    if (!dense.empty()) return dense;
    std::vector<float> out(std::size_t(rows * cols));
    if (packed) {
      dequantize_reference(*packed, out.data());
    } else if (const float* w = fp32_rows(0, rows, out.data()); w != out.data()) {
      std::memcpy(out.data(), w, out.size() * sizeof(float));
    }
    return out;
  }
};

struct Block {
  std::vector<float> attn_norm, ffn_norm;
  Linear q, k, v, o, gate, up, down;

  // In LlamaLinearKind order, so index i is the kind i that hooks, plans and gradients use.
  std::array<Linear*, kLlamaLinearKinds> linears() { return {&q, &k, &v, &o, &gate, &up, &down}; }
  std::array<const Linear*, kLlamaLinearKinds> linears() const { return {&q, &k, &v, &o, &gate, &up, &down}; }
};

}  // namespace

struct LlamaModel::Impl {
  LlamaConfig config;
  std::string description;
  std::string tokenizer_path;
  Linear embedding;   // [vocab, dim]
  Linear classifier;  // [vocab, dim] when not tied
  std::vector<float> final_norm;
  std::vector<Block> blocks;
  ActivationHook hook;
  KvHook kv_hook;
  Simd simd = detect_simd();
  int threads = 1;
  cpu::Arithmetic arithmetic = cpu::Arithmetic::exact;
  bool release_weights = false;            // LlamaLoadOptions::release_weights, resolved
  std::shared_ptr<const void> keep_alive;  // the mapped checkpoint that stored and packed layers point into
  std::shared_ptr<LinearBackend> backend;  // runs the packed layers when set

  const Linear& classifier_weights() const { return config.tied_classifier ? embedding : classifier; }

  // A block's linear layer: the activation hook sees its input, then run().
  void apply(const Linear& l, const float* x, int64_t n, float* y) const {
    if (hook) hook(l.name, x, n, l.cols);
    run(l, x, n, y);
  }

  // y [n, rows] = x [n, cols] · Wᵀ in the layer's own format.
  void run(const Linear& l, const float* x, int64_t n, float* y) const {
    if (l.backend_id >= 0) return backend->run(l.backend_id, x, n, y);
    if (l.packed && n <= cpu::kMaxFusedBatch)
      return cpu::linear(*l.packed, x, l.cols, y, l.rows, n,
                         {threads, std::nullopt, arithmetic, l.int8_codebooks.get()});
    // Prefill of a packed layer: each thread decodes a slab of rows at a time (bit-identical to the
    // reference dequantizer; ~64 KiB, at least 4 rows) into the dense tiles below, built for the CPU's
    // widest ISA unlike the library's baseline-ISA GEMM, so the scratch does not grow with the layer.
    multiply(l, x, n, y);
  }

  // y [n, rows] = x [n, cols] · Wᵀ for fp32 weights in memory.
  void multiply(const float* w, int64_t rows, int64_t cols, const float* x, int64_t n, float* y) const {
    parallel_for(threads, rows, 4, [&](int64_t r0, int64_t r1) {
      matmul_rows(simd, x, n, cols, w, cols, cols, r0, r1, y, rows);
    });
  }

  // The same for a full-precision layer in any stored type: each thread converts its rows a slab at a
  // time (about 64 KiB of fp32, a multiple of the tiles' 4 rows so that every output is the same tile's
  // sum as with the whole matrix in fp32) and multiplies the slab while it is in cache.
  void multiply(const Linear& l, const float* x, int64_t n, float* y) const {
    if (const float* w = l.fp32_in_place()) return multiply(w, l.rows, l.cols, x, n, y);
    const int64_t slab = std::max<int64_t>(4, (16384 / l.cols) / 4 * 4);
    parallel_for(threads, l.rows, 4, [&](int64_t r0, int64_t r1) {
      thread_local std::vector<float> scratch;
      scratch.resize(std::size_t(slab * l.cols));
      for (int64_t r = r0; r < r1; r += slab) {
        const int64_t re = std::min(r1, r + slab);
        const float* w = l.fp32_rows(r, re, scratch.data());
        matmul_rows(simd, x, n, l.cols, w, l.cols, l.cols, 0, re - r, y + r, l.rows);
      }
    });
  }

  // LlamaLoadOptions::release_weights: the mapped pages of a block's full-precision layers leave the
  // resident set once the block has run (they stay in the page cache, or are read again from disk).
  void release(const Linear& l) const {
    if (release_weights && l.stored) release_mapped_pages(l.stored->bytes(l.rows));
  }
};

namespace {

using detail::weight_base;

// Where tensors come from while loading: small tensors (norm gains) as fp32 copies, matrices in place
// (StoredMatrix) or, with LlamaLoadOptions::fp32_weights, as fp32 copies, plus the packed layers of nuq
// checkpoints.
class WeightSource {
 public:
  explicit WeightSource(bool fp32_weights) : fp32_weights_(fp32_weights) {}
  virtual ~WeightSource() = default;
  virtual bool has(const std::string& name) const = 0;
  // `<base>.weight` or a nuq-packed layer `<base>`, given the weight's full name.
  virtual bool has_matrix(const std::string& name) const { return has(name); }
  virtual std::vector<float> read(const std::string& name, const Shape& expected) const = 0;
  // The tensor's bytes in the mapping and their type, its shape checked against [rows, cols].
  virtual StoredMatrix stored(const std::string& name, int64_t rows, int64_t cols) const = 0;
  // Fills `l` from the full-precision tensor `name` [rows, cols].
  void read_matrix(const std::string& name, int64_t rows, int64_t cols, Linear& l) const {
    l.rows = rows;
    l.cols = cols;
    const StoredMatrix s = stored(name, rows, cols);
    l.stored_bytes = s.row_bytes * uint64_t(rows);
    if (fp32_weights_) l.dense = read(name, Shape{rows, cols});
    else l.stored = s;
  }
  // Fills `l` from `<base>.weight` or from the packed tensors `<base>.qweight`... .
  virtual void read_linear(const std::string& base, int64_t rows, int64_t cols, Linear& l) const {
    l.name = base;
    read_matrix(base + ".weight", rows, cols, l);
  }
  virtual std::string source_name() const = 0;

 private:
  bool fp32_weights_;
};

void check_shape(const std::string& src, const std::string& name, const Shape& got, const Shape& want) {
  NUQ_CHECK(got == want, Errc::invalid_file, "{}: tensor '{}' has shape {}, the model's configuration implies {}", src,
            name, to_string(got), to_string(want));
}

class GgufSource : public WeightSource {
 public:
  GgufSource(const std::string& path, bool fp32_weights) : WeightSource(fp32_weights), file_(path) {}
  const GgufFile& file() const { return file_; }
  bool has(const std::string& name) const override { return file_.find_tensor(name) != nullptr; }
  std::vector<float> read(const std::string& name, const Shape& expected) const override {
    check_shape(file_.path(), name, info(name).shape, expected);
    Buffer b = file_.dequantize(name);
    const float* p = b.data_as<float>();
    return std::vector<float>(p, p + b.shape().numel());
  }
  StoredMatrix stored(const std::string& name, int64_t rows, int64_t cols) const override {
    const GgufTensorInfo& t = info(name);
    check_shape(file_.path(), name, t.shape, Shape{rows, cols});
    const GgmlTypeTraits* traits = ggml_type_traits(uint32_t(t.type));
    NUQ_CHECK(traits && traits->can_dequantize, Errc::unsupported, "{}: tensor '{}': nuq cannot decode type {}",
              file_.path(), name, traits ? std::string(traits->name) : std::to_string(uint32_t(t.type)));
    return {file_.tensor_bytes(t).data(), t.type, t.nbytes / uint64_t(rows)};
  }
  std::string source_name() const override { return file_.path(); }

 private:
  const GgufTensorInfo& info(const std::string& name) const {
    const GgufTensorInfo* t = file_.find_tensor(name);
    NUQ_CHECK(t, Errc::invalid_file, "{}: tensor '{}' is missing", file_.path(), name);
    return *t;
  }
  GgufFile file_;
};

class SafetensorsSource : public WeightSource {
 public:
  SafetensorsSource(const std::string& path, bool decode_packed, bool fp32_weights)
      : WeightSource(fp32_weights), ckpt_(path), decode_packed_(decode_packed) {
    for (const auto& f : ckpt_.files()) {
      auto it = f->metadata().find(kQuantizationConfigKey);
      if (it == f->metadata().end()) continue;
      QuantizationConfig c = parse_quantization_config(it->second, f->path());
      for (auto& [name, meta] : c.layers) packed_.emplace(name, meta);
    }
  }
  const SafetensorsCheckpoint& checkpoint() const { return ckpt_; }
  bool packed() const { return !packed_.empty(); }
  bool has(const std::string& name) const override { return ckpt_.contains(name); }
  bool has_matrix(const std::string& name) const override { return has(name) || packed_meta(weight_base(name)); }
  const PackedTensorMeta* packed_meta(const std::string& base) const {
    auto it = packed_.find(base);
    return it == packed_.end() ? nullptr : &it->second;
  }
  std::vector<float> read(const std::string& name, const Shape& expected) const override {
    check(name, expected);
    Buffer b = to_float32(ckpt_.tensor(name));
    const float* p = b.data_as<float>();
    return std::vector<float>(p, p + b.shape().numel());
  }
  StoredMatrix stored(const std::string& name, int64_t rows, int64_t cols) const override {
    check(name, Shape{rows, cols});
    const ConstTensorView t = ckpt_.tensor(name);
    const DType d = ckpt_.info(name).dtype;
    const GgmlType type = d == DType::F32 ? GgmlType::F32 : d == DType::F16 ? GgmlType::F16 : GgmlType::BF16;
    return {t.data(), type, uint64_t(cols) * dtype_size(d)};
  }
  void read_linear(const std::string& base, int64_t rows, int64_t cols, Linear& l) const override {
    auto it = packed_.find(base);
    if (it == packed_.end()) return WeightSource::read_linear(base, rows, cols, l);
    l.name = base;
    l.rows = rows;
    l.cols = cols;
    const PackedTensorMeta& meta = it->second;
    NUQ_CHECK(meta.rows == rows && meta.cols == cols, Errc::invalid_file,
              "{}: packed layer '{}' is [{}, {}], the model's configuration implies [{}, {}]", ckpt_.path(), base,
              meta.rows, meta.cols, rows, cols);
    const format::PackedLinearView view = packed_view(ckpt_, base, meta);
    validate_packed(view, base);  // the kernels trust the data they run on
    if (decode_packed_) {
      // Decoded once to fp32 with the reference dequantizer: the exact numbers of the format.
      l.dense.resize(std::size_t(rows * cols));
      dequantize_reference(view, l.dense.data());
    } else {
      l.packed = view;
    }
    l.stored_bytes = packed_storage(rows, cols, meta.bits, meta.group_size, meta.nnz).total();
  }
  std::string source_name() const override { return ckpt_.path(); }

 private:
  void check(const std::string& name, const Shape& expected) const {
    NUQ_CHECK(ckpt_.contains(name), Errc::invalid_file, "{}: tensor '{}' is missing", ckpt_.path(), name);
    check_shape(ckpt_.path(), name, ckpt_.info(name).shape, expected);
    const DType d = ckpt_.info(name).dtype;
    NUQ_CHECK(d == DType::F32 || d == DType::F16 || d == DType::BF16, Errc::unsupported,
              "{}: tensor '{}' has dtype {}; the decoder reads F32, F16 and BF16", ckpt_.path(), name, dtype_name(d));
  }
  SafetensorsCheckpoint ckpt_;
  std::map<std::string, PackedTensorMeta> packed_;
  bool decode_packed_;
};

// The names of one checkpoint family.
struct Naming {
  std::string embedding, final_norm, classifier;
  std::string block(int64_t i) const { return fmt::format(fmt::runtime(block_format), i); }
  std::string block_format;
  std::string attn_norm, ffn_norm, q, k, v, o, gate, up, down;  // suffixes after the block prefix
};

const Naming kHuggingFace{"model.embed_tokens.weight",
                          "model.norm.weight",
                          "lm_head.weight",
                          "model.layers.{}.",
                          "input_layernorm.weight",
                          "post_attention_layernorm.weight",
                          "self_attn.q_proj",
                          "self_attn.k_proj",
                          "self_attn.v_proj",
                          "self_attn.o_proj",
                          "mlp.gate_proj",
                          "mlp.up_proj",
                          "mlp.down_proj"};
const Naming kGguf{"token_embd.weight", "output_norm.weight", "output.weight", "blk.{}.", "attn_norm.weight",
                   "ffn_norm.weight",   "attn_q",             "attn_k",        "attn_v",  "attn_output",
                   "ffn_gate",          "ffn_up",             "ffn_down"};

int64_t get_int(const Json& j, const char* key, const std::string& src, std::optional<int64_t> fallback = {}) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    NUQ_CHECK(fallback.has_value(), Errc::invalid_file, "{}: configuration has no '{}'", src, key);
    return *fallback;
  }
  NUQ_CHECK(it->is_number_integer() && it->get<int64_t>() > 0, Errc::invalid_file,
            "{}: configuration '{}' is {}, expected a positive integer", src, key, it->dump());
  return it->get<int64_t>();
}

double get_float(const Json& j, const char* key, double fallback) {
  auto it = j.find(key);
  return it == j.end() || !it->is_number() ? fallback : it->get<double>();
}

LlamaConfig config_from_hf(const Json& j, const std::string& src) {
  LlamaConfig c;
  c.dim = get_int(j, "hidden_size", src);
  c.hidden_dim = get_int(j, "intermediate_size", src);
  c.n_layers = get_int(j, "num_hidden_layers", src);
  c.n_heads = get_int(j, "num_attention_heads", src);
  c.n_kv_heads = get_int(j, "num_key_value_heads", src, c.n_heads);
  c.head_dim = get_int(j, "head_dim", src, c.dim / c.n_heads);
  c.vocab_size = get_int(j, "vocab_size", src);
  c.max_seq_len = get_int(j, "max_position_embeddings", src, 2048);
  c.norm_eps = float(get_float(j, "rms_norm_eps", 1e-6));
  c.rope_theta = get_float(j, "rope_theta", 10000.0);
  auto scaling = j.find("rope_scaling");
  NUQ_CHECK(scaling == j.end() || scaling->is_null(), Errc::unsupported,
            "{}: rope_scaling {} is not supported by this decoder", src, scaling == j.end() ? "" : scaling->dump());
  c.rope = RopeLayout::half_split;
  return c;
}

LlamaConfig config_from_gguf_keys(const std::function<const Json*(const std::string&)>& get, const std::string& src) {
  auto num = [&](const std::string& key, std::optional<double> fallback = {}) -> double {
    const Json* v = get(key);
    if (!v) {
      NUQ_CHECK(fallback.has_value(), Errc::invalid_file, "{}: metadata has no '{}'", src, key);
      return *fallback;
    }
    NUQ_CHECK(v->is_number(), Errc::invalid_file, "{}: metadata '{}' is not a number", src, key);
    return v->get<double>();
  };
  const Json* arch = get("general.architecture");
  NUQ_CHECK(arch && arch->is_string() && arch->get<std::string>() == "llama", Errc::unsupported,
            "{}: architecture {} is not supported (the decoder runs 'llama')", src, arch ? arch->dump() : "(none)");
  LlamaConfig c;
  c.dim = int64_t(num("llama.embedding_length"));
  c.hidden_dim = int64_t(num("llama.feed_forward_length"));
  c.n_layers = int64_t(num("llama.block_count"));
  c.n_heads = int64_t(num("llama.attention.head_count"));
  c.n_kv_heads = int64_t(num("llama.attention.head_count_kv", double(c.n_heads)));
  c.head_dim = int64_t(num("llama.rope.dimension_count", double(c.dim / std::max<int64_t>(c.n_heads, 1))));
  c.max_seq_len = int64_t(num("llama.context_length", 2048));
  c.norm_eps = float(num("llama.attention.layer_norm_rms_epsilon", 1e-5));
  c.rope_theta = num("llama.rope.freq_base", 10000.0);
  c.vocab_size = int64_t(num("llama.vocab_size", 0));
  c.rope = RopeLayout::interleaved;
  return c;
}

Json gguf_value_json(const GgufValue& v) {
  switch (v.type) {
    case GgufValueType::STRING: return v.as_string();
    case GgufValueType::BOOL: return v.as_bool();
    case GgufValueType::FLOAT32:
    case GgufValueType::FLOAT64: return v.as_float();
    case GgufValueType::ARRAY: return nullptr;
    case GgufValueType::INT8:
    case GgufValueType::INT16:
    case GgufValueType::INT32:
    case GgufValueType::INT64: return v.as_int();
    default: return v.as_uint();
  }
}

void validate_config(const LlamaConfig& c, const std::string& src) {
  NUQ_CHECK(c.dim > 0 && c.hidden_dim > 0 && c.n_layers > 0 && c.n_heads > 0 && c.n_kv_heads > 0 && c.head_dim > 0 &&
                c.vocab_size > 0,
            Errc::invalid_file, "{}: incomplete model configuration", src);
  NUQ_CHECK(c.n_heads % c.n_kv_heads == 0, Errc::invalid_file,
            "{}: {} attention heads are not a multiple of {} key/value heads", src, c.n_heads, c.n_kv_heads);
  NUQ_CHECK(c.head_dim % 2 == 0, Errc::invalid_file, "{}: head dimension {} is odd; RoPE rotates pairs", src,
            c.head_dim);
}

void load_blocks(const WeightSource& src, const Naming& names, LlamaModel::Impl& m) {
  const LlamaConfig& c = m.config;
  const int64_t q_dim = c.n_heads * c.head_dim, kv_dim = c.n_kv_heads * c.head_dim;
  m.blocks.resize(std::size_t(c.n_layers));
  for (int64_t i = 0; i < c.n_layers; ++i) {
    Block& b = m.blocks[std::size_t(i)];
    const std::string p = names.block(i);
    b.attn_norm = src.read(p + names.attn_norm, Shape{c.dim});
    b.ffn_norm = src.read(p + names.ffn_norm, Shape{c.dim});
    src.read_linear(p + names.q, q_dim, c.dim, b.q);
    src.read_linear(p + names.k, kv_dim, c.dim, b.k);
    src.read_linear(p + names.v, kv_dim, c.dim, b.v);
    src.read_linear(p + names.o, c.dim, q_dim, b.o);
    src.read_linear(p + names.gate, c.hidden_dim, c.dim, b.gate);
    src.read_linear(p + names.up, c.hidden_dim, c.dim, b.up);
    src.read_linear(p + names.down, c.dim, c.hidden_dim, b.down);
  }
  // The embedding and a separate classifier may be nuq-packed too (`nuq quantize --plan` naming them):
  // rows are then decoded per token, and the classifier runs on the packed kernels.
  src.read_linear(weight_base(names.embedding), c.vocab_size, c.dim, m.embedding);
  m.final_norm = src.read(names.final_norm, Shape{c.dim});
  m.config.tied_classifier = !src.has_matrix(names.classifier);
  if (!m.config.tied_classifier) src.read_linear(weight_base(names.classifier), c.vocab_size, c.dim, m.classifier);
  else m.classifier.name = weight_base(names.classifier);
}

// llama2.c's legacy format: 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size —
// negative when the classifier is stored separately —, seq_len), then fp32 arrays in a fixed order.
void load_llama2c(const std::string& path, bool fp32_weights, LlamaModel::Impl& m) {
  auto mapping = std::make_shared<MappedFile>(path);
  m.keep_alive = mapping;
  const MappedFile& file = *mapping;
  NUQ_CHECK(file.size() >= 28, Errc::invalid_file, "{}: too short for a llama2.c header ({} bytes)", path, file.size());
  int32_t h[7];
  std::memcpy(h, file.data(), sizeof h);
  LlamaConfig& c = m.config;
  c.dim = h[0];
  c.hidden_dim = h[1];
  c.n_layers = h[2];
  c.n_heads = h[3];
  c.n_kv_heads = h[4];
  c.tied_classifier = h[5] > 0;
  c.vocab_size = std::abs(h[5]);
  c.max_seq_len = h[6];
  NUQ_CHECK(c.dim > 0 && c.hidden_dim > 0 && c.n_layers > 0 && c.n_heads > 0 && c.n_kv_heads > 0 && c.max_seq_len > 0 &&
                c.dim % c.n_heads == 0 && c.dim < (1 << 20) && c.n_layers < 4096,
            Errc::invalid_file, "{}: implausible llama2.c header (dim {}, hidden {}, layers {}, heads {}/{}, seq {})",
            path, c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.max_seq_len);
  c.head_dim = c.dim / c.n_heads;
  c.norm_eps = 1e-5f;
  c.rope_theta = 10000.0;
  c.rope = RopeLayout::interleaved;
  validate_config(c, path);
  const int64_t L = c.n_layers, D = c.dim, H = c.hidden_dim, kv = c.n_kv_heads * c.head_dim;
  const int64_t floats = c.vocab_size * D + L * D + L * D * D + 2 * L * D * kv + L * D * D + L * D + 3 * L * D * H + D +
                         c.max_seq_len * c.head_dim + (c.tied_classifier ? 0 : c.vocab_size * D);
  NUQ_CHECK(int64_t(file.size()) >= 28 + 4 * floats, Errc::invalid_file,
            "{}: truncated: the header implies {} bytes of weights, the file has {}", path, 4 * floats,
            file.size() - 28);
  const float* p = reinterpret_cast<const float*>(file.data() + 28);
  auto take = [&](int64_t n) {
    std::vector<float> v(p, p + n);
    p += n;
    return v;
  };
  // Matrices stay in the mapping (fp32 already, 4-byte aligned after the 28-byte header) unless asked for
  // copies.
  auto take_matrix = [&](Linear& l, int64_t rows, int64_t cols) {
    l.rows = rows;
    l.cols = cols;
    l.stored_bytes = uint64_t(rows * cols) * 4;
    if (fp32_weights) l.dense.assign(p, p + rows * cols);
    else l.stored = StoredMatrix{reinterpret_cast<const std::byte*>(p), GgmlType::F32, uint64_t(cols) * 4};
    p += rows * cols;
  };
  m.embedding.name = "token_embedding_table";
  take_matrix(m.embedding, c.vocab_size, D);
  m.blocks.resize(std::size_t(L));
  auto linear = [&](Linear Block::*field, const char* name, int64_t rows, int64_t cols) {
    for (int64_t l = 0; l < L; ++l) {
      Linear& lin = m.blocks[std::size_t(l)].*field;
      lin.name = fmt::format("layers.{}.{}", l, name);
      take_matrix(lin, rows, cols);
    }
  };
  auto gains = [&](std::vector<float> Block::*field) {
    for (Block& b : m.blocks) b.*field = take(D);
  };
  gains(&Block::attn_norm);
  linear(&Block::q, "attention.wq", D, D);
  linear(&Block::k, "attention.wk", kv, D);
  linear(&Block::v, "attention.wv", kv, D);
  linear(&Block::o, "attention.wo", D, D);
  gains(&Block::ffn_norm);
  linear(&Block::gate, "feed_forward.w1", H, D);
  linear(&Block::down, "feed_forward.w2", D, H);
  linear(&Block::up, "feed_forward.w3", H, D);
  m.final_norm = take(D);
  p += c.max_seq_len * c.head_dim;  // precomputed RoPE tables (freq_cis real and imaginary halves): recomputed
  m.classifier.name = "wcls";
  if (!c.tied_classifier) take_matrix(m.classifier, c.vocab_size, D);
  m.description = "llama2.c checkpoint, fp32 weights";
}

}  // namespace

// ---- loading -------------------------------------------------------------------------------------------

namespace {

// LlamaLoadOptions::Release resolved for a loaded model: `automatic` from the bytes its matrices map
// (full-precision and packed alike: all of them would stay resident after a pass).
// fn(matrix) for every weight matrix of a model: the embedding, the classifier when it is not tied to it,
// each block's linear layers.
template <class ModelImpl, class Fn>
void for_each_matrix(ModelImpl& m, Fn&& fn) {
  fn(m.embedding);
  if (!m.config.tied_classifier) fn(m.classifier);
  for (auto& b : m.blocks)
    for (auto* l : b.linears()) fn(*l);
}

bool releases_weights(const LlamaModel::Impl& m, LlamaLoadOptions::Release release) {
  if (release != LlamaLoadOptions::Release::automatic) return release == LlamaLoadOptions::Release::after_each_block;
  uint64_t mapped = 0;
  for_each_matrix(m, [&](const Linear& l) {
    if (l.dense.empty()) mapped += l.stored_bytes;
  });
  const uint64_t memory = physical_memory_bytes();
  return memory > 0 && mapped > memory / 2;
}

// Int8 codebooks for every packed layer the CPU runs with int8 arithmetic (Linear::int8_codebooks):
// 20 bytes per row and codebook group, against 16-32 of fp16 codebooks already in the checkpoint.
void prepare_int8_codebooks(LlamaModel::Impl& m) {
  const cpu::LinearOptions options{m.threads, std::nullopt, m.arithmetic};
  for_each_matrix(m, [&](Linear& l) {
    if (l.packed && l.backend_id < 0 && cpu::fused_arithmetic(*l.packed, options) == cpu::Arithmetic::int8)
      l.int8_codebooks = std::make_shared<const cpu::Int8Codebooks>(*l.packed);
  });
}

}  // namespace

std::unique_ptr<LlamaModel> LlamaModel::load(const std::string& path, const LlamaLoadOptions& options) {
  NUQ_CHECK(!(options.decode_packed && options.linear_backend), Errc::invalid_argument,
            "{}: decode_packed decodes packed layers for the CPU; it cannot be combined with a linear backend", path);
  auto m = std::make_unique<Impl>();
  const bool is_dir = fs::is_directory(path);
  std::optional<CheckpointKind> kind;
  if (is_dir || path.ends_with(".json")) {
    kind = CheckpointKind::safetensors;
  } else {
    MappedFile probe(path);
    if (probe.size() >= 4 && std::memcmp(probe.data(), "GGUF", 4) == 0) kind = CheckpointKind::gguf;
    else if (path.ends_with(".safetensors")) kind = CheckpointKind::safetensors;
  }
  if (!kind) {
    load_llama2c(path, options.fp32_weights, *m);
  } else if (*kind == CheckpointKind::gguf) {
    auto owned = std::make_shared<GgufSource>(path, options.fp32_weights);
    m->keep_alive = owned;
    const GgufSource& src = *owned;
    m->config = config_from_gguf_keys(
        [&](const std::string& key) -> const Json* {
          static thread_local Json holder;
          const GgufValue* v = src.file().find_value(key);
          if (!v) return nullptr;
          holder = gguf_value_json(*v);
          return &holder;
        },
        path);
    if (m->config.vocab_size == 0) {
      const GgufTensorInfo* e = src.file().find_tensor(kGguf.embedding);
      NUQ_CHECK(e && e->shape.rank() == 2, Errc::invalid_file, "{}: no token embedding '{}'", path, kGguf.embedding);
      m->config.vocab_size = e->shape[0];
    }
    validate_config(m->config, path);
    load_blocks(src, kGguf, *m);
    m->tokenizer_path = path;
    m->description = options.fp32_weights ? "GGUF checkpoint, weights dequantized to fp32"
                                          : "GGUF checkpoint, weights multiplied as stored";
  } else {
    auto owned = std::make_shared<SafetensorsSource>(path, options.decode_packed, options.fp32_weights);
    m->keep_alive = owned;
    const SafetensorsSource& src = *owned;
    const SafetensorsCheckpoint& ck = src.checkpoint();
    const bool gguf_names = src.has_matrix(kGguf.embedding);
    if (gguf_names) {
      // A checkpoint `nuq quantize` made from a GGUF file carries that file's scalar metadata.
      Json meta;
      for (const auto& f : ck.files()) {
        auto it = f->metadata().find("gguf_metadata");
        if (it != f->metadata().end()) meta = Json::parse(it->second, nullptr, false);
      }
      NUQ_CHECK(meta.is_object(), Errc::invalid_file,
                "{}: tensors use GGUF names but there is no gguf_metadata with the model's hyperparameters", path);
      m->config = config_from_gguf_keys(
          [&](const std::string& key) -> const Json* {
            auto it = meta.find(key);
            return it == meta.end() ? nullptr : &*it;
          },
          path);
      if (m->config.vocab_size == 0) {
        const PackedTensorMeta* packed = src.packed_meta(weight_base(kGguf.embedding));
        m->config.vocab_size = packed ? packed->rows : ck.info(kGguf.embedding).shape[0];
      }
    } else {
      const fs::path dir = is_dir ? fs::path(path) : fs::path(path).parent_path();
      const fs::path config_path = dir / "config.json";
      NUQ_CHECK(fs::exists(config_path), Errc::invalid_file,
                "{}: no config.json next to the checkpoint (the decoder needs the model's hyperparameters)", path);
      const Json j = Json::parse(read_small_file(config_path.string(), "the model's config"), nullptr, false);
      NUQ_CHECK(j.is_object(), Errc::invalid_file, "{}: not a JSON object", config_path.string());
      m->config = config_from_hf(j, config_path.string());
    }
    validate_config(m->config, path);
    load_blocks(src, gguf_names ? kGguf : kHuggingFace, *m);
    m->description = !src.packed()          ? "safetensors checkpoint, full-precision weights"
                     : options.decode_packed ? "safetensors checkpoint, nuq-packed linear layers decoded to fp32"
                                             : "safetensors checkpoint, nuq-packed linear layers (CPU kernels)";
  }
  const int threads = cpu::detail::resolve_threads(options.threads);
  m->threads = threads;
  m->arithmetic = options.arithmetic;
  m->release_weights = releases_weights(*m, options.release_weights);
  if (m->release_weights) m->description += ", mapped pages released after each block";
  if (options.linear_backend) {
    // Packed layers move to the backend (their host copies stay mapped, for exports); a checkpoint
    // without packed layers runs entirely on the CPU, which the description says.
    int64_t moved = 0;
    for (Block& b : m->blocks)
      for (Linear* l : b.linears())
        if (l->packed) {
          l->backend_id = options.linear_backend->add_layer(l->name, *l->packed);
          ++moved;
        }
    if (moved > 0) {  // only safetensors checkpoints hold packed layers
      m->backend = options.linear_backend;
      m->description = "safetensors checkpoint, nuq-packed linear layers (" + m->backend->description() + ")";
    }
  }
  prepare_int8_codebooks(*m);
  return std::unique_ptr<LlamaModel>(new LlamaModel(std::move(m)));
}

LlamaModel::LlamaModel(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
LlamaModel::~LlamaModel() = default;

const LlamaConfig& LlamaModel::config() const noexcept { return impl_->config; }
const std::string& LlamaModel::description() const noexcept { return impl_->description; }
const std::string& LlamaModel::embedded_tokenizer_path() const noexcept { return impl_->tokenizer_path; }
void LlamaModel::set_activation_hook(ActivationHook hook) { impl_->hook = std::move(hook); }
void LlamaModel::set_kv_hook(KvHook hook) { impl_->kv_hook = std::move(hook); }

int LlamaModel::threads() const noexcept { return impl_->threads; }

const std::string& LlamaModel::classifier_layer() const noexcept { return impl_->classifier_weights().name; }

int64_t LlamaModel::block_of_linear(const std::string& base) const {
  for (std::size_t i = 0; i < impl_->blocks.size(); ++i) {
    const Block& b = impl_->blocks[i];
    for (const Linear* l : b.linears())
      if (l->name == base) return int64_t(i);
  }
  return -1;
}

int64_t LlamaModel::linear_weight_count() const noexcept {
  int64_t n = 0;
  for (const Block& b : impl_->blocks)
    for (const Linear* l : b.linears()) n += l->rows * l->cols;
  return n;
}

int64_t LlamaModel::packed_layer_count() const noexcept {
  int64_t n = 0;
  for (const Block& b : impl_->blocks)
    for (const Linear* l : b.linears()) n += l->packed.has_value();
  return n;
}

int64_t LlamaModel::int8_layer_count() const {
  const cpu::LinearOptions options{impl_->threads, std::nullopt, impl_->arithmetic};
  int64_t n = 0;
  for (const Block& b : impl_->blocks)
    for (const Linear* l : b.linears())
      n += l->packed && l->backend_id < 0 && cpu::fused_arithmetic(*l->packed, options) == cpu::Arithmetic::int8;
  return n;
}

double LlamaModel::linear_bits_per_weight() const noexcept {
  uint64_t bytes = 0;
  for (const Block& b : impl_->blocks)
    for (const Linear* l : b.linears()) bytes += l->stored_bytes;
  const int64_t n = linear_weight_count();
  return n ? 8.0 * double(bytes) / double(n) : 0.0;
}

void LlamaModel::save_hf(const std::string& dir) const {
  const Impl& m = *impl_;
  const LlamaConfig& c = m.config;
  std::error_code ec;
  fs::create_directories(dir, ec);
  NUQ_CHECK(!ec, Errc::io, "{}: cannot create directory: {}", dir, ec.message());
  // Rows of each head reordered from adjacent pairs (2i, 2i+1) to halves (i, i + head_dim/2).
  auto to_half_split = [&](const Linear& l, int64_t heads) {
    const std::vector<float> dense = l.decoded();
    if (c.rope == RopeLayout::half_split) return dense;
    std::vector<float> out(dense.size());
    const int64_t hd = c.head_dim, half = hd / 2;
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < half; ++i)
        for (int64_t s = 0; s < 2; ++s)
          std::memcpy(&out[std::size_t((h * hd + s * half + i) * l.cols)], &dense[std::size_t((h * hd + 2 * i + s) * l.cols)],
                      std::size_t(l.cols) * 4);
    return out;
  };
  std::vector<std::pair<std::string, std::vector<float>>> owned;
  std::vector<std::pair<std::string, ConstTensorView>> views;
  auto add = [&](std::string name, std::vector<float> data, Shape shape) {
    owned.emplace_back(std::move(name), std::move(data));
    views.emplace_back(owned.back().first,
                       ConstTensorView(reinterpret_cast<const std::byte*>(owned.back().second.data()), DType::F32, shape));
  };
  owned.reserve(std::size_t(12 * c.n_layers + 4));
  add(kHuggingFace.embedding, m.embedding.decoded(), Shape{c.vocab_size, c.dim});
  for (int64_t i = 0; i < c.n_layers; ++i) {
    const Block& b = m.blocks[std::size_t(i)];
    const std::string p = kHuggingFace.block(i);
    add(p + kHuggingFace.attn_norm, b.attn_norm, Shape{c.dim});
    add(p + kHuggingFace.ffn_norm, b.ffn_norm, Shape{c.dim});
    auto lin = [&](const std::string& suffix, const Linear& l, std::vector<float> data) {
      add(p + suffix + ".weight", std::move(data), Shape{l.rows, l.cols});
    };
    lin(kHuggingFace.q, b.q, to_half_split(b.q, c.n_heads));
    lin(kHuggingFace.k, b.k, to_half_split(b.k, c.n_kv_heads));
    lin(kHuggingFace.v, b.v, b.v.decoded());
    lin(kHuggingFace.o, b.o, b.o.decoded());
    lin(kHuggingFace.gate, b.gate, b.gate.decoded());
    lin(kHuggingFace.up, b.up, b.up.decoded());
    lin(kHuggingFace.down, b.down, b.down.decoded());
  }
  add(kHuggingFace.final_norm, m.final_norm, Shape{c.dim});
  if (!c.tied_classifier) add(kHuggingFace.classifier, m.classifier.decoded(), Shape{c.vocab_size, c.dim});
  write_safetensors((fs::path(dir) / "model.safetensors").string(), views, {{"format", "pt"}});
  Json config = {{"architectures", {"LlamaForCausalLM"}},
                 {"model_type", "llama"},
                 {"hidden_size", c.dim},
                 {"intermediate_size", c.hidden_dim},
                 {"num_hidden_layers", c.n_layers},
                 {"num_attention_heads", c.n_heads},
                 {"num_key_value_heads", c.n_kv_heads},
                 {"head_dim", c.head_dim},
                 {"vocab_size", c.vocab_size},
                 {"max_position_embeddings", c.max_seq_len},
                 {"rms_norm_eps", c.norm_eps},
                 {"rope_theta", c.rope_theta},
                 {"hidden_act", "silu"},
                 {"tie_word_embeddings", c.tied_classifier},
                 {"torch_dtype", "float32"}};
  write_file_atomically((fs::path(dir) / "config.json").string(), config.dump(2) + "\n");
}

std::unique_ptr<LlamaModel::Cache> LlamaModel::new_cache(int64_t capacity) const {
  NUQ_CHECK(capacity > 0, Errc::invalid_argument, "cache capacity must be positive, got {}", capacity);
  auto c = std::make_unique<Cache>();
  c->capacity = capacity;
  const auto n = std::size_t(impl_->config.n_layers * capacity * impl_->config.n_kv_heads * impl_->config.head_dim);
  c->k.assign(n, 0.0f);
  c->v.assign(n, 0.0f);
  return c;
}

struct LlamaModel::Cache::Quantized {
  std::vector<kv::LayerCache> layers;
  int seq = 0;  // the one sequence of every layer's cache
};

std::unique_ptr<LlamaModel::Cache> LlamaModel::new_cache(int64_t capacity, const kv::Calibration& calibration,
                                                         int block_tokens) const {
  const LlamaConfig& c = impl_->config;
  NUQ_CHECK(capacity > 0, Errc::invalid_argument, "cache capacity must be positive, got {}", capacity);
  NUQ_CHECK(int64_t(calibration.layers.size()) == c.n_layers, Errc::invalid_argument,
            "KV calibration of {} layers for a model of {}", calibration.layers.size(), c.n_layers);
  auto q = std::make_shared<Cache::Quantized>();
  kv::CacheOptions options;
  options.block_tokens = block_tokens;
  options.rope = kv::Rope{c.rope, c.rope_theta, kv::RopeScaling::none, 1.0};
  for (int64_t l = 0; l < c.n_layers; ++l) {
    const kv::LayerCalibration& layer = calibration.layers[std::size_t(l)];
    NUQ_CHECK(layer.n_kv_heads == c.n_kv_heads && layer.head_dim == c.head_dim, Errc::invalid_argument,
              "KV calibration of layer {} is for {} kv heads of {} channels, the model has {} of {}", l,
              layer.n_kv_heads, layer.head_dim, c.n_kv_heads, c.head_dim);
    q->layers.emplace_back(layer, calibration, options);
    q->seq = q->layers.back().add_sequence();
  }
  auto cache = std::make_unique<Cache>();
  cache->capacity = capacity;
  cache->quantized = std::move(q);
  return cache;
}

int64_t LlamaModel::Cache::bytes() const {
  if (!quantized) return int64_t(k.size() + v.size()) * int64_t(sizeof(float));
  int64_t total = 0;
  for (const kv::LayerCache& layer : quantized->layers) total += layer.allocated_bytes();
  return total;
}

// ---- forward -------------------------------------------------------------------------------------------

namespace {

void rms_norm(const float* x, const float* w, int64_t n, int64_t dim, float eps, float* out) {
  for (int64_t t = 0; t < n; ++t) {
    double ss = 0;
    for (int64_t i = 0; i < dim; ++i) ss += double(x[t * dim + i]) * x[t * dim + i];
    const float scale = float(1.0 / std::sqrt(ss / double(dim) + double(eps)));
    for (int64_t i = 0; i < dim; ++i) out[t * dim + i] = x[t * dim + i] * scale * w[i];
  }
}

// Rotates every head of x [n, heads, head_dim] in place for positions pos0 .. pos0 + n - 1. Angles are
// computed in double, so positions far beyond 10^6 keep their accuracy.
void apply_rope(float* x, int64_t n, int64_t heads, int64_t head_dim, int64_t pos0, double theta, RopeLayout layout) {
  const int64_t half = head_dim / 2;
  std::vector<float> cs(std::size_t(2 * half));
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t i = 0; i < half; ++i) {
      const double inv_freq = std::pow(theta, -double(2 * i) / double(head_dim));
      const double a = double(pos0 + t) * inv_freq;
      cs[std::size_t(2 * i)] = float(std::cos(a));
      cs[std::size_t(2 * i + 1)] = float(std::sin(a));
    }
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + (t * heads + h) * head_dim;
      for (int64_t i = 0; i < half; ++i) {
        const int64_t a = layout == RopeLayout::interleaved ? 2 * i : i;
        const int64_t b = layout == RopeLayout::interleaved ? 2 * i + 1 : i + half;
        const float c = cs[std::size_t(2 * i)], s = cs[std::size_t(2 * i + 1)];
        const float x0 = v[a], x1 = v[b];
        v[a] = x0 * c - x1 * s;
        v[b] = x0 * s + x1 * c;
      }
    }
  }
}

}  // namespace

void LlamaModel::forward(const int32_t* tokens, int64_t n, Cache& cache, float* hidden) const {
  NUQ_CHECK(n > 0, Errc::invalid_argument, "forward: no tokens");
  NUQ_CHECK(cache.length + n <= cache.capacity, Errc::invalid_argument,
            "forward: {} more tokens do not fit a cache of {} holding {}", n, cache.capacity, cache.length);
  std::vector<float> x(std::size_t(n * impl_->config.dim));
  embed(tokens, n, x.data(), cache.length);
  forward_blocks(0, impl_->config.n_layers, x.data(), n, cache);
  cache.length += n;
  final_norm(x.data(), n, hidden);
}

void LlamaModel::embed(const int32_t* tokens, int64_t n, float* x, int64_t first_position) const {
  const Impl& m = *impl_;
  const int64_t D = m.config.dim;
  for (int64_t t = 0; t < n; ++t) {
    NUQ_CHECK(tokens[t] >= 0 && tokens[t] < m.config.vocab_size, Errc::invalid_argument,
              "forward: token {} at position {} is outside the vocabulary of {}", tokens[t], first_position + t,
              m.config.vocab_size);
    const float* row = m.embedding.fp32_rows(tokens[t], tokens[t] + 1, &x[t * D]);
    if (row != &x[t * D]) std::memcpy(&x[t * D], row, std::size_t(D) * sizeof(float));
  }
}

void LlamaModel::final_norm(const float* x, int64_t n, float* hidden) const {
  rms_norm(x, impl_->final_norm.data(), n, impl_->config.dim, impl_->config.norm_eps, hidden);
}

void LlamaModel::forward_blocks(int64_t first, int64_t last, float* x, int64_t n, Cache& cache) const {
  const Impl& m = *impl_;
  const LlamaConfig& c = m.config;
  NUQ_CHECK(n > 0, Errc::invalid_argument, "forward: no tokens");
  NUQ_CHECK(0 <= first && first <= last && last <= c.n_layers, Errc::invalid_argument,
            "forward: blocks [{}, {}) of a model of {}", first, last, c.n_layers);
  NUQ_CHECK(cache.length + n <= cache.capacity, Errc::invalid_argument,
            "forward: {} more tokens do not fit a cache of {} holding {}", n, cache.capacity, cache.length);
  if (cache.quantized) {
    Cache::Quantized& qc = *cache.quantized;
    const int64_t held = qc.layers.front().length(qc.seq);
    NUQ_CHECK(cache.length == held || cache.length == 0, Errc::invalid_argument,
              "forward: cache.length was set to {} but the quantized cache holds {} tokens; it can only restart at 0",
              cache.length, held);
    NUQ_CHECK(first == 0 && last == c.n_layers, Errc::invalid_argument,
              "forward: a quantized cache runs every block in one call");
    if (cache.length == 0 && held > 0)
      for (kv::LayerCache& layer : qc.layers) {
        layer.free_sequence(qc.seq);
        qc.seq = layer.add_sequence();  // reuses the freed id and pages
      }
  }
  const int64_t D = c.dim, hd = c.head_dim, qd = c.n_heads * hd, kvd = c.n_kv_heads * hd, pos0 = cache.length;
  std::vector<float> xb(std::size_t(n * std::max(D, qd))), q(std::size_t(n * qd)), k(std::size_t(n * kvd)),
      v(std::size_t(n * kvd)), att(std::size_t(n * qd)), g(std::size_t(n * c.hidden_dim)),
      u(std::size_t(n * c.hidden_dim)), o(std::size_t(n * D));
  for (int64_t l = first; l < last; ++l) {
    const Block& b = m.blocks[std::size_t(l)];
    rms_norm(x, b.attn_norm.data(), n, D, c.norm_eps, xb.data());
    m.apply(b.q, xb.data(), n, q.data());
    m.apply(b.k, xb.data(), n, k.data());
    m.apply(b.v, xb.data(), n, v.data());
    if (m.kv_hook) m.kv_hook(l, pos0, n, k.data(), v.data());
    if (cache.quantized) {
      // Keys and values stay pre-RoPE (the cache quantizes keys per channel before rotation; the kernels
      // rotate keys and queries as they read them). Every query row is one batch row over the same
      // sequence, cut to the positions up to its own: the causal mask of a prefill in one call.
      kv::LayerCache& layer = cache.quantized->layers[std::size_t(l)];
      const int seq = cache.quantized->seq;
      layer.append(seq, k.data(), v.data(), n, m.threads);
      const std::vector<int> rows(std::size_t(n), seq);
      std::vector<int64_t> visible(static_cast<std::size_t>(n));
      for (int64_t t = 0; t < n; ++t) visible[std::size_t(t)] = pos0 + t + 1;
      kv::AttentionOptions options;
      options.threads = m.threads;
      options.lengths = visible;
      kv::decode_attention(layer, rows, q.data(), c.n_heads, att.data(), options);
    } else {
      apply_rope(q.data(), n, c.n_heads, hd, pos0, c.rope_theta, c.rope);
      apply_rope(k.data(), n, c.n_kv_heads, hd, pos0, c.rope_theta, c.rope);
      float* kc = cache.k.data() + l * cache.capacity * kvd;
      float* vc = cache.v.data() + l * cache.capacity * kvd;
      std::memcpy(kc + pos0 * kvd, k.data(), std::size_t(n * kvd) * 4);
      std::memcpy(vc + pos0 * kvd, v.data(), std::size_t(n * kvd) * 4);
      causal_attention(m.simd, m.threads, q.data(), n, pos0, kc, vc, c, att.data());
    }
    m.apply(b.o, att.data(), n, o.data());
    for (int64_t i = 0; i < n * D; ++i) x[i] += o[std::size_t(i)];
    rms_norm(x, b.ffn_norm.data(), n, D, c.norm_eps, xb.data());
    m.apply(b.gate, xb.data(), n, g.data());
    m.apply(b.up, xb.data(), n, u.data());
    for (int64_t i = 0; i < n * c.hidden_dim; ++i) {
      const float a = g[std::size_t(i)];
      g[std::size_t(i)] = a / (1.0f + std::exp(-a)) * u[std::size_t(i)];
    }
    m.apply(b.down, g.data(), n, o.data());
    for (int64_t i = 0; i < n * D; ++i) x[i] += o[std::size_t(i)];
    for (const Linear* w : b.linears()) m.release(*w);
  }
}

void LlamaModel::set_linear_weights(const std::string& base, const float* weights) {
  for (Block& b : impl_->blocks)
    for (Linear* l : b.linears()) {
      if (l->name != base) continue;
      NUQ_CHECK(!l->packed, Errc::unsupported,
                "layer '{}' is nuq-packed and runs packed; load the model with decode_packed to replace its weights",
                base);
      l->dense.assign(weights, weights + l->rows * l->cols);
      l->stored.reset();
      return;
    }
  fail(Errc::invalid_argument, "the model has no linear layer '{}'", base);
}

LlamaModel::LinearWeights LlamaModel::linear_weights(const std::string& base) const {
  for (const Block& b : impl_->blocks)
    for (const Linear* l : b.linears())
      if (l->name == base) return {l->rows, l->cols, l->decoded()};
  fail(Errc::invalid_argument, "the model has no linear layer '{}'", base);
}

void LlamaModel::logits(const float* hidden, int64_t n, float* out) const {
  const Impl& m = *impl_;
  m.run(m.classifier_weights(), hidden, n, out);
  m.release(m.classifier_weights());
}

LlamaWeights LlamaModel::weights() const {
  const Impl& m = *impl_;
  LlamaWeights w;
  w.config = m.config;
  // The backward pass reads fp32 arrays; weights that need converting were not copied at load.
  auto fp32 = [](const Linear& l) {
    NUQ_CHECK(!l.packed, Errc::unsupported,
              "'{}' is nuq-packed and runs packed; load the model with decode_packed for dense weights", l.name);
    const float* p = l.fp32_in_place();
    NUQ_CHECK(p, Errc::unsupported,
              "'{}' is stored as {} and read in place; load the model with fp32_weights for fp32 arrays", l.name,
              l.stored ? ggml_type_traits(uint32_t(l.stored->type))->name : "?");
    return p;
  };
  w.embedding = fp32(m.embedding);
  w.classifier = fp32(m.classifier_weights());
  w.final_norm = m.final_norm.data();
  for (const Block& b : m.blocks) {
    LlamaBlockWeights& bw = w.blocks.emplace_back();
    bw.attn_norm = b.attn_norm.data();
    bw.ffn_norm = b.ffn_norm.data();
    const auto ls = b.linears();
    for (int i = 0; i < kLlamaLinearKinds; ++i) {
      NUQ_CHECK(!ls[i]->packed, Errc::unsupported,
                "layer '{}' is nuq-packed and runs packed; load the model with decode_packed for dense weights",
                ls[i]->name);
      bw.linear[std::size_t(i)] = {ls[i]->name, ls[i]->rows, ls[i]->cols, fp32(*ls[i])};
    }
    // The gains' tensor names, in the naming the linear layers show (llama2.c checkpoints have none).
    const int64_t l = int64_t(w.blocks.size()) - 1;
    for (const Naming* names : {&kHuggingFace, &kGguf})
      if (b.q.name == names->block(l) + names->q) {
        bw.attn_norm_name = names->block(l) + names->attn_norm;
        bw.ffn_norm_name = names->block(l) + names->ffn_norm;
        if (l == 0) w.final_norm_name = names->final_norm;
      }
  }
  return w;
}

int64_t window_count(int64_t tokens, int64_t ctx) {
  NUQ_CHECK(ctx >= 2, Errc::invalid_argument, "the window length must be at least 2 tokens, got {}", ctx);
  return (tokens + ctx - 2) / (ctx - 1);
}

TokenWindow window_input(const std::vector<int32_t>& ids, int32_t start, int64_t ctx, int64_t w,
                         std::vector<int32_t>& input) {
  const int64_t per = ctx - 1, begin = w * per, len = std::min(per, int64_t(ids.size()) - begin);
  NUQ_CHECK(ctx >= 2 && w >= 0 && len > 0, Errc::invalid_argument, "window {} of {} tokens in windows of {}", w,
            ids.size(), ctx);
  input.assign(1, start);
  input.insert(input.end(), ids.begin() + begin, ids.begin() + begin + len - 1);
  return {begin, len};
}

namespace detail {

void dense_parallel_for(int threads, int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  parallel_for(threads, n, grain, fn);
}

void dense_gemm_nt(int threads, const float* a, int64_t m, int64_t lda, const float* b, int64_t nb, int64_t ldb,
                   int64_t k, float* c, int64_t ldc) {
  static const Simd simd = detect_simd();
  parallel_for(threads, nb, 4, [&](int64_t r0, int64_t r1) { matmul_rows(simd, a, m, lda, b, ldb, k, r0, r1, c, ldc); });
}

}  // namespace detail

}  // namespace nuq
