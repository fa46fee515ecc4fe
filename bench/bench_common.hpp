// Helpers shared by nuq's Google Benchmark binaries. Contract (all benches): a case name carries its
// parameters as key:value tokens separated by '/', and every case reports the user counters
// bytes_per_s, bw_fraction (bytes_per_s over the bandwidth this same binary measured) and, where
// weights are involved, weights_per_s.
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

double seconds_since(std::chrono::steady_clock::time_point start);

}  // namespace nuq::bench
