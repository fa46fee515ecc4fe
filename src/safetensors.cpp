#include "nuq/safetensors.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <numeric>
#include <sstream>
#include <tuple>
#include <utility>

#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "nuq/error.hpp"

namespace nuq {
namespace fs = std::filesystem;

namespace {

using Json = nlohmann::json;

// ---- message helpers --------------------------------------------------------------------------------

// Quotes text taken from a file or a caller for an error message. Control bytes are escaped so that a
// message always stays on one line, and long names are cut so that a hostile 100 MB key cannot make
// a 100 MB message. With ascii_only, bytes >= 0x80 are escaped too (for text not known to be UTF-8).
std::string quote(std::string_view s, bool ascii_only = false) {
  constexpr std::size_t kMaxBytes = 200;
  std::size_t n = std::min(s.size(), kMaxBytes);
  if (n < s.size() && !ascii_only)
    while (n > 0 && (static_cast<unsigned char>(s[n]) & 0xC0) == 0x80) --n;  // keep UTF-8 whole
  std::string out = "'";
  for (char ch : s.substr(0, n)) {
    const auto u = static_cast<unsigned char>(ch);
    if (u < 0x20 || u == 0x7f || (ascii_only && u >= 0x80) || ch == '\\' || ch == '\'')
      out += (ch == '\\' || ch == '\'') ? std::string("\\") + ch : fmt::format("\\x{:02x}", u);
    else
      out += ch;
  }
  out += '\'';
  if (n < s.size()) out += fmt::format("... ({} bytes)", s.size());
  return out;
}

// nlohmann's parse errors quote the last bytes read, which may be invalid UTF-8 or control bytes.
std::string printable(std::string_view s) {
  std::string out;
  for (char ch : s) {
    const auto u = static_cast<unsigned char>(ch);
    out += (u < 0x20 || u >= 0x7f) ? fmt::format("\\x{:02x}", u) : std::string(1, ch);
  }
  return out;
}

template <class J>
std::string json_excerpt(const J& j) {
  std::string s = j.dump(-1, ' ', false, J::error_handler_t::replace);
  if (s.size() > 80) s = s.substr(0, 80) + "...";
  return printable(s);
}

// "an array", "a string": a JSON value's type for messages.
std::string kind(const Json& j) {
  const std::string_view t = j.type_name();
  return (t.find_first_of("aeiou") == 0 ? "an " : "a ") + std::string(t);
}

bool is_valid_utf8(std::string_view s) {
  try {
    (void)Json(std::string(s)).dump();
    return true;
  } catch (const Json::type_error&) {
    return false;
  }
}

// ---- JSON parsing -------------------------------------------------------------------------------------

// A SAX handler that builds the DOM itself, because nlohmann's own parser silently keeps the last of
// two equal keys (a file could then mean different things to different readers), and because bounding
// the nesting depth and the array lengths keeps a hostile header from costing many times its size in
// memory. Strings reaching the handler are valid UTF-8: nlohmann's lexer rejects ill-formed bytes and
// unpaired surrogate escapes.
class DomBuilder {
  using J = Json;

 public:
  DomBuilder(std::size_t max_depth, std::size_t max_array_items)
      : max_depth_(max_depth), max_array_items_(max_array_items) {}

  bool null() { return add(J(nullptr)) != nullptr; }
  bool boolean(bool v) { return add(J(v)) != nullptr; }
  bool number_integer(J::number_integer_t v) { return add(J(v)) != nullptr; }
  bool number_unsigned(J::number_unsigned_t v) { return add(J(v)) != nullptr; }
  bool number_float(J::number_float_t v, const J::string_t&) { return add(J(v)) != nullptr; }
  bool string(J::string_t& v) { return add(J(std::move(v))) != nullptr; }
  bool binary(J::binary_t&) {
    error_ = "binary values are not JSON";
    return false;
  }
  bool start_object(std::size_t) { return open(J::object()); }
  bool start_array(std::size_t) { return open(J::array()); }
  bool end_object() { return close(); }
  bool end_array() { return close(); }
  bool key(J::string_t& k) {
    if (stack_.back()->contains(k)) {
      error_ = fmt::format("key {} appears twice{}", quote(k), where());
      return false;
    }
    key_ = std::move(k);
    return true;
  }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& e) {
    error_ = "not valid JSON: " + printable(e.what());
    return false;
  }

  J& root() { return root_; }
  const std::string& error() const { return error_; }

 private:
  // " in 'w'" or " in 'w'.'shape'": where a problem sits, for messages.
  std::string where() const {
    std::string s;
    for (std::size_t i = 1; i < path_.size(); ++i) s += (s.empty() ? " in " : ".") + path_[i];
    return s;
  }

  J* add(J v) {
    if (stack_.empty()) {
      root_ = std::move(v);
      return &root_;
    }
    J& top = *stack_.back();
    if (top.is_array()) {
      if (top.size() >= max_array_items_) {
        error_ = fmt::format("an array{} has more than {} elements", where(), max_array_items_);
        return nullptr;
      }
      top.push_back(std::move(v));
      return &top.back();
    }
    // Only ancestors of `top` are held by pointer, and they are never modified while a child is open,
    // so growing `top` cannot invalidate anything on the stack.
    auto& object = top.get_ref<J::object_t&>();
    return &object.emplace(std::move(key_), std::move(v)).first->second;
  }

  bool open(J container) {
    if (stack_.size() >= max_depth_) {
      error_ = fmt::format("JSON nests deeper than {} levels", max_depth_);
      return false;
    }
    std::string label = stack_.empty() ? std::string()
                        : stack_.back()->is_array() ? fmt::format("[{}]", stack_.back()->size())
                                                     : quote(key_);
    J* p = add(std::move(container));
    if (!p) return false;
    stack_.push_back(p);
    path_.push_back(std::move(label));
    return true;
  }

  bool close() {
    stack_.pop_back();
    path_.pop_back();
    return true;
  }

  std::size_t max_depth_;
  std::size_t max_array_items_;
  J root_;
  std::vector<J*> stack_;
  std::vector<std::string> path_;
  J::string_t key_;
  std::string error_;
};

// Parses `text` as one JSON value followed by nothing but whitespace; on failure returns the reason.
Json parse_json(std::string_view text, std::size_t max_depth, std::size_t max_array_items, std::string& error) {
  // nlohmann's lexer takes a NUL byte outside a string for the end of the input, which would let
  // anything follow it; raw NUL is never valid JSON, so refuse it first.
  if (const auto nul = text.find('\0'); nul != std::string_view::npos) {
    error = fmt::format("not valid JSON: NUL byte at offset {}", nul);
    return Json();
  }
  DomBuilder builder(max_depth, max_array_items);
  bool ok = false;
  try {
    ok = Json::sax_parse(text.data(), text.data() + text.size(), &builder, nlohmann::json::input_format_t::json,
                      /*strict=*/true);
  } catch (const nlohmann::json::exception& e) {
    error = "not valid JSON: " + printable(e.what());
    return Json();
  }
  if (!ok) {
    error = builder.error().empty() ? std::string("not valid JSON") : builder.error();
    return Json();
  }
  return std::move(builder.root());
}

uint64_t load_le64(const std::byte* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | uint64_t(p[i]);
  return v;
}

// A valid header nests three levels (root, tensor entry, shape) and its longest array is a shape of
// rank Shape::kMaxRank; these bounds leave room for a precise message about what is wrong.
constexpr std::size_t kHeaderMaxDepth = 16;
constexpr std::size_t kHeaderMaxArrayItems = 1024;

SafetensorsTensorInfo parse_tensor_entry(const std::string& name, const Json& entry, std::string_view source,
                                         uint64_t data_size) {
  const std::string t = quote(name);
  NUQ_CHECK(entry.is_object(), Errc::invalid_file, "{}: tensor {}: entry is {}, not an object", source, t,
            kind(entry));
  for (const auto& [key, value] : entry.items()) {
    // An unknown key may be a format extension that changes how the bytes are to be read; refusing is
    // safer than silently misreading them.
    NUQ_CHECK(key == "dtype" || key == "shape" || key == "data_offsets", Errc::invalid_file,
              "{}: tensor {}: unexpected key {} (expected dtype, shape, data_offsets)", source, t, quote(key));
  }
  for (const char* key : {"dtype", "shape", "data_offsets"})
    NUQ_CHECK(entry.contains(key), Errc::invalid_file, "{}: tensor {}: missing \"{}\"", source, t, key);

  SafetensorsTensorInfo info;
  info.name = name;
  const Json& dtype = entry["dtype"];
  NUQ_CHECK(dtype.is_string(), Errc::invalid_file, "{}: tensor {}: dtype must be a string, not {}", source, t,
            json_excerpt(dtype));
  const auto& dtype_str = dtype.get_ref<const std::string&>();
  const std::optional<DType> dt = dtype_from_name(dtype_str);
  NUQ_CHECK(dt.has_value(), Errc::unsupported, "{}: tensor {}: unknown dtype {}", source, t, quote(dtype_str));
  info.dtype = *dt;

  const Json& shape = entry["shape"];
  NUQ_CHECK(shape.is_array(), Errc::invalid_file, "{}: tensor {}: shape must be an array, not {}", source, t,
            json_excerpt(shape));
  NUQ_CHECK(shape.size() <= std::size_t(Shape::kMaxRank), Errc::invalid_file,
            "{}: tensor {}: shape has rank {}, above the maximum rank {}", source, t, shape.size(), Shape::kMaxRank);
  int64_t numel = 1;
  for (const Json& d : shape) {
    NUQ_CHECK(d.is_number_unsigned(), Errc::invalid_file,
              "{}: tensor {}: shape {} must hold non-negative integers, not {}", source, t, json_excerpt(shape),
              json_excerpt(d));
    const auto dim = d.get<uint64_t>();
    NUQ_CHECK(dim <= uint64_t(std::numeric_limits<int64_t>::max()), Errc::invalid_file,
              "{}: tensor {}: shape {} has a dimension above 2^63-1", source, t, json_excerpt(shape));
    // Checked step by step, like Shape::numel(), so that every accepted shape has a computable numel().
    NUQ_CHECK(!__builtin_mul_overflow(numel, int64_t(dim), &numel), Errc::invalid_file,
              "{}: tensor {}: shape {} has more elements than fit in 64 bits", source, t, json_excerpt(shape));
    info.shape.push_back(int64_t(dim));
  }

  const Json& offsets = entry["data_offsets"];
  NUQ_CHECK(offsets.is_array() && offsets.size() == 2 && offsets[0].is_number_unsigned() &&
                offsets[1].is_number_unsigned(),
            Errc::invalid_file, "{}: tensor {}: data_offsets must be two non-negative integers [begin, end], not {}",
            source, t, json_excerpt(offsets));
  info.begin = offsets[0].get<uint64_t>();
  info.end = offsets[1].get<uint64_t>();
  NUQ_CHECK(info.begin <= info.end, Errc::invalid_file, "{}: tensor {}: data_offsets [{}, {}] end before they begin",
            source, t, info.begin, info.end);
  uint64_t need = 0;
  NUQ_CHECK(!__builtin_mul_overflow(uint64_t(numel), uint64_t(dtype_size(info.dtype)), &need), Errc::invalid_file,
            "{}: tensor {}: {} {} needs more bytes than fit in 64 bits", source, t, dtype_str, to_string(info.shape));
  NUQ_CHECK(need == info.end - info.begin, Errc::invalid_file,
            "{}: tensor {}: data_offsets [{}, {}] hold {} bytes but {} {} needs {}", source, t, info.begin, info.end,
            info.end - info.begin, dtype_str, to_string(info.shape), need);
  NUQ_CHECK(info.end <= data_size, Errc::invalid_file,
            "{}: tensor {}: data_offsets [{}, {}] end past the data section ({} bytes)", source, t, info.begin,
            info.end, data_size);
  return info;
}

// ---- file writing helpers -------------------------------------------------------------------------------

std::atomic<uint64_t> g_temp_counter{0};

// Same directory as the target so that the final rename() stays within one file system (atomic); the
// pid and a counter keep concurrent writers, in this process or others, from colliding.
std::string temp_path_for(const std::string& path) {
  const fs::path p(path);
  NUQ_CHECK(!path.empty() && p.has_filename(), Errc::invalid_argument, "'{}' does not name a file", path);
  const std::string name = fmt::format(".{}.tmp.{}.{}", p.filename().string(), ::getpid(), g_temp_counter++);
  return (p.parent_path() / name).string();
}

int create_temp(const std::string& path, const std::string& temp) {
  int fd;
  do {
    fd = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) fail(Errc::io, "{}: cannot create temporary file {}: {}", path, temp, std::strerror(errno));
  return fd;
}

void write_all_at(int fd, const std::byte* p, std::size_t n, uint64_t offset, const std::string& path) {
  while (n > 0) {
    const ssize_t r = ::pwrite(fd, p, n, off_t(offset));
    if (r < 0 && errno == EINTR) continue;
    // pwrite returns 0 only when nothing can be written; treat it like a full disk rather than spin.
    if (r <= 0)
      fail(Errc::io, "{}: cannot write {} bytes at offset {}: {}", path, n, offset,
           std::strerror(r < 0 ? errno : ENOSPC));
    p += r;
    n -= std::size_t(r);
    offset += uint64_t(r);
  }
}

// Reserving the whole file before any data is written makes a full disk fail here, at the start,
// instead of after minutes of conversion.
void reserve_space(int fd, uint64_t size, const std::string& path) {
  int rc;
  do {
    rc = ::posix_fallocate(fd, 0, off_t(size));
  } while (rc == EINTR);
  if (rc == EOPNOTSUPP || rc == EINVAL) {
    do {
      rc = ::ftruncate(fd, off_t(size)) == 0 ? 0 : errno;
    } while (rc == EINTR);
  }
  if (rc != 0) fail(Errc::io, "{}: cannot reserve {} bytes: {}", path, size, std::strerror(rc));
}

void sync_and_close(int& fd, const std::string& path, const std::string& temp) {
  int rc;
  do {
    rc = ::fsync(fd);
  } while (rc != 0 && errno == EINTR);
  if (rc != 0) fail(Errc::io, "{}: cannot flush {}: {}", path, temp, std::strerror(errno));
  // Linux releases the descriptor even when close() fails, so it must not be closed again.
  rc = ::close(std::exchange(fd, -1));
  if (rc != 0 && errno != EINTR) fail(Errc::io, "{}: cannot close {}: {}", path, temp, std::strerror(errno));
}

void rename_into_place(const std::string& temp, const std::string& path) {
  if (::rename(temp.c_str(), path.c_str()) != 0)
    fail(Errc::io, "{}: cannot rename {} onto it: {}", path, temp, std::strerror(errno));
}

// Makes the rename itself durable. Some file systems cannot fsync a directory (EINVAL); the rename has
// happened by then, so that is not worth failing for.
void sync_parent_dir(const std::string& path) {
  std::string dir = fs::path(path).parent_path().string();
  if (dir.empty()) dir = ".";
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) fail(Errc::io, "{}: cannot open directory {} to sync it: {}", path, dir, std::strerror(errno));
  int rc;
  do {
    rc = ::fsync(fd);
  } while (rc != 0 && errno == EINTR);
  const int e = errno;
  ::close(fd);
  if (rc != 0 && e != EINVAL && e != EROFS)
    fail(Errc::io, "{}: cannot sync directory {}: {}", path, dir, std::strerror(e));
}

// Closes and removes a temporary file unless it was committed (used by write_safetensors_index).
struct TempFile {
  std::string path, temp;
  int fd = -1;
  bool committed = false;
  explicit TempFile(std::string p) : path(std::move(p)), temp(temp_path_for(path)), fd(create_temp(path, temp)) {}
  ~TempFile() {
    if (fd >= 0) ::close(fd);
    if (!committed) ::unlink(temp.c_str());
  }
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;
  void commit() {
    sync_and_close(fd, path, temp);
    rename_into_place(temp, path);
    committed = true;
    sync_parent_dir(path);
  }
};

}  // namespace

// ---- reading --------------------------------------------------------------------------------------------

const SafetensorsTensorInfo* SafetensorsHeader::find(std::string_view name) const {
  for (const SafetensorsTensorInfo& t : tensors)
    if (t.name == name) return &t;
  return nullptr;
}

SafetensorsHeader parse_safetensors(std::span<const std::byte> file, std::string_view source) {
  NUQ_CHECK(file.size() >= 8, Errc::invalid_file,
            "{}: file is {} bytes, too short for the 8-byte header length of a safetensors file", source,
            file.size());
  const uint64_t n = load_le64(file.data());
  NUQ_CHECK(n <= kSafetensorsMaxHeaderBytes, Errc::invalid_file,
            "{}: header length {} exceeds the limit of {} bytes (not a safetensors file?)", source, n,
            kSafetensorsMaxHeaderBytes);
  NUQ_CHECK(n <= file.size() - 8, Errc::invalid_file,
            "{}: header length {} runs past the end of the file ({} bytes; truncated?)", source, n, file.size());
  // The format requires the header to begin with '{' (so no BOM or leading whitespace); trailing
  // whitespace is the padding writers use to align the data section.
  NUQ_CHECK(n > 0 && char(file[8]) == '{', Errc::invalid_file, "{}: header does not start with '{{'", source);

  SafetensorsHeader h;
  h.data_offset = 8 + n;
  h.data_size = file.size() - h.data_offset;
  const std::string_view text(reinterpret_cast<const char*>(file.data() + 8), std::size_t(n));
  std::string error;
  Json root = parse_json(text, kHeaderMaxDepth, kHeaderMaxArrayItems, error);
  NUQ_CHECK(error.empty(), Errc::invalid_file, "{}: header: {}", source, error);
  NUQ_CHECK(root.is_object(), Errc::invalid_file, "{}: header is {}, not an object", source, kind(root));

  for (const auto& [key, value] : root.items()) {
    if (key == "__metadata__") {
      NUQ_CHECK(value.is_object(), Errc::invalid_file, "{}: __metadata__ is {}, not an object of strings",
                source, kind(value));
      for (const auto& [mk, mv] : value.items()) {
        NUQ_CHECK(mv.is_string(), Errc::invalid_file, "{}: __metadata__ value of {} is {} ({}), not a string",
                  source, quote(mk), kind(mv), json_excerpt(mv));
        h.metadata.emplace(mk, mv.get<std::string>());
      }
      continue;
    }
    h.tensors.push_back(parse_tensor_entry(key, value, source, h.data_size));
  }

  // Sorting by (begin, end) puts empty tensors before a non-empty one starting at the same offset,
  // so that they do not count as overlapping it; the name makes the order total.
  std::sort(h.tensors.begin(), h.tensors.end(), [](const SafetensorsTensorInfo& a, const SafetensorsTensorInfo& b) {
    return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
  });
  uint64_t covered = 0;
  const SafetensorsTensorInfo* prev = nullptr;
  for (const SafetensorsTensorInfo& t : h.tensors) {
    if (t.begin < covered)
      fail(Errc::invalid_file, "{}: tensors {} [{}, {}] and {} [{}, {}] overlap", source, quote(prev->name),
           prev->begin, prev->end, quote(t.name), t.begin, t.end);
    if (t.begin > covered)
      fail(Errc::invalid_file, "{}: data offsets [{}, {}) belong to no tensor: a gap of {} bytes {}", source, covered,
           t.begin, t.begin - covered,
           prev ? fmt::format("between tensors {} and {}", quote(prev->name), quote(t.name))
                : fmt::format("before tensor {}", quote(t.name)));
    covered = t.end;
    prev = &t;
  }
  NUQ_CHECK(covered == h.data_size, Errc::invalid_file,
            "{}: {} trailing bytes after the last tensor{} (the data section is {} bytes, tensors end at {})", source,
            h.data_size - covered, prev ? " " + quote(prev->name) : std::string(), h.data_size, covered);
  return h;
}

SafetensorsFile::SafetensorsFile(const std::string& path)
    : file_(path), header_(parse_safetensors(file_.bytes(), path)) {}

std::span<const std::byte> SafetensorsFile::tensor_bytes(const SafetensorsTensorInfo& info) const {
  NUQ_CHECK(info.begin <= info.end && info.end <= header_.data_size, Errc::invalid_argument,
            "{}: tensor {} with data_offsets [{}, {}] does not lie in this file's data section ({} bytes)", path(),
            quote(info.name), info.begin, info.end, header_.data_size);
  return file_.bytes().subspan(std::size_t(header_.data_offset + info.begin), std::size_t(info.nbytes()));
}

ConstTensorView SafetensorsFile::tensor(std::string_view name) const {
  const SafetensorsTensorInfo* info = find(name);
  NUQ_CHECK(info != nullptr, Errc::invalid_argument, "{}: no tensor named {}", path(), quote(name));
  return {tensor_bytes(*info).data(), info->dtype, info->shape};
}

// tensor_names() order: for a single file, data-offset order. For a sharded checkpoint, shards by file
// name (model-00001-of-00003... sorts in shard order) and, within each shard, data-offset order: every
// name of the index, in the order that reads each file front to back (what a streaming conversion
// wants), independent of how the index happens to order its weight_map.
SafetensorsCheckpoint::SafetensorsCheckpoint(const std::string& path) : path_(path) {
  std::error_code ec;
  const fs::file_status status = fs::status(path, ec);
  NUQ_CHECK(!ec && fs::exists(status), Errc::io, "{}: no such file or directory", path);

  auto add_file = [&](const std::string& file_path) -> std::size_t {
    files_.push_back(std::make_unique<SafetensorsFile>(file_path));
    return files_.size() - 1;
  };

  auto load_index = [&](const std::string& index_path) {
    sharded_ = true;
    const MappedFile mapped(index_path);
    const std::string_view text(reinterpret_cast<const char*>(mapped.data()), mapped.size());
    std::string error;
    Json index = parse_json(text, 64, std::numeric_limits<std::size_t>::max(), error);
    NUQ_CHECK(error.empty(), Errc::invalid_file, "{}: {}", index_path, error);
    NUQ_CHECK(index.is_object(), Errc::invalid_file, "{}: index is {}, not an object", index_path, kind(index));
    NUQ_CHECK(index.contains("weight_map") && index["weight_map"].is_object(), Errc::invalid_file,
              "{}: index has no \"weight_map\" object", index_path);
    if (index.contains("metadata") && !index["metadata"].is_null()) {
      const Json& meta = index["metadata"];
      NUQ_CHECK(meta.is_object(), Errc::invalid_file, "{}: index \"metadata\" is {}, not an object", index_path,
                kind(meta));
      for (const auto& [k, v] : meta.items())
        metadata_[k] = v.is_string() ? v.get<std::string>() : v.dump();
    }

    const fs::path dir = fs::path(index_path).parent_path();
    std::map<std::string, std::vector<std::string>> shard_tensors;
    std::map<std::string, std::string, std::less<>> weight_map;
    for (const auto& [name, file] : index["weight_map"].items()) {
      NUQ_CHECK(file.is_string(), Errc::invalid_file, "{}: weight_map entry for tensor {} is {}, not a file name",
                index_path, quote(name), kind(file));
      const auto& shard = file.get_ref<const std::string&>();
      NUQ_CHECK(!shard.empty() && fs::path(shard).is_relative(), Errc::invalid_file,
                "{}: weight_map puts tensor {} in shard {}, which is not a file name relative to the index",
                index_path, quote(name), quote(shard));
      shard_tensors[shard].push_back(name);
      weight_map.emplace(name, shard);
    }

    for (const auto& [shard, listed] : shard_tensors) {
      const std::string shard_path = (dir / shard).string();
      NUQ_CHECK(fs::exists(shard_path, ec), Errc::invalid_file,
                "{}: shard {} (listed for tensor {}{}) does not exist", index_path, quote(shard), quote(listed[0]),
                listed.size() > 1 ? fmt::format(" and {} more", listed.size() - 1) : std::string());
      const std::size_t i = add_file(shard_path);
      const SafetensorsFile& f = *files_[i];
      for (const std::string& name : listed) {
        const SafetensorsTensorInfo* info = f.find(name);
        NUQ_CHECK(info != nullptr, Errc::invalid_file,
                  "{}: weight_map puts tensor {} in shard {}, which has no such tensor", index_path, quote(name),
                  quote(shard));
        where_.emplace(name, std::make_pair(i, info));
      }
      for (const SafetensorsTensorInfo& t : f.tensors()) {
        auto it = weight_map.find(t.name);
        NUQ_CHECK(it != weight_map.end(), Errc::invalid_file, "{}: tensor {} of shard {} is not in the weight_map",
                  index_path, quote(t.name), quote(shard));
        NUQ_CHECK(it->second == shard, Errc::invalid_file,
                  "{}: tensor {} is in shard {} but the weight_map puts it in shard {}", index_path, quote(t.name),
                  quote(shard), quote(it->second));
        names_.push_back(t.name);
      }
    }
  };

  auto load_single = [&](const std::string& file_path) {
    const std::size_t i = add_file(file_path);
    metadata_ = files_[i]->metadata();
    for (const SafetensorsTensorInfo& t : files_[i]->tensors()) {
      names_.push_back(t.name);
      where_.emplace(t.name, std::make_pair(i, &t));
    }
  };

  if (fs::is_directory(status)) {
    const fs::path dir(path);
    if (fs::exists(dir / "model.safetensors.index.json", ec)) {
      load_index((dir / "model.safetensors.index.json").string());
      return;
    }
    if (fs::exists(dir / "model.safetensors", ec)) {
      load_single((dir / "model.safetensors").string());
      return;
    }
    std::vector<std::string> found;
    for (const fs::directory_entry& e : fs::directory_iterator(dir, ec))
      if (e.path().extension() == ".safetensors" && e.is_regular_file(ec)) found.push_back(e.path().filename().string());
    NUQ_CHECK(!ec, Errc::io, "{}: cannot list directory: {}", path, ec.message());
    std::sort(found.begin(), found.end());
    NUQ_CHECK(!found.empty(), Errc::invalid_file,
              "{}: directory holds no model.safetensors.index.json and no .safetensors file", path);
    NUQ_CHECK(found.size() == 1, Errc::invalid_file,
              "{}: directory holds {} .safetensors files ({}) but no model.safetensors.index.json saying how they "
              "form one checkpoint",
              path, found.size(), fmt::join(found, ", "));
    load_single((dir / found[0]).string());
  } else if (path.ends_with(".json")) {
    load_index(path);
  } else {
    load_single(path);
  }
}

bool SafetensorsCheckpoint::contains(std::string_view name) const { return where_.find(name) != where_.end(); }

const SafetensorsTensorInfo& SafetensorsCheckpoint::info(std::string_view name) const {
  auto it = where_.find(name);
  NUQ_CHECK(it != where_.end(), Errc::invalid_argument, "{}: no tensor named {}", path_, quote(name));
  return *it->second.second;
}

const SafetensorsFile& SafetensorsCheckpoint::file_of(std::string_view name) const {
  auto it = where_.find(name);
  NUQ_CHECK(it != where_.end(), Errc::invalid_argument, "{}: no tensor named {}", path_, quote(name));
  return *files_[it->second.first];
}

ConstTensorView SafetensorsCheckpoint::tensor(std::string_view name) const {
  auto it = where_.find(name);
  NUQ_CHECK(it != where_.end(), Errc::invalid_argument, "{}: no tensor named {}", path_, quote(name));
  const SafetensorsTensorInfo& info = *it->second.second;
  return {files_[it->second.first]->tensor_bytes(info).data(), info.dtype, info.shape};
}

// ---- writing --------------------------------------------------------------------------------------------

SafetensorsWriter::SafetensorsWriter(std::string path, std::map<std::string, std::string> metadata)
    : path_(std::move(path)), metadata_(std::move(metadata)) {
  for (const auto& [k, v] : metadata_)
    NUQ_CHECK(is_valid_utf8(k) && is_valid_utf8(v), Errc::invalid_argument,
              "{}: metadata entry {} is not valid UTF-8", path_, quote(k, true));
  temp_path_ = temp_path_for(path_);
  fd_ = create_temp(path_, temp_path_);
}

SafetensorsWriter::~SafetensorsWriter() {
  if (fd_ >= 0) ::close(fd_);
  if (!finished_ && !temp_path_.empty()) ::unlink(temp_path_.c_str());
}

void SafetensorsWriter::declare(std::string name, DType dtype, Shape shape) {
  NUQ_CHECK(!header_written_ && !finished_, Errc::invalid_argument,
            "{}: tensor {} declared after data was written (declare every tensor first)", path_, quote(name));
  NUQ_CHECK(!name.starts_with("__metadata__"), Errc::invalid_argument,
            "{}: tensor name {} is reserved for the file's metadata", path_, quote(name));
  NUQ_CHECK(is_valid_utf8(name), Errc::invalid_argument, "{}: tensor name {} is not valid UTF-8", path_,
            quote(name, true));
  NUQ_CHECK(!index_.contains(name), Errc::invalid_argument, "{}: tensor {} declared twice", path_, quote(name));
  uint64_t nbytes = 0;
  NUQ_CHECK(!__builtin_mul_overflow(uint64_t(shape.numel()), uint64_t(dtype_size(dtype)), &nbytes),
            Errc::invalid_argument, "{}: tensor {}: {} {} has more bytes than fit in 64 bits", path_, quote(name),
            dtype_name(dtype), to_string(shape));
  index_.emplace(name, entries_.size());
  // Until the layout is fixed, [begin, end) is [0, size).
  entries_.push_back(Entry{std::move(name), dtype, shape, 0, nbytes, 0, {}});
}

SafetensorsWriter::Entry& SafetensorsWriter::entry(std::string_view name) {
  auto it = index_.find(name);
  NUQ_CHECK(it != index_.end(), Errc::invalid_argument, "{}: write to tensor {}, which was not declared", path_,
            quote(name));
  return entries_[it->second];
}

// Largest dtype first: with the data section 64-byte aligned and every dtype size a power of two
// dividing 64, each tensor then starts at a multiple of its own element size (so typed loads from the
// mapping are aligned), and the first tensor is 64-byte (cache line / AVX-512) aligned.
void SafetensorsWriter::layout_and_write_header() {
  std::vector<std::size_t> order(entries_.size());
  std::iota(order.begin(), order.end(), std::size_t(0));
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    return dtype_size(entries_[a].dtype) > dtype_size(entries_[b].dtype);
  });
  uint64_t offset = 0;
  Json header = Json::object();
  for (std::size_t i : order) {
    Entry& e = entries_[i];
    const uint64_t size = e.end - e.begin;
    e.begin = offset;
    NUQ_CHECK(!__builtin_add_overflow(offset, size, &e.end), Errc::invalid_argument,
              "{}: tensors total more bytes than fit in 64 bits", path_);
    offset = e.end;
    header[e.name] = {{"dtype", dtype_name(e.dtype)},
                      {"shape", std::vector<int64_t>(e.shape.begin(), e.shape.end())},
                      {"data_offsets", {e.begin, e.end}}};
  }
  if (!metadata_.empty()) header["__metadata__"] = metadata_;
  std::string text = header.dump();
  constexpr std::size_t kDataAlignment = 64;
  text.append((kDataAlignment - (8 + text.size()) % kDataAlignment) % kDataAlignment, ' ');
  NUQ_CHECK(text.size() <= kSafetensorsMaxHeaderBytes, Errc::invalid_argument,
            "{}: header of {} bytes ({} tensors) exceeds the limit of {} bytes", path_, text.size(), entries_.size(),
            kSafetensorsMaxHeaderBytes);
  data_offset_ = 8 + text.size();
  file_size_ = data_offset_ + offset;
  reserve_space(fd_, file_size_, path_);

  std::vector<std::byte> head(data_offset_);
  for (int i = 0; i < 8; ++i) head[std::size_t(i)] = std::byte(uint64_t(text.size()) >> (8 * i) & 0xFF);
  std::memcpy(head.data() + 8, text.data(), text.size());
  write_all_at(fd_, head.data(), head.size(), 0, path_);
  header_written_ = true;
}

void SafetensorsWriter::write(std::string_view name, std::span<const std::byte> bytes, uint64_t offset) {
  NUQ_CHECK(!finished_ && fd_ >= 0, Errc::invalid_argument, "{}: write to tensor {} after finish()", path_,
            quote(name));
  Entry& e = entry(name);
  if (!header_written_) layout_and_write_header();
  const uint64_t size = e.end - e.begin;
  const uint64_t n = bytes.size();
  NUQ_CHECK(offset <= size && n <= size - offset, Errc::invalid_argument,
            "{}: tensor {}: write of {} bytes at offset {} runs past its end ({} {} is {} bytes)", path_, quote(name),
            n, offset, dtype_name(e.dtype), to_string(e.shape), size);
  if (n == 0) return;
  const uint64_t hi = offset + n;
  auto next = e.ranges.upper_bound(offset);
  auto prev = next == e.ranges.begin() ? e.ranges.end() : std::prev(next);
  if (prev != e.ranges.end() && prev->second > offset)
    fail(Errc::invalid_argument, "{}: tensor {}: bytes [{}, {}) written twice (already wrote [{}, {}))", path_,
         quote(name), offset, hi, prev->first, prev->second);
  if (next != e.ranges.end() && next->first < hi)
    fail(Errc::invalid_argument, "{}: tensor {}: bytes [{}, {}) written twice (already wrote [{}, {}))", path_,
         quote(name), offset, hi, next->first, next->second);

  write_all_at(fd_, bytes.data(), bytes.size(), data_offset_ + e.begin + offset, path_);

  // Keep the ranges merged so that a tensor written in many pieces costs one entry.
  uint64_t lo = offset, end = hi;
  if (prev != e.ranges.end() && prev->second == lo) {
    lo = prev->first;
    e.ranges.erase(prev);
  }
  if (next != e.ranges.end() && next->first == end) {
    end = next->second;
    e.ranges.erase(next);
  }
  e.ranges.emplace(lo, end);
  e.written += n;
}

void SafetensorsWriter::finish() {
  NUQ_CHECK(!finished_ && fd_ >= 0, Errc::invalid_argument, "{}: finish() called twice", path_);
  if (!header_written_) layout_and_write_header();
  const Entry* first = nullptr;
  std::size_t incomplete = 0;
  for (const Entry& e : entries_) {
    if (e.written == e.end - e.begin) continue;
    if (!first) first = &e;
    ++incomplete;
  }
  if (first) {
    const uint64_t size = first->end - first->begin;
    fail(Errc::invalid_argument, "{}: tensor {} is incomplete: {} of {} bytes written, {} missing{}", path_,
         quote(first->name), first->written, size, size - first->written,
         incomplete > 1 ? fmt::format(" ({} more tensors are incomplete)", incomplete - 1) : std::string());
  }
  sync_and_close(fd_, path_, temp_path_);
  rename_into_place(temp_path_, path_);
  finished_ = true;
  sync_parent_dir(path_);
}

void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, ConstTensorView>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  SafetensorsWriter writer(path, metadata);
  for (const auto& [name, view] : tensors) {
    // An empty view has no layout to get wrong (and is_contiguous() rejects some zero-size shapes).
    NUQ_CHECK(view.numel() == 0 || view.is_contiguous(), Errc::invalid_argument, "{}: tensor {} is not contiguous",
              path, quote(name));
    NUQ_CHECK(view.data() != nullptr || view.nbytes() == 0, Errc::invalid_argument, "{}: tensor {} has no data",
              path, quote(name));
    writer.declare(name, view.dtype(), view.shape());
  }
  for (const auto& [name, view] : tensors) writer.write(name, {view.data(), view.nbytes()});
  writer.finish();
}

void write_safetensors_index(const std::string& path,
                             const std::vector<std::pair<std::string, std::string>>& tensor_to_file,
                             uint64_t total_size, const std::map<std::string, std::string>& extra_metadata) {
  Json index;
  index["metadata"] = Json::object();
  index["metadata"]["total_size"] = total_size;
  for (const auto& [k, v] : extra_metadata) {
    NUQ_CHECK(k != "total_size", Errc::invalid_argument, "{}: extra metadata may not set \"total_size\"", path);
    index["metadata"][k] = v;
  }
  Json& weight_map = index["weight_map"] = Json::object();
  for (const auto& [name, file] : tensor_to_file) {
    NUQ_CHECK(!weight_map.contains(name), Errc::invalid_argument, "{}: tensor {} listed twice", path, quote(name));
    NUQ_CHECK(!file.empty() && fs::path(file).is_relative(), Errc::invalid_argument,
              "{}: tensor {}: shard {} is not a file name relative to the index", path, quote(name), quote(file));
    weight_map[name] = file;
  }
  std::string text;
  try {
    text = index.dump(2) + "\n";
  } catch (const Json::type_error&) {
    fail(Errc::invalid_argument, "{}: a tensor name, file name or metadata entry is not valid UTF-8", path);
  }
  write_file_atomically(path, text);
}

std::string read_small_file(const std::string& path, std::string_view what) {
  std::ifstream in(path, std::ios::binary);
  NUQ_CHECK(in, Errc::io, "{}: cannot open {}: {}", path, what, std::strerror(errno));
  std::stringstream ss;
  ss << in.rdbuf();
  NUQ_CHECK(!in.bad(), Errc::io, "{}: cannot read {}", path, what);
  return ss.str();
}

void write_file_atomically(const std::string& path, std::string_view content) {
  TempFile out(path);
  write_all_at(out.fd, reinterpret_cast<const std::byte*>(content.data()), content.size(), 0, path);
  out.commit();
}

}  // namespace nuq
