#include "bench_common.hpp"

#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

namespace nuq::bench {
namespace {

// 1 GiB: far beyond any last-level cache this code will meet, so the figure is a DRAM figure.
constexpr std::size_t kBufferBytes = std::size_t(1) << 30;

// Integer sum: unlike a float sum the compiler may reorder it, so it vectorizes and the loop is bound
// by memory, not by add latency.
uint64_t sum_range(const uint64_t* p, std::size_t n) {
  uint64_t a = 0;
  for (std::size_t i = 0; i < n; ++i) a += p[i];
  return a;
}

double measure(int threads) {
  const std::size_t n = kBufferBytes / sizeof(uint64_t);
  auto* buf = static_cast<uint64_t*>(std::aligned_alloc(64, kBufferBytes));
  if (!buf) return 0;
  // Touch every page from the thread that will read it (first-touch placement on NUMA machines).
  std::vector<std::thread> pool;
  const std::size_t chunk = (n + threads - 1) / threads;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([=] {
      const std::size_t b = std::min(n, t * chunk), e = std::min(n, b + chunk);
      for (std::size_t i = b; i < e; ++i) buf[i] = i;
    });
  for (auto& th : pool) th.join();
  double best = 0;
  volatile uint64_t sink = 0;
  for (int pass = 0; pass < 5; ++pass) {
    pool.clear();
    std::vector<uint64_t> partial(threads);
    const auto start = std::chrono::steady_clock::now();
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([=, &partial] {
        const std::size_t b = std::min(n, t * chunk), e = std::min(n, b + chunk);
        partial[t] = sum_range(buf + b, e - b);
      });
    for (auto& th : pool) th.join();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    for (uint64_t p : partial) sink = sink + p;
    best = std::max(best, double(kBufferBytes) / seconds);
  }
  std::free(buf);
  return best;
}

}  // namespace

double measured_read_bandwidth(int threads) {
  static std::mutex mu;
  static std::map<int, double> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(threads);
  if (it != cache.end()) return it->second;
  const double bw = measure(threads);
  cache[threads] = bw;
  benchmark::AddCustomContext("read_bandwidth_GBps_threads_" + std::to_string(threads), std::to_string(bw / 1e9));
  return bw;
}

void report_counters(benchmark::State& state, double seconds, double bytes_per_iteration,
                     double weights_per_iteration, int threads) {
  const double iters = double(state.iterations());
  if (seconds <= 0 || iters == 0) return;
  const double bytes_per_s = bytes_per_iteration * iters / seconds;
  state.counters["bytes_per_s"] = bytes_per_s;
  if (weights_per_iteration > 0) state.counters["weights_per_s"] = weights_per_iteration * iters / seconds;
  const double bw = measured_read_bandwidth(threads);
  state.counters["bw_fraction"] = bw > 0 ? bytes_per_s / bw : 0;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace nuq::bench
