// The CPU linear kernels (include/nuq/linear_cpu.hpp): every implementation this CPU runs against the
// scalar reference linear_ref, on layers produced by the real quantizer, over awkward shapes, every bit
// width, per-row and grouped codebooks, with and without the sparse part, fused (batch <= 16) and dense
// (batch > 16) paths; results bit-identical across thread counts; bad arguments rejected by name.
//
// Tolerance: |y - y_ref| <= 1e-5 · sum_c (|dense(r,c)| + |sparse(r,c)|)·|x[b,c]|. The reference sums
// in double; an fp32 kernel's rounding error against that is a few units of 2^-24 (6e-8) of this scale
// for random data (reordered sums of n terms have a worst case of n·2^-24, but sign-mixed data stays
// near 2^-24). The scale counts both parts because a kernel may add them in separate sums. One wrong
// weight among 4097 columns moves y by about 1/4097 = 2.4e-4 of the scale, far above the tolerance.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "nuq/error.hpp"
#include "nuq/half.hpp"
#include "nuq/linear_cpu.hpp"
#include "nuq/quantize.hpp"

namespace {

using nuq::cpu::Isa;
using nuq::cpu::LinearOptions;

constexpr double kTolerance = 1e-5;
constexpr int64_t kMaxBatch = 40;  // > 16: the dense path is exercised too

struct LayerSpec {
  int64_t rows, cols;
  int bits;
  int64_t group_size;  // == cols: one codebook per row
  bool sparse;
};

std::string describe(const LayerSpec& s) {
  return "rows=" + std::to_string(s.rows) + " cols=" + std::to_string(s.cols) + " bits=" + std::to_string(s.bits) +
         " group=" + std::to_string(s.group_size) + (s.sparse ? " sparse" : " dense-only");
}

struct TestLayer {
  nuq::PackedLinear packed;
  std::vector<float> x;      // [kMaxBatch, ldx], NaN in the gap columns
  int64_t ldx = 0;
  std::vector<float> y_ref;  // [kMaxBatch, rows]
  std::vector<double> scale; // [kMaxBatch, rows]: sum_c (|dense| + |sparse|)·|x|
};

// Heavy-tailed weights (like LLM rows) through nuq::quantize_linear, activations with a few large
// entries, and the reference output; cached so each ISA's test reuses the same layers.
const TestLayer& layer_for(const LayerSpec& s) {
  static std::map<std::tuple<int64_t, int64_t, int, int64_t, bool>, std::unique_ptr<TestLayer>> cache;
  auto& slot = cache[{s.rows, s.cols, s.bits, s.group_size, s.sparse}];
  if (slot) return *slot;
  auto t = std::make_unique<TestLayer>();
  std::mt19937_64 rng(uint64_t(s.rows * 1000003 + s.cols * 101 + s.bits * 7 + s.group_size + s.sparse));
  std::student_t_distribution<float> heavy(3.0f);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> w(size_t(s.rows * s.cols)), sens(w.size());
  for (auto& v : w) v = 0.02f * heavy(rng);
  for (auto& v : sens) {
    const float g = normal(rng);
    v = g * g;  // like squared gradients (the Fisher diagonal)
  }
  nuq::QuantizeOptions opt;
  opt.method = nuq::QuantMethod::nuq;
  opt.bits = s.bits;
  opt.group_size = s.group_size;
  opt.outlier_fraction = s.sparse ? 0.01 : 0.0;
  opt.sensitive_fraction = s.sparse ? 0.005 : 0.0;
  opt.threads = 1;
  t->packed = nuq::quantize_linear(w.data(), sens.data(), s.rows, s.cols, s.cols, opt, "test");
  if (s.sparse && s.rows * s.cols >= 1000) EXPECT_GT(t->packed.nnz(), 0) << describe(s);
  if (!s.sparse) EXPECT_EQ(t->packed.nnz(), 0) << describe(s);

  t->ldx = s.cols + 3;
  t->x.assign(size_t(kMaxBatch * t->ldx), std::numeric_limits<float>::quiet_NaN());
  for (int64_t b = 0; b < kMaxBatch; ++b)
    for (int64_t c = 0; c < s.cols; ++c) {
      float v = normal(rng);
      if (c % 97 == 5) v *= 30.0f;  // activation outliers
      t->x[size_t(b * t->ldx + c)] = v;
    }
  const auto view = t->packed.view();
  t->y_ref.assign(size_t(kMaxBatch * s.rows), 0.0f);
  nuq::cpu::linear_ref(view, t->x.data(), t->ldx, t->y_ref.data(), s.rows, kMaxBatch);

  // |dense| and |sparse| per weight, decoded independently of the library's decoders.
  std::vector<double> mag(size_t(s.rows * s.cols));
  const int entries = 1 << s.bits;
  for (int64_t r = 0; r < s.rows; ++r) {
    const uint8_t* row = view.qweight + r * view.row_stride();
    for (int64_t c = 0; c < s.cols; ++c) {
      const int idx = nuq::format::unpack_index(row, s.cols, s.bits, c);
      const uint16_t h = view.lut[(r * view.groups() + c / s.group_size) * entries + idx];
      mag[size_t(r * s.cols + c)] = std::fabs(nuq::fp16_to_float(h));
    }
    if (view.nnz > 0)
      for (int32_t k = view.sparse_row_ptr[r]; k < view.sparse_row_ptr[r + 1]; ++k) {
        const int64_t c = static_cast<const uint16_t*>(view.sparse_col_idx)[k];  // cols <= 65536 here
        mag[size_t(r * s.cols + c)] += std::fabs(nuq::fp16_to_float(view.sparse_values[k]));
      }
  }
  t->scale.assign(size_t(kMaxBatch * s.rows), 0.0);
  for (int64_t b = 0; b < kMaxBatch; ++b)
    for (int64_t r = 0; r < s.rows; ++r) {
      double sum = 0;
      for (int64_t c = 0; c < s.cols; ++c) sum += mag[size_t(r * s.cols + c)] * std::fabs(t->x[size_t(b * t->ldx + c)]);
      t->scale[size_t(b * s.rows + r)] = sum;
    }
  slot = std::move(t);
  return *slot;
}

std::vector<LayerSpec> layer_specs() {
  std::vector<LayerSpec> specs;
  for (int bits : {2, 3, 4})
    for (bool sparse : {false, true}) {
      for (int64_t rows : {1, 7, 19, 111})
        for (int64_t cols : {1, 7, 19, 111, 4097}) {
          specs.push_back({rows, cols, bits, cols, sparse});
          // A group size dividing cols that is not a multiple of anything the kernels use.
          if (cols == 111 || cols == 4097) specs.push_back({rows, cols, bits, cols == 111 ? 37 : 241, sparse});
        }
      specs.push_back({4097, 19, bits, 19, sparse});
      // Groups that 16-lane chunks divide (128 at 4 bits, 256 at 2-3 bits), that only 8-lane chunks
      // divide, and that neither divides.
      for (int64_t group : {1024, 256, 128, 64}) specs.push_back({13, 1024, bits, group, sparse});
    }
  return specs;
}

// Y of the first `batch` rows of the test activations; Y's row stride exceeds rows and the gap must
// stay untouched.
std::vector<float> run(const TestLayer& t, int64_t batch, Isa isa, int threads) {
  const int64_t rows = t.packed.rows, ldy = rows + 2;
  std::vector<float> y(size_t(batch * ldy), -12345.0f);
  LinearOptions opt;
  opt.isa = isa;
  opt.threads = threads;
  nuq::cpu::linear(t.packed.view(), t.x.data(), t.ldx, y.data(), ldy, batch, opt);
  std::vector<float> out(size_t(batch * rows));
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t r = 0; r < rows; ++r) out[size_t(b * rows + r)] = y[size_t(b * ldy + r)];
    for (int64_t r = rows; r < ldy; ++r) EXPECT_EQ(y[size_t(b * ldy + r)], -12345.0f) << "wrote into the ldy gap";
  }
  return out;
}

class LinearCpu : public ::testing::TestWithParam<Isa> {
 protected:
  void SetUp() override {
    if (!nuq::cpu::isa_supported(GetParam()))
      GTEST_SKIP() << "this CPU does not support the " << nuq::cpu::to_string(GetParam()) << " implementation";
  }
};

TEST_P(LinearCpu, MatchesReferenceAndIsIdenticalAcrossThreadCounts) {
  const Isa isa = GetParam();
  for (const LayerSpec& spec : layer_specs()) {
    const TestLayer& t = layer_for(spec);
    for (int64_t batch = 1; batch <= kMaxBatch; batch += (batch < 17 ? 1 : kMaxBatch - 17)) {
      const std::vector<float> y = run(t, batch, isa, 2);
      int bad = 0;
      for (int64_t b = 0; b < batch && bad < 3; ++b)
        for (int64_t r = 0; r < spec.rows && bad < 3; ++r) {
          const size_t i = size_t(b * spec.rows + r);
          const double err = std::fabs(double(y[i]) - double(t.y_ref[i]));
          if (!(err <= kTolerance * t.scale[i])) {
            ++bad;
            ADD_FAILURE() << describe(spec) << " batch=" << batch << " b=" << b << " r=" << r << ": " << y[i]
                          << " vs reference " << t.y_ref[i] << " (error " << err << ", allowed "
                          << kTolerance * t.scale[i] << ")";
          }
        }
      if (bad) return;
      if (batch == 1 || batch == 3 || batch == 16 || batch == 17) {
        for (int threads : {1, 3}) {
          const std::vector<float> other = run(t, batch, isa, threads);
          ASSERT_EQ(0, std::memcmp(other.data(), y.data(), y.size() * sizeof(float)))
              << describe(spec) << " batch=" << batch << ": threads=" << threads << " differs from threads=2";
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Isa, LinearCpu, ::testing::Values(Isa::scalar, Isa::avx2, Isa::avx512),
                         [](const auto& info) { return std::string(nuq::cpu::to_string(info.param)); });

TEST(LinearCpuDequantize, BitIdenticalToReferenceForAnyThreadCount) {
  for (const LayerSpec& spec : {LayerSpec{111, 4097, 3, 241, true}, LayerSpec{19, 111, 2, 111, true},
                                LayerSpec{13, 1024, 4, 128, true}}) {
    const TestLayer& t = layer_for(spec);
    const auto view = t.packed.view();
    std::vector<float> ref(size_t(spec.rows * spec.cols));
    nuq::dequantize_reference(view, ref.data());
    for (int threads : {1, 2, 3}) {
      const int64_t ld = spec.cols + 5;
      std::vector<float> out(size_t(spec.rows * ld), -1.0f);
      nuq::cpu::dequantize_dense(view, out.data(), ld, {threads, std::nullopt});
      for (int64_t r = 0; r < spec.rows; ++r) {
        ASSERT_EQ(0, std::memcmp(out.data() + r * ld, ref.data() + r * spec.cols, size_t(spec.cols) * sizeof(float)))
            << describe(spec) << " row " << r << " threads " << threads;
        for (int64_t c = spec.cols; c < ld; ++c) ASSERT_EQ(out[size_t(r * ld + c)], -1.0f) << "wrote into the ld gap";
      }
    }
  }
}

TEST(LinearCpuDispatch, BestIsaIsSupportedAndNamed) {
  const Isa best = nuq::cpu::best_isa();
  EXPECT_TRUE(nuq::cpu::isa_supported(best));
  EXPECT_TRUE(nuq::cpu::isa_supported(Isa::scalar));
  EXPECT_EQ(nuq::cpu::to_string(Isa::avx512), "avx512");
  EXPECT_EQ(nuq::cpu::to_string(Isa::avx2), "avx2");
  EXPECT_EQ(nuq::cpu::to_string(Isa::scalar), "scalar");
  if (nuq::cpu::isa_supported(Isa::avx512)) EXPECT_EQ(best, Isa::avx512);
}

template <class F>
void expect_error(F&& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one mentioning '" << needle << "'";
  } catch (const nuq::Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << "message: " << e.what();
  }
}

TEST(LinearCpuErrors, BadArgumentsAreNamed) {
  const TestLayer& t = layer_for({7, 19, 3, 19, true});
  const auto view = t.packed.view();
  std::vector<float> y(size_t(kMaxBatch * 7));
  const float* x = t.x.data();
  expect_error([&] { nuq::cpu::linear(view, nullptr, t.ldx, y.data(), 7, 1); }, "x are null");
  expect_error([&] { nuq::cpu::linear(view, x, t.ldx, nullptr, 7, 1); }, "y is null");
  expect_error([&] { nuq::cpu::linear(view, x, 18, y.data(), 7, 1); }, "ldx 18");
  expect_error([&] { nuq::cpu::linear(view, x, t.ldx, y.data(), 6, 1); }, "ldy 6");
  expect_error([&] { nuq::cpu::linear(view, x, t.ldx, y.data(), 7, 0); }, "batch");
  expect_error([&] { nuq::cpu::linear(view, x, t.ldx, y.data(), 7, -3); }, "batch");
  expect_error([&] { nuq::cpu::linear_ref(view, x, t.ldx, y.data(), 7, 0); }, "batch");
  expect_error([&] { nuq::cpu::linear(view, x, t.ldx, y.data(), 7, 1, {-1, std::nullopt}); }, "threads");
  auto bad = view;
  bad.bits = 5;
  expect_error([&] { nuq::cpu::linear(bad, x, t.ldx, y.data(), 7, 1); }, "bit width 5");
  expect_error([&] { nuq::cpu::dequantize_dense(bad, y.data(), 19); }, "bit width 5");
  bad = view;
  bad.qweight = nullptr;
  expect_error([&] { nuq::cpu::linear(bad, x, t.ldx, y.data(), 7, 1); }, "qweight");
  bad = view;
  bad.lut = nullptr;
  expect_error([&] { nuq::cpu::linear(bad, x, t.ldx, y.data(), 7, 1); }, "lut");
  bad = view;
  bad.group_size = 5;
  expect_error([&] { nuq::cpu::linear(bad, x, t.ldx, y.data(), 7, 1); }, "group size 5");
  bad = view;
  bad.sparse_values = nullptr;
  expect_error([&] { nuq::cpu::linear(bad, x, t.ldx, y.data(), 7, 1); }, "sparse");
  expect_error([&] { nuq::cpu::dequantize_dense(view, y.data(), 18); }, "ld 18");
  expect_error([&] { nuq::cpu::dequantize_dense(view, nullptr, 19); }, "null");
  for (Isa isa : {Isa::avx2, Isa::avx512})
    if (!nuq::cpu::isa_supported(isa))
      expect_error([&] { nuq::cpu::linear(view, x, t.ldx, y.data(), 7, 1, {0, isa}); }, "does not support");
}

TEST(LinearCpuBf16, WidensActivationsAndRoundsOutputs) {
  for (const LayerSpec& spec : {LayerSpec{111, 4097, 3, 241, true}, LayerSpec{19, 1024, 4, 1024, false}}) {
    const TestLayer& t = layer_for(spec);
    for (int64_t batch : {1, 5, 17}) {
      // bf16 activations, and the same values in fp32 for the fp32 path.
      const int64_t ldx = spec.cols + 1, ldy = spec.rows + 3;
      std::vector<uint16_t> xb(size_t(batch * ldx), 0x7FC0);  // NaN in the gap: must not be read
      std::vector<float> xf(size_t(batch * spec.cols));
      for (int64_t b = 0; b < batch; ++b)
        for (int64_t c = 0; c < spec.cols; ++c) {
          xb[size_t(b * ldx + c)] = nuq::float_to_bf16(t.x[size_t(b * t.ldx + c)]);
          xf[size_t(b * spec.cols + c)] = nuq::bf16_to_float(xb[size_t(b * ldx + c)]);
        }
      std::vector<float> yf(size_t(batch * spec.rows));
      nuq::cpu::linear(t.packed.view(), xf.data(), spec.cols, yf.data(), spec.rows, batch);
      std::vector<uint16_t> yb(size_t(batch * ldy), 0xBEEF);
      nuq::cpu::linear_bf16(t.packed.view(), xb.data(), ldx, yb.data(), ldy, batch);
      for (int64_t b = 0; b < batch; ++b)
        for (int64_t r = 0; r < ldy; ++r) {
          if (r >= spec.rows) {
            ASSERT_EQ(yb[size_t(b * ldy + r)], 0xBEEF) << "wrote into the ldy gap";
            continue;
          }
          // Round to nearest even, computed here independently of the library's converter.
          uint32_t bits;
          const float v = yf[size_t(b * spec.rows + r)];
          std::memcpy(&bits, &v, 4);
          const uint16_t expected = uint16_t((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
          ASSERT_EQ(yb[size_t(b * ldy + r)], expected) << describe(spec) << " batch=" << batch << " b=" << b << " r=" << r;
        }
    }
  }
}

// ---- int8 arithmetic (LinearOptions::arithmetic == int8) -------------------------------------------

// Layers whose codebook groups the int8 path takes: per-row, or groups of a multiple of 256 columns.
std::vector<LayerSpec> int8_specs() {
  std::vector<LayerSpec> specs;
  for (const LayerSpec& s : layer_specs())
    if (s.group_size == s.cols || s.group_size % nuq::cpu::kInt8Block == 0) specs.push_back(s);
  for (int bits : {2, 3, 4}) {
    specs.push_back({5, 14336, bits, 14336, true});  // a long row, several blocks
    // Rows whose last block holds 192 of its 256 columns (700 → 704 stored), the one tail length the
    // shapes above miss (they leave 0, 64 or 128), and SmolLM2's 576 columns (a 64-column tail).
    specs.push_back({9, 700, bits, 700, true});
    specs.push_back({9, 576, bits, 576, true});
  }
  return specs;
}

// The contract of linear_int8_ref, computed here from its definition rather than from the library:
// with d the activation block's scale max|x|/127 and s the codebook's scale max|c|/127, every product
// c·x becomes (s·q)·(d·xq) with |c − s·q| <= s/2 and |x − d·xq| <= d/2, so
//   |y_int8 − y_exact| <= Σ_c |c|·d/2 + (|x| + d/2)·s/2.
// Also returns, per output, the magnitude the int8 kernel sums in fp32: it multiplies unsigned table
// entries q + 128 and takes 128·s·Σ d·xq out at the end (see src/cpu/linear_int8_avx512.cpp), so its
// rounding error is relative to Σ_c (|c| + 128.5·s)·(|x| + d/2), not to Σ|c|·|x|.
struct Int8Bounds {
  std::vector<double> quantization, summed;
};
Int8Bounds int8_bounds(const TestLayer& t, const LayerSpec& s, int64_t batch) {
  const auto view = t.packed.view();
  const int entries = 1 << s.bits;
  const int64_t block = nuq::cpu::kInt8Block;
  Int8Bounds out{std::vector<double>(size_t(batch * s.rows)), std::vector<double>(size_t(batch * s.rows))};
  for (int64_t b = 0; b < batch; ++b) {
    const float* x = t.x.data() + b * t.ldx;
    std::vector<double> d(size_t((s.cols + block - 1) / block), 0.0);
    for (int64_t c = 0; c < s.cols; ++c) d[size_t(c / block)] = std::max(d[size_t(c / block)], std::fabs(double(x[c])) / 127);
    for (int64_t r = 0; r < s.rows; ++r) {
      const uint8_t* row = view.qweight + r * view.row_stride();
      double sum = 0, summed = 0;
      for (int64_t c = 0; c < s.cols; ++c) {
        const uint16_t* lut = view.lut + (r * view.groups() + c / s.group_size) * entries;
        double max_abs = 0;
        for (int e = 0; e < entries; ++e) max_abs = std::max(max_abs, std::fabs(double(nuq::fp16_to_float(lut[e]))));
        const double sc = max_abs / 127;
        const double w = std::fabs(double(nuq::fp16_to_float(lut[nuq::format::unpack_index(row, s.cols, s.bits, c)])));
        const double dc = d[size_t(c / block)];
        sum += w * dc / 2 + (std::fabs(double(x[c])) + dc / 2) * sc / 2;
        summed += (w + 128.5 * sc) * (std::fabs(double(x[c])) + dc / 2);
      }
      out.quantization[size_t(b * s.rows + r)] = sum;
      out.summed[size_t(b * s.rows + r)] = summed;
    }
  }
  return out;
}

TEST(LinearCpuInt8, ReferenceStaysWithinTheRoundingBoundOfExact) {
  int64_t changed = 0, compared = 0;
  for (const LayerSpec& spec : int8_specs()) {
    const TestLayer& t = layer_for(spec);
    const int64_t batch = 3;
    std::vector<float> y(size_t(batch * spec.rows));
    nuq::cpu::linear_int8_ref(t.packed.view(), t.x.data(), t.ldx, y.data(), spec.rows, batch);
    const std::vector<double> bound = int8_bounds(t, spec, batch).quantization;
    for (size_t i = 0; i < y.size(); ++i) {
      const double err = std::fabs(double(y[i]) - double(t.y_ref[i]));
      // fp32 rounding of the two results on top of the quantization bound.
      ASSERT_LE(err, bound[i] + kTolerance * t.scale[i]) << describe(spec) << " output " << i;
      changed += y[i] != t.y_ref[i];
      ++compared;
    }
  }
  // The quantization is really applied: most outputs move.
  EXPECT_GT(changed, compared / 2);
}

TEST(LinearCpuInt8, KernelMatchesTheInt8ReferenceForAnyThreadCount) {
  if (!nuq::cpu::int8_kernel_supported()) GTEST_SKIP() << "this CPU lacks AVX-512 VNNI/VBMI: no int8 kernel to test";
  for (const LayerSpec& spec : int8_specs()) {
    const TestLayer& t = layer_for(spec);
    const auto view = t.packed.view();
    for (int64_t batch : {1, 2, 5, 8, 9, 16}) {
      const std::vector<double> summed = int8_bounds(t, spec, batch).summed;
      std::vector<float> ref(size_t(batch * spec.rows));
      nuq::cpu::linear_int8_ref(view, t.x.data(), t.ldx, ref.data(), spec.rows, batch);
      std::vector<float> first;
      for (int threads : {2, 1, 3}) {
        const int64_t ldy = spec.rows + 2;
        std::vector<float> y(size_t(batch * ldy), -12345.0f);
        LinearOptions opt;
        opt.threads = threads;
        opt.arithmetic = nuq::cpu::Arithmetic::int8;
        nuq::cpu::linear(view, t.x.data(), t.ldx, y.data(), ldy, batch, opt);
        std::vector<float> out(size_t(batch * spec.rows));
        for (int64_t b = 0; b < batch; ++b)
          for (int64_t r = 0; r < ldy; ++r) {
            if (r >= spec.rows) {
              ASSERT_EQ(y[size_t(b * ldy + r)], -12345.0f) << "wrote into the ldy gap";
              continue;
            }
            const size_t i = size_t(b * spec.rows + r);
            out[i] = y[size_t(b * ldy + r)];
            // Same integers, different fp32 summation order (and the +128 offset taken out again).
            ASSERT_LE(std::fabs(double(out[i]) - double(ref[i])), kTolerance * (summed[i] + t.scale[i]))
                << describe(spec) << " batch=" << batch << " b=" << b << " r=" << r << ": " << out[i]
                << " vs int8 reference " << ref[i];
          }
        if (first.empty())
          first = out;
        else
          ASSERT_EQ(0, std::memcmp(first.data(), out.data(), out.size() * sizeof(float)))
              << describe(spec) << " batch=" << batch << ": threads=" << threads << " differs from threads=2";
      }
    }
  }
}

// Codebooks converted once (what a decoder keeps per layer) are the bytes the definition gives, and the
// kernel run with them writes bit for bit what it writes converting them itself, on every shape and
// batch tile; codebooks of another layer are refused rather than multiplied.
TEST(LinearCpuInt8, PreparedCodebooksAreTheDefinitionAndChangeNoBit) {
  for (const LayerSpec& spec : int8_specs()) {
    const TestLayer& t = layer_for(spec);
    const auto view = t.packed.view();
    const nuq::cpu::Int8Codebooks books(view);
    ASSERT_TRUE(books.built_from(view));
    const int entries = 1 << spec.bits;
    for (int64_t i = 0; i < spec.rows * view.groups(); ++i) {
      double max_abs = 0;
      for (int e = 0; e < entries; ++e) max_abs = std::max(max_abs, std::fabs(double(nuq::fp16_to_float(view.lut[i * entries + e]))));
      const float s = max_abs > 0 ? float(max_abs) / 127.0f : std::numeric_limits<float>::min();
      ASSERT_EQ(books.scales()[i], s) << describe(spec) << " codebook " << i;
      for (int e = 0; e < entries; ++e) {
        const long q = std::lround(std::nearbyint(nuq::fp16_to_float(view.lut[i * entries + e]) / s));  // as linear_int8_ref: fp32
        ASSERT_EQ(int(books.codes()[i * 16 + e]), int(q + 128)) << describe(spec) << " codebook " << i << " entry " << e;
      }
    }
    if (!nuq::cpu::int8_kernel_supported()) continue;  // the comparison below needs the kernel
    for (int64_t batch : {1, 5, 9}) {
      LinearOptions opt;
      opt.threads = 2;
      opt.arithmetic = nuq::cpu::Arithmetic::int8;
      std::vector<float> own(size_t(batch * spec.rows)), prepared(own.size());
      nuq::cpu::linear(view, t.x.data(), t.ldx, own.data(), spec.rows, batch, opt);
      opt.int8_codebooks = &books;
      nuq::cpu::linear(view, t.x.data(), t.ldx, prepared.data(), spec.rows, batch, opt);
      ASSERT_EQ(0, std::memcmp(own.data(), prepared.data(), own.size() * sizeof(float)))
          << describe(spec) << " batch=" << batch;
    }
  }
  const TestLayer& a = layer_for({9, 576, 3, 576, true});
  const TestLayer& b = layer_for({9, 576, 4, 576, true});
  const nuq::cpu::Int8Codebooks books_a(a.packed.view());
  EXPECT_FALSE(books_a.built_from(b.packed.view()));
  LinearOptions opt;
  opt.arithmetic = nuq::cpu::Arithmetic::int8;
  opt.int8_codebooks = &books_a;
  std::vector<float> y(9);
  expect_error([&] { nuq::cpu::linear(b.packed.view(), b.x.data(), b.ldx, y.data(), 9, 1, opt); },
               "LinearOptions::int8_codebooks were not built from this layer (9 x 576, 4 bits)");
  const TestLayer& grouped = layer_for({13, 1024, 4, 128, false});
  expect_error([&] { nuq::cpu::Int8Codebooks refused(grouped.packed.view()); },
               "int8 arithmetic needs per-row codebooks or groups of a multiple of 256 columns");
}

// A row whose codebook is all zeros (everything it has lives in the sparse part) gives its sparse sum
// to fp32 precision. Its int8 scale must be tiny rather than, say, 1: the kernel multiplies table entries
// q + 128 and takes 128·s·Σ d·xq out again, so with s = 1 that cancellation (≈ 128·Σ|x|) would swamp
// the row's actual value.
TEST(LinearCpuInt8, AllZeroCodebookRowKeepsItsSparseSum) {
  const int64_t rows = 3, cols = 700, per_row = 4;
  nuq::PackedLinear p(rows, cols, 3, cols, rows * per_row);
  auto* q = p.qweight.data_as<uint8_t>();
  for (int64_t i = 0; i < rows * p.view().row_stride(); ++i) q[i] = uint8_t(i * 37 + 11);
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto* lut = p.lut.data_as<uint16_t>();
  for (int64_t r = 0; r < rows; ++r)
    for (int e = 0; e < 8; ++e) lut[r * 8 + e] = nuq::float_to_fp16(r == 1 ? 0.0f : 0.02f * float(e - 4));
  auto* row_ptr = p.sparse_row_ptr.data_as<int32_t>();
  auto* col = p.sparse_col_idx.data_as<uint16_t>();
  auto* val = p.sparse_values.data_as<uint16_t>();
  for (int64_t r = 0; r <= rows; ++r) row_ptr[r] = int32_t(r * per_row);
  for (int64_t k = 0; k < rows * per_row; ++k) {
    col[k] = uint16_t(k % per_row * 170 + 3);
    val[k] = nuq::float_to_fp16(0.1f * normal(rng));
  }
  std::vector<float> x(cols);
  for (auto& v : x) v = normal(rng);
  double expected = 0, magnitude = 0;
  for (int32_t k = row_ptr[1]; k < row_ptr[2]; ++k) {
    expected += double(nuq::fp16_to_float(val[k])) * double(x[col[k]]);
    magnitude += std::fabs(double(nuq::fp16_to_float(val[k])) * double(x[col[k]]));
  }
  LinearOptions opt;
  opt.arithmetic = nuq::cpu::Arithmetic::int8;
  std::vector<float> y(rows), y_ref(rows);
  nuq::cpu::linear(p.view(), x.data(), cols, y.data(), rows, 1, opt);
  nuq::cpu::linear_int8_ref(p.view(), x.data(), cols, y_ref.data(), rows, 1);
  EXPECT_NEAR(y_ref[1], expected, 1e-6 * magnitude);
  EXPECT_NEAR(y[1], expected, 1e-6 * magnitude) << "int8 kernel (reference: " << y_ref[1] << ")";
  const nuq::cpu::Int8Codebooks books(p.view());
  opt.int8_codebooks = &books;
  nuq::cpu::linear(p.view(), x.data(), cols, y.data(), rows, 1, opt);
  EXPECT_NEAR(y[1], expected, 1e-6 * magnitude) << "int8 kernel, codebooks converted ahead";
}

TEST(LinearCpuInt8, UnsupportedGroupsAndNonFiniteActivations) {
  const TestLayer& t = layer_for({13, 1024, 4, 128, false});
  std::vector<float> y(13 * 2);
  LinearOptions opt;
  opt.arithmetic = nuq::cpu::Arithmetic::int8;
  expect_error([&] { nuq::cpu::linear(t.packed.view(), t.x.data(), t.ldx, y.data(), 13, 1, opt); },
               "int8 arithmetic needs per-row codebooks or groups of a multiple of 256 columns, this layer has "
               "groups of 128");
  // A NaN activation poisons its outputs as it does in the exact path, in every implementation.
  const TestLayer& u = layer_for({13, 1024, 3, 1024, true});
  std::vector<float> x(u.x.begin(), u.x.begin() + 2 * u.ldx);
  x[size_t(u.ldx + 700)] = std::numeric_limits<float>::quiet_NaN();
  for (bool ref : {true, false}) {
    std::fill(y.begin(), y.end(), 0.0f);
    if (ref)
      nuq::cpu::linear_int8_ref(u.packed.view(), x.data(), u.ldx, y.data(), 13, 2);
    else
      nuq::cpu::linear(u.packed.view(), x.data(), u.ldx, y.data(), 13, 2, opt);
    for (int64_t r = 0; r < 13; ++r) {
      EXPECT_TRUE(std::isfinite(y[size_t(r)])) << "batch row 0 has no NaN, row " << r;
      EXPECT_TRUE(std::isnan(y[size_t(13 + r)])) << "batch row 1 has a NaN, row " << r << (ref ? " (ref)" : "");
    }
  }
}

// fastest is, bit for bit, the int8 kernel where the CPU has it and the layer's groups allow it, and the
// exact path everywhere else: on other CPUs, for groups the int8 path refuses, for forced ISAs other than
// avx512 (the portable int8 reference is slower than exact), and for batches above the fused path.
TEST(LinearCpuArithmetic, FastestIsTheInt8KernelWhereItRunsAndExactElsewhere) {
  EXPECT_EQ(nuq::cpu::to_string(nuq::cpu::Arithmetic::fastest), "fastest");
  for (auto a : {nuq::cpu::Arithmetic::exact, nuq::cpu::Arithmetic::int8, nuq::cpu::Arithmetic::fastest})
    EXPECT_EQ(nuq::cpu::arithmetic_from_string(nuq::cpu::to_string(a)), a);
  EXPECT_FALSE(nuq::cpu::arithmetic_from_string("fp8").has_value());
  struct Case {
    LayerSpec spec;
    bool int8_groups;
  };
  const std::vector<Case> cases = {{{19, 1024, 3, 1024, true}, true},   // per-row codebooks
                                   {{13, 1024, 4, 512, false}, true},   // groups of 2 blocks
                                   {{13, 1024, 4, 128, false}, false},  // groups the int8 path refuses
                                   {{7, 111, 2, 111, true}, true}};     // one partial block
  for (const Case& c : cases) {
    const TestLayer& t = layer_for(c.spec);
    for (int64_t batch : {int64_t(1), int64_t(5), nuq::cpu::kMaxFusedBatch + 1}) {
      for (std::optional<Isa> isa : {std::optional<Isa>(), std::optional<Isa>(Isa::avx2)}) {
        if (isa && !nuq::cpu::isa_supported(*isa)) continue;
        const bool int8 = c.int8_groups && !isa && nuq::cpu::best_isa() == Isa::avx512 &&
                          nuq::cpu::int8_kernel_supported() && batch <= nuq::cpu::kMaxFusedBatch;
        auto run = [&](nuq::cpu::Arithmetic arithmetic) {
          std::vector<float> y(size_t(batch * c.spec.rows));
          nuq::cpu::linear(t.packed.view(), t.x.data(), t.ldx, y.data(), c.spec.rows, batch, {1, isa, arithmetic});
          return y;
        };
        // What reports print (fused_arithmetic) is what the fused calls do.
        if (batch <= nuq::cpu::kMaxFusedBatch)
          EXPECT_EQ(nuq::cpu::fused_arithmetic(t.packed.view(), {1, isa, nuq::cpu::Arithmetic::fastest}),
                    int8 ? nuq::cpu::Arithmetic::int8 : nuq::cpu::Arithmetic::exact)
              << describe(c.spec);
        const std::vector<float> fastest = run(nuq::cpu::Arithmetic::fastest);
        const std::vector<float> want = run(int8 ? nuq::cpu::Arithmetic::int8 : nuq::cpu::Arithmetic::exact);
        ASSERT_EQ(0, std::memcmp(fastest.data(), want.data(), want.size() * sizeof(float)))
            << describe(c.spec) << " batch=" << batch << (isa ? " isa forced" : "") << ": fastest is not "
            << (int8 ? "int8" : "exact");
        if (int8) {  // and the int8 kernel really differs from exact here, so the comparison can fail
          const std::vector<float> exact = run(nuq::cpu::Arithmetic::exact);
          EXPECT_NE(0, std::memcmp(fastest.data(), exact.data(), exact.size() * sizeof(float))) << describe(c.spec);
        }
      }
    }
  }
}

}  // namespace
