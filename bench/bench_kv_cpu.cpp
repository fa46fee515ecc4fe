// Decode attention over the KV cache on the CPU: the quantized cache (nuq::kv::decode_attention) against
// our own unquantized fp32 and bf16 decode kernels in the same run.
//
// kv/impl:<nuq|fp32|bf16>/hd:128/bits:<b>/heads:<q heads>/kv_heads:<n>/
//   ctx:<tokens>/batch:<b>/threads:<t>   (bits: 32 for fp32, 16 for bf16)
//
// One iteration is one decode step: every sequence of the batch attends with all query heads to its
// whole context (of length ctx). bytes_per_s counts the cache bytes one step reads (nuq: every stored
// byte per token, metadata included; fp32/bf16: K and V), bw_fraction divides by the read bandwidth this
// binary measures; us_per_step and cache_bytes_per_token are reported alongside. Cases whose fp32
// cache would exceed kMaxCacheBytes are skipped with that reason (the machine is shared).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "bench_common.hpp"
#include "nuq/half.hpp"
#include "nuq/kv_cache.hpp"

namespace {

namespace kv = nuq::kv;
constexpr int64_t kHeadDim = 128;
constexpr double kMaxCacheBytes = 3.0 * 1024 * 1024 * 1024;

// Cheap reproducible values: Gaussian-like sums of uniforms, plus per-channel offsets on a few key
// channels (the structure of real keys); attention speed does not depend on the values.
void fill(float* x, int64_t n, uint64_t seed, int64_t width) {
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (int64_t i = 0; i < n; ++i) {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    const float u = float(s & 0xffff) / 65536.0f + float((s >> 16) & 0xffff) / 65536.0f - 1.0f;
    x[i] = u * 2.0f + (i % width % 17 == 3 ? 4.0f : 0.0f);
  }
}

struct NuqState {
  std::string key;
  std::unique_ptr<kv::LayerCache> cache;
  std::vector<int> seqs;
};

void nuq_attention(benchmark::State& state) {
  const int bits = int(state.range(0));
  const int64_t heads = state.range(1), n_kv = state.range(2), ctx = state.range(3), batch = state.range(4);
  const int threads = int(state.range(5));
  static NuqState st;
  const std::string key = std::to_string(bits) + "/" + std::to_string(n_kv) + "/" + std::to_string(ctx) + "/" +
                          std::to_string(batch);
  if (st.key != key) {
    st.cache.reset();
    st.seqs.clear();
    const int64_t width = n_kv * kHeadDim, calib = 256;
    std::vector<float> k(size_t(calib * width)), v(k.size());
    fill(k.data(), int64_t(k.size()), 1, width);
    fill(v.data(), int64_t(v.size()), 2, width);
    kv::CalibrationOptions co;
    co.bits_k = co.bits_v = bits;
    kv::Calibration common;
    const auto layer = kv::calibrate_layer(k.data(), v.data(), nullptr, nullptr, calib, n_kv, kHeadDim, co);
    st.cache = std::make_unique<kv::LayerCache>(layer, common, kv::CacheOptions{});
    const int64_t chunk = 1024;
    k.resize(size_t(chunk * width));
    v.resize(k.size());
    for (int64_t b = 0; b < batch; ++b) {
      st.seqs.push_back(st.cache->add_sequence());
      for (int64_t t = 0; t < ctx; t += chunk) {
        const int64_t n = std::min(chunk, ctx - t);
        fill(k.data(), n * width, uint64_t(b * 1000 + t + 3), width);
        fill(v.data(), n * width, uint64_t(b * 1000 + t + 4), width);
        st.cache->append(st.seqs.back(), k.data(), v.data(), n, 2);
      }
    }
    st.key = key;
  }
  std::vector<float> q(size_t(batch * heads * kHeadDim)), out(q.size());
  fill(q.data(), int64_t(q.size()), 9, kHeadDim);
  kv::AttentionOptions o;
  o.threads = threads;
  const auto start = std::chrono::steady_clock::now();
  for (auto _ : state) {
    kv::decode_attention(*st.cache, st.seqs, q.data(), heads, out.data(), o);
    benchmark::DoNotOptimize(out.data());
  }
  const double seconds = nuq::bench::seconds_since(start);
  const double bytes = double(batch * ctx * st.cache->bytes_per_token());
  nuq::bench::report_counters(state, seconds, bytes, 0, threads);
  state.counters["us_per_step"] = seconds / double(state.iterations()) * 1e6;
  state.counters["cache_bytes_per_token"] = double(st.cache->bytes_per_token());
}

template <bool Bf16>
void dense_attention(benchmark::State& state) {
  const int64_t heads = state.range(1), n_kv = state.range(2), ctx = state.range(3), batch = state.range(4);
  const int threads = int(state.range(5));
  const int64_t elem = Bf16 ? 2 : 4, per_token = 2 * n_kv * kHeadDim * elem;
  if (double(batch * ctx * per_token) > kMaxCacheBytes) {
    state.SkipWithError("cache larger than the benchmark's 3 GiB memory budget");
    return;
  }
  static std::string key_seen;
  static std::vector<float> kf, vf;
  static std::vector<uint16_t> kb, vb;
  const std::string key = std::to_string(n_kv) + "/" + std::to_string(ctx) + "/" + std::to_string(batch);
  const size_t n = size_t(batch * n_kv * ctx * kHeadDim);
  if (key_seen != key) {
    kf.clear(), vf.clear(), kb.clear(), vb.clear();
    kf.shrink_to_fit(), vf.shrink_to_fit(), kb.shrink_to_fit(), vb.shrink_to_fit();
    std::vector<float> tmp(size_t(1) << 20);
    auto make = [&](uint64_t seed, std::vector<float>& f, std::vector<uint16_t>& h) {
      if (Bf16) h.resize(n); else f.resize(n);
      for (size_t i = 0; i < n; i += tmp.size()) {
        const size_t m = std::min(tmp.size(), n - i);
        fill(tmp.data(), int64_t(m), seed + i, kHeadDim);
        if (Bf16)
          for (size_t j = 0; j < m; ++j) h[i + j] = nuq::float_to_bf16(tmp[j]);
        else
          std::memcpy(f.data() + i, tmp.data(), m * 4);
      }
    };
    make(1, kf, kb);
    make(2, vf, vb);
    key_seen = key;
  }
  kv::DenseKv d;
  d.k = Bf16 ? static_cast<const void*>(kb.data()) : kf.data();
  d.v = Bf16 ? static_cast<const void*>(vb.data()) : vf.data();
  d.bf16 = Bf16;
  d.n_kv_heads = n_kv;
  d.head_dim = kHeadDim;
  d.head_stride = ctx * kHeadDim;
  d.seq_stride = n_kv * ctx * kHeadDim;
  const std::vector<int64_t> lengths(size_t(batch), ctx);
  std::vector<float> q(size_t(batch * heads * kHeadDim)), out(q.size());
  fill(q.data(), int64_t(q.size()), 9, kHeadDim);
  kv::AttentionOptions o;
  o.threads = threads;
  const auto start = std::chrono::steady_clock::now();
  for (auto _ : state) {
    kv::dense_decode_attention(d, lengths, q.data(), heads, out.data(), o);
    benchmark::DoNotOptimize(out.data());
  }
  const double seconds = nuq::bench::seconds_since(start);
  nuq::bench::report_counters(state, seconds, double(batch * ctx * per_token), 0, threads);
  state.counters["us_per_step"] = seconds / double(state.iterations()) * 1e6;
  state.counters["cache_bytes_per_token"] = double(per_token);
}

// Arguments bits, heads, kv_heads, ctx, batch, threads (named, so that Google Benchmark writes them into
// the case name as key:value tokens).
void kv_args(benchmark::internal::Benchmark* b, std::initializer_list<int64_t> bit_widths) {
  b->ArgNames({"bits", "heads", "kv_heads", "ctx", "batch", "threads"});
  for (int64_t threads : {1, 2})
    for (int64_t batch : {1, 8}) {
      if (threads == 1 && batch != 1) continue;  // one thread: batch 1 only, to keep the run short
      for (int64_t n_kv : {32, 8})
        for (int64_t ctx : {1024, 4096, 16384, 32768})
          for (int64_t bits : bit_widths) b->Args({bits, 32, n_kv, ctx, batch, threads});
    }
}

void register_all() {
  benchmark::RegisterBenchmark("kv/impl:nuq/hd:128", nuq_attention)
      ->Apply([](benchmark::internal::Benchmark* b) { kv_args(b, {4, 3, 2}); })
      ->UseRealTime()
      ->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark("kv/impl:fp32/hd:128", dense_attention<false>)
      ->Apply([](benchmark::internal::Benchmark* b) { kv_args(b, {32}); })
      ->UseRealTime()
      ->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark("kv/impl:bf16/hd:128", dense_attention<true>)
      ->Apply([](benchmark::internal::Benchmark* b) { kv_args(b, {16}); })
      ->UseRealTime()
      ->Unit(benchmark::kMicrosecond);
}

const int registered = (register_all(), 0);

}  // namespace
