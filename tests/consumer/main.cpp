// Uses only installed public headers: packs and unpacks a row, converts a half, prints the version.
#include <cstdio>
#include <vector>

#include <nuq/half.hpp>
#include <nuq/packed.hpp>
#include <nuq/version.hpp>

int main() {
  std::vector<uint8_t> idx = {1, 7, 3, 0, 5};
  std::vector<uint8_t> packed(nuq::format::row_bytes(5, 3));
  nuq::pack_indices(idx.data(), 1, 5, 3, packed.data());
  std::vector<uint8_t> back(5);
  nuq::unpack_indices(packed.data(), 1, 5, 3, back.data());
  if (back != idx) return 1;
  if (nuq::fp16_to_float(nuq::float_to_fp16(0.5f)) != 0.5f) return 1;
  std::printf("nuq %s consumer ok\n", NUQ_VERSION_STRING);
  return 0;
}
