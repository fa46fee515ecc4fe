// libFuzzer target for the GGUF reader: any byte string must either parse or fail with nuq::Error,
// and every tensor of a parsed file must decode from its byte range without reading past it.
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "nuq/error.hpp"
#include "nuq/gguf.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  const std::span<const std::byte> file(reinterpret_cast<const std::byte*>(data), size);
  try {
    const nuq::GgufHeader h = nuq::parse_gguf(file, "fuzz.gguf");
    for (const nuq::GgufTensorInfo& t : h.tensors) {
      const nuq::GgmlTypeTraits* traits = nuq::ggml_type_traits(uint32_t(t.type));
      if (!traits || !traits->can_dequantize || t.nbytes >= (1u << 20)) continue;
      // Copy the range into its own allocation so that ASan flags any read beyond nbytes.
      const std::vector<std::byte> bytes(file.begin() + std::ptrdiff_t(h.data_offset + t.offset),
                                         file.begin() + std::ptrdiff_t(h.data_offset + t.offset + t.nbytes));
      std::vector<float> out(std::size_t(t.numel()));
      nuq::ggml_dequantize(t.type, bytes.data(), out.data(), t.numel());
    }
    for (const nuq::GgufKeyValue& kv : h.metadata) (void)kv.value.to_display_string();
  } catch (const nuq::Error&) {
  }
  return 0;
}
