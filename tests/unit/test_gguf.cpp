// The GGUF reader: ggml block formats decoded from hand-built blocks whose expected values follow
// directly from ggml's definitions, a small GGUF image written byte by byte and parsed back, one
// malformed image per validation rule, truncation at every length, and the real SmolLM2 file when it
// is installed.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "nuq/error.hpp"
#include "nuq/gguf.hpp"
#include "nuq/half.hpp"
#include "test_paths.hpp"

namespace {

using nuq::GgmlType;
using nuq::GgufValueType;

// ---- helpers ---------------------------------------------------------------------------------------------

// Appends little-endian fields; enough to write any GGUF image, valid or not.
class ByteWriter {
 public:
  template <class T>
  ByteWriter& put(T v) {
    const auto* p = reinterpret_cast<const std::byte*>(&v);
    bytes.insert(bytes.end(), p, p + sizeof(T));
    return *this;
  }
  ByteWriter& u8(uint8_t v) { return put(v); }
  ByteWriter& u16(uint16_t v) { return put(v); }
  ByteWriter& u32(uint32_t v) { return put(v); }
  ByteWriter& u64(uint64_t v) { return put(v); }
  ByteWriter& str(std::string_view s) {
    u64(s.size());
    for (char c : s) bytes.push_back(std::byte(c));
    return *this;
  }
  ByteWriter& raw(const std::vector<std::byte>& b) {
    bytes.insert(bytes.end(), b.begin(), b.end());
    return *this;
  }
  ByteWriter& pad_to(std::size_t alignment) {
    while (bytes.size() % alignment) bytes.push_back(std::byte{0});
    return *this;
  }
  std::vector<std::byte> bytes;
};

using KvWriter = std::function<void(ByteWriter&)>;

KvWriter kv_u32(std::string key, uint32_t v) {
  return [=](ByteWriter& w) { w.str(key).u32(uint32_t(GgufValueType::UINT32)).u32(v); };
}
KvWriter kv_string(std::string key, std::string v) {
  return [=](ByteWriter& w) { w.str(key).u32(uint32_t(GgufValueType::STRING)).str(v); };
}

struct TensorSpec {
  std::string name;
  std::vector<uint64_t> ne;
  uint32_t type;
  uint64_t offset;
};

// A GGUF image described field by field, so that each malformed variant changes one thing.
struct Image {
  uint32_t version = 3;
  std::vector<KvWriter> kvs;
  std::vector<TensorSpec> tensors;
  std::vector<std::byte> data;  // the data section, after the padding
  uint64_t alignment = 32;      // for padding the tensor infos; the key itself is a kv
  std::optional<uint64_t> kv_count, tensor_count;

  std::vector<std::byte> build() const {
    ByteWriter w;
    w.u32(0x46554747);  // "GGUF"
    w.u32(version);
    w.u64(tensor_count.value_or(tensors.size()));
    w.u64(kv_count.value_or(kvs.size()));
    for (const KvWriter& kv : kvs) kv(w);
    for (const TensorSpec& t : tensors) {
      w.str(t.name).u32(uint32_t(t.ne.size()));
      for (uint64_t d : t.ne) w.u64(d);
      w.u32(t.type).u64(t.offset);
    }
    w.pad_to(alignment);
    w.raw(data);
    return w.bytes;
  }
};

std::vector<std::byte> bytes_of(const void* p, std::size_t n) {
  const auto* b = static_cast<const std::byte*>(p);
  return {b, b + n};
}

template <class T>
void append(std::vector<std::byte>& out, const std::vector<T>& v) {
  auto b = bytes_of(v.data(), v.size() * sizeof(T));
  out.insert(out.end(), b.begin(), b.end());
}

std::string error_of(auto&& fn, nuq::Errc* code = nullptr) {
  try {
    fn();
  } catch (const nuq::Error& e) {
    if (code) *code = e.code();
    return e.what();
  }
  return "<no error>";
}

nuq::GgufHeader parse(const std::vector<std::byte>& image) { return nuq::parse_gguf(image, "test.gguf"); }

// Parses `image` expecting an error of `code` whose message holds every fragment.
void expect_parse_error(const std::vector<std::byte>& image, nuq::Errc code,
                        std::initializer_list<std::string_view> fragments) {
  nuq::Errc got = nuq::Errc::internal;
  const std::string msg = error_of([&] { parse(image); }, &got);
  EXPECT_EQ(got, code) << msg;
  EXPECT_NE(msg.find("test.gguf: "), std::string::npos) << msg;
  for (std::string_view f : fragments) EXPECT_NE(msg.find(f), std::string::npos) << "'" << f << "' not in: " << msg;
}

std::vector<float> dequant(GgmlType type, const std::vector<std::byte>& src, int64_t n) {
  // Decode from an odd address: the reader must not assume alignment of mapped data.
  std::vector<std::byte> shifted(src.size() + 1);
  std::memcpy(shifted.data() + 1, src.data(), src.size());
  std::vector<float> out(std::size_t(n), -12345.0f);
  nuq::ggml_dequantize(type, shifted.data() + 1, out.data(), n);
  return out;
}

void expect_bits_eq(const std::vector<float>& got, const std::vector<float>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    EXPECT_EQ(nuq::float_bits(got[i]), nuq::float_bits(want[i])) << "element " << i << ": " << got[i] << " vs " << want[i];
  }
}

void put_fp16(std::vector<std::byte>& b, float v) {
  const uint16_t h = nuq::float_to_fp16(v);
  auto x = bytes_of(&h, 2);
  b.insert(b.end(), x.begin(), x.end());
}

// ---- type table ------------------------------------------------------------------------------------------

TEST(GgufTypes, TableMatchesGgml) {
  struct Want {
    uint32_t value;
    const char* name;
    uint32_t block, size;
    bool decodes;
  };
  const Want wants[] = {
      {0, "F32", 1, 4, true},        {1, "F16", 1, 2, true},          {2, "Q4_0", 32, 18, true},
      {3, "Q4_1", 32, 20, true},     {6, "Q5_0", 32, 22, true},       {7, "Q5_1", 32, 24, true},
      {8, "Q8_0", 32, 34, true},     {9, "Q8_1", 32, 36, false},      {10, "Q2_K", 256, 84, false},
      {11, "Q3_K", 256, 110, false}, {12, "Q4_K", 256, 144, false},   {13, "Q5_K", 256, 176, false},
      {14, "Q6_K", 256, 210, false}, {15, "Q8_K", 256, 292, false},   {16, "IQ2_XXS", 256, 66, false},
      {17, "IQ2_XS", 256, 74, false}, {18, "IQ3_XXS", 256, 98, false}, {19, "IQ1_S", 256, 50, false},
      {20, "IQ4_NL", 32, 18, false}, {21, "IQ3_S", 256, 110, false},  {22, "IQ2_S", 256, 82, false},
      {23, "IQ4_XS", 256, 136, false}, {24, "I8", 1, 1, true},        {25, "I16", 1, 2, true},
      {26, "I32", 1, 4, true},       {27, "I64", 1, 8, false},        {28, "F64", 1, 8, true},
      {29, "IQ1_M", 256, 56, false}, {30, "BF16", 1, 2, true},        {34, "TQ1_0", 256, 54, false},
      {35, "TQ2_0", 256, 66, false},
  };
  for (const Want& w : wants) {
    const nuq::GgmlTypeTraits* t = nuq::ggml_type_traits(w.value);
    ASSERT_NE(t, nullptr) << w.name;
    EXPECT_EQ(t->name, w.name);
    EXPECT_EQ(t->block_size, w.block) << w.name;
    EXPECT_EQ(t->type_size, w.size) << w.name;
    EXPECT_EQ(t->can_dequantize, w.decodes) << w.name;
  }
  // Values ggml retired or never used.
  for (uint32_t v : {4u, 5u, 31u, 32u, 33u, 36u, 37u, 38u, 1000u, 0xFFFFFFFFu}) EXPECT_EQ(nuq::ggml_type_traits(v), nullptr) << v;
}

// ---- block formats -----------------------------------------------------------------------------------------

TEST(GgufDequant, Q4_0NibbleOrderAndOffset) {
  // Two blocks: element j of a block is the low nibble of byte j, element j + 16 the high nibble.
  std::vector<std::byte> b;
  std::vector<float> want;
  for (float d : {0.5f, -2.0f}) {
    put_fp16(b, d);
    for (int j = 0; j < 16; ++j) b.push_back(std::byte(uint8_t(j | ((15 - j) << 4))));
    for (int j = 0; j < 16; ++j) want.push_back(float(j - 8) * d);
    for (int j = 0; j < 16; ++j) want.push_back(float(15 - j - 8) * d);
  }
  ASSERT_EQ(b.size(), 36u);
  expect_bits_eq(dequant(GgmlType::Q4_0, b, 64), want);
  EXPECT_EQ(dequant(GgmlType::Q4_0, b, 64)[0], -4.0f);   // (0 - 8) * 0.5
  EXPECT_EQ(dequant(GgmlType::Q4_0, b, 64)[16], 3.5f);   // (15 - 8) * 0.5
}

TEST(GgufDequant, Q4_1ScaleAndMin) {
  std::vector<std::byte> b;
  put_fp16(b, 0.5f);
  put_fp16(b, -1.0f);
  for (int j = 0; j < 16; ++j) b.push_back(std::byte(uint8_t(j | (((j * 7) & 15) << 4))));
  std::vector<float> want;
  for (int j = 0; j < 16; ++j) want.push_back(float(j) * 0.5f - 1.0f);
  for (int j = 0; j < 16; ++j) want.push_back(float((j * 7) & 15) * 0.5f - 1.0f);
  expect_bits_eq(dequant(GgmlType::Q4_1, b, 32), want);
  EXPECT_EQ(dequant(GgmlType::Q4_1, b, 32)[15], 6.5f);
}

TEST(GgufDequant, Q5_0FifthBitFromQh) {
  const uint32_t qh = 0xA5C3F00Fu;
  std::vector<std::byte> b;
  put_fp16(b, 0.25f);
  auto h = bytes_of(&qh, 4);
  b.insert(b.end(), h.begin(), h.end());
  for (int j = 0; j < 16; ++j) b.push_back(std::byte(uint8_t((j * 5 & 15) | ((j * 3 & 15) << 4))));
  std::vector<float> want(32);
  for (int j = 0; j < 16; ++j) {
    const int lo = (j * 5 & 15) + 16 * int((qh >> j) & 1);
    const int hi = (j * 3 & 15) + 16 * int((qh >> (j + 16)) & 1);
    want[j] = float(lo - 16) * 0.25f;
    want[j + 16] = float(hi - 16) * 0.25f;
  }
  expect_bits_eq(dequant(GgmlType::Q5_0, b, 32), want);
  // qh bit 0 is set and byte 0 is 0: q = 16, x = 0; bit 4 is clear and nibble is 4: q = 4.
  EXPECT_EQ(dequant(GgmlType::Q5_0, b, 32)[0], 0.0f);
  EXPECT_EQ(dequant(GgmlType::Q5_0, b, 32)[4], (4 - 16) * 0.25f);
}

TEST(GgufDequant, Q5_1FifthBitScaleAndMin) {
  const uint32_t qh = 0x0F0F3CC3u;
  std::vector<std::byte> b;
  put_fp16(b, 0.125f);
  put_fp16(b, 3.0f);
  auto h = bytes_of(&qh, 4);
  b.insert(b.end(), h.begin(), h.end());
  for (int j = 0; j < 16; ++j) b.push_back(std::byte(uint8_t((15 - j) | (j << 4))));
  std::vector<float> want(32);
  for (int j = 0; j < 16; ++j) {
    want[j] = float((15 - j) + 16 * int((qh >> j) & 1)) * 0.125f + 3.0f;
    want[j + 16] = float(j + 16 * int((qh >> (j + 16)) & 1)) * 0.125f + 3.0f;
  }
  expect_bits_eq(dequant(GgmlType::Q5_1, b, 32), want);
  EXPECT_EQ(dequant(GgmlType::Q5_1, b, 32)[0], (15 + 16) * 0.125f + 3.0f);
}

TEST(GgufDequant, Q8_0SignedQuants) {
  std::vector<std::byte> b;
  std::vector<float> want;
  for (float d : {0.125f, 3.0f}) {
    put_fp16(b, d);
    for (int j = 0; j < 32; ++j) {
      const int q = j * 8 - 128;  // -128 .. 120
      b.push_back(std::byte(uint8_t(int8_t(q))));
      want.push_back(float(q) * d);
    }
  }
  expect_bits_eq(dequant(GgmlType::Q8_0, b, 64), want);
  EXPECT_EQ(dequant(GgmlType::Q8_0, b, 64)[0], -16.0f);
}

TEST(GgufDequant, PlainTypes) {
  const std::vector<float> f32 = {1.5f, -0.0f, 3e-38f, INFINITY};
  expect_bits_eq(dequant(GgmlType::F32, bytes_of(f32.data(), 16), 4), f32);

  const std::vector<uint16_t> f16 = {nuq::float_to_fp16(1.5f), nuq::float_to_fp16(-65504.0f), 0x0001, 0x7c00};
  expect_bits_eq(dequant(GgmlType::F16, bytes_of(f16.data(), 8), 4), {1.5f, -65504.0f, std::ldexp(1.0f, -24), INFINITY});

  const std::vector<uint16_t> bf16 = {0x3FC0, 0xC000, 0x0001};
  expect_bits_eq(dequant(GgmlType::BF16, bytes_of(bf16.data(), 6), 3), {1.5f, -2.0f, nuq::bits_float(0x00010000)});

  const std::vector<double> f64 = {0.1, -1e300, 2.5};
  expect_bits_eq(dequant(GgmlType::F64, bytes_of(f64.data(), 24), 3), {0.1f, -INFINITY, 2.5f});

  const std::vector<int8_t> i8 = {-128, 0, 127};
  expect_bits_eq(dequant(GgmlType::I8, bytes_of(i8.data(), 3), 3), {-128.0f, 0.0f, 127.0f});
  const std::vector<int16_t> i16 = {-32768, 7, 32767};
  expect_bits_eq(dequant(GgmlType::I16, bytes_of(i16.data(), 6), 3), {-32768.0f, 7.0f, 32767.0f});
  const std::vector<int32_t> i32 = {-5, 16777217, 2147483647};
  expect_bits_eq(dequant(GgmlType::I32, bytes_of(i32.data(), 12), 3), {-5.0f, 16777216.0f, 2147483648.0f});
}

TEST(GgufDequant, RejectsUnsupportedTypesAndPartialBlocks) {
  std::vector<std::byte> block(256, std::byte{0});
  std::vector<float> out(256);
  nuq::Errc code{};
  std::string msg = error_of([&] { nuq::ggml_dequantize(GgmlType::Q4_K, block.data(), out.data(), 256); }, &code);
  EXPECT_EQ(code, nuq::Errc::unsupported);
  EXPECT_NE(msg.find("Q4_K"), std::string::npos) << msg;
  msg = error_of([&] { nuq::ggml_dequantize(GgmlType(4), block.data(), out.data(), 32); }, &code);
  EXPECT_EQ(code, nuq::Errc::unsupported);
  EXPECT_NE(msg.find("type 4"), std::string::npos) << msg;
  msg = error_of([&] { nuq::ggml_dequantize(GgmlType::Q8_0, block.data(), out.data(), 48); }, &code);
  EXPECT_EQ(code, nuq::Errc::invalid_argument);
  EXPECT_NE(msg.find("48"), std::string::npos) << msg;
}

// ---- a valid image ---------------------------------------------------------------------------------------

// Metadata of every value type (nested and empty arrays included) and three tensors: F32 [4],
// Q8_0 with ne = [32, 2] and F16 with ne = [3, 2]; the last one ends exactly at the end of the file,
// so that any truncation must be detected.
Image valid_image() {
  Image img;
  img.kvs.push_back(kv_string("general.architecture", "llama"));
  img.kvs.push_back(kv_u32("general.alignment", 32));
  img.kvs.push_back([](ByteWriter& w) { w.str("t.u8").u32(0).u8(200); });
  img.kvs.push_back([](ByteWriter& w) { w.str("t.i8").u32(1).put<int8_t>(-100); });
  img.kvs.push_back([](ByteWriter& w) { w.str("t.u16").u32(2).u16(65535); });
  img.kvs.push_back([](ByteWriter& w) { w.str("t.i16").u32(3).put<int16_t>(-32768); });
  img.kvs.push_back([](ByteWriter& w) { w.str("t.i32").u32(5).put<int32_t>(-7); });
  img.kvs.push_back([](ByteWriter& w) { w.str("t.f32").u32(6).put<float>(1e-5f); });
  img.kvs.push_back([](ByteWriter& w) { w.str("t.bool").u32(7).u8(1); });
  img.kvs.push_back([](ByteWriter& w) { w.str("t.u64").u32(10).u64(~uint64_t(0)); });
  img.kvs.push_back([](ByteWriter& w) { w.str("t.i64").u32(11).put<int64_t>(INT64_MIN); });
  img.kvs.push_back([](ByteWriter& w) { w.str("t.f64").u32(12).put<double>(-2.25); });
  img.kvs.push_back([](ByteWriter& w) { w.str("t.strs").u32(9).u32(8).u64(3).str("a").str("").str("héllo"); });
  img.kvs.push_back([](ByteWriter& w) { w.str("t.ints").u32(9).u32(5).u64(3).put<int32_t>(1).put<int32_t>(-2).put<int32_t>(3); });
  img.kvs.push_back([](ByteWriter& w) { w.str("t.empty").u32(9).u32(6).u64(0); });
  // [[1, 2], [], [[9]]] spelled as ARRAY of ARRAY: inner arrays carry their own element types.
  img.kvs.push_back([](ByteWriter& w) {
    w.str("t.nested").u32(9).u32(9).u64(3);
    w.u32(2).u64(2).u16(1).u16(2);
    w.u32(0).u64(0);
    w.u32(9).u64(1).u32(0).u64(1).u8(9);
  });
  img.tensors = {{"a", {4}, 0, 0}, {"b", {32, 2}, 8, 32}, {"c", {3, 2}, 1, 128}};
  img.data.resize(128 + 12);
  const float a[4] = {1.0f, -2.0f, 0.5f, 100.0f};
  std::memcpy(img.data.data(), a, 16);
  std::vector<std::byte> q8;
  for (float d : {0.5f, 0.25f}) {
    put_fp16(q8, d);
    for (int j = 0; j < 32; ++j) q8.push_back(std::byte(uint8_t(int8_t(j - 16))));
  }
  std::memcpy(img.data.data() + 32, q8.data(), q8.size());
  for (int i = 0; i < 6; ++i) {
    const uint16_t h = nuq::float_to_fp16(float(i) - 2.5f);
    std::memcpy(img.data.data() + 128 + 2 * i, &h, 2);
  }
  return img;
}

TEST(GgufParse, ValidImageMetadataOfEveryType) {
  const auto image = valid_image().build();
  const nuq::GgufHeader h = parse(image);
  EXPECT_EQ(h.version, 3u);
  EXPECT_EQ(h.alignment, 32u);
  ASSERT_EQ(h.metadata.size(), 16u);
  EXPECT_EQ(h.metadata[0].key, "general.architecture");
  EXPECT_EQ(h.find_value("general.architecture")->as_string(), "llama");
  EXPECT_EQ(h.find_value("t.u8")->as_uint(), 200u);
  EXPECT_EQ(h.find_value("t.u8")->type, GgufValueType::UINT8);
  EXPECT_EQ(h.find_value("t.i8")->as_int(), -100);
  EXPECT_EQ(h.find_value("t.u16")->as_uint(), 65535u);
  EXPECT_EQ(h.find_value("t.i16")->as_int(), -32768);
  EXPECT_EQ(h.find_value("t.i32")->as_int(), -7);
  EXPECT_EQ(h.find_value("t.f32")->as_float(), double(1e-5f));
  EXPECT_TRUE(h.find_value("t.bool")->as_bool());
  EXPECT_EQ(h.find_value("t.u64")->as_uint(), ~uint64_t(0));
  EXPECT_EQ(h.find_value("t.i64")->as_int(), INT64_MIN);
  EXPECT_EQ(h.find_value("t.f64")->as_float(), -2.25);
  const auto& strs = h.find_value("t.strs")->as_array();
  ASSERT_EQ(strs.size(), 3u);
  EXPECT_EQ(h.find_value("t.strs")->array_type, GgufValueType::STRING);
  EXPECT_EQ(strs[2].as_string(), "héllo");
  EXPECT_EQ(strs[1].as_string(), "");
  EXPECT_EQ(h.find_value("t.ints")->as_array()[1].as_int(), -2);
  EXPECT_TRUE(h.find_value("t.empty")->as_array().empty());
  EXPECT_EQ(h.find_value("t.empty")->array_type, GgufValueType::FLOAT32);
  const nuq::GgufValue& nested = *h.find_value("t.nested");
  EXPECT_EQ(nested.array_type, GgufValueType::ARRAY);
  ASSERT_EQ(nested.as_array().size(), 3u);
  EXPECT_EQ(nested.as_array()[0].array_type, GgufValueType::UINT16);
  EXPECT_EQ(nested.as_array()[0].as_array()[1].as_uint(), 2u);
  EXPECT_TRUE(nested.as_array()[1].as_array().empty());
  EXPECT_EQ(nested.as_array()[2].as_array()[0].as_array()[0].as_uint(), 9u);
  EXPECT_EQ(h.find_value("missing"), nullptr);
}

TEST(GgufParse, ValidImageTensorInfos) {
  const auto image = valid_image().build();
  const nuq::GgufHeader h = parse(image);
  ASSERT_EQ(h.tensors.size(), 3u);
  EXPECT_EQ(h.data_offset % 32, 0u);
  EXPECT_EQ(h.data_offset + 140, image.size());
  const nuq::GgufTensorInfo* b = h.find_tensor("b");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->type, GgmlType::Q8_0);
  EXPECT_EQ(b->ne, (std::vector<uint64_t>{32, 2}));
  EXPECT_EQ(b->shape, (nuq::Shape{2, 32}));
  EXPECT_EQ(b->offset, 32u);
  EXPECT_EQ(b->nbytes, 68u);
  EXPECT_EQ(b->numel(), 64);
  EXPECT_EQ(h.find_tensor("c")->shape, (nuq::Shape{2, 3}));
  EXPECT_EQ(h.find_tensor("c")->nbytes, 12u);
  EXPECT_EQ(h.find_tensor("a")->nbytes, 16u);
  EXPECT_EQ(h.find_tensor("nope"), nullptr);
}

TEST(GgufParse, VersionTwoIsAccepted) {
  Image img = valid_image();
  img.version = 2;
  EXPECT_EQ(parse(img.build()).version, 2u);
}

TEST(GgufParse, CustomAlignmentPlacesTheDataSection) {
  Image img;
  img.alignment = 256;
  img.kvs.push_back(kv_u32("general.alignment", 256));
  img.tensors = {{"x", {2}, 0, 0}, {"y", {2}, 0, 256}};
  img.data.resize(256 + 8);
  const nuq::GgufHeader h = parse(img.build());
  EXPECT_EQ(h.alignment, 256u);
  EXPECT_EQ(h.data_offset, 256u);
  // Without the key the default alignment of 32 applies and an offset of 16 is misaligned.
  Image bad;
  bad.tensors = {{"x", {4}, 0, 16}};
  bad.data.resize(64);
  expect_parse_error(bad.build(), nuq::Errc::invalid_file, {"tensor 'x'", "offset 16", "alignment 32"});
}

// ---- one malformed image per rule ------------------------------------------------------------------------

TEST(GgufParse, RejectsBadMagic) {
  auto image = valid_image().build();
  image[0] = std::byte{'X'};
  expect_parse_error(image, nuq::Errc::invalid_file, {"not a GGUF file", "58 47 55 46"});
  expect_parse_error({}, nuq::Errc::invalid_file, {"file ends", "magic"});
}

TEST(GgufParse, RejectsOtherVersions) {
  for (uint32_t v : {0u, 1u, 4u}) {
    Image img = valid_image();
    img.version = v;
    expect_parse_error(img.build(), nuq::Errc::unsupported, {fmt::format("GGUF version {} is not supported", v)});
  }
  Image img = valid_image();
  img.version = 0x03000000;
  expect_parse_error(img.build(), nuq::Errc::unsupported, {"big-endian"});
}

TEST(GgufParse, RejectsCountsTheFileCannotHold) {
  Image img = valid_image();
  img.kv_count = uint64_t(1) << 40;
  expect_parse_error(img.build(), nuq::Errc::invalid_file, {"1099511627776 metadata entries cannot fit"});
  img = valid_image();
  img.tensor_count = uint64_t(1) << 62;
  expect_parse_error(img.build(), nuq::Errc::invalid_file, {"4611686018427387904 tensor infos"});
  // Plausible against the whole file, impossible once the metadata has been read.
  img = valid_image();
  img.tensor_count = 20;
  expect_parse_error(img.build(), nuq::Errc::invalid_file, {"20 tensor infos cannot fit"});
}

TEST(GgufParse, RejectsStringsPastTheEnd) {
  Image img = valid_image();
  img.kvs.insert(img.kvs.begin(), [](ByteWriter& w) { w.str("k.s").u32(8).u64(1000000).u8('x'); });
  expect_parse_error(img.build(), nuq::Errc::invalid_file, {"key 'k.s'", "1000000 bytes runs past the end"});
  img = valid_image();
  img.kvs.insert(img.kvs.begin(), [](ByteWriter& w) { w.u64(~uint64_t(0)); });
  expect_parse_error(img.build(), nuq::Errc::invalid_file, {"metadata entry #0", "the key of 18446744073709551615 bytes"});
}

TEST(GgufParse, RejectsHugeArraysWithoutAllocating) {
  Image img = valid_image();
  img.kvs.insert(img.kvs.begin(), [](ByteWriter& w) { w.str("k.arr").u32(9).u32(4).u64(uint64_t(1) << 60); });
  expect_parse_error(img.build(), nuq::Errc::invalid_file, {"key 'k.arr'", "array of 1152921504606846976 UINT32 items cannot fit"});
  // Strings need at least their 8-byte length each.
  img = valid_image();
  img.kvs.insert(img.kvs.begin(), [](ByteWriter& w) { w.str("k.strs").u32(9).u32(8).u64(200); });
  expect_parse_error(img.build(), nuq::Errc::invalid_file, {"key 'k.strs'", "200 STRING items"});
}

TEST(GgufParse, RejectsUnknownValueTypes) {
  Image img = valid_image();
  img.kvs.insert(img.kvs.begin() + 1, [](ByteWriter& w) { w.str("k.odd").u32(13).u32(0); });
  expect_parse_error(img.build(), nuq::Errc::invalid_file, {"key 'k.odd'", "unknown value type 13"});
  img = valid_image();
  img.kvs.insert(img.kvs.begin() + 1, [](ByteWriter& w) { w.str("k.odd").u32(9).u32(77).u64(1).u32(0); });
  expect_parse_error(img.build(), nuq::Errc::invalid_file, {"key 'k.odd'", "unknown value type 77", "element type"});
}

TEST(GgufParse, LimitsArrayNesting) {
  auto nested = [](int levels) {
    return [levels](ByteWriter& w) {
      w.str("k.deep").u32(9);
      for (int i = 1; i < levels; ++i) w.u32(9).u64(1);
      w.u32(0).u64(1).u8(7);
    };
  };
  Image ok = valid_image();
  ok.kvs.push_back(nested(4));
  EXPECT_EQ(parse(ok.build()).find_value("k.deep")->as_array()[0].as_array()[0].as_array()[0].as_array()[0].as_uint(), 7u);
  Image bad = valid_image();
  bad.kvs.push_back(nested(5));
  expect_parse_error(bad.build(), nuq::Errc::invalid_file, {"key 'k.deep'", "nested more than 4 levels"});
}

TEST(GgufParse, RejectsBadAlignment) {
  for (uint32_t a : {0u, 24u, 33u}) {
    Image img = valid_image();
    img.kvs[1] = kv_u32("general.alignment", a);
    expect_parse_error(img.build(), nuq::Errc::invalid_file,
                       {"key 'general.alignment'", fmt::format("alignment {} is not a power of two", a)});
  }
  Image img = valid_image();
  img.kvs[1] = [](ByteWriter& w) { w.str("general.alignment").u32(10).u64(32); };
  expect_parse_error(img.build(), nuq::Errc::invalid_file, {"key 'general.alignment'", "must be a UINT32, not UINT64"});
}

TEST(GgufParse, RejectsBadDimensions) {
  Image img = valid_image();
  img.tensors[0].ne = {1, 1, 1, 1, 4};
  expect_parse_error(img.build(), nuq::Errc::invalid_file, {"tensor 'a'", "5 dimensions (GGUF allows 1 to 4)"});
  img = valid_image();
  img.tensors[0].ne = {};
  expect_parse_error(img.build(), nuq::Errc::invalid_file, {"tensor 'a'", "0 dimensions"});
  img = valid_image();
  img.tensors[2].ne = {3, 0};
  expect_parse_error(img.build(), nuq::Errc::invalid_file, {"tensor 'c'", "ne[1] is 0", "empty tensors"});
  img = valid_image();
  img.tensors[0].ne = {uint64_t(1) << 62, 1u << 4};
  expect_parse_error(img.build(), nuq::Errc::invalid_file, {"tensor 'a'", "overflow the element count"});
  img = valid_image();
  img.tensors[0].ne = {uint64_t(1) << 63};
  expect_parse_error(img.build(), nuq::Errc::invalid_file, {"tensor 'a'", "overflow"});
}

TEST(GgufParse, RejectsRowsThatAreNotWholeBlocks) {
  Image img = valid_image();
  img.tensors[1].ne = {16, 4};
  expect_parse_error(img.build(), nuq::Errc::invalid_file,
                     {"tensor 'b'", "row length ne[0] = 16 is not a multiple of the Q8_0 block size 32"});
}

TEST(GgufParse, RejectsUnknownTensorTypes) {
  Image img = valid_image();
  img.tensors[1].type = 4;
  expect_parse_error(img.build(), nuq::Errc::unsupported, {"tensor 'b'", "unknown ggml type 4"});
  img.tensors[1].type = 1234;
  expect_parse_error(img.build(), nuq::Errc::unsupported, {"tensor 'b'", "unknown ggml type 1234"});
}

TEST(GgufParse, RejectsMisalignedOffsets) {
  Image img = valid_image();
  img.tensors[1].offset = 36;
  expect_parse_error(img.build(), nuq::Errc::invalid_file,
                     {"tensor 'b'", "data offset 36 is not a multiple of the alignment 32"});
}

TEST(GgufParse, RejectsTensorsPastTheEnd) {
  Image img = valid_image();
  img.data.resize(img.data.size() - 1);
  const auto image = img.build();
  const uint64_t data_offset = image.size() + 1 - 140;
  expect_parse_error(image, nuq::Errc::invalid_file,
                     {fmt::format("tensor 'c': data [{}, {}) runs past the end of the file ({} bytes)",
                                  data_offset + 128, data_offset + 140, image.size())});
  img = valid_image();
  img.tensors[0].offset = ~uint64_t(0) - 31;  // aligned, and overflows when added to the data offset
  expect_parse_error(img.build(), nuq::Errc::invalid_file, {"tensor 'a'", "runs past the end of the file"});
}

TEST(GgufParse, RejectsOverlappingTensors) {
  Image img = valid_image();
  img.tensors[2].offset = 64;  // inside b, which covers [32, 100)
  const auto image = img.build();
  const uint64_t base = image.size() - 140;
  expect_parse_error(image, nuq::Errc::invalid_file,
                     {fmt::format("tensors 'b' [{}, {}) and 'c' [{}, {}) overlap", base + 32, base + 100, base + 64,
                                  base + 76)});
  // One large tensor that contains two small ones.
  img = valid_image();
  img.tensors = {{"big", {32}, 0, 0}, {"small", {2}, 0, 32}, {"inner", {2}, 0, 64}};
  img.data.resize(128);
  expect_parse_error(img.build(), nuq::Errc::invalid_file, {"'big'", "'small'", "overlap"});
  img = valid_image();
  img.tensors[1].offset = 0;
  expect_parse_error(img.build(), nuq::Errc::invalid_file, {"tensors 'a'", "and 'b'", "overlap"});
}

TEST(GgufParse, RejectsDuplicates) {
  Image img = valid_image();
  img.kvs.push_back(kv_string("t.u8", "again"));
  expect_parse_error(img.build(), nuq::Errc::invalid_file, {"key 't.u8' appears twice", "#2 and #16"});
  img = valid_image();
  img.tensors[2].name = "a";
  expect_parse_error(img.build(), nuq::Errc::invalid_file, {"tensor 'a' appears twice", "#0 and #2"});
}

TEST(GgufParse, TruncationAtEveryLengthThrows) {
  const auto image = valid_image().build();
  ASSERT_NO_THROW(parse(image));
  for (std::size_t len = 0; len < image.size(); ++len) {
    std::vector<std::byte> cut(image.begin(), image.begin() + std::ptrdiff_t(len));
    nuq::Errc code = nuq::Errc::internal;
    const std::string msg = error_of([&] { parse(cut); }, &code);
    EXPECT_EQ(code, nuq::Errc::invalid_file) << "length " << len << ": " << msg;
  }
}

TEST(GgufParse, CorruptBytesNeverCrash) {
  // Not a proof, but every single-byte corruption must either parse or fail with nuq::Error.
  const auto image = valid_image().build();
  for (std::size_t i = 0; i < image.size(); ++i) {
    for (uint8_t v : {uint8_t(0x00), uint8_t(0x01), uint8_t(0x7F), uint8_t(0xFF)}) {
      auto bad = image;
      bad[i] = std::byte(v);
      try {
        const nuq::GgufHeader h = parse(bad);
        for (const auto& t : h.tensors) EXPECT_LE(h.data_offset + t.offset + t.nbytes, bad.size());
      } catch (const nuq::Error&) {
      }
    }
  }
}

// ---- values ----------------------------------------------------------------------------------------------

TEST(GgufValue, AccessorsCheckTypes) {
  const auto image = valid_image().build();
  const nuq::GgufHeader h = parse(image);
  nuq::Errc code{};
  std::string msg = error_of([&] { h.find_value("t.i8")->as_uint(); }, &code);
  EXPECT_EQ(code, nuq::Errc::invalid_argument);
  EXPECT_NE(msg.find("expected an unsigned integer, got INT8 -100"), std::string::npos) << msg;
  EXPECT_NE(error_of([&] { h.find_value("t.u64")->as_int(); }).find("got UINT64"), std::string::npos);
  EXPECT_NE(error_of([&] { h.find_value("t.u8")->as_string(); }).find("expected STRING, got UINT8 200"),
            std::string::npos);
  EXPECT_NE(error_of([&] { h.find_value("t.strs")->as_float(); }).find("got ARRAY"), std::string::npos);
  EXPECT_NE(error_of([&] { h.find_value("t.f64")->as_bool(); }).find("expected BOOL"), std::string::npos);
  EXPECT_NE(error_of([&] { h.find_value("t.bool")->as_array(); }).find("expected ARRAY"), std::string::npos);
  EXPECT_EQ(h.find_value("t.u16")->as_int(), 65535);
  EXPECT_EQ(h.find_value("t.i32")->as_float(), -7.0);
  EXPECT_EQ(h.find_value("t.u8")->as_float(), 200.0);
  nuq::GgufValue positive{GgufValueType::INT32, int64_t(5)};
  EXPECT_EQ(positive.as_uint(), 5u);
}

TEST(GgufValue, DisplayStrings) {
  const auto image = valid_image().build();
  const nuq::GgufHeader h = parse(image);
  EXPECT_EQ(h.find_value("general.architecture")->to_display_string(), "\"llama\"");
  EXPECT_EQ(h.find_value("t.f32")->to_display_string(), "1e-05");
  EXPECT_EQ(h.find_value("t.f64")->to_display_string(), "-2.25");
  EXPECT_EQ(h.find_value("t.i64")->to_display_string(), "-9223372036854775808");
  EXPECT_EQ(h.find_value("t.bool")->to_display_string(), "true");
  EXPECT_EQ(h.find_value("t.strs")->to_display_string(), "[\"a\", \"\", \"héllo\"]");
  EXPECT_EQ(h.find_value("t.strs")->to_display_string(2), "[\"a\", \"\", ... (3 items)]");
  EXPECT_EQ(h.find_value("t.empty")->to_display_string(), "[]");
  EXPECT_EQ(h.find_value("t.nested")->to_display_string(), "[[1, 2], [], [[9]]]");

  nuq::GgufValue arr{GgufValueType::ARRAY, std::vector<nuq::GgufValue>(100), GgufValueType::INT32};
  auto& items = std::get<std::vector<nuq::GgufValue>>(arr.value);
  for (std::size_t i = 0; i < items.size(); ++i) {
    items[i].type = GgufValueType::INT32;
    items[i].value = int64_t(i);
  }
  EXPECT_EQ(arr.to_display_string(), "[0, 1, 2, 3, 4, 5, 6, 7, ... (100 items)]");
  EXPECT_EQ(arr.to_display_string(0), "[... (100 items)]");

  // The 2-byte é straddles the 60-byte cut, so it is dropped whole rather than split.
  nuq::GgufValue text{GgufValueType::STRING, std::string(59, 'x') + "é\"tail and more\n"};
  EXPECT_EQ(text.to_display_string(), "\"" + std::string(59, 'x') + "...\" (76 bytes)");
  nuq::GgufValue text2{GgufValueType::STRING, std::string(58, 'x') + "é\"tail and more\n"};
  EXPECT_EQ(text2.to_display_string(), "\"" + std::string(58, 'x') + "é...\" (75 bytes)");
  nuq::GgufValue quoted{GgufValueType::STRING, std::string("a\"b\\c\nd\x01")};
  EXPECT_EQ(quoted.to_display_string(), "\"a\\\"b\\\\c\\nd\\x01\"");
  EXPECT_EQ(nuq::gguf_value_type_name(GgufValueType::FLOAT64), "FLOAT64");
  EXPECT_EQ(nuq::gguf_value_type_name(GgufValueType(99)), "unknown");
}

// ---- files ------------------------------------------------------------------------------------------------

class GgufFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = std::filesystem::temp_directory_path() /
            ("nuq_test_gguf_" + std::to_string(::testing::UnitTest::GetInstance()->random_seed()) + "_" +
             ::testing::UnitTest::GetInstance()->current_test_info()->name() + ".gguf");
    const auto image = valid_image().build();
    std::ofstream(path_, std::ios::binary).write(reinterpret_cast<const char*>(image.data()), std::streamsize(image.size()));
  }
  void TearDown() override { std::filesystem::remove(path_); }
  std::filesystem::path path_;
};

TEST_F(GgufFileTest, DequantizesTensorsByName) {
  const nuq::GgufFile f(path_.string());
  EXPECT_EQ(f.path(), path_.string());
  EXPECT_EQ(f.tensors().size(), 3u);
  EXPECT_EQ(f.metadata().size(), 16u);
  EXPECT_EQ(f.find_value("general.architecture")->as_string(), "llama");

  nuq::Buffer a = f.dequantize("a");
  EXPECT_EQ(a.dtype(), nuq::DType::F32);
  EXPECT_EQ(a.shape(), (nuq::Shape{4}));
  EXPECT_EQ(a.data_as<float>()[1], -2.0f);
  EXPECT_EQ(a.data_as<float>()[3], 100.0f);

  nuq::Buffer b = f.dequantize("b");
  EXPECT_EQ(b.shape(), (nuq::Shape{2, 32}));
  for (int j = 0; j < 32; ++j) {
    EXPECT_EQ(b.data_as<float>()[j], float(j - 16) * 0.5f);
    EXPECT_EQ(b.data_as<float>()[32 + j], float(j - 16) * 0.25f);
  }
  nuq::Buffer c = f.dequantize("c");
  EXPECT_EQ(c.shape(), (nuq::Shape{2, 3}));
  for (int i = 0; i < 6; ++i) EXPECT_EQ(c.data_as<float>()[i], float(i) - 2.5f);

  EXPECT_EQ(f.tensor_bytes(*f.find_tensor("b")).size(), 68u);
  EXPECT_EQ(f.tensor_bytes(*f.find_tensor("b")).data(), f.tensor_bytes(*f.find_tensor("a")).data() + 32);

  nuq::Errc code{};
  const std::string msg = error_of([&] { f.dequantize("no.such.tensor"); }, &code);
  EXPECT_EQ(code, nuq::Errc::invalid_argument);
  EXPECT_NE(msg.find("no tensor named 'no.such.tensor'"), std::string::npos) << msg;
  EXPECT_NE(msg.find(path_.string()), std::string::npos) << msg;

  nuq::GgufTensorInfo foreign = *f.find_tensor("c");
  foreign.offset = 1 << 20;
  EXPECT_THROW(f.tensor_bytes(foreign), nuq::Error);
}

TEST_F(GgufFileTest, UnsupportedTypeNamesTensorAndType) {
  Image img = valid_image();
  img.tensors[1].type = uint32_t(GgmlType::Q4_K);
  img.tensors[1].ne = {256};  // 144 bytes at offset 32: c moves past them
  img.tensors[2].offset = 192;
  img.data.resize(192 + 12);
  const auto image = img.build();
  std::ofstream(path_, std::ios::binary | std::ios::trunc)
      .write(reinterpret_cast<const char*>(image.data()), std::streamsize(image.size()));
  const nuq::GgufFile f(path_.string());
  nuq::Errc code{};
  const std::string msg = error_of([&] { f.dequantize("b"); }, &code);
  EXPECT_EQ(code, nuq::Errc::unsupported);
  EXPECT_NE(msg.find("tensor 'b'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("Q4_K"), std::string::npos) << msg;
}

TEST(GgufFile, MissingFileIsAnIoError) {
  nuq::Errc code{};
  const std::string msg = error_of([] { nuq::GgufFile f("/nonexistent/dir/model.gguf"); }, &code);
  EXPECT_EQ(code, nuq::Errc::io);
  EXPECT_NE(msg.find("/nonexistent/dir/model.gguf"), std::string::npos) << msg;
}

// ---- the real SmolLM2 checkpoint ------------------------------------------------------------------------

TEST(GgufRealModel, SmolLM2Q4_1) {
  const auto dir = nuq::testing::models_dir();
  if (!dir) GTEST_SKIP() << "no models directory ($NUQ_MODELS_DIR or ~/.cache/nuq/models)";
  const auto path = *dir / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf";
  if (!std::filesystem::is_regular_file(path)) GTEST_SKIP() << path << " is absent: run scripts/fetch-models.sh";

  const nuq::GgufFile f(path.string());
  EXPECT_EQ(f.header().version, 3u);
  EXPECT_EQ(f.find_value("general.architecture")->as_string(), "llama");
  EXPECT_EQ(f.find_value("llama.block_count")->as_uint(), 30u);
  EXPECT_EQ(f.find_value("llama.embedding_length")->as_uint(), 576u);
  EXPECT_EQ(f.find_value("tokenizer.ggml.tokens")->as_array().size(), 49152u);
  EXPECT_EQ(f.find_value("tokenizer.ggml.tokens")->array_type, GgufValueType::STRING);
  EXPECT_EQ(f.tensors().size(), 272u);

  const nuq::GgufTensorInfo* emb = f.find_tensor("token_embd.weight");
  ASSERT_NE(emb, nullptr);
  EXPECT_EQ(emb->type, GgmlType::Q8_0);
  EXPECT_EQ(emb->shape, (nuq::Shape{49152, 576}));

  const nuq::GgufTensorInfo* q = f.find_tensor("blk.0.attn_q.weight");
  ASSERT_NE(q, nullptr);
  EXPECT_EQ(q->type, GgmlType::Q4_1);
  EXPECT_EQ(q->shape, (nuq::Shape{576, 576}));
  const nuq::Buffer w = f.dequantize("blk.0.attn_q.weight");
  const float* x = w.data_as<float>();
  double sum_sq = 0;
  for (int64_t i = 0; i < w.shape().numel(); ++i) {
    ASSERT_TRUE(std::isfinite(x[i])) << "element " << i;
    sum_sq += double(x[i]) * x[i];
  }
  EXPECT_GT(sum_sq, 0.0);
  const nuq::Buffer down = f.dequantize("blk.0.ffn_down.weight");
  EXPECT_EQ(down.shape(), (nuq::Shape{576, 1536}));
  const nuq::Buffer norm = f.dequantize("blk.0.attn_norm.weight");
  EXPECT_EQ(norm.shape(), (nuq::Shape{576}));
}

}  // namespace
