// Device-side index decoding over the packed format. It is built from the same inline definitions in
// include/nuq/format.hpp as the CPU reference, so the test that compares the two on a GPU checks that
// the format header means the same thing under nvcc as under the host compiler.
#include <cuda_runtime.h>

#include <string>

#include "nuq/cuda.hpp"
#include "nuq/format.hpp"
#include "portable.cuh"

namespace nuq::cuda {
namespace {

// One thread per output index, grid-stride: this kernel exists for correctness checks and format
// conversion, not for speed (the GEMV kernels decode whole words per thread).
__global__ void unpack_indices_kernel(const uint8_t* __restrict__ packed, int64_t rows, int64_t cols,
                                      int bits, uint8_t* __restrict__ out, int64_t out_row_stride) {
  const int64_t total = rows * cols;
  const int64_t stride = format::row_bytes(cols, bits);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i % cols;
    out[r * out_row_stride + c] = uint8_t(format::unpack_index(packed + r * stride, cols, bits, c));
  }
}

}  // namespace

int device_count() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error so later calls start clean
    return 0;
  }
  return n;
}

Status can_implement_unpack_indices(int64_t rows, int64_t cols, int bits, int64_t out_row_stride) {
  if (!format::is_supported_bits(bits))
    return {StatusCode::invalid_argument, "unpack_indices: unsupported width " + std::to_string(bits) + " bits"};
  if (rows < 0 || cols < 0)
    return {StatusCode::invalid_argument,
            "unpack_indices: negative shape [" + std::to_string(rows) + ", " + std::to_string(cols) + "]"};
  if (out_row_stride < cols)
    return {StatusCode::invalid_argument, "unpack_indices: output row stride " + std::to_string(out_row_stride) +
                                              " is smaller than the " + std::to_string(cols) + " columns"};
  return {};
}

Status unpack_indices(const uint8_t* packed, int64_t rows, int64_t cols, int bits, uint8_t* out,
                      int64_t out_row_stride, cudaStream_t stream) {
  if (Status s = can_implement_unpack_indices(rows, cols, bits, out_row_stride); !s.ok()) return s;
  if (rows == 0 || cols == 0) return {};
  constexpr int kThreads = 256;
  const int64_t blocks_needed = (rows * cols + kThreads - 1) / kThreads;
  const int blocks = int(blocks_needed < 65536 ? blocks_needed : 65536);
  return detail::launch("unpack_indices launch", unpack_indices_kernel, blocks, kThreads, 0, stream, packed, rows, cols,
                        bits, out, out_row_stride);
}

}  // namespace nuq::cuda
