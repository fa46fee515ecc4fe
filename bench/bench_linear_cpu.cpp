// CPU linear kernels against the machine's read bandwidth and two baselines in the same run.
//
// gemv/impl:nuq/isa:<isa>/bits:<b>/rows/cols/batch/threads: nuq::cpu::linear on packed layers with one
//   codebook per row and 0.45% sparse entries (the SqueezeLLM setting); batch <= 16 is the fused path.
// gemv/impl:nuq_int8/isa:avx512/...: the same with LinearOptions::arithmetic = int8 (VNNI).
// gemv/impl:nuq_int8_books/isa:avx512/...: int8 with each layer's codebooks converted once beforehand
//   (LinearOptions::int8_codebooks), as nuq's decoder runs it; bytes_per_s still counts the stored
//   format's bytes (the converted codebooks, 20 bytes per row, are read instead of the fp16 ones).
// gemv/impl:eigen_fp32/...: Y = X·Wᵀ with W in fp32 (Eigen, row blocks over the same thread pool).
// gemv/impl:bf16_avx512/...: a plain AVX-512 kernel over W in bf16 (widen, FMA), same threading.
//
// Every case rotates over enough copies of its matrix that the working set is at least 128 MiB and
// twice the last-level cache (working_set_over_llc, and cpu_model/llc_bytes in the context, say so), so
// the figures are DRAM figures. bytes_per_s counts the weight bytes read (every
// stored part: indices, codebooks, sparse part), weights_per_s counts rows·cols per call (not times
// the batch), bw_fraction divides by the read bandwidth this binary measures with the same threads.
#include <benchmark/benchmark.h>
#include <immintrin.h>

#include <Eigen/Core>

#include <algorithm>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "../src/cpu/thread_pool.hpp"  // the pool the kernels use, so baselines thread the same way
#include "bench_common.hpp"
#include "nuq/half.hpp"
#include "nuq/linear_cpu.hpp"
#include "nuq/packed.hpp"

namespace {

using nuq::cpu::Isa;

constexpr double kSparseFraction = 0.0045;

int copies_for(double bytes) { return std::max(2, int(nuq::bench::dram_working_set_bytes() / bytes + 0.999)); }

// Random packed layer (shapes with cols % 64 == 0): uniform indices, a sorted random codebook per row, kSparseFraction sparse entries
// at random columns. The kernels' speed does not depend on the values.
nuq::PackedLinear random_layer(int64_t rows, int64_t cols, int bits, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const int64_t per_row = std::max<int64_t>(1, int64_t(kSparseFraction * double(cols)));
  nuq::PackedLinear p(rows, cols, bits, cols, rows * per_row);
  // Random index bytes (every bench shape is a multiple of 64 columns, so there is no padding to keep
  // zero); a xorshift generator keeps setting up ~150 MiB per case to a fraction of a second.
  auto* q = p.qweight.data_as<uint8_t>();
  uint64_t state = seed * 0x9E3779B97F4A7C15ull + 1;
  const int64_t bytes = rows * nuq::format::row_bytes(cols, bits);
  for (int64_t i = 0; i < bytes; i += 8) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    std::memcpy(q + i, &state, size_t(std::min<int64_t>(8, bytes - i)));
  }
  std::normal_distribution<float> normal(0.0f, 0.02f);
  auto* lut = p.lut.data_as<uint16_t>();
  std::vector<float> cb(size_t(1) << bits);
  for (int64_t r = 0; r < rows; ++r) {
    for (auto& v : cb) v = normal(rng);
    std::sort(cb.begin(), cb.end());
    for (size_t k = 0; k < cb.size(); ++k) lut[size_t(r) * cb.size() + k] = nuq::float_to_fp16(cb[k]);
  }
  auto* row_ptr = p.sparse_row_ptr.data_as<int32_t>();
  auto* col = p.sparse_col_idx.data_as<uint16_t>();
  auto* val = p.sparse_values.data_as<uint16_t>();
  std::uniform_int_distribution<int64_t> pick_col(0, cols / per_row - 1);
  for (int64_t r = 0; r <= rows; ++r) row_ptr[r] = int32_t(r * per_row);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < per_row; ++k) {
      col[r * per_row + k] = uint16_t(k * (cols / per_row) + pick_col(rng));  // strictly increasing
      val[r * per_row + k] = nuq::float_to_fp16(normal(rng) * 10);
    }
  return p;
}

std::vector<float> random_activations(int64_t batch, int64_t cols) {
  std::mt19937_64 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(size_t(batch * cols));
  for (auto& v : x) v = normal(rng);
  return x;
}

// The current case's matrices, kept between cases with the same shape (setting them up costs seconds).
template <class T>
struct Cache {
  std::string key;
  std::vector<T> items;
};

void nuq_gemv(benchmark::State& state, Isa isa, nuq::cpu::Arithmetic arithmetic, bool converted_books = false) {
  const int bits = int(state.range(0));
  const int64_t rows = state.range(1), cols = state.range(2), batch = state.range(3);
  const int threads = int(state.range(4));
  if (!nuq::cpu::isa_supported(isa)) {
    state.SkipWithError("ISA not supported by this CPU");
    return;
  }
  if (arithmetic == nuq::cpu::Arithmetic::int8 && !nuq::cpu::int8_kernel_supported()) {
    state.SkipWithError("no int8 kernel on this CPU (needs AVX-512 VNNI and VBMI)");
    return;
  }
  static Cache<nuq::PackedLinear> cache;
  static std::vector<std::unique_ptr<nuq::cpu::Int8Codebooks>> books;  // one per cached layer, or none
  const std::string key = std::to_string(bits) + "/" + std::to_string(rows) + "/" + std::to_string(cols);
  if (cache.key != key) {
    cache.items.clear();
    books.clear();
    cache.items.push_back(random_layer(rows, cols, bits, 1));
    const double bytes = double(cache.items[0].view().row_stride() * rows);
    for (int i = 1; i < copies_for(bytes); ++i) cache.items.push_back(random_layer(rows, cols, bits, 1 + i));
    cache.key = key;
  }
  if (converted_books && books.size() != cache.items.size())
    for (const auto& w : cache.items) books.push_back(std::make_unique<nuq::cpu::Int8Codebooks>(w.view()));
  const auto storage = nuq::packed_storage(rows, cols, bits, cols, cache.items[0].nnz());
  const auto x = random_activations(batch, cols);
  std::vector<float> y(size_t(batch * rows));
  nuq::cpu::LinearOptions opt{threads, isa, arithmetic};
  size_t i = 0;
  const auto start = std::chrono::steady_clock::now();
  for (auto _ : state) {
    const size_t item = i++ % cache.items.size();
    opt.int8_codebooks = converted_books ? books[item].get() : nullptr;
    nuq::cpu::linear(cache.items[item].view(), x.data(), cols, y.data(), rows, batch, opt);
    benchmark::DoNotOptimize(y.data());
  }
  nuq::bench::report_counters(state, nuq::bench::seconds_since(start), double(storage.total()),
                              double(rows * cols), threads);
  nuq::bench::report_working_set(state, double(storage.total()) * double(cache.items.size()));
}

// Row blocks of a dense GEMV through the kernels' thread pool.
template <class F>
void run_blocks(int64_t rows, int threads, F& f) {
  constexpr int64_t kRowsPerTask = 64;
  nuq::cpu::detail::parallel_for((rows + kRowsPerTask - 1) / kRowsPerTask, threads,
                                 [](void* ctx, int64_t task, int) {
                                   (*static_cast<F*>(ctx))(task * kRowsPerTask, kRowsPerTask);
                                 },
                                 &f);
}

void eigen_fp32(benchmark::State& state) {
  const int64_t rows = state.range(1), cols = state.range(2), batch = state.range(3);
  const int threads = int(state.range(4));
  using RowMajor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  static Cache<RowMajor> cache;
  const std::string key = std::to_string(rows) + "/" + std::to_string(cols);
  if (cache.key != key) {
    cache.items.clear();
    for (int i = 0; i < copies_for(4.0 * double(rows * cols)); ++i) cache.items.push_back(RowMajor::Random(rows, cols));
    cache.key = key;
  }
  const auto xv = random_activations(batch, cols);
  Eigen::Map<const RowMajor> X(xv.data(), batch, cols);
  RowMajor Y(batch, rows);
  size_t i = 0;
  const auto start = std::chrono::steady_clock::now();
  for (auto _ : state) {
    const RowMajor& W = cache.items[i++ % cache.items.size()];
    auto block = [&](int64_t r0, int64_t n) {
      n = std::min(n, rows - r0);
      Y.middleCols(r0, n).noalias() = X * W.middleRows(r0, n).transpose();
    };
    run_blocks(rows, threads, block);
    benchmark::DoNotOptimize(Y.data());
  }
  nuq::bench::report_counters(state, nuq::bench::seconds_since(start), 4.0 * double(rows * cols),
                              double(rows * cols), threads);
  nuq::bench::report_working_set(state, 4.0 * double(rows * cols) * double(cache.items.size()));
}

template <int B>
__attribute__((target("avx512f,avx512bw"))) void bf16_rows(const uint16_t* w, const float* x, float* y,
                                                           int64_t rows, int64_t cols, int64_t r0, int64_t n) {
  for (int64_t r = r0; r < std::min(rows, r0 + n); ++r) {
    __m512 acc[B];
    for (int b = 0; b < B; ++b) acc[b] = _mm512_setzero_ps();
    const uint16_t* wr = w + r * cols;
    for (int64_t c = 0; c < cols; c += 16) {
      const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + c)));
      const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
      for (int b = 0; b < B; ++b) acc[b] = _mm512_fmadd_ps(v, _mm512_loadu_ps(x + b * cols + c), acc[b]);
    }
    for (int b = 0; b < B; ++b) y[b * rows + r] = _mm512_reduce_add_ps(acc[b]);
  }
}

void bf16_avx512(benchmark::State& state) {
  const int64_t rows = state.range(1), cols = state.range(2), batch = state.range(3);
  const int threads = int(state.range(4));
  if (!nuq::cpu::isa_supported(Isa::avx512) || cols % 16 != 0) {
    state.SkipWithError("needs AVX-512 and cols % 16 == 0");
    return;
  }
  static Cache<std::vector<uint16_t>> cache;
  const std::string key = std::to_string(rows) + "/" + std::to_string(cols);
  if (cache.key != key) {
    cache.items.clear();
    std::mt19937_64 rng(3);
    std::normal_distribution<float> normal(0.0f, 0.02f);
    std::vector<uint16_t> w(size_t(rows * cols));
    for (auto& v : w) v = nuq::float_to_bf16(normal(rng));
    for (int i = 0; i < copies_for(2.0 * double(rows * cols)); ++i) cache.items.push_back(w);
    cache.key = key;
  }
  const auto x = random_activations(batch, cols);
  std::vector<float> y(size_t(batch * rows));
  size_t i = 0;
  const auto start = std::chrono::steady_clock::now();
  for (auto _ : state) {
    const uint16_t* w = cache.items[i++ % cache.items.size()].data();
    auto block = [&](int64_t r0, int64_t n) {
      switch (batch) {
        case 1: bf16_rows<1>(w, x.data(), y.data(), rows, cols, r0, n); break;
        case 4: bf16_rows<4>(w, x.data(), y.data(), rows, cols, r0, n); break;
        default: bf16_rows<16>(w, x.data(), y.data(), rows, cols, r0, n); break;
      }
    };
    run_blocks(rows, threads, block);
    benchmark::DoNotOptimize(y.data());
  }
  nuq::bench::report_counters(state, nuq::bench::seconds_since(start), 2.0 * double(rows * cols),
                              double(rows * cols), threads);
  nuq::bench::report_working_set(state, 2.0 * double(rows * cols) * double(cache.items.size()));
}

const std::vector<std::vector<int64_t>> kShapes = {{4096, 4096}, {4096, 14336}, {14336, 4096}, {11008, 4096}};

void nuq_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"bits", "rows", "cols", "batch", "threads"});
  for (const auto& s : kShapes)
    for (int64_t bits : {2, 3, 4})
      for (int64_t batch : {1, 4, 8, 16})
        for (int64_t threads : {1, 2}) b->Args({bits, s[0], s[1], batch, threads});
}

// A small decoder's layers (SmolLM2-135M: 576 wide, 1536 in the MLP, a 49152-token classifier), whose
// 576-column rows are 2¼ activation blocks: per-row work (codebook tables, sums, sparse entries) weighs
// as much as the dot products there, which the 4096-wide shapes above do not show.
const std::vector<std::vector<int64_t>> kSmallDecoderShapes = {
    {576, 576}, {192, 576}, {1536, 576}, {576, 1536}, {49152, 576}};

void small_decoder_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"bits", "rows", "cols", "batch", "threads"});
  for (const auto& s : kSmallDecoderShapes)
    for (int64_t bits : {3, 4})
      for (int64_t threads : {1, 2}) b->Args({bits, s[0], s[1], 1, threads});
}

void dense_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"bits", "rows", "cols", "batch", "threads"});
  for (const auto& s : kShapes)
    for (int64_t batch : {1, 4, 8, 16})
      for (int64_t threads : {1, 2}) b->Args({16, s[0], s[1], batch, threads});
}

}  // namespace

BENCHMARK_CAPTURE(nuq_gemv, avx512, Isa::avx512, nuq::cpu::Arithmetic::exact)->Name("gemv/impl:nuq/isa:avx512")->Apply(nuq_args)->UseRealTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(nuq_gemv, avx512_int8, Isa::avx512, nuq::cpu::Arithmetic::int8)->Name("gemv/impl:nuq_int8/isa:avx512")->Apply(nuq_args)->UseRealTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(nuq_gemv, avx512_int8_small, Isa::avx512, nuq::cpu::Arithmetic::int8)->Name("gemv_small/impl:nuq_int8/isa:avx512")->Apply(small_decoder_args)->UseRealTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(nuq_gemv, avx512_int8_books, Isa::avx512, nuq::cpu::Arithmetic::int8, true)->Name("gemv/impl:nuq_int8_books/isa:avx512")->Apply(nuq_args)->UseRealTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(nuq_gemv, avx512_int8_books_small, Isa::avx512, nuq::cpu::Arithmetic::int8, true)->Name("gemv_small/impl:nuq_int8_books/isa:avx512")->Apply(small_decoder_args)->UseRealTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(nuq_gemv, avx2, Isa::avx2, nuq::cpu::Arithmetic::exact)->Name("gemv/impl:nuq/isa:avx2")->Apply(nuq_args)->UseRealTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(eigen_fp32)->Name("gemv/impl:eigen_fp32")->Apply(dense_args)->UseRealTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(bf16_avx512)->Name("gemv/impl:bf16_avx512")->Apply(dense_args)->UseRealTime()->Unit(benchmark::kMicrosecond);
