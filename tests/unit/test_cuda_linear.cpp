// The CUDA linear kernels (include/nuq/linear_cuda.hpp) against the CPU reference nuq::cpu::linear_ref on
// layers from the real quantizer: odd shapes, 2/3/4 bits, per-row and grouped codebooks, with and without
// the sparse part, fp16 and bf16, the GEMV batches 1-16 and the prefill path above. Without a CUDA device
// these tests report as skipped, never as passed; the argument checks run on the host regardless.
//
// Tolerance, per output: r(y_ref) + u_w·S + s·X + 1e-5·S, where S = Σ_c (|dense| + |sparse|)·|x|,
// X = Σ_c |x|, u is the unit roundoff of the activation type (2^-11 fp16, 2^-8 bf16), s half its
// smallest subnormal (2^-25 fp16, 2^-134 bf16), and r(v) = max(u·|v|, s) the largest error of rounding v
// to the type: relative for normal numbers, half the (fixed) spacing in the subnormal range. The GEMV
// multiplies exact 16-bit weights and activations on tensor cores with fp32 sums and rounds once on
// output (r); with bf16 activations its weights are the fp16 codebook values rounded to bf16 (u_w = u).
// The prefill path rounds every dense + sparse weight to the activation type before cuBLAS (u_w = u,
// plus s·X for weights in the subnormal range). Otherwise u_w = 0 and the s·X term is dropped. The
// reference gets the same rounded activations, so activation rounding is not part of the error.
#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "nuq/cuda.hpp"
#include "nuq/error.hpp"
#include "nuq/half.hpp"
#include "nuq/linear_cpu.hpp"
#include "nuq/linear_cuda.hpp"
#include "nuq/llama_cuda.hpp"
#include "nuq/packed.hpp"
#include "nuq/quantize.hpp"

namespace {

using nuq::cuda::ActivationType;

struct Rounding {
  double u, s;  // unit roundoff, half the smallest subnormal
};
Rounding rounding_of(ActivationType type) {
  return type == ActivationType::bf16 ? Rounding{std::ldexp(1.0, -8), std::ldexp(1.0, -134)}
                                      : Rounding{std::ldexp(1.0, -11), std::ldexp(1.0, -25)};
}

// The bound of the header comment for one output: y_ref, S = Σ|W||x| and X = Σ|x| over the row.
double tolerance(ActivationType type, int64_t batch, double y_ref, double S, double X) {
  const Rounding r = rounding_of(type);
  const bool prefill = batch > nuq::cuda::kMaxGemvBatch;
  const bool rounded_weights = prefill || type == ActivationType::bf16;
  return std::max(r.u * std::fabs(y_ref), r.s) + (rounded_weights ? r.u * S : 0.0) + (prefill ? r.s * X : 0.0) +
         1e-5 * S;
}

struct Spec {
  int64_t rows, cols;
  int bits;
  int64_t group;
  bool sparse;
  // Activation rows that allow the GEMV's 16-byte loads (ldx a multiple of 8, no gap when cols is); the
  // other specs leave a gap after each row and an odd ldx/2, which takes its narrow loads.
  bool tight = false;
};

std::string describe(const Spec& s) {
  return "rows=" + std::to_string(s.rows) + " cols=" + std::to_string(s.cols) + " bits=" + std::to_string(s.bits) +
         " group=" + std::to_string(s.group) + (s.sparse ? " sparse" : "") + (s.tight ? " tight" : "");
}

nuq::PackedLinear make_layer(const Spec& s) {
  std::mt19937_64 rng(uint64_t(s.rows * 31 + s.cols * 7 + s.bits + s.group + s.sparse));
  std::student_t_distribution<float> heavy(3.0f);
  std::vector<float> w(size_t(s.rows * s.cols));
  for (auto& v : w) v = 0.02f * heavy(rng);
  nuq::QuantizeOptions opt;
  opt.method = nuq::QuantMethod::nuq;
  opt.bits = s.bits;
  opt.group_size = s.group;
  opt.outlier_fraction = s.sparse ? 0.01 : 0.0;
  opt.threads = 1;
  return nuq::quantize_linear(w.data(), nullptr, s.rows, s.cols, s.cols, opt, "test");
}

template <class T>
T* to_device(const std::vector<T>& v) {
  T* d = nullptr;
  if (v.empty()) return nullptr;
  EXPECT_EQ(cudaMalloc(reinterpret_cast<void**>(&d), v.size() * sizeof(T)), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  return d;
}

class CudaLinear : public ::testing::TestWithParam<ActivationType> {
 protected:
  void SetUp() override {
    if (nuq::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device: the CUDA linear kernels were not run";
  }
};

TEST_P(CudaLinear, MatchesCpuReference) {
  const ActivationType type = GetParam();
  const bool bf16 = type == ActivationType::bf16;
  cublasHandle_t blas = nullptr;
  std::vector<Spec> specs;
  for (int bits : {2, 3, 4})
    for (bool sparse : {false, true}) {
      for (int64_t rows : {1, 19, 111})
        for (int64_t cols : {1, 19, 111, 4097}) specs.push_back({rows, cols, bits, cols, sparse});
      specs.push_back({4097, 64, bits, 64, sparse});
      for (int64_t group : {64, 256}) specs.push_back({37, 4096, bits, group, sparse});
      // The GEMV's steady loop with 16-byte loads: one round of 8 warps (4096 columns), and two rounds
      // plus a checked step (8704 = 17 steps of 512) with rows that do not fill the last 16-row tile.
      specs.push_back({37, 4096, bits, 4096, sparse, true});
      specs.push_back({19, 8704, bits, 8704, sparse, true});
      specs.push_back({19, 8704, bits, 128, sparse, true});  // grouped, 16-byte loads
    }
  for (const Spec& s : specs) {
    const nuq::PackedLinear layer = make_layer(s);
    const auto host = layer.view();
    // Device copies of every array of the layer.
    const auto* qw = host.qweight;
    std::vector<uint8_t> q(qw, qw + host.rows * host.row_stride());
    std::vector<uint16_t> lut(host.lut, host.lut + host.rows * host.groups() * (1 << s.bits));
    nuq::format::PackedLinearView dev = host;
    dev.qweight = to_device(q);
    dev.lut = to_device(lut);
    if (host.nnz > 0) {
      dev.sparse_row_ptr = to_device(std::vector<int32_t>(host.sparse_row_ptr, host.sparse_row_ptr + host.rows + 1));
      const size_t idx_bytes = nuq::format::sparse_cols_are_u16(s.cols) ? 2 : 4;
      const auto* ci = static_cast<const uint8_t*>(host.sparse_col_idx);
      dev.sparse_col_idx = to_device(std::vector<uint8_t>(ci, ci + host.nnz * idx_bytes));
      dev.sparse_values = to_device(std::vector<uint16_t>(host.sparse_values, host.sparse_values + host.nnz));
    }
    // 4097 rows make 257 row tiles, the most blocks of any case and half the emulated run time: one batch
    // per kernel instantiation (GEMV for batch <= 8 and <= 16, prefill) covers what the row count tests.
    const std::vector<int64_t> batches = s.rows > 1000 ? std::vector<int64_t>{1, 16, 17}
                                                        : std::vector<int64_t>{1, 2, 3, 8, 13, 16, 17, 40};
    for (int64_t batch : batches) {
      const int64_t ldx = s.tight ? (s.cols + 7) / 8 * 8 : s.cols + (s.cols % 2 ? 1 : 2);
      const int64_t ldy = s.rows + (s.rows % 2 ? 1 : 2);
      std::mt19937 rng{unsigned(batch)};
      std::normal_distribution<float> normal(0.0f, 1.0f);
      std::vector<uint16_t> xh(size_t(batch * ldx), 0);
      std::vector<float> xf(size_t(batch * ldx), 0.0f);
      for (int64_t i = 0; i < batch * ldx; ++i) {
        const float v = normal(rng);
        xh[size_t(i)] = bf16 ? nuq::float_to_bf16(v) : nuq::float_to_fp16(v);
        xf[size_t(i)] = bf16 ? nuq::bf16_to_float(xh[size_t(i)]) : nuq::fp16_to_float(xh[size_t(i)]);
      }
      std::vector<float> ref(size_t(batch * s.rows));
      nuq::cpu::linear_ref(host, xf.data(), ldx, ref.data(), s.rows, batch);
      // S per output: decode |W| densely on the host.
      std::vector<float> dense(size_t(s.rows * s.cols));
      nuq::dequantize_reference(host, dense.data());

      uint16_t* dx = to_device(xh);
      uint16_t* dy = to_device(std::vector<uint16_t>(size_t(batch * ldy), 0xFFFF));
      void* workspace = nullptr;
      const size_t ws = nuq::cuda::linear_workspace_bytes(dev, batch);
      if (ws > 0) {
        ASSERT_EQ(cudaMalloc(&workspace, ws), cudaSuccess);
        if (blas == nullptr) ASSERT_EQ(cublasCreate(&blas), CUBLAS_STATUS_SUCCESS);
      }
      const auto status = nuq::cuda::linear(dev, dx, ldx, dy, ldy, batch, type, nullptr, blas, workspace, ws);
      ASSERT_TRUE(status.ok()) << describe(s) << " batch=" << batch << ": " << status.message;
      std::vector<uint16_t> yh(size_t(batch * ldy));
      ASSERT_EQ(cudaMemcpy(yh.data(), dy, yh.size() * 2, cudaMemcpyDeviceToHost), cudaSuccess);
      for (int64_t b = 0; b < batch; ++b)
        for (int64_t r = 0; r < ldy; ++r) {
          if (r >= s.rows) {
            ASSERT_EQ(yh[size_t(b * ldy + r)], 0xFFFF) << "wrote into the ldy gap";
            continue;
          }
          double scale = 0, xsum = 0;
          for (int64_t c = 0; c < s.cols; ++c) {
            scale += std::fabs(double(dense[size_t(r * s.cols + c)])) * std::fabs(double(xf[size_t(b * ldx + c)]));
            xsum += std::fabs(double(xf[size_t(b * ldx + c)]));
          }
          const double y = bf16 ? nuq::bf16_to_float(yh[size_t(b * ldy + r)]) : nuq::fp16_to_float(yh[size_t(b * ldy + r)]);
          const double want = ref[size_t(b * s.rows + r)];
          ASSERT_LE(std::fabs(y - want), tolerance(type, batch, want, scale, xsum))
              << describe(s) << " batch=" << batch << " b=" << b << " r=" << r << ": " << y << " vs " << want;
        }
      cudaFree(dx);
      cudaFree(dy);
      cudaFree(workspace);
    }
    cudaFree(const_cast<uint8_t*>(dev.qweight));
    cudaFree(const_cast<uint16_t*>(dev.lut));
    cudaFree(const_cast<int32_t*>(dev.sparse_row_ptr));
    cudaFree(const_cast<void*>(dev.sparse_col_idx));
    cudaFree(const_cast<uint16_t*>(dev.sparse_values));
  }
  if (blas) cublasDestroy(blas);
}

INSTANTIATE_TEST_SUITE_P(Types, CudaLinear, ::testing::Values(ActivationType::f16, ActivationType::bf16),
                         [](const auto& info) { return std::string(info.param == ActivationType::f16 ? "f16" : "bf16"); });

// Host-side checks: no device needed. Pointers are never dereferenced by can_implement_linear.
alignas(16) uint8_t fake[64];

TEST(CudaLinearArgs, RefusalsNameTheProblem) {
  nuq::format::PackedLinearView w;
  w.rows = 8;
  w.cols = 96;
  w.bits = 3;
  w.group_size = 96;
  w.qweight = fake;
  w.lut = reinterpret_cast<const uint16_t*>(fake);
  EXPECT_TRUE(nuq::cuda::can_implement_linear(w, fake, 96, fake, 8, 1).ok());
  auto msg = [&](auto view, int64_t ldx, int64_t ldy, int64_t batch, const void* x = fake) {
    return nuq::cuda::can_implement_linear(view, x, ldx, fake, ldy, batch).message;
  };
  auto bad = w;
  bad.group_size = 32;
  EXPECT_NE(msg(bad, 96, 8, 1).find("groups of 32"), std::string::npos);
  bad = w;
  bad.bits = 5;
  EXPECT_NE(msg(bad, 96, 8, 1).find("bit width 5"), std::string::npos);
  EXPECT_NE(msg(w, 95, 8, 1).find("ldx 95"), std::string::npos);
  EXPECT_NE(msg(w, 97, 8, 1).find("must be even"), std::string::npos);
  EXPECT_NE(msg(w, 96, 8, 0).find("batch must be positive"), std::string::npos);
  EXPECT_NE(msg(w, 96, 8, 1, fake + 1).find("4-byte aligned"), std::string::npos);
  bad = w;
  bad.qweight = fake + 4;
  EXPECT_NE(msg(bad, 96, 8, 1).find("8-byte aligned"), std::string::npos);
  bad = w;
  bad.nnz = 3;
  EXPECT_NE(msg(bad, 96, 8, 1).find("sparse array"), std::string::npos);
  bad = w;
  bad.cols = 128;
  bad.group_size = 64;
  bad.lut = reinterpret_cast<const uint16_t*>(fake + 2);
  EXPECT_NE(msg(bad, 128, 8, 1).find("lut is not 8-byte aligned"), std::string::npos);
  bad.lut = reinterpret_cast<const uint16_t*>(fake + 8);
  EXPECT_TRUE(nuq::cuda::can_implement_linear(bad, fake, 128, fake, 8, 1).ok());
  EXPECT_EQ(nuq::cuda::linear_workspace_bytes(w, 16), 0u);
  EXPECT_EQ(nuq::cuda::linear_workspace_bytes(w, 17), size_t(8 * 96 * 2));
}

// The decoder's CUDA path (include/nuq/llama_cuda.hpp): host fp32 in and out, layers copied at load, odd
// leading dimensions padded for the kernels. Inputs are rounded to the activation type beforehand, so the
// tolerance above applies unchanged (the backend's own rounding of x is then exact).
TEST(CudaLinearBackend, MatchesCpuReference) {
  if (nuq::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device: the decoder's CUDA path was not run";
  for (ActivationType type : {ActivationType::f16, ActivationType::bf16}) {
    const bool bf16 = type == ActivationType::bf16;
    auto backend = nuq::cuda::make_linear_backend(type);
    EXPECT_NE(backend->description().find(bf16 ? "bf16" : "fp16"), std::string::npos) << backend->description();
    const std::vector<Spec> specs = {{19, 111, 3, 111, true}, {111, 19, 2, 19, false}, {37, 4096, 4, 64, true},
                                     {4097, 64, 3, 64, true}, {1, 1, 4, 1, false}};
    std::vector<nuq::PackedLinear> layers;
    for (const Spec& s : specs) {
      layers.push_back(make_layer(s));
      ASSERT_EQ(backend->add_layer(describe(s), layers.back().view()), int64_t(layers.size()) - 1);
    }
    for (size_t i = 0; i < specs.size(); ++i) {
      const Spec& s = specs[i];
      const auto host = layers[i].view();
      std::vector<float> dense(size_t(s.rows * s.cols));
      nuq::dequantize_reference(host, dense.data());
      for (int64_t batch : {1, 3, 16, 17, 40}) {
        std::mt19937 rng{unsigned(batch + 100 * i)};
        std::normal_distribution<float> normal(0.0f, 1.0f);
        std::vector<float> x(size_t(batch * s.cols)), y(size_t(batch * s.rows), NAN), ref(y.size());
        for (auto& v : x) v = bf16 ? nuq::bf16_to_float(nuq::float_to_bf16(normal(rng)))
                                   : nuq::fp16_to_float(nuq::float_to_fp16(normal(rng)));
        backend->run(int64_t(i), x.data(), batch, y.data());
        nuq::cpu::linear_ref(host, x.data(), s.cols, ref.data(), s.rows, batch);
        for (int64_t b = 0; b < batch; ++b)
          for (int64_t r = 0; r < s.rows; ++r) {
            double scale = 0, xsum = 0;
            for (int64_t c = 0; c < s.cols; ++c) {
              scale += std::fabs(double(dense[size_t(r * s.cols + c)])) * std::fabs(double(x[size_t(b * s.cols + c)]));
              xsum += std::fabs(double(x[size_t(b * s.cols + c)]));
            }
            const double want = ref[size_t(b * s.rows + r)], got = y[size_t(b * s.rows + r)];
            ASSERT_LE(std::fabs(got - want), tolerance(type, batch, want, scale, xsum))
                << describe(s) << (bf16 ? " bf16" : " fp16") << " batch=" << batch << " b=" << b << " r=" << r;
          }
      }
    }
    if (!bf16) {  // fp16 cannot hold 1e5: refused, naming the layer
      std::vector<float> x(size_t(specs[0].cols), 1.0f), y(size_t(specs[0].rows));
      x[5] = 1e5f;
      try {
        backend->run(0, x.data(), 1, y.data());
        ADD_FAILURE() << "an input beyond fp16's range was accepted";
      } catch (const nuq::Error& e) {
        EXPECT_EQ(e.code(), nuq::Errc::unsupported);
        EXPECT_NE(std::string(e.what()).find(describe(specs[0])), std::string::npos) << e.what();
      }
    }
  }
}

// Runs everywhere: without a device (CI) the backend refuses to start and says why.
TEST(CudaLinearBackend, RefusesAMissingDevice) {
  const int n = nuq::cuda::device_count();
  try {
    nuq::cuda::make_linear_backend(ActivationType::f16, n);  // device n does not exist, also when n == 0
    FAIL() << "device " << n << " of " << n << " was accepted";
  } catch (const nuq::Error& e) {
    EXPECT_EQ(e.code(), nuq::Errc::unsupported);
    EXPECT_NE(std::string(e.what()).find("no CUDA device " + std::to_string(n)), std::string::npos) << e.what();
  }
}

}  // namespace
