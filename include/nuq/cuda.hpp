// CUDA entry points of nuq (target nuq::cuda, built when a CUDA compiler is found). Launchers take
// device pointers, shapes, strides and a stream, never framework types, and return a Status instead of
// throwing, so that they can be called from bindings and captured in CUDA graphs: they do not
// synchronize with the host.
#pragma once

#include <cstdint>
#include <string>

// The CUDA runtime's own declaration; repeating it keeps this header free of CUDA includes.
typedef struct CUstream_st* cudaStream_t;

namespace nuq::cuda {

enum class StatusCode {
  ok = 0,
  invalid_argument,  // shapes, strides, bit widths or pointers the launcher cannot handle
  cuda_error,        // the CUDA runtime reported an error (launch failure, no device...)
};

// The 16-bit floating-point type of activations (and queries, outputs) a launcher reads and writes.
enum class ActivationType { f16, bf16 };

struct Status {
  StatusCode code = StatusCode::ok;
  std::string message;  // empty when ok; otherwise names the argument or CUDA error
  bool ok() const noexcept { return code == StatusCode::ok; }
};

// Number of CUDA devices visible, 0 when there is none or no driver.
int device_count() noexcept;

// Explains why unpack_indices would refuse these arguments; ok() when it can run them.
Status can_implement_unpack_indices(int64_t rows, int64_t cols, int bits, int64_t out_row_stride);

// Decodes packed qweight rows (docs/format.md) into one byte per index: out[r * out_row_stride + c] for
// c < cols. Device pointers; asynchronous on `stream`.
Status unpack_indices(const uint8_t* packed, int64_t rows, int64_t cols, int bits, uint8_t* out,
                      int64_t out_row_stride, cudaStream_t stream);

}  // namespace nuq::cuda
