// CUDA KV decode attention over the quantized cache (include/nuq/kv_cuda.hpp) against our own fp16
// flash-decoding kernel on the same shapes, in the same case.
//
// kv/impl:nuq_cuda/tokens:<n>/batch:<b>/group:<g>: LLaMA-3-shaped heads (8 kv heads, head dim 128, g
//   query heads per kv head), a 3-bit keys + 3-bit values cache with 1% fp16 outliers and one fp16 sink
//   token, built by nuq::kv::LayerCache from random pre-RoPE keys and values (the kernels' speed does not
//   depend on the values), every sequence `tokens` long, each with its own pages.
//   Counters: bytes_per_s (cache bytes read per call: the pages of every token of every sequence, plus
//   queries and outputs), token_heads_per_s, bw_fraction (bytes_per_s over the device-to-device copy
//   bandwidth this binary measures), fp16_us / speedup_vs_fp16 (dense_kv_decode_attention on fp16 keys
//   and values of the same shapes, timed in the same case), bytes_vs_fp16 (cache bytes relative).
// Caches of a (tokens, batch) pair are built once and kept for the cases that share them; every call
// streams its cache from HBM (each case's cache is at least 8× the L2 cache except the 1k-token ones).
#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "cuda_bench.hpp"
#include "nuq/half.hpp"
#include "nuq/kv_cache.hpp"
#include "nuq/kv_cuda.hpp"

namespace {

namespace kv = nuq::kv;
constexpr int kKvHeads = 8, kHeadDim = 128, kSplit = 512;

#define CHECK_CUDA(expr)                                                                  \
  do {                                                                                    \
    if (cudaError_t err_ = (expr); err_ != cudaSuccess) {                                 \
      state.SkipWithError((std::string(#expr) + ": " + cudaGetErrorString(err_)).c_str()); \
      return;                                                                             \
    }                                                                                     \
  } while (0)

struct DeviceBuffers {
  std::vector<void*> owned;
  ~DeviceBuffers() {
    for (void* p : owned) cudaFree(p);
  }
  template <class T>
  const T* upload(const std::vector<T>& host) {
    void* d = nullptr;
    if (cudaMalloc(&d, std::max<size_t>(1, host.size() * sizeof(T))) != cudaSuccess) return nullptr;
    cudaMemcpy(d, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice);
    owned.push_back(d);
    return static_cast<const T*>(d);
  }
};

// The quantized cache and the fp16 one of `batch` sequences of `tokens` tokens, on the device.
struct Caches {
  DeviceBuffers buffers;
  nuq::cuda::KvDeviceCache quantized;
  nuq::cuda::DenseKvDevice dense;
  double quantized_bytes = 0, dense_bytes = 0;
  bool ok = false;
};

Caches& caches(int64_t tokens, int batch) {
  static std::map<std::pair<int64_t, int>, std::unique_ptr<Caches>> built;
  auto& slot = built[{tokens, batch}];
  if (slot) return *slot;
  slot = std::make_unique<Caches>();
  Caches& c = *slot;
  std::mt19937_64 rng(uint64_t(tokens * 31 + batch));
  std::normal_distribution<float> normal;
  const int64_t calib = 512;
  std::vector<float> k(size_t(calib * kKvHeads * kHeadDim)), v(k.size());
  for (auto& x : k) x = normal(rng);
  for (auto& x : v) x = normal(rng);
  kv::CalibrationOptions co;  // 3/3 bits, 1% outliers, one sink token
  const auto layer = kv::calibrate_layer(k.data(), v.data(), nullptr, nullptr, calib, kKvHeads, kHeadDim, co);
  kv::Calibration common;
  kv::LayerCache cache(layer, common, kv::CacheOptions{});
  std::vector<int> seqs;
  const int64_t chunk = 4096;
  std::vector<float> kk(size_t(chunk * kKvHeads * kHeadDim)), vv(kk.size());
  for (int b = 0; b < batch; ++b) {
    seqs.push_back(cache.add_sequence());
    for (int64_t done = 0; done < tokens; done += chunk) {
      const int64_t n = std::min(chunk, tokens - done);
      for (size_t i = 0; i < size_t(n * kKvHeads * kHeadDim); ++i) kk[i] = normal(rng), vv[i] = normal(rng);
      cache.append(seqs.back(), kk.data(), vv.data(), n, 16);
    }
  }
  const auto e = cache.export_pages(seqs);
  auto& d = c.quantized;
  d.pages = c.buffers.upload(e.pages);
  d.page_stride = e.page_stride;
  d.block_tables = c.buffers.upload(e.block_tables);
  d.max_blocks = e.max_blocks;
  d.lengths = c.buffers.upload(e.lengths);
  d.sink_k = c.buffers.upload(e.sink_k);
  d.sink_v = c.buffers.upload(e.sink_v);
  d.sink_tokens = cache.sink_tokens();
  d.n_kv_heads = kKvHeads;
  d.head_dim = kHeadDim;
  d.block_tokens = cache.block_tokens();
  d.bits_k = layer.bits_k;
  d.bits_v = layer.bits_v;
  d.slots = cache.layout().slots;
  d.k_scale = c.buffers.upload(e.k_scale);
  d.k_offset = c.buffers.upload(e.k_offset);
  d.k_codebook = c.buffers.upload(e.k_codebook);
  d.v_codebook = c.buffers.upload(e.v_codebook);
  d.storage = c.buffers.upload(e.storage);
  d.rope_page_cos = c.buffers.upload(e.rope_page_cos);
  d.rope_page_sin = c.buffers.upload(e.rope_page_sin);
  d.rope_pages = int64_t(e.rope_page_cos.size()) / (kHeadDim / 2);
  d.rope_step_cos = c.buffers.upload(e.rope_step_cos);
  d.rope_step_sin = c.buffers.upload(e.rope_step_sin);
  c.quantized_bytes = double(batch) * double(tokens) * double(cache.bytes_per_token());

  // fp16 keys and values of the same shapes: random bits of small normal values.
  const int64_t head_stride = tokens * kHeadDim, seq_stride = kKvHeads * head_stride;
  std::vector<uint16_t> dense(size_t(batch * seq_stride));
  for (auto& x : dense) x = nuq::float_to_fp16(normal(rng));
  c.dense.k = c.buffers.upload(dense);
  for (auto& x : dense) x = nuq::float_to_fp16(normal(rng));
  c.dense.v = c.buffers.upload(dense);
  c.dense.seq_stride = seq_stride;
  c.dense.head_stride = head_stride;
  c.dense.n_kv_heads = kKvHeads;
  c.dense.head_dim = kHeadDim;
  c.dense.lengths = d.lengths;
  c.dense_bytes = 2.0 * double(batch) * double(seq_stride) * 2;
  c.ok = d.pages && c.dense.k && c.dense.v;
  return c;
}

void nuq_cuda_kv_decode(benchmark::State& state) {
  const int64_t tokens = state.range(0);
  const int batch = int(state.range(1)), group = int(state.range(2)), n_heads = kKvHeads * group;
  Caches& c = caches(tokens, batch);
  if (!c.ok) {
    state.SkipWithError("could not build or upload the caches (device memory?)");
    return;
  }
  std::vector<uint16_t> q(size_t(batch * n_heads * kHeadDim));
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 0.5f);
  for (auto& x : q) x = nuq::float_to_fp16(normal(rng));
  DeviceBuffers io;
  const uint16_t* dq = io.upload(q);
  auto* out = const_cast<uint16_t*>(io.upload(q));
  const int64_t ws_bytes = nuq::cuda::kv_decode_workspace_bytes(batch, n_heads, kHeadDim, int(tokens), kSplit);
  void* ws = nullptr;
  CHECK_CUDA(cudaMalloc(&ws, size_t(ws_bytes)));
  io.owned.push_back(ws);
  const float scale = float(1.0 / std::sqrt(double(kHeadDim)));
  auto run_nuq = [&] {
    return nuq::cuda::kv_decode_attention(c.quantized, batch, n_heads, dq, out, scale, int(tokens), kSplit, ws, ws_bytes,
                                          nullptr);
  };
  auto run_fp16 = [&] {
    return nuq::cuda::dense_kv_decode_attention(c.dense, batch, n_heads, dq, out, scale, int(tokens), kSplit, ws,
                                                ws_bytes, nullptr);
  };
  for (const auto& s : {run_nuq(), run_fp16()}) {
    if (!s.ok()) {
      state.SkipWithError(s.message.c_str());
      return;
    }
  }
  cudaEvent_t e0, e1;
  CHECK_CUDA(cudaEventCreate(&e0));
  CHECK_CUDA(cudaEventCreate(&e1));
  auto timed = [&](auto& run) {
    constexpr int kCalls = 10;
    cudaEventRecord(e0);
    for (int i = 0; i < kCalls; ++i) run();
    cudaEventRecord(e1);
    cudaEventSynchronize(e1);
    float ms = 0;
    cudaEventElapsedTime(&ms, e0, e1);
    return double(ms) * 1e-3 / kCalls;
  };
  double nuq_total = 0, fp16_total = 0;
  int64_t n = 0;
  for (auto _ : state) {
    const double t = timed(run_nuq);
    state.SetIterationTime(t);
    nuq_total += t;
    fp16_total += timed(run_fp16);
    ++n;
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  const double t_nuq = nuq_total / double(n), t_fp16 = fp16_total / double(n);
  const double io_bytes = 2.0 * double(q.size()) * 2;
  const double bytes = c.quantized_bytes + io_bytes;
  state.counters["bytes_per_s"] = bytes / t_nuq;
  state.counters["token_heads_per_s"] = double(batch) * double(tokens) * kKvHeads / t_nuq;
  state.counters["bw_fraction"] = bytes / t_nuq / nuq::bench::copy_bandwidth();
  state.counters["copy_bw_GBps"] = nuq::bench::copy_bandwidth() / 1e9;
  state.counters["fp16_us"] = t_fp16 * 1e6;
  state.counters["fp16_bw_fraction"] = (c.dense_bytes + io_bytes) / t_fp16 / nuq::bench::copy_bandwidth();
  state.counters["speedup_vs_fp16"] = t_fp16 / t_nuq;
  state.counters["bytes_vs_fp16"] = c.quantized_bytes / c.dense_bytes;
}

void args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"tokens", "batch", "group"});
  for (int64_t tokens : {1024, 4096, 16384, 32768, 131072})
    for (int64_t batch : {1, 8})
      for (int64_t group : {1, 4, 8})
        if (tokens < 131072 || batch == 1) b->Args({tokens, batch, group});
}

}  // namespace

BENCHMARK(nuq_cuda_kv_decode)->Name("kv/impl:nuq_cuda")->Apply(args)->UseManualTime()->Unit(benchmark::kMicrosecond);
