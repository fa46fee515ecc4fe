// Exposes nuq's GGUF reader to the Python tests, which compare it with the reference `gguf` package:
//   nuq_gguf_tool dump <file.gguf> <out.json>            header, metadata and tensor infos as JSON
//   nuq_gguf_tool dequant <file.gguf> <tensor> <out.f32>  the tensor as raw little-endian fp32
//   nuq_gguf_tool types <out.json>                        the ggml type table
// Exit status: 0 on success, 1 on nuq::Error (message on stderr), 2 on bad usage or I/O.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>

#include <nlohmann/json.hpp>

#include "nuq/error.hpp"
#include "nuq/gguf.hpp"

namespace {

using Json = nlohmann::ordered_json;

Json value_json(const nuq::GgufValue& v) {
  switch (v.type) {
    case nuq::GgufValueType::UINT8:
    case nuq::GgufValueType::UINT16:
    case nuq::GgufValueType::UINT32:
    case nuq::GgufValueType::UINT64:
      return std::get<uint64_t>(v.value);
    case nuq::GgufValueType::INT8:
    case nuq::GgufValueType::INT16:
    case nuq::GgufValueType::INT32:
    case nuq::GgufValueType::INT64:
      return std::get<int64_t>(v.value);
    case nuq::GgufValueType::FLOAT32:
    case nuq::GgufValueType::FLOAT64:
      return std::get<double>(v.value);
    case nuq::GgufValueType::BOOL:
      return std::get<bool>(v.value);
    case nuq::GgufValueType::STRING:
      return std::get<std::string>(v.value);
    case nuq::GgufValueType::ARRAY: {
      Json items = Json::array();
      for (const nuq::GgufValue& item : v.as_array()) items.push_back(value_json(item));
      return items;
    }
  }
  return nullptr;
}

void write_json(const Json& j, const std::string& path) {
  std::ofstream out(path);
  // Metadata strings are not guaranteed to be UTF-8; replace bad bytes rather than fail the dump.
  out << j.dump(1, ' ', false, Json::error_handler_t::replace) << '\n';
  if (!out) throw std::runtime_error("cannot write " + path);
}

int dump(const std::string& in, const std::string& out) {
  const nuq::GgufFile f(in);
  const nuq::GgufHeader& h = f.header();
  Json j;
  j["version"] = h.version;
  j["alignment"] = h.alignment;
  j["data_offset"] = h.data_offset;
  Json meta = Json::object();
  for (const nuq::GgufKeyValue& kv : h.metadata) {
    Json entry;
    entry["type"] = std::string(nuq::gguf_value_type_name(kv.value.type));
    if (kv.value.type == nuq::GgufValueType::ARRAY)
      entry["array_type"] = std::string(nuq::gguf_value_type_name(kv.value.array_type));
    entry["value"] = value_json(kv.value);
    entry["display"] = kv.value.to_display_string();
    meta[kv.key] = std::move(entry);
  }
  j["metadata"] = std::move(meta);
  Json tensors = Json::array();
  for (const nuq::GgufTensorInfo& t : h.tensors) {
    const nuq::GgmlTypeTraits* traits = nuq::ggml_type_traits(uint32_t(t.type));
    Json e;
    e["name"] = t.name;
    e["type"] = traits ? std::string(traits->name) : "?";
    e["type_value"] = uint32_t(t.type);
    e["shape"] = Json(std::vector<int64_t>(t.shape.begin(), t.shape.end()));
    e["ne"] = t.ne;
    e["offset"] = t.offset;
    e["nbytes"] = t.nbytes;
    tensors.push_back(std::move(e));
  }
  j["tensors"] = std::move(tensors);
  write_json(j, out);
  return 0;
}

int dequant(const std::string& in, const std::string& name, const std::string& out) {
  const nuq::GgufFile f(in);
  const nuq::Buffer b = f.dequantize(name);
  std::ofstream o(out, std::ios::binary);
  o.write(reinterpret_cast<const char*>(b.data()), std::streamsize(b.nbytes()));
  if (!o) throw std::runtime_error("cannot write " + out);
  return 0;
}

int types(const std::string& out) {
  Json j = Json::array();
  for (uint32_t v = 0; v < 64; ++v) {
    if (const nuq::GgmlTypeTraits* t = nuq::ggml_type_traits(v)) {
      j.push_back({{"value", v},
                   {"name", std::string(t->name)},
                   {"block_size", t->block_size},
                   {"type_size", t->type_size},
                   {"can_dequantize", t->can_dequantize}});
    }
  }
  write_json(j, out);
  return 0;
}

int usage() {
  std::cerr << "usage: nuq_gguf_tool dump <file.gguf> <out.json>\n"
               "       nuq_gguf_tool dequant <file.gguf> <tensor-name> <out.f32>\n"
               "       nuq_gguf_tool types <out.json>\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string cmd = argc > 1 ? argv[1] : "";
  try {
    if (cmd == "dump" && argc == 4) return dump(argv[2], argv[3]);
    if (cmd == "dequant" && argc == 5) return dequant(argv[2], argv[3], argv[4]);
    if (cmd == "types" && argc == 3) return types(argv[2]);
    return usage();
  } catch (const nuq::Error& e) {
    std::cerr << e.what() << '\n';
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "nuq_gguf_tool: " << e.what() << '\n';
    return 2;
  }
}
