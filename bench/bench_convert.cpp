// Throughput of the bulk fp32 <-> fp16/bf16 conversions that readers and writers use on whole
// tensors. Arrays of 64 Mi elements (256 MiB fp32) so that the figures are memory figures.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <vector>

#include "bench_common.hpp"
#include "nuq/half.hpp"

namespace {

constexpr std::size_t kElements = std::size_t(64) << 20;

enum class Direction { f16_to_f32, f32_to_f16, bf16_to_f32, f32_to_bf16 };

void convert(benchmark::State& state, Direction dir) {
  std::vector<float> f32(kElements, 0.3f);
  std::vector<uint16_t> h(kElements, 0x3c00);
  nuq::bench::measured_read_bandwidth(1);  // measured before timing, once per process
  const auto start = std::chrono::steady_clock::now();
  for (auto _ : state) {
    switch (dir) {
      case Direction::f16_to_f32: nuq::convert_fp16_to_float(h.data(), f32.data(), kElements); break;
      case Direction::f32_to_f16: nuq::convert_float_to_fp16(f32.data(), h.data(), kElements); break;
      case Direction::bf16_to_f32: nuq::convert_bf16_to_float(h.data(), f32.data(), kElements); break;
      case Direction::f32_to_bf16: nuq::convert_float_to_bf16(f32.data(), h.data(), kElements); break;
    }
    benchmark::ClobberMemory();
  }
  // Bytes moved: the source read plus the destination written.
  nuq::bench::report_counters(state, nuq::bench::seconds_since(start), double(kElements) * (4 + 2), 0, 1);
}

}  // namespace

BENCHMARK_CAPTURE(convert, f16_to_f32, Direction::f16_to_f32)->Name("convert/op:f16_to_f32/n:67108864/threads:1")->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(convert, f32_to_f16, Direction::f32_to_f16)->Name("convert/op:f32_to_f16/n:67108864/threads:1")->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(convert, bf16_to_f32, Direction::bf16_to_f32)->Name("convert/op:bf16_to_f32/n:67108864/threads:1")->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(convert, f32_to_bf16, Direction::f32_to_bf16)->Name("convert/op:f32_to_bf16/n:67108864/threads:1")->UseRealTime()->Unit(benchmark::kMillisecond);
