// CUDA linear kernels (include/nuq/linear_cuda.hpp) against cuBLAS fp16 in the same run.
//
// gemv/impl:nuq_cuda/bits:<b>/sparse_permille:<s>/rows/cols/batch: nuq::cuda::linear, fp16 activations,
//   one codebook per row, s/1000 of the weights in the sparse part (0 or 4.5 = SqueezeLLM's 0.45%).
//   Counters: bytes_per_s (every stored byte of the layer plus activations and outputs, per call),
//   weights_per_s (rows·cols per call), bw_fraction (bytes_per_s over the device-to-device copy
//   bandwidth this binary measures: bytes read + written per second by cudaMemcpyAsync of 1 GiB), and
//   cublas_us / speedup_vs_cublas from cublasGemmEx (fp16 in and out, fp32 compute) on the same shape,
//   timed in the same case.
// Every case rotates over enough copies of its matrices that they exceed 4× the L2 cache, so each call
// streams its weights from HBM; timing with CUDA events around 20+ calls.
#include <benchmark/benchmark.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda_bench.hpp"
#include "nuq/half.hpp"
#include "nuq/linear_cuda.hpp"

namespace {

#define CHECK_CUDA(expr)                                                                  \
  do {                                                                                    \
    if (cudaError_t err_ = (expr); err_ != cudaSuccess) {                                 \
      state.SkipWithError((std::string(#expr) + ": " + cudaGetErrorString(err_)).c_str()); \
      return;                                                                             \
    }                                                                                     \
  } while (0)

struct DeviceLayer {
  nuq::format::PackedLinearView view;
  std::vector<void*> allocations;
  size_t bytes = 0;
};

void* upload(const void* data, size_t bytes, DeviceLayer& l) {
  void* d = nullptr;
  if (cudaMalloc(&d, bytes) != cudaSuccess) return nullptr;
  cudaMemcpy(d, data, bytes, cudaMemcpyHostToDevice);
  l.allocations.push_back(d);
  l.bytes += bytes;
  return d;
}

// Random indices and codebooks (the kernel's speed does not depend on the values), evenly spread sparse
// entries.
DeviceLayer random_layer(int64_t rows, int64_t cols, int bits, double sparse, uint64_t seed) {
  DeviceLayer l;
  auto& v = l.view;
  v.rows = rows;
  v.cols = cols;
  v.bits = bits;
  v.group_size = cols;
  std::vector<uint8_t> q(size_t(rows * nuq::format::row_bytes(cols, bits)));
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (size_t i = 0; i < q.size(); i += 8) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    std::memcpy(q.data() + i, &s, std::min<size_t>(8, q.size() - i));
  }
  std::mt19937 rng{unsigned(seed)};
  std::normal_distribution<float> normal(0.0f, 0.02f);
  std::vector<uint16_t> lut(size_t(rows << bits));
  for (auto& e : lut) e = nuq::float_to_fp16(normal(rng));
  v.qweight = static_cast<const uint8_t*>(upload(q.data(), q.size(), l));
  v.lut = static_cast<const uint16_t*>(upload(lut.data(), lut.size() * 2, l));
  const int64_t per_row = int64_t(sparse * double(cols));
  if (per_row > 0) {
    std::vector<int32_t> row_ptr(size_t(rows + 1));
    std::vector<int32_t> col32;
    std::vector<uint16_t> col16, values;
    for (int64_t r = 0; r <= rows; ++r) row_ptr[size_t(r)] = int32_t(r * per_row);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t k = 0; k < per_row; ++k) {
        const int64_t c = k * (cols / per_row) + (r % (cols / per_row));
        if (nuq::format::sparse_cols_are_u16(cols)) col16.push_back(uint16_t(c)); else col32.push_back(int32_t(c));
        values.push_back(nuq::float_to_fp16(normal(rng) * 10));
      }
    v.nnz = rows * per_row;
    v.sparse_row_ptr = static_cast<const int32_t*>(upload(row_ptr.data(), row_ptr.size() * 4, l));
    v.sparse_col_idx = col16.empty() ? upload(col32.data(), col32.size() * 4, l) : upload(col16.data(), col16.size() * 2, l);
    v.sparse_values = static_cast<const uint16_t*>(upload(values.data(), values.size() * 2, l));
  }
  return l;
}

void free_layer(DeviceLayer& l) {
  for (void* p : l.allocations) cudaFree(p);
  l.allocations.clear();
}

int device_l2_bytes() {
  int dev = 0, l2 = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev);
  return l2;
}

void nuq_cuda_gemv(benchmark::State& state) {
  const int bits = int(state.range(0));
  const double sparse = double(state.range(1)) / 10000.0;  // the arg is per ten thousand
  const int64_t rows = state.range(2), cols = state.range(3), batch = state.range(4);
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    state.SkipWithError("no CUDA device");
    return;
  }
  const double l2 = double(device_l2_bytes());
  std::vector<DeviceLayer> layers{random_layer(rows, cols, bits, sparse, 1)};
  const int copies = std::max(2, int(4 * l2 / double(layers[0].bytes)) + 1);
  for (int i = 1; i < copies; ++i) layers.push_back(random_layer(rows, cols, bits, sparse, 1 + i));
  const int fp16_copies = std::max(2, int(4 * l2 / double(rows * cols * 2)) + 1);
  std::vector<void*> dense(size_t(fp16_copies), nullptr);
  for (auto& d : dense) CHECK_CUDA(cudaMalloc(&d, size_t(rows * cols) * 2));  // contents irrelevant to speed
  void *x = nullptr, *y = nullptr;
  CHECK_CUDA(cudaMalloc(&x, size_t(batch * cols) * 2));
  CHECK_CUDA(cudaMemset(x, 0, size_t(batch * cols) * 2));
  CHECK_CUDA(cudaMalloc(&y, size_t(batch * rows) * 2));
  cublasHandle_t blas = nullptr;
  cublasCreate(&blas);
  cudaStream_t stream = nullptr;
  cublasSetStream(blas, stream);
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  constexpr int kCalls = 20;
  auto run_nuq = [&](int calls) {
    for (int i = 0; i < calls; ++i) {
      const auto s = nuq::cuda::linear(layers[size_t(i) % layers.size()].view, x, cols, y, rows, batch,
                                       nuq::cuda::ActivationType::f16, stream);
      if (!s.ok()) return s.message;
    }
    return std::string();
  };
  auto run_cublas = [&](int calls) {
    const float alpha = 1.0f, beta = 0.0f;
    for (int i = 0; i < calls; ++i)
      cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, int(rows), int(batch), int(cols), &alpha, dense[size_t(i) % dense.size()],
                   CUDA_R_16F, int(cols), x, CUDA_R_16F, int(cols), &beta, y, CUDA_R_16F, int(rows), CUBLAS_COMPUTE_32F,
                   CUBLAS_GEMM_DEFAULT);
  };
  auto timed = [&](auto&& fn) {
    cudaEventRecord(e0, stream);
    fn(kCalls);
    cudaEventRecord(e1, stream);
    cudaEventSynchronize(e1);
    float ms = 0;
    cudaEventElapsedTime(&ms, e0, e1);
    return double(ms) * 1e-3 / kCalls;
  };
  if (std::string err = run_nuq(2); !err.empty()) {
    state.SkipWithError(err.c_str());
    return;
  }
  run_cublas(2);
  double nuq_total = 0, cublas_total = 0;
  int64_t n = 0;
  for (auto _ : state) {
    const double t = timed(run_nuq);
    state.SetIterationTime(t);
    nuq_total += t;
    cublas_total += timed(run_cublas);
    ++n;
  }
  const double t_nuq = nuq_total / double(n), t_cublas = cublas_total / double(n);
  const double bytes = double(layers[0].bytes) + double(batch * (cols + rows) * 2);
  state.counters["bytes_per_s"] = bytes / t_nuq;
  state.counters["weights_per_s"] = double(rows * cols) / t_nuq;
  state.counters["bw_fraction"] = bytes / t_nuq / nuq::bench::copy_bandwidth();
  state.counters["copy_bw_GBps"] = nuq::bench::copy_bandwidth() / 1e9;
  state.counters["cublas_us"] = t_cublas * 1e6;
  state.counters["speedup_vs_cublas"] = t_cublas / t_nuq;
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  cublasDestroy(blas);
  cudaFree(x);
  cudaFree(y);
  for (void* d : dense) cudaFree(d);
  for (auto& l : layers) free_layer(l);
}

void args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"bits", "sparse_per_10k", "rows", "cols", "batch"});
  const std::vector<std::pair<int64_t, int64_t>> shapes = {
      {4096, 4096}, {4096, 14336}, {14336, 4096}, {8192, 28672}, {28672, 8192}};
  for (const auto& [rows, cols] : shapes)
    for (int64_t bits : {3, 4})
      for (int64_t sparse : {0, 45})
        for (int64_t batch : {1, 2, 4, 8, 16}) b->Args({bits, sparse, rows, cols, batch});
}

}  // namespace

BENCHMARK(nuq_cuda_gemv)->Name("gemv/impl:nuq_cuda")->Apply(args)->UseManualTime()->Unit(benchmark::kMicrosecond);
