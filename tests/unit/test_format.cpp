// The packed format: byte layouts written out by hand from docs/format.md, exact pack/unpack round
// trips on lengths that are not multiples of the packing width, validation, the reference dequantizer,
// storage accounting and the quantization_config metadata.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "nuq/error.hpp"
#include "nuq/half.hpp"
#include "nuq/packed.hpp"

namespace {

using nuq::format::row_bytes;

std::string error_of(auto&& fn) {
  try {
    fn();
  } catch (const nuq::Error& e) {
    return e.what();
  }
  return "<no error>";
}

TEST(Format, FourBitLayoutMatchesTheSpec) {
  // docs/format.md: index c lives in byte c/2, low nibble for even c, high nibble for odd c.
  std::vector<uint8_t> idx = {1, 2, 3, 15, 0, 9};
  std::vector<uint8_t> packed(row_bytes(6, 4), 0xAA);
  nuq::pack_indices(idx.data(), 1, 6, 4, packed.data());
  ASSERT_EQ(packed.size(), 32u);
  EXPECT_EQ(packed[0], 0x21);
  EXPECT_EQ(packed[1], 0xF3);
  EXPECT_EQ(packed[2], 0x90);
  for (std::size_t i = 3; i < packed.size(); ++i) EXPECT_EQ(packed[i], 0) << "padding byte " << i;
}

TEST(Format, TwoBitLayoutMatchesTheSpec) {
  // Index c in byte c/4 at bit 2*(c%4).
  std::vector<uint8_t> idx = {3, 0, 1, 2, 1};
  std::vector<uint8_t> packed(row_bytes(5, 2));
  nuq::pack_indices(idx.data(), 1, 5, 2, packed.data());
  ASSERT_EQ(packed.size(), 16u);
  EXPECT_EQ(packed[0], 0b10'01'00'11);
  EXPECT_EQ(packed[1], 0b01);
}

TEST(Format, ThreeBitLayoutIsTwoPlanesLowBitsFirst) {
  // 70 columns pad to 128: the 2-bit plane takes 32 bytes, then the 1-bit plane 16 bytes.
  std::vector<uint8_t> idx(70, 0);
  idx[0] = 5;    // 0b101: low bits 01 in plane 0, top bit 1 in plane 1
  idx[1] = 6;    // 0b110: low bits 10, top bit 1
  idx[69] = 3;   // 0b011: low bits 11 at byte 17 bits 2-3, top bit 0
  std::vector<uint8_t> packed(row_bytes(70, 3));
  nuq::pack_indices(idx.data(), 1, 70, 3, packed.data());
  ASSERT_EQ(packed.size(), 48u);
  EXPECT_EQ(packed[0], 0b10'01);
  EXPECT_EQ(packed[17], 0b11'00);
  EXPECT_EQ(packed[32], 0b11);  // plane 1, byte 0: top bits of columns 0 and 1
  EXPECT_EQ(packed[32 + 8], 0);  // column 69's top bit (byte 8, bit 5) is 0
  int set = 0;
  for (uint8_t b : packed) set += __builtin_popcount(b);
  EXPECT_EQ(set, 1 + 1 + 1 + 1 + 2);  // exactly the bits above, nothing else
}

class PackRoundTrip : public ::testing::TestWithParam<std::tuple<int, int64_t>> {};

TEST_P(PackRoundTrip, UnpackReturnsExactlyWhatWasPacked) {
  const auto [bits, cols] = GetParam();
  const int64_t rows = 5;
  std::mt19937 rng(unsigned(bits * 100003 + cols));
  std::vector<uint8_t> idx(rows * cols);
  for (auto& v : idx) v = uint8_t(rng() % (1u << bits));
  std::vector<uint8_t> packed(rows * row_bytes(cols, bits), 0xFF);
  nuq::pack_indices(idx.data(), rows, cols, bits, packed.data());
  std::vector<uint8_t> back(idx.size(), 0xEE);
  nuq::unpack_indices(packed.data(), rows, cols, bits, back.data());
  EXPECT_EQ(back, idx);
  // Storage is exactly bits per index over the padded width, and the padding decodes to 0.
  EXPECT_EQ(row_bytes(cols, bits) * 8, nuq::format::padded_cols(cols) * bits);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = cols; c < nuq::format::padded_cols(cols); ++c)
      ASSERT_EQ(nuq::format::unpack_index(packed.data() + r * row_bytes(cols, bits), cols, bits, c), 0);
}

INSTANTIATE_TEST_SUITE_P(AllWidthsOddLengths, PackRoundTrip,
                         ::testing::Combine(::testing::Values(2, 3, 4),
                                            ::testing::Values(1, 7, 19, 63, 64, 65, 111, 128, 576, 4097)));

TEST(Format, RejectsIndicesThatDoNotFitAndUnsupportedWidths) {
  std::vector<uint8_t> idx = {0, 8};
  std::vector<uint8_t> packed(row_bytes(2, 3));
  EXPECT_NE(error_of([&] { nuq::pack_indices(idx.data(), 1, 2, 3, packed.data()); }).find("column 1"), std::string::npos);
  EXPECT_NE(error_of([&] { nuq::pack_indices(idx.data(), 1, 2, 5, packed.data()); }).find("5 bits"), std::string::npos);
  EXPECT_FALSE(nuq::format::is_supported_bits(1));
  EXPECT_FALSE(nuq::format::is_supported_bits(8));
  EXPECT_EQ(nuq::format::index_layout(8).planes, 0);
}

// A 2-row, 6-column, 2-bit layer with two column groups of 3 and one sparse entry per row, decoded by
// hand from the definition W = lut[r, c / g, index] + sparse.
nuq::PackedLinear small_layer() {
  nuq::PackedLinear l(2, 6, 2, 3, 2);
  const uint8_t idx[12] = {0, 1, 2, 3, 0, 1, /* row 1 */ 3, 3, 2, 1, 0, 0};
  nuq::pack_indices(idx, 2, 6, 2, l.qweight.data_as<uint8_t>());
  uint16_t* lut = l.lut.data_as<uint16_t>();
  for (int r = 0; r < 2; ++r)
    for (int g = 0; g < 2; ++g)
      for (int e = 0; e < 4; ++e) lut[(r * 2 + g) * 4 + e] = nuq::float_to_fp16(float(100 * r + 10 * g + e));
  int32_t* row_ptr = l.sparse_row_ptr.data_as<int32_t>();
  row_ptr[0] = 0, row_ptr[1] = 1, row_ptr[2] = 2;
  l.sparse_col_idx.data_as<uint16_t>()[0] = 4;
  l.sparse_col_idx.data_as<uint16_t>()[1] = 0;
  l.sparse_values.data_as<uint16_t>()[0] = nuq::float_to_fp16(0.5f);
  l.sparse_values.data_as<uint16_t>()[1] = nuq::float_to_fp16(-0.25f);
  return l;
}

TEST(Format, ReferenceDequantizerFollowsTheDefinition) {
  nuq::PackedLinear l = small_layer();
  ASSERT_NO_THROW(nuq::validate_packed(l.view(), "small"));
  std::vector<float> w(12);
  nuq::dequantize_reference(l.view(), w.data());
  const std::vector<float> expected = {0, 1, 2, 13, 10.5f, 11, /* row 1 */ 103 - 0.25f, 103, 102, 111, 110, 110};
  EXPECT_EQ(w, expected);
}

TEST(Format, ValidationNamesTheProblem) {
  {
    nuq::PackedLinear l = small_layer();
    l.sparse_col_idx.data_as<uint16_t>()[1] = 6;  // column out of range
    EXPECT_NE(error_of([&] { nuq::validate_packed(l.view(), "layer.x"); }).find("layer.x: sparse entry 1 in row 1 has column 6"),
              std::string::npos);
  }
  {
    nuq::PackedLinear l = small_layer();
    l.sparse_row_ptr.data_as<int32_t>()[2] = 1;
    EXPECT_NE(error_of([&] { nuq::validate_packed(l.view(), "L"); }).find("sparse_row_ptr[2] is 1 but there are 2 values"),
              std::string::npos);
  }
  {
    nuq::PackedLinear l = small_layer();
    l.lut.data_as<uint16_t>()[5] = 0x7e00;  // NaN in row 0's second group
    EXPECT_NE(error_of([&] { nuq::validate_packed(l.view(), "L"); }).find("codebook entry 1 of row 0 is nan"), std::string::npos);
  }
  {
    nuq::PackedLinear l = small_layer();
    l.qweight.data_as<uint8_t>()[15] = 0x40;  // a padding index of row 0
    EXPECT_NE(error_of([&] { nuq::validate_packed(l.view(), "L"); }).find("padding index at row 0"), std::string::npos);
  }
  {
    nuq::PackedLinear l = small_layer();
    auto v = l.view();
    v.group_size = 4;
    EXPECT_NE(error_of([&] { nuq::validate_packed(v, "L"); }).find("group size 4 does not divide the 6 columns"),
              std::string::npos);
  }
}

TEST(Format, StorageCountsEveryPart) {
  // 4096 x 4096 at 3 bits, one codebook per row, 0.45% sparse (75497 values, 16-bit columns).
  auto s = nuq::packed_storage(4096, 4096, 3, 4096, 75497);
  EXPECT_EQ(s.qweight, 4096ull * 4096 * 3 / 8);
  EXPECT_EQ(s.lut, 4096ull * 8 * 2);
  EXPECT_EQ(s.sparse, 4097ull * 4 + 75497ull * 4);
  EXPECT_NEAR(nuq::bits_per_weight(s, 4096, 4096), 3.0 + 8.0 * 16 / 4096 + (4097.0 * 4 + 75497.0 * 4) * 8 / (4096.0 * 4096),
              1e-12);
  // Wide rows need 32-bit sparse columns; padding counts against bits per weight.
  EXPECT_EQ(nuq::packed_storage(1, 70000, 4, 70000, 1).sparse, 2ull * 4 + 6);
  EXPECT_EQ(nuq::packed_storage(1, 1, 2, 1, 0).qweight, 16u);
}

TEST(Format, QuantizationConfigRoundTripsAndChecksVersion) {
  nuq::QuantizationConfig c;
  c.layers["model.layers.0.mlp.down_proj"] = {3, 576, 1536, 1536, 12, "nuq", "F32"};
  c.extra["created_by"] = "test";
  const std::string json = nuq::to_json(c);
  nuq::QuantizationConfig back = nuq::parse_quantization_config(json, "x.safetensors");
  ASSERT_EQ(back.layers.size(), 1u);
  const auto& m = back.layers.at("model.layers.0.mlp.down_proj");
  EXPECT_EQ(m.bits, 3);
  EXPECT_EQ(m.rows, 576);
  EXPECT_EQ(m.cols, 1536);
  EXPECT_EQ(m.nnz, 12);
  EXPECT_EQ(m.method, "nuq");
  EXPECT_EQ(back.extra.at("created_by"), "test");
  EXPECT_NE(error_of([] { nuq::parse_quantization_config(R"({"quant_method":"nuq","format_version":2})", "f"); })
                .find("packed format version 2 is not supported"),
            std::string::npos);
  EXPECT_NE(error_of([] { nuq::parse_quantization_config("{not json", "f.safetensors"); })
                .find("f.safetensors: quantization_config is not a JSON object"),
            std::string::npos);
  EXPECT_NE(error_of([] {
              nuq::parse_quantization_config(
                  R"({"quant_method":"nuq","format_version":1,"layers":{"a":{"bits":3,"rows":2,"cols":6,"group_size":4,"nnz":0}}})",
                  "f");
            }).find("layer 'a' has inconsistent geometry"),
            std::string::npos);
}

TEST(Format, HuggingFaceConfigGetsTheWholeModelsQuantizationConfigAndItsSummary) {
  nuq::QuantizationConfig c;
  c.layers["a"] = {3, 4, 128, 128, 2, "nuq", "F32"};  // one codebook per row
  c.layers["b"] = {3, 8, 64, 64, 0, "nuq", "F32"};
  c.extra["tool"] = "test";
  const std::string hf = R"({"model_type": "llama", "hidden_size": 64})";
  auto out = nlohmann::json::parse(nuq::hf_config_with_quantization(hf, c, "config.json"));
  EXPECT_EQ(out["model_type"], "llama");  // the model's own keys are kept
  EXPECT_EQ(out["hidden_size"], 64);
  nlohmann::json q = out["quantization_config"];
  EXPECT_EQ(q["quant_method"], "nuq");
  EXPECT_EQ(q["bits"], 3);
  EXPECT_EQ(q["group_size"], 0);
  EXPECT_DOUBLE_EQ(q["sparse_fraction"].get<double>(), 2.0 / (4 * 128 + 8 * 64));
  // The same object the safetensors metadata holds, so nuq's own reader parses it.
  const auto back = nuq::parse_quantization_config(q.dump(), "config.json");
  EXPECT_EQ(back.layers.size(), 2u);
  EXPECT_EQ(back.layers.at("a").nnz, 2);
  EXPECT_EQ(back.extra.at("tool"), "test");

  c.layers["b"].bits = 4;         // a mixed-precision plan
  c.layers["b"].group_size = 32;  // and groups in one layer
  q = nlohmann::json::parse(nuq::hf_config_with_quantization(hf, c, "config.json"))["quantization_config"];
  EXPECT_TRUE(q["bits"].is_null());
  EXPECT_TRUE(q["group_size"].is_null());
  c.layers.erase("a");
  q = nlohmann::json::parse(nuq::hf_config_with_quantization(hf, c, "config.json"))["quantization_config"];
  EXPECT_EQ(q["bits"], 4);
  EXPECT_EQ(q["group_size"], 32);
  EXPECT_NE(error_of([&] { nuq::hf_config_with_quantization("[1, 2]", c, "dir/config.json"); })
                .find("dir/config.json: not a JSON object"),
            std::string::npos);
}

}  // namespace
