// CUDA decode attention over the quantized KV cache against the CPU reference on the same cache.
// Without a CUDA device the GPU test reports as skipped, never as passed; the argument checks run
// everywhere.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "nuq/half.hpp"
#include "nuq/kv_cache.hpp"
#include "nuq/kv_cuda.hpp"

namespace {

namespace kv = nuq::kv;

template <class T>
T* upload(const std::vector<T>& host) {
  void* d = nullptr;
  if (cudaMalloc(&d, std::max<size_t>(1, host.size() * sizeof(T))) != cudaSuccess) return nullptr;
  if (!host.empty()) cudaMemcpy(d, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice);
  return static_cast<T*>(d);
}

// A cache's exported pages and tables on the device; freed with it.
struct DeviceCache {
  nuq::cuda::KvDeviceCache d;
  std::vector<void*> owned;
  DeviceCache() = default;
  DeviceCache(const DeviceCache&) = delete;
  DeviceCache& operator=(const DeviceCache&) = delete;
  ~DeviceCache() {
    for (void* p : owned) cudaFree(p);
  }
  template <class T>
  const T* put(const std::vector<T>& host) {
    T* p = upload(host);
    owned.push_back(p);
    return p;
  }
};

void upload_cache(const kv::LayerCache& cache, const kv::LayerCache::Export& e, DeviceCache& dc) {
  nuq::cuda::KvDeviceCache& d = dc.d;
  const int64_t hd = cache.head_dim();
  d.pages = dc.put(e.pages);
  d.page_stride = e.page_stride;
  d.block_tables = dc.put(e.block_tables);
  d.max_blocks = e.max_blocks;
  d.lengths = dc.put(e.lengths);
  d.sink_k = dc.put(e.sink_k);
  d.sink_v = dc.put(e.sink_v);
  d.sink_tokens = cache.sink_tokens();
  d.n_kv_heads = int(cache.n_kv_heads());
  d.head_dim = int(hd);
  d.block_tokens = cache.block_tokens();
  d.bits_k = cache.layout().bits_k;
  d.bits_v = cache.layout().bits_v;
  d.slots = cache.layout().slots;
  d.k_scale = dc.put(e.k_scale);
  d.k_offset = dc.put(e.k_offset);
  d.k_codebook = dc.put(e.k_codebook);
  d.v_codebook = dc.put(e.v_codebook);
  d.storage = dc.put(e.storage);
  d.rope_page_cos = dc.put(e.rope_page_cos);
  d.rope_page_sin = dc.put(e.rope_page_sin);
  d.rope_pages = int64_t(e.rope_page_cos.size()) / (hd / 2);
  d.rope_step_cos = dc.put(e.rope_step_cos);
  d.rope_step_sin = dc.put(e.rope_step_sin);
}

struct KvCase {
  int64_t head_dim, n_kv, group;
  int bits_k, bits_v;
  std::vector<int64_t> lengths;
  nuq::cuda::ActivationType type;
  int sink_tokens = 1;
  int block_tokens = 32;  // tokens per page
  int split_tokens = 512;
};

std::string describe(const KvCase& k) {
  std::string s = "head_dim=" + std::to_string(k.head_dim) + " n_kv=" + std::to_string(k.n_kv) +
                  " group=" + std::to_string(k.group) + " bits=" + std::to_string(k.bits_k) + "/" +
                  std::to_string(k.bits_v) + " sink=" + std::to_string(k.sink_tokens) + " page=" + std::to_string(k.block_tokens) +
                  " split=" + std::to_string(k.split_tokens) + " lengths=";
  for (int64_t l : k.lengths) s += std::to_string(l) + ",";
  return s + (k.type == nuq::cuda::ActivationType::bf16 ? " bf16" : " fp16");
}

// Outputs round to the query type (unit roundoff u); fp32 sums, the GPU's fast exp and fp32 RoPE add far
// less than 2e-3 at these magnitudes (|out| < ~2).
void check_case(const KvCase& kc) {
  SCOPED_TRACE(describe(kc));
  const bool bf16 = kc.type == nuq::cuda::ActivationType::bf16;
  const int64_t hd = kc.head_dim, n_kv = kc.n_kv, n_heads = n_kv * kc.group, calib = 256;
  std::mt19937_64 rng(static_cast<uint64_t>(hd * 131 + kc.group * 7 + kc.bits_k));
  std::normal_distribution<float> nd;
  std::vector<float> k(size_t(calib * n_kv * hd)), v(k.size());
  for (auto& x : k) x = nd(rng);
  for (auto& x : v) x = nd(rng);
  kv::CalibrationOptions co;
  co.bits_k = kc.bits_k;
  co.bits_v = kc.bits_v;
  co.sink_tokens = kc.sink_tokens;
  const auto layer = kv::calibrate_layer(k.data(), v.data(), nullptr, nullptr, calib, n_kv, hd, co);
  kv::Calibration common;
  common.sink_tokens = kc.sink_tokens;
  kv::CacheOptions opt;
  opt.rope.layout = hd == 80 ? nuq::RopeLayout::half_split : nuq::RopeLayout::interleaved;
  opt.block_tokens = kc.block_tokens;
  kv::LayerCache cache(layer, common, opt);
  std::vector<int> seqs;
  for (int64_t len : kc.lengths) {
    std::vector<float> kk(size_t(len * n_kv * hd)), vv(kk.size());
    for (auto& x : kk) x = nd(rng);
    for (auto& x : vv) x = nd(rng);
    // Value vectors of one level plus an outlier at tokens 5 and 6 (per kv head): a range of 0, which the
    // writer stores as scale 1 (src/kv_cache.cpp), so the token's values are its offset and the outlier
    // residual, divided by the scale in the kernel's codebook units.
    for (int64_t t = 5; t < std::min<int64_t>(len, 7); ++t)
      for (int64_t j = 0; j < n_kv; ++j) {
        float* row = vv.data() + (t * n_kv + j) * hd;
        std::fill(row, row + hd, 0.25f);
        row[(t + 3 * j) % hd] = 6.0f;
      }
    seqs.push_back(cache.add_sequence());
    cache.append(seqs.back(), kk.data(), vv.data(), len, 2);
  }
  const int batch = int(kc.lengths.size());
  std::vector<uint16_t> q16(size_t(int64_t(batch) * n_heads * hd));
  std::vector<float> q(q16.size());
  for (size_t i = 0; i < q.size(); ++i) {
    q16[i] = bf16 ? nuq::float_to_bf16(nd(rng) * 0.5f) : nuq::float_to_fp16(nd(rng) * 0.5f);
    q[i] = bf16 ? nuq::bf16_to_float(q16[i]) : nuq::fp16_to_float(q16[i]);
  }
  std::vector<float> ref(q.size());
  kv::AttentionOptions ro;
  ro.isa = nuq::cpu::Isa::scalar;
  kv::decode_attention_reference(cache, seqs, q.data(), n_heads, ref.data(), ro);

  const auto e = cache.export_pages(seqs);
  DeviceCache dc;
  upload_cache(cache, e, dc);
  const nuq::cuda::KvDeviceCache& d = dc.d;
  const int split = kc.split_tokens, max_len = int(*std::max_element(kc.lengths.begin(), kc.lengths.end()));
  const int64_t ws_bytes = nuq::cuda::kv_decode_workspace_bytes(batch, int(n_heads), int(hd), max_len, split);
  void* ws = nullptr;
  ASSERT_EQ(cudaMalloc(&ws, size_t(ws_bytes)), cudaSuccess);
  uint16_t* dq = upload(q16);
  uint16_t* dout = upload(std::vector<uint16_t>(q16.size(), 0));
  const auto status = nuq::cuda::kv_decode_attention(d, batch, int(n_heads), dq, dout, float(1.0 / std::sqrt(double(hd))),
                                                     max_len, split, ws, ws_bytes, nullptr, kc.type);
  ASSERT_TRUE(status.ok()) << status.message;
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<uint16_t> out16(q16.size());
  cudaMemcpy(out16.data(), dout, out16.size() * 2, cudaMemcpyDeviceToHost);
  const double u = bf16 ? std::ldexp(1.0, -8) : std::ldexp(1.0, -11);
  for (size_t i = 0; i < ref.size(); ++i) {
    const double got = bf16 ? nuq::bf16_to_float(out16[i]) : nuq::fp16_to_float(out16[i]);
    ASSERT_LE(std::fabs(got - ref[i]), u * std::fabs(ref[i]) + 2e-3) << "output " << i << ": " << got << " vs " << ref[i];
  }
  for (void* p : {ws, static_cast<void*>(dq), static_cast<void*>(dout)}) cudaFree(p);
}

class CudaKvDecode : public ::testing::Test {
 protected:
  void SetUp() override {
    if (nuq::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device: GPU KV decode not checked";
  }
};

using nuq::cuda::ActivationType;

// Every supported head dimension (interleaved and half-split RoPE), paged batches of different lengths.
TEST_F(CudaKvDecode, MatchesCpuReference) {
  for (int64_t hd : {64, 80, 96, 128}) check_case({hd, 2, 4, 3, 3, {1, 17, 4097}, ActivationType::f16});
}

// GQA 1, 3 (SmolLM2) and 8, mixed widths, three sink tokens, bf16 queries and outputs.
TEST_F(CudaKvDecode, GroupsWidthsSinksAndBf16) {
  check_case({128, 4, 1, 2, 4, {1, 17, 4097}, ActivationType::f16});
  check_case({64, 3, 3, 4, 2, {17, 300, 33}, ActivationType::bf16, 3});
  check_case({128, 1, 8, 3, 3, {1, 17, 4097}, ActivationType::bf16});
  check_case({96, 2, 2, 2, 2, {1000, 5}, ActivationType::f16, 0});
}

// Warps take 16-token tiles: pages of 16 and 64 tokens, splits that end inside a page (48) or are a
// single tile (16), sink tokens past the first tile (20), lengths on and off tile boundaries.
TEST_F(CudaKvDecode, PageSizesSplitsAndTileEdges) {
  check_case({128, 2, 4, 3, 3, {1, 16, 17, 300, 4097}, ActivationType::f16, 1, 16, 48});
  check_case({64, 2, 2, 4, 4, {15, 32, 33, 1000}, ActivationType::bf16, 20, 64, 16});
  check_case({80, 1, 8, 2, 3, {64, 65, 129}, ActivationType::f16, 2, 64, 2048});
}

// Attention over a cache's dequantized tokens with value rows replaced, in double, computed here (RoPE
// from the exported frequencies, interleaved pairs): the reference for pages patched after export.
std::vector<double> host_attention(const kv::LayerCache& cache, const kv::LayerCache::Export& e, int seq,
                                   const std::vector<float>& q, int64_t n_heads, std::vector<float> v_override,
                                   int64_t override_token) {
  const int64_t hd = cache.head_dim(), n_kv = cache.n_kv_heads(), len = cache.length(seq), group = n_heads / n_kv;
  std::vector<float> k(size_t(len * n_kv * hd)), v(k.size());
  cache.dequantize(seq, k.data(), v.data());
  if (override_token >= 0) std::copy(v_override.begin(), v_override.end(), v.begin() + override_token * n_kv * hd);
  auto rotated = [&](const float* x, int64_t pos) {
    std::vector<double> r(x, x + hd);
    for (int64_t i = 0; i < hd / 2; ++i) {
      const double a = pos * e.rope_freq[size_t(i)], x0 = r[size_t(2 * i)], x1 = r[size_t(2 * i + 1)];
      r[size_t(2 * i)] = x0 * std::cos(a) - x1 * std::sin(a);
      r[size_t(2 * i + 1)] = x0 * std::sin(a) + x1 * std::cos(a);
    }
    return r;
  };
  std::vector<double> out(size_t(n_heads * hd), 0.0);
  for (int64_t h = 0; h < n_kv; ++h)
    for (int64_t g = 0; g < group; ++g) {
      const std::vector<double> qr = rotated(q.data() + (h * group + g) * hd, len - 1);
      std::vector<double> p(static_cast<size_t>(len));
      for (int64_t t = 0; t < len; ++t) {
        const std::vector<double> kr = rotated(k.data() + (t * n_kv + h) * hd, t);
        double d = 0;
        for (int64_t i = 0; i < hd; ++i) d += qr[size_t(i)] * kr[size_t(i)];
        p[size_t(t)] = d / std::sqrt(double(hd));
      }
      const double mx = *std::max_element(p.begin(), p.end());
      double sum = 0;
      for (double& x : p) sum += x = std::exp(x - mx);
      for (int64_t t = 0; t < len; ++t)
        for (int64_t i = 0; i < hd; ++i)
          out[size_t((h * group + g) * hd + i)] += p[size_t(t)] / sum * v[size_t((t * n_kv + h) * hd + i)];
    }
  return out;
}

// A token whose value scale is 0 in the pages (nuq's writer stores 1 for a range of 0, src/kv_cache.cpp;
// pages written elsewhere may not): its values are the offset plus the outlier residuals, which the
// kernel gets by taking scale 1 and a row of zeros. The reference reads the offset and residuals from the
// record as docs/kv-cache.md lays it out.
TEST_F(CudaKvDecode, ZeroValueScaleMeansOffsetPlusResiduals) {
  const int64_t hd = 64, n_kv = 1, group = 4, n_heads = n_kv * group, len = 12, t5 = 5;
  std::mt19937_64 rng(7);
  std::normal_distribution<float> nd;
  std::vector<float> k(size_t(256 * n_kv * hd)), v(k.size());
  for (auto& x : k) x = nd(rng);
  for (auto& x : v) x = nd(rng);
  kv::CalibrationOptions co;
  co.sink_tokens = 0;
  const auto layer = kv::calibrate_layer(k.data(), v.data(), nullptr, nullptr, 256, n_kv, hd, co);
  kv::Calibration common;
  common.sink_tokens = 0;
  kv::CacheOptions opt;
  opt.rope.layout = nuq::RopeLayout::interleaved;
  kv::LayerCache cache(layer, common, opt);
  const int seq = cache.add_sequence();
  std::vector<float> kk(size_t(len * n_kv * hd)), vv(kk.size());
  for (auto& x : kk) x = nd(rng);
  for (auto& x : vv) x = nd(rng);
  std::fill(vv.begin() + t5 * hd, vv.begin() + (t5 + 1) * hd, 0.25f);  // one level: stored with scale 1
  vv[size_t(t5 * hd + 9)] = 6.0f;                                     // and one outlier
  cache.append(seq, kk.data(), vv.data(), len);
  auto e = cache.export_pages(std::vector<int>{seq});
  const kv::TokenLayout& lay = cache.layout();
  ASSERT_GE(lay.slots, 1);
  uint8_t* rec = e.pages.data() + int64_t(e.block_tables[0]) * e.page_stride +
                 n_kv * cache.block_tokens() * lay.k_bytes + t5 * lay.v_bytes;  // head 0's V record of token 5
  auto fp16_at = [](const uint8_t* p) { return nuq::fp16_to_float(uint16_t(p[0] | p[1] << 8)); };
  ASSERT_EQ(fp16_at(rec), 1.0f) << "the writer's scale for a constant vector";
  rec[0] = rec[1] = 0;  // scale 0
  std::vector<float> v5(size_t(hd), fp16_at(rec + 2));
  const uint8_t* slots = rec + 4 + lay.v_index_bytes;
  for (int s = 0; s < lay.slots; ++s)
    if (slots[s] < hd) v5[slots[s]] += fp16_at(slots + lay.slots + 2 * s);

  std::vector<uint16_t> q16(size_t(n_heads * hd));
  std::vector<float> q(q16.size());
  for (size_t i = 0; i < q.size(); ++i) q[i] = nuq::fp16_to_float(q16[i] = nuq::float_to_fp16(nd(rng) * 0.5f));
  // The host reference agrees with the library's on the unpatched cache, and the patch matters.
  std::vector<float> lib(q.size());
  kv::AttentionOptions ro;
  ro.isa = nuq::cpu::Isa::scalar;
  kv::decode_attention_reference(cache, std::vector<int>{seq}, q.data(), n_heads, lib.data(), ro);
  const std::vector<double> unpatched = host_attention(cache, e, seq, q, n_heads, {}, -1);
  const std::vector<double> ref = host_attention(cache, e, seq, q, n_heads, v5, t5);
  double moved = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    ASSERT_NEAR(unpatched[i], lib[i], 1e-5) << "output " << i;
    moved = std::max(moved, std::fabs(ref[i] - unpatched[i]));
  }
  ASSERT_GT(moved, 1e-2) << "token 5's codebook term should move the output";

  DeviceCache dc;
  upload_cache(cache, e, dc);
  const int split = 512;
  const int64_t ws_bytes = nuq::cuda::kv_decode_workspace_bytes(1, int(n_heads), int(hd), int(len), split);
  void* ws = nullptr;
  ASSERT_EQ(cudaMalloc(&ws, size_t(ws_bytes)), cudaSuccess);
  uint16_t* dq = upload(q16);
  uint16_t* dout = upload(std::vector<uint16_t>(q16.size(), 0));
  const auto status = nuq::cuda::kv_decode_attention(dc.d, 1, int(n_heads), dq, dout, float(1.0 / std::sqrt(double(hd))),
                                                     int(len), split, ws, ws_bytes, nullptr, ActivationType::f16);
  ASSERT_TRUE(status.ok()) << status.message;
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<uint16_t> out16(q16.size());
  cudaMemcpy(out16.data(), dout, out16.size() * 2, cudaMemcpyDeviceToHost);
  for (void* p : {ws, static_cast<void*>(dq), static_cast<void*>(dout)}) cudaFree(p);
  for (size_t i = 0; i < ref.size(); ++i)
    ASSERT_LE(std::fabs(nuq::fp16_to_float(out16[i]) - ref[i]), std::ldexp(1.0, -11) * std::fabs(ref[i]) + 2e-3)
        << "output " << i;
}

// A context past 32k tokens: positions where angles formed in fp32 would be off by ~1e-3 rad.
TEST_F(CudaKvDecode, LongContext) { check_case({128, 2, 4, 3, 3, {33000, 5}, ActivationType::f16}); }

// The fp16/bf16 baseline kernel against the CPU's unquantized attention on the same rounded values.
void check_dense(int64_t hd, int64_t n_kv, int64_t group, const std::vector<int64_t>& lengths, ActivationType type) {
  SCOPED_TRACE("dense head_dim=" + std::to_string(hd) + " group=" + std::to_string(group) +
               (type == ActivationType::bf16 ? " bf16" : " fp16"));
  const bool bf16 = type == ActivationType::bf16;
  const int batch = int(lengths.size());
  const int64_t n_heads = n_kv * group, max_len = *std::max_element(lengths.begin(), lengths.end());
  const int64_t head_stride = (max_len + 3) / 4 * 4 * hd, seq_stride = n_kv * head_stride;
  std::mt19937_64 rng(uint64_t(hd + 17 * group));
  std::normal_distribution<float> nd;
  auto round16 = [&](float x, uint16_t& bits) {
    bits = bf16 ? nuq::float_to_bf16(x) : nuq::float_to_fp16(x);
    return bf16 ? nuq::bf16_to_float(bits) : nuq::fp16_to_float(bits);
  };
  std::vector<uint16_t> k16(size_t(batch * seq_stride)), v16(k16.size()), q16(size_t(batch * n_heads * hd));
  std::vector<float> kf(k16.size()), vf(k16.size()), qf(q16.size());
  for (size_t i = 0; i < k16.size(); ++i) {
    kf[i] = round16(nd(rng), k16[i]);
    vf[i] = round16(nd(rng), v16[i]);
  }
  for (size_t i = 0; i < q16.size(); ++i) qf[i] = round16(0.5f * nd(rng), q16[i]);
  kv::DenseKv ref_kv;
  ref_kv.k = kf.data();
  ref_kv.v = vf.data();
  ref_kv.n_kv_heads = n_kv;
  ref_kv.head_dim = hd;
  ref_kv.seq_stride = seq_stride;
  ref_kv.head_stride = head_stride;
  std::vector<float> ref(qf.size());
  kv::AttentionOptions ro;
  ro.isa = nuq::cpu::Isa::scalar;
  kv::dense_decode_attention(ref_kv, lengths, qf.data(), n_heads, ref.data(), ro);

  std::vector<int32_t> lens32(lengths.begin(), lengths.end());
  nuq::cuda::DenseKvDevice d;
  d.k = upload(k16);
  d.v = upload(v16);
  d.seq_stride = seq_stride;
  d.head_stride = head_stride;
  d.n_kv_heads = int(n_kv);
  d.head_dim = int(hd);
  d.lengths = upload(lens32);
  const int split = 256;
  const int64_t ws_bytes = nuq::cuda::kv_decode_workspace_bytes(batch, int(n_heads), int(hd), int(max_len), split);
  void* ws = nullptr;
  ASSERT_EQ(cudaMalloc(&ws, size_t(ws_bytes)), cudaSuccess);
  uint16_t* dq = upload(q16);
  uint16_t* dout = upload(std::vector<uint16_t>(q16.size(), 0));
  const auto status = nuq::cuda::dense_kv_decode_attention(d, batch, int(n_heads), dq, dout, float(1.0 / std::sqrt(double(hd))),
                                                           int(max_len), split, ws, ws_bytes, nullptr, type);
  ASSERT_TRUE(status.ok()) << status.message;
  std::vector<uint16_t> out16(q16.size());
  cudaMemcpy(out16.data(), dout, out16.size() * 2, cudaMemcpyDeviceToHost);
  const double u = bf16 ? std::ldexp(1.0, -8) : std::ldexp(1.0, -11);
  for (size_t i = 0; i < ref.size(); ++i) {
    const double got = bf16 ? nuq::bf16_to_float(out16[i]) : nuq::fp16_to_float(out16[i]);
    ASSERT_LE(std::fabs(got - ref[i]), u * std::fabs(ref[i]) + 2e-3) << "output " << i << ": " << got << " vs " << ref[i];
  }
  for (const void* p : {static_cast<const void*>(d.k), static_cast<const void*>(d.v), static_cast<const void*>(d.lengths),
                        static_cast<const void*>(dq), static_cast<const void*>(dout), static_cast<const void*>(ws)})
    cudaFree(const_cast<void*>(p));
}

TEST_F(CudaKvDecode, DenseBaselineMatchesCpuReference) {
  check_dense(128, 2, 4, {1, 33, 700}, ActivationType::f16);
  check_dense(64, 3, 3, {257, 5}, ActivationType::bf16);
  check_dense(80, 1, 8, {100, 1000}, ActivationType::f16);
  check_dense(96, 4, 1, {9, 513}, ActivationType::bf16);
}

TEST(CudaKvDecodeArgs, DenseRefusalsNameTheProblem) {
  nuq::cuda::DenseKvDevice d;
  d.head_dim = 128;
  d.n_kv_heads = 2;
  alignas(16) static uint16_t fake[64];
  d.k = fake + 1;
  d.v = fake;
  d.lengths = reinterpret_cast<const int32_t*>(fake);
  d.head_stride = 128 * 16;
  auto s = nuq::cuda::can_implement_dense_kv_decode(d, 1, 4, 16, 256, 1 << 20);
  EXPECT_NE(s.message.find("16-byte aligned"), std::string::npos) << s.message;
  d.k = fake;
  s = nuq::cuda::can_implement_dense_kv_decode(d, 1, 4, 17, 256, 1 << 20);
  EXPECT_NE(s.message.find("cannot hold max_length 17"), std::string::npos) << s.message;
  EXPECT_TRUE(nuq::cuda::can_implement_dense_kv_decode(d, 1, 4, 16, 256, 1 << 20).ok());
  s = nuq::cuda::can_implement_dense_kv_decode(d, 1, 5, 16, 256, 1 << 20);
  EXPECT_NE(s.message.find("5 query heads over 2 kv heads"), std::string::npos) << s.message;
}

// The message of can_implement_kv_decode for one sequence of up to 10 tokens and a 1 MiB workspace.
std::string refusal(const nuq::cuda::KvDeviceCache& c, int n_heads, int split_tokens) {
  const auto s = nuq::cuda::can_implement_kv_decode(c, 1, n_heads, 10, split_tokens, 1 << 20);
  EXPECT_EQ(s.code, s.ok() ? nuq::cuda::StatusCode::ok : nuq::cuda::StatusCode::invalid_argument);
  return s.message;
}

TEST(CudaKvDecodeArgs, RefusalsNameTheProblem) {
  // Host-side checks: no device needed.
  nuq::cuda::KvDeviceCache c;
  c.head_dim = 72;
  c.bits_k = c.bits_v = 3;
  c.n_kv_heads = 2;
  auto expect = [&](int n_heads, int split, const std::string& text) {
    const std::string m = refusal(c, n_heads, split);
    EXPECT_NE(m.find(text), std::string::npos) << "expected \"" << text << "\" in: " << m;
  };
  expect(4, 512, "head_dim 72");
  c.head_dim = 128;
  expect(4, 512, "page size 0");
  c.block_tokens = 32;
  expect(3, 512, "3 query heads");
  expect(4, 512, "null cache pointer");
  c.bits_v = 5;
  expect(4, 512, "5 bits");
  c.bits_v = 3;
  // Past the pointer and size checks (never dereferenced: these checks run on the host).
  alignas(16) static const unsigned char fake[16] = {};
  c.pages = fake;
  c.block_tables = c.lengths = c.storage = reinterpret_cast<const int32_t*>(fake);
  c.k_scale = c.k_offset = c.k_codebook = c.v_codebook = reinterpret_cast<const float*>(fake);
  c.rope_page_cos = c.rope_page_sin = c.rope_step_cos = c.rope_step_sin = reinterpret_cast<const float*>(fake);
  c.sink_k = c.sink_v = reinterpret_cast<const uint16_t*>(fake);
  c.rope_pages = 1;
  EXPECT_EQ(refusal(c, 4, 512), "");
  c.block_tokens = 24;  // a valid page size for the CPU cache, not for the kernel's 16-token tiles
  expect(4, 512, "page size 24 tokens is not a multiple of 16 up to 64");
  c.block_tokens = 128;
  expect(4, 512, "page size 128 tokens");
  c.block_tokens = 32;
  expect(4, 500, "split_tokens 500");
  c.page_stride = 1000;
  expect(4, 512, "page_stride (1000)");
  c.page_stride = 0;
  c.sink_tokens = 64;  // the kernel's sink prologue scores at most 64 sink tokens
  EXPECT_EQ(refusal(c, 4, 512), "");
  c.sink_tokens = 65;
  expect(4, 512, "65 sink tokens (at most 64)");
}

}  // namespace
