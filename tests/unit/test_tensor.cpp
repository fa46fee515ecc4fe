#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>

#include "nuq/error.hpp"
#include "nuq/half.hpp"
#include "nuq/tensor.hpp"

namespace {

TEST(Tensor, ShapeBasics) {
  nuq::Shape s{4, 3, 2};
  EXPECT_EQ(s.rank(), 3);
  EXPECT_EQ(s.numel(), 24);
  EXPECT_EQ(nuq::to_string(s), "[4, 3, 2]");
  EXPECT_EQ(nuq::Shape{}.numel(), 1);  // a scalar
  EXPECT_EQ((nuq::Shape{5, 0}).numel(), 0);
  EXPECT_EQ(nuq::contiguous_strides(s), (nuq::Shape{6, 2, 1}));
  EXPECT_THROW((nuq::Shape{-1}), nuq::Error);
  EXPECT_THROW((nuq::Shape{1, 2, 3, 4, 5, 6, 7, 8, 9}), nuq::Error);
  nuq::Shape huge{int64_t(1) << 40, int64_t(1) << 40};
  EXPECT_THROW(huge.numel(), nuq::Error);
}

TEST(Tensor, ViewContiguityAndConstConversion) {
  nuq::Buffer b(nuq::DType::F32, {3, 4});
  nuq::TensorView v = b.view();
  EXPECT_TRUE(v.is_contiguous());
  EXPECT_EQ(v.nbytes(), 48u);
  nuq::ConstTensorView c = v;  // writable -> read-only is allowed
  EXPECT_EQ(c.data(), v.data());
  nuq::TensorView transposed(b.data(), nuq::DType::F32, {4, 3}, {1, 4});
  EXPECT_FALSE(transposed.is_contiguous());
  EXPECT_THROW(nuq::to_float32(transposed), nuq::Error);
  static_assert(!std::is_convertible_v<nuq::ConstTensorView, nuq::TensorView>);
}

TEST(Tensor, BufferIsAlignedAndZeroed) {
  for (int64_t n : {0, 1, 7, 1000}) {
    nuq::Buffer b(nuq::DType::F16, {n});
    ASSERT_NE(b.data(), nullptr);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(b.data()) % nuq::Buffer::kAlignment, 0u);
    for (int64_t i = 0; i < n; ++i) EXPECT_EQ(b.data_as<uint16_t>()[i], 0);
  }
}

TEST(Tensor, ToFloat32ConvertsHalfTypesFromUnalignedMemory) {
  // Mapped checkpoints can place a tensor at an odd address; conversion must not assume alignment.
  alignas(8) unsigned char raw[1 + 6];
  const uint16_t h[3] = {nuq::float_to_fp16(1.5f), nuq::float_to_fp16(-2.0f), 0x7c00};
  std::memcpy(raw + 1, h, 6);
  nuq::ConstTensorView v(reinterpret_cast<const std::byte*>(raw + 1), nuq::DType::F16, {3});
  nuq::Buffer f = nuq::to_float32(v);
  EXPECT_EQ(f.data_as<float>()[0], 1.5f);
  EXPECT_EQ(f.data_as<float>()[1], -2.0f);
  EXPECT_TRUE(std::isinf(f.data_as<float>()[2]));
  const uint16_t b[2] = {nuq::float_to_bf16(3.0f), nuq::float_to_bf16(-0.5f)};
  nuq::Buffer fb = nuq::to_float32({reinterpret_cast<const std::byte*>(b), nuq::DType::BF16, {2}});
  EXPECT_EQ(fb.data_as<float>()[0], 3.0f);
  EXPECT_EQ(fb.data_as<float>()[1], -0.5f);
  const int32_t ints[1] = {3};
  try {
    nuq::to_float32({reinterpret_cast<const std::byte*>(ints), nuq::DType::I32, {1}});
    FAIL() << "I32 should not convert";
  } catch (const nuq::Error& e) {
    EXPECT_EQ(e.code(), nuq::Errc::unsupported);
    EXPECT_NE(std::string(e.what()).find("I32"), std::string::npos) << e.what();
  }
}

TEST(Tensor, DTypeNamesRoundTrip) {
  for (int i = 0; i < nuq::kDTypeCount; ++i) {
    auto t = static_cast<nuq::DType>(i);
    auto parsed = nuq::dtype_from_name(nuq::dtype_name(t));
    ASSERT_TRUE(parsed.has_value());
    EXPECT_EQ(*parsed, t);
    EXPECT_GT(nuq::dtype_size(t), 0u);
  }
  EXPECT_FALSE(nuq::dtype_from_name("F128").has_value());
  EXPECT_EQ(nuq::dtype_size(nuq::DType::BF16), 2u);
}

}  // namespace
