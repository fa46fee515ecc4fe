// GPU decode of the packed format against the CPU reference. Without a CUDA device every test here
// reports as skipped, never as passed.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "nuq/cuda.hpp"
#include "nuq/packed.hpp"

namespace {

class CudaUnpack : public ::testing::TestWithParam<std::tuple<int, int64_t>> {
 protected:
  void SetUp() override {
    if (nuq::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device: GPU decode not checked";
  }
};

TEST_P(CudaUnpack, MatchesCpuReference) {
  const auto [bits, cols] = GetParam();
  const int64_t rows = 19;
  std::mt19937 rng(unsigned(bits * 7919 + cols));
  std::vector<uint8_t> idx(rows * cols);
  for (auto& v : idx) v = uint8_t(rng() % (1u << bits));
  std::vector<uint8_t> packed(rows * nuq::format::row_bytes(cols, bits));
  nuq::pack_indices(idx.data(), rows, cols, bits, packed.data());

  uint8_t *d_packed = nullptr, *d_out = nullptr;
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&d_packed), packed.size()), cudaSuccess);
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&d_out), idx.size() + 1), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(d_packed, packed.data(), packed.size(), cudaMemcpyHostToDevice), cudaSuccess);
  auto status = nuq::cuda::unpack_indices(d_packed, rows, cols, bits, d_out, cols, nullptr);
  ASSERT_TRUE(status.ok()) << status.message;
  std::vector<uint8_t> back(idx.size());
  ASSERT_EQ(cudaMemcpy(back.data(), d_out, back.size(), cudaMemcpyDeviceToHost), cudaSuccess);
  cudaFree(d_packed);
  cudaFree(d_out);
  EXPECT_EQ(back, idx);
}

INSTANTIATE_TEST_SUITE_P(AllWidthsOddLengths, CudaUnpack,
                         ::testing::Combine(::testing::Values(2, 3, 4), ::testing::Values(1, 19, 111, 4097)));

TEST(CudaUnpackArgs, RefusalsNameTheProblem) {
  // Argument checks run on the host and need no device.
  auto s = nuq::cuda::can_implement_unpack_indices(4, 10, 5, 10);
  EXPECT_EQ(s.code, nuq::cuda::StatusCode::invalid_argument);
  EXPECT_NE(s.message.find("5 bits"), std::string::npos);
  s = nuq::cuda::can_implement_unpack_indices(4, 10, 3, 8);
  EXPECT_NE(s.message.find("stride 8"), std::string::npos);
  EXPECT_TRUE(nuq::cuda::can_implement_unpack_indices(4, 10, 3, 10).ok());
}

}  // namespace
