// Read-only memory mapping of a whole file. Checkpoints are read through this so that only the pages
// a caller touches are loaded, and tensors are handed out as zero-copy views.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

namespace nuq {

class MappedFile {
 public:
  MappedFile() = default;
  // Throws nuq::Error (Errc::io) naming the path if it cannot be opened or mapped.
  explicit MappedFile(const std::string& path);
  ~MappedFile();
  MappedFile(MappedFile&& other) noexcept;
  MappedFile& operator=(MappedFile&& other) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const std::byte* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }
  std::span<const std::byte> bytes() const noexcept { return {data_, size_}; }
  const std::string& path() const noexcept { return path_; }

 private:
  void reset() noexcept;
  std::string path_;
  const std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

// Tells the kernel that the pages wholly inside `bytes` (part of a read-only mapping) will not be read
// again soon, so they stop counting towards this process's resident memory; they stay in the page cache
// and are read back transparently if touched. Streaming a checkpoint through a mapping with this after
// each tensor keeps the resident set at about one tensor whatever the checkpoint's size.
void release_mapped_pages(std::span<const std::byte> bytes) noexcept;

// Bytes of physical memory on this machine (0 where the system does not say).
uint64_t physical_memory_bytes() noexcept;

}  // namespace nuq
