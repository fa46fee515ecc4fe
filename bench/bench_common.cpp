#include "bench_common.hpp"

#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <thread>
#include <unistd.h>
#include <vector>

namespace nuq::bench {
namespace {

// Integer sum: unlike a float sum the compiler may reorder it, so it vectorizes and the loop is bound
// by memory, not by add latency.
uint64_t sum_range(const uint64_t* p, std::size_t n) {
  uint64_t a = 0;
  for (std::size_t i = 0; i < n; ++i) a += p[i];
  return a;
}

double measure(int threads) {
  // At least 1 GiB and four times the last-level cache, so the figure is a DRAM figure.
  const std::size_t buffer_bytes = std::max(std::size_t(1) << 30, 4 * last_level_cache_bytes()) / 64 * 64;
  const std::size_t n = buffer_bytes / sizeof(uint64_t);
  auto* buf = static_cast<uint64_t*>(std::aligned_alloc(64, buffer_bytes));
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
    best = std::max(best, double(buffer_bytes) / seconds);
  }
  std::free(buf);
  return best;
}

// The context every bench run reports first; a static object because benchmark_main owns main().
struct MachineContext {
  MachineContext() {
    benchmark::AddCustomContext("cpu_model", cpu_model());
    benchmark::AddCustomContext("llc_bytes", std::to_string(last_level_cache_bytes()));
  }
};
const MachineContext machine_context;

}  // namespace

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("model name", 0) == 0) {
      const auto colon = line.find(':');
      if (colon != std::string::npos) return line.substr(line.find_first_not_of(' ', colon + 1));
    }
  return "unknown";
}

namespace {
// sysfs lists cpu0's caches as index0..N with a level and a size such as "260M" or "2048K".
std::size_t read_last_level_cache_bytes() {
  int best_level = 0;
  std::size_t best = 0;
  for (int i = 0; i < 16; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    std::ifstream level_file(dir + "level"), size_file(dir + "size");
    int level = 0;
    std::string size;
    if (!(level_file >> level) || !(size_file >> size) || size.empty()) continue;
    std::size_t bytes = std::strtoull(size.c_str(), nullptr, 10);
    if (size.back() == 'K') bytes <<= 10;
    if (size.back() == 'M') bytes <<= 20;
    if (level > best_level || (level == best_level && bytes > best)) best_level = level, best = bytes;
  }
  if (best > 0) return best;
  const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE), l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
  return std::size_t(std::max(0L, l3 > 0 ? l3 : l2));
}
}  // namespace

// Read once: every case asks (its working set and its counter).
std::size_t last_level_cache_bytes() {
  static const std::size_t bytes = read_last_level_cache_bytes();
  return bytes;
}

double dram_working_set_bytes() {
  return std::max(128.0 * 1024 * 1024, 2.0 * double(last_level_cache_bytes()));
}

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

void report_working_set(benchmark::State& state, double working_set_bytes) {
  const double llc = double(last_level_cache_bytes());
  state.counters["working_set_over_llc"] = llc > 0 ? working_set_bytes / llc : 0;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace nuq::bench
