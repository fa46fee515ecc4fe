// Helpers shared by nuq's Google Benchmark binaries. Contract (all benches): a case name carries its
// parameters as key:value tokens separated by '/', and every case reports the user counters
// bytes_per_s, bw_fraction (bytes_per_s over the bandwidth this same binary measured) and, where
// weights are involved, weights_per_s. Every run's context names the CPU model and its last-level cache
// size (cpu_model, llc_bytes), so a table can be matched to the machine it came from.
#pragma once

#include <benchmark/benchmark.h>

#include <chrono>
#include <cstddef>
#include <string>

namespace nuq::bench {

// Read bandwidth of main memory in bytes/s with `threads` threads, measured once per process (cached)
// by streaming over a buffer several times larger than the last-level cache; best of a few passes.
double measured_read_bandwidth(int threads);

// Sets bytes_per_s, weights_per_s (when > 0) and bw_fraction from per-iteration totals and the wall
// seconds the benchmark loop took (measured by the caller around `for (auto _ : state)`), against the
// read bandwidth measured with `threads` threads.
void report_counters(benchmark::State& state, double seconds, double bytes_per_iteration,
                     double weights_per_iteration, int threads);

// The CPU's model name (/proc/cpuinfo), or "unknown".
std::string cpu_model();

// Bytes of the largest cache level the kernel reports (sysfs, else sysconf), 0 when unknown.
std::size_t last_level_cache_bytes();

// Bytes a benchmark should rotate over so that its data comes from DRAM: at least 128 MiB, and at
// least twice the last-level cache (some server L3s exceed 128 MiB: 260 MiB on the Intel Xeon of
// docs/benchmarks.md).
double dram_working_set_bytes();

// Sets working_set_over_llc: the bytes a case cycles through over the last-level cache's size (above 1:
// the case reads from DRAM; 0 when the cache size is unknown).
void report_working_set(benchmark::State& state, double working_set_bytes);

double seconds_since(std::chrono::steady_clock::time_point start);

}  // namespace nuq::bench
