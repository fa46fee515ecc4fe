// libFuzzer target for the safetensors header parser: any byte string must either parse or fail with
// nuq::Error, and every tensor of a parsed file must lie inside the input with exactly the bytes its
// dtype and shape need.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <span>
#include <vector>

#include "nuq/error.hpp"
#include "nuq/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  const std::span<const std::byte> file(reinterpret_cast<const std::byte*>(data), size);
  try {
    const nuq::SafetensorsHeader h = nuq::parse_safetensors(file, "fuzz.safetensors");
    uint64_t covered = 0;
    for (const nuq::SafetensorsTensorInfo& t : h.tensors) {
      // The promises callers rely on; abort() makes a violation a crash the fuzzer reports.
      if (t.begin != covered || t.end > h.data_size || h.data_offset + h.data_size != size) std::abort();
      if (uint64_t(t.shape.numel()) * nuq::dtype_size(t.dtype) != t.nbytes()) std::abort();
      covered = t.end;
      // Copy the range into its own allocation so that ASan flags any read beyond the input.
      const std::vector<std::byte> bytes(file.begin() + std::ptrdiff_t(h.data_offset + t.begin),
                                         file.begin() + std::ptrdiff_t(h.data_offset + t.end));
      (void)bytes;
      if (h.find(t.name) == nullptr) std::abort();
    }
    if (covered != h.data_size) std::abort();
  } catch (const nuq::Error&) {
  }
  return 0;
}
