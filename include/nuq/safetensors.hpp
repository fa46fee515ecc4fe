// safetensors reading (memory-mapped, zero-copy, validated before use) and writing (streaming,
// crash-safe: a temporary file in the target directory renamed into place only when complete).
//
// File layout (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N,
// N bytes of UTF-8 JSON, then the data section. The JSON maps tensor names to
// {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the data section) and may
// hold "__metadata__": {string: string}.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "nuq/dtype.hpp"
#include "nuq/mapped_file.hpp"
#include "nuq/tensor.hpp"

namespace nuq {

// Largest JSON header nuq accepts; the same bound as the reference implementation.
inline constexpr uint64_t kSafetensorsMaxHeaderBytes = 100'000'000;

struct SafetensorsTensorInfo {
  std::string name;
  DType dtype = DType::F32;
  Shape shape;
  uint64_t begin = 0;  // byte offsets relative to the start of the data section
  uint64_t end = 0;
  uint64_t nbytes() const { return end - begin; }
};

struct SafetensorsHeader {
  std::vector<SafetensorsTensorInfo> tensors;  // ordered by data offset
  std::map<std::string, std::string> metadata;
  uint64_t data_offset = 0;  // absolute offset of the data section in the file (8 + N)
  uint64_t data_size = 0;

  const SafetensorsTensorInfo* find(std::string_view name) const;
};

// Parses and validates a complete safetensors file image. `source` names the file in error messages.
// Checks: header length within the file and <= kSafetensorsMaxHeaderBytes; valid UTF-8 JSON object;
// no duplicate keys; known dtypes; non-negative integer shapes; shape product x dtype size equal to
// the byte range; offsets inside the data section; tensors covering the data section exactly, with
// no overlaps and no holes; __metadata__ a map of strings. Throws nuq::Error (Errc::invalid_file or
// Errc::unsupported) naming the source, the tensor and the problem.
SafetensorsHeader parse_safetensors(std::span<const std::byte> file, std::string_view source);

// One memory-mapped .safetensors file.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);

  const std::string& path() const noexcept { return file_.path(); }
  const SafetensorsHeader& header() const noexcept { return header_; }
  const std::vector<SafetensorsTensorInfo>& tensors() const noexcept { return header_.tensors; }
  const std::map<std::string, std::string>& metadata() const noexcept { return header_.metadata; }
  const SafetensorsTensorInfo* find(std::string_view name) const { return header_.find(name); }
  // Zero-copy view into the mapping; valid while this object lives. Throws if the name is absent.
  // The data may be unaligned for its dtype (the format does not require alignment): use memcpy or
  // to_float32() rather than dereferencing typed pointers directly.
  ConstTensorView tensor(std::string_view name) const;
  std::span<const std::byte> tensor_bytes(const SafetensorsTensorInfo& info) const;

 private:
  MappedFile file_;
  SafetensorsHeader header_;
};

// A checkpoint: one .safetensors file, a directory holding model.safetensors or
// model.safetensors.index.json, or the index file itself. Shards are opened (mapped) once each.
class SafetensorsCheckpoint {
 public:
  explicit SafetensorsCheckpoint(const std::string& path);

  // Tensor names in a stable order: by shard file name, then by data offset within the shard.
  const std::vector<std::string>& tensor_names() const noexcept { return names_; }
  bool contains(std::string_view name) const;
  const SafetensorsTensorInfo& info(std::string_view name) const;
  ConstTensorView tensor(std::string_view name) const;
  const SafetensorsFile& file_of(std::string_view name) const;
  const std::vector<std::unique_ptr<SafetensorsFile>>& files() const noexcept { return files_; }
  // The index's "metadata" object (as strings) for sharded checkpoints, or the file's __metadata__.
  const std::map<std::string, std::string>& metadata() const noexcept { return metadata_; }
  bool is_sharded() const noexcept { return sharded_; }
  const std::string& path() const noexcept { return path_; }

 private:
  std::string path_;
  bool sharded_ = false;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::vector<std::string> names_;
  std::map<std::string, std::pair<std::size_t, const SafetensorsTensorInfo*>, std::less<>> where_;
  std::map<std::string, std::string> metadata_;
};

// Streams one safetensors file. All tensors are declared first (the header precedes the data and holds
// every offset); then their bytes are written in any order and in as many pieces as wanted, so at most
// a piece of a tensor is ever in memory. finish() checks that every byte was written, flushes, and
// renames the temporary file onto the final path. If the writer is destroyed before finish() (an
// exception, a crash of the process), the temporary file is removed or left under its temporary name:
// the final path never holds a partial file.
class SafetensorsWriter {
 public:
  SafetensorsWriter(std::string path, std::map<std::string, std::string> metadata = {});
  ~SafetensorsWriter();
  SafetensorsWriter(const SafetensorsWriter&) = delete;
  SafetensorsWriter& operator=(const SafetensorsWriter&) = delete;

  void declare(std::string name, DType dtype, Shape shape);
  // Writes `bytes` at `offset` bytes into tensor `name`. The first call to write() fixes the layout
  // and writes the header; declare() after that is an error.
  void write(std::string_view name, std::span<const std::byte> bytes, uint64_t offset = 0);
  void finish();

  const std::string& path() const noexcept { return path_; }
  const std::string& temp_path() const noexcept { return temp_path_; }
  // Total file size once laid out (header included); valid after the first write() or finish().
  uint64_t file_size() const noexcept { return file_size_; }

 private:
  struct Entry {
    std::string name;
    DType dtype;
    Shape shape;
    uint64_t begin = 0, end = 0, written = 0;
    std::map<uint64_t, uint64_t> ranges;  // bytes written so far as disjoint [begin, end), to catch overlaps
  };
  void layout_and_write_header();
  Entry& entry(std::string_view name);

  std::string path_;
  std::string temp_path_;
  std::map<std::string, std::string> metadata_;
  std::vector<Entry> entries_;
  std::map<std::string, std::size_t, std::less<>> index_;  // name -> position in entries_
  uint64_t data_offset_ = 0;
  uint64_t file_size_ = 0;
  int fd_ = -1;
  bool header_written_ = false;
  bool finished_ = false;
};

// Writes whole tensors at once (small files, tests). Views must be contiguous.
void write_safetensors(const std::string& path,
                       const std::vector<std::pair<std::string, ConstTensorView>>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// Writes model.safetensors.index.json (atomically, like the writer) mapping each tensor to its shard
// file name (relative to the index's directory), with "metadata": {"total_size": N, ...extra}.
void write_safetensors_index(const std::string& path,
                             const std::vector<std::pair<std::string, std::string>>& tensor_to_file,
                             uint64_t total_size,
                             const std::map<std::string, std::string>& extra_metadata = {});

// Writes a small file (JSON, text) with the writer's crash safety: a temporary file in the same
// directory, flushed, then renamed onto `path`, so `path` holds either its old content or all of `content`.
void write_file_atomically(const std::string& path, std::string_view content);
// The whole content of a small file (JSON, text, a tokenizer). Throws Errc::io naming `path` and `what`
// ("the plan", "a companion file") when it cannot be read.
std::string read_small_file(const std::string& path, std::string_view what);

}  // namespace nuq
