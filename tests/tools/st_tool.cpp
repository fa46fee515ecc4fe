// Exposes nuq's safetensors reader and writer to the Python tests, which check them against the
// reference `safetensors` package:
//   nuq_st_tool copy <in> <out.safetensors>         read every tensor with nuq (file, directory or index)
//                                                    and write them with SafetensorsWriter, streaming:
//                                                    tensors in reverse order, each in pieces written
//                                                    back to front; __metadata__ is kept (for a sharded
//                                                    input, the union of the shards' __metadata__)
//   nuq_st_tool write-sample <out.safetensors>       a few tensors of many dtypes with known contents
//   nuq_st_tool shard <in> <outdir> <max-shard-bytes> model-0000i-of-0000N.safetensors shards plus
//                                                    model.safetensors.index.json
//   nuq_st_tool dump <in>                            what nuq reads (names, dtypes, shapes, offsets,
//                                                    metadata, shard files) as JSON on stdout
// Exit status: 0 on success, 1 on nuq::Error (message on stderr), 2 on bad usage or other failures.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "nuq/error.hpp"
#include "nuq/safetensors.hpp"

namespace {

namespace fs = std::filesystem;

std::map<std::string, std::string> file_metadata(const nuq::SafetensorsCheckpoint& ckpt) {
  // A sharded checkpoint's own metadata() is the index's (total_size...), not what the files carry.
  std::map<std::string, std::string> meta;
  for (const auto& f : ckpt.files()) meta.insert(f->metadata().begin(), f->metadata().end());
  return meta;
}

// Copies one tensor in pieces written last piece first, so that the writer sees out-of-order, partial
// writes, as a real streaming conversion would produce them.
void copy_tensor(nuq::SafetensorsWriter& w, const nuq::SafetensorsCheckpoint& ckpt, const std::string& name) {
  const std::span<const std::byte> bytes = ckpt.file_of(name).tensor_bytes(ckpt.info(name));
  const std::size_t n = bytes.size();
  if (n == 0) {
    w.write(name, bytes, 0);
    return;
  }
  const std::size_t piece = std::min<std::size_t>((n + 2) / 3, std::size_t(1) << 24);
  for (std::size_t start = (n - 1) / piece * piece;; start -= piece) {
    w.write(name, bytes.subspan(start, std::min(piece, n - start)), start);
    if (start == 0) break;
  }
}

int copy(const std::string& in, const std::string& out) {
  const nuq::SafetensorsCheckpoint ckpt(in);
  nuq::SafetensorsWriter w(out, file_metadata(ckpt));
  const std::vector<std::string>& names = ckpt.tensor_names();
  for (const std::string& name : names) {
    const nuq::SafetensorsTensorInfo& info = ckpt.info(name);
    w.declare(name, info.dtype, info.shape);
  }
  for (auto it = names.rbegin(); it != names.rend(); ++it) copy_tensor(w, ckpt, *it);
  w.finish();
  return 0;
}

template <class T>
nuq::ConstTensorView view_of(const std::vector<T>& v, nuq::DType dtype, nuq::Shape shape) {
  return {reinterpret_cast<const std::byte*>(v.data()), dtype, shape};
}

// The Python test spells out the same values; change both together.
int write_sample(const std::string& out) {
  using nuq::DType;
  const std::vector<float> f32 = {-1.5f, 0.0f, 0.25f, 1e-8f, 3.4e38f, -7.0f};
  const std::vector<double> f64 = {3.141592653589793, -2.5};
  const std::vector<uint16_t> f16 = {0x3C00, 0xC000, 0x3800, 0x7BFF};   // 1, -2, 0.5, 65504
  const std::vector<uint16_t> bf16 = {0x3F80, 0xBF80, 0x4049, 0x0000};  // 1, -1, 3.140625, 0
  const std::vector<int64_t> i64 = {-1, 0, int64_t(1) << 40};
  const std::vector<int32_t> i32 = {1, -2, 3, -4};
  const std::vector<int16_t> i16 = {-32768, 0, 32767};
  const std::vector<int8_t> i8 = {-128, -1, 0, 127};
  const std::vector<uint16_t> u16 = {0, 65535};
  const std::vector<uint8_t> u8 = {200};
  const std::vector<uint8_t> boolean = {1, 0, 1};
  const std::vector<float> empty;
  nuq::write_safetensors(out,
                         {
                             {"f32", view_of(f32, DType::F32, {2, 3})},
                             {"f64", view_of(f64, DType::F64, {2})},
                             {"f16", view_of(f16, DType::F16, {4})},
                             {"bf16", view_of(bf16, DType::BF16, {2, 2})},
                             {"i64", view_of(i64, DType::I64, {3})},
                             {"i32", view_of(i32, DType::I32, {2, 2})},
                             {"i16", view_of(i16, DType::I16, {3})},
                             {"i8", view_of(i8, DType::I8, {4})},
                             {"u16", view_of(u16, DType::U16, {2})},
                             {"u8_scalar", view_of(u8, DType::U8, {})},
                             {"bool", view_of(boolean, DType::BOOL, {3})},
                             {"empty", view_of(empty, DType::F32, {0, 4})},
                         },
                         {{"format", "pt"}, {"producer", "nuq_st_tool"}, {"note", "h\xc3\xa9llo \xe2\x9c\x93"}});
  return 0;
}

int shard(const std::string& in, const std::string& outdir, uint64_t max_bytes) {
  const nuq::SafetensorsCheckpoint ckpt(in);
  std::vector<std::vector<std::string>> shards;
  uint64_t current = 0, total = 0;
  for (const std::string& name : ckpt.tensor_names()) {
    const uint64_t n = ckpt.info(name).nbytes();
    if (shards.empty() || (!shards.back().empty() && current + n > max_bytes)) {
      shards.emplace_back();
      current = 0;
    }
    shards.back().push_back(name);
    current += n;
    total += n;
  }
  if (shards.empty()) shards.emplace_back();  // a checkpoint without tensors still gets one (empty) shard
  fs::create_directories(outdir);
  const std::map<std::string, std::string> meta = file_metadata(ckpt);
  std::vector<std::pair<std::string, std::string>> weight_map;
  for (std::size_t i = 0; i < shards.size(); ++i) {
    const std::string file = fmt::format("model-{:05}-of-{:05}.safetensors", i + 1, shards.size());
    nuq::SafetensorsWriter w((fs::path(outdir) / file).string(), meta);
    for (const std::string& name : shards[i]) {
      const nuq::SafetensorsTensorInfo& info = ckpt.info(name);
      w.declare(name, info.dtype, info.shape);
      weight_map.emplace_back(name, file);
    }
    for (const std::string& name : shards[i]) copy_tensor(w, ckpt, name);
    w.finish();
  }
  nuq::write_safetensors_index((fs::path(outdir) / "model.safetensors.index.json").string(), weight_map, total,
                               {{"producer", "nuq_st_tool"}});
  return 0;
}

int dump(const std::string& in) {
  const nuq::SafetensorsCheckpoint ckpt(in);
  nlohmann::ordered_json j;
  j["sharded"] = ckpt.is_sharded();
  j["metadata"] = ckpt.metadata();
  nlohmann::ordered_json files = nlohmann::ordered_json::array();
  for (const auto& f : ckpt.files()) {
    nlohmann::ordered_json fj;
    fj["path"] = f->path();
    fj["data_offset"] = f->header().data_offset;
    fj["metadata"] = f->metadata();
    files.push_back(std::move(fj));
  }
  j["files"] = std::move(files);
  nlohmann::ordered_json tensors = nlohmann::ordered_json::array();
  for (const std::string& name : ckpt.tensor_names()) {
    const nuq::SafetensorsTensorInfo& info = ckpt.info(name);
    nlohmann::ordered_json t;
    t["name"] = name;
    t["dtype"] = std::string(nuq::dtype_name(info.dtype));
    t["shape"] = std::vector<int64_t>(info.shape.begin(), info.shape.end());
    t["data_offsets"] = {info.begin, info.end};
    t["file"] = ckpt.file_of(name).path();
    tensors.push_back(std::move(t));
  }
  j["tensors"] = std::move(tensors);
  std::cout << j.dump(1) << '\n';
  return 0;
}

int usage() {
  std::cerr << "usage: nuq_st_tool copy <in> <out.safetensors>\n"
               "       nuq_st_tool write-sample <out.safetensors>\n"
               "       nuq_st_tool shard <in> <outdir> <max-shard-bytes>\n"
               "       nuq_st_tool dump <in>\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string> args(argv + 1, argv + argc);
  try {
    if (args.size() == 3 && args[0] == "copy") return copy(args[1], args[2]);
    if (args.size() == 2 && args[0] == "write-sample") return write_sample(args[1]);
    if (args.size() == 4 && args[0] == "shard") return shard(args[1], args[2], std::stoull(args[3]));
    if (args.size() == 2 && args[0] == "dump") return dump(args[1]);
    return usage();
  } catch (const nuq::Error& e) {
    std::cerr << "nuq_st_tool: error: " << e.what() << '\n';
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "nuq_st_tool: " << e.what() << '\n';
    return 2;
  }
}
