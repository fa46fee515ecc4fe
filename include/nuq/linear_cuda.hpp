// y = Ŵ·x on a CUDA GPU for layers in nuq's packed format (docs/format.md): a fused look-up-table GEMV for
// batches 1-16 with the sparse part in the same kernel, and a prefill path (dequantize row blocks to
// fp16/bf16, then cuBLAS GEMM) above. Launchers take device pointers, shapes, strides, a stream and
// return a Status (include/nuq/cuda.hpp); they never synchronize with the host, so they can be captured
// in CUDA graphs. docs/cuda-kernels.md describes the kernels and what has been verified on a GPU.
#pragma once

#include <cstddef>
#include <cstdint>

#include "nuq/cuda.hpp"
#include "nuq/format.hpp"

// cuBLAS's own declaration; repeating it keeps this header free of CUDA includes.
typedef struct cublasContext* cublasHandle_t;

namespace nuq::cuda {

// Batches up to this size take the fused GEMV (weights read once for all batch rows).
inline constexpr int64_t kMaxGemvBatch = 16;
// Rows the prefill path dequantizes per cuBLAS call (bounds its workspace).
inline constexpr int64_t kPrefillRowBlock = 2048;

// Device workspace linear() needs for this layer and batch: 0 for the GEMV path, one fp16/bf16 block of
// min(rows, kPrefillRowBlock) × cols weights for the prefill path.
std::size_t linear_workspace_bytes(const format::PackedLinearView& w, int64_t batch);

// Explains why linear() would refuse these arguments (naming the shapes and values involved); ok() when
// it can run them. Needs no device. Requirements beyond the format's: per-row codebooks or groups of a
// multiple of 64 columns; ldx and ldy even and the activation/output pointers 4-byte aligned (pairs of
// values are loaded and stored together); qweight 8-byte aligned, and lut too when codebooks are grouped.
Status can_implement_linear(const format::PackedLinearView& w, const void* x, int64_t ldx, const void* y,
                            int64_t ldy, int64_t batch);

// Y[b, r] = Σ_c W[r, c] · X[b, c] for b < batch; X [batch, ldx] and Y [batch, ldy] row-major in `type`,
// fp32 accumulation. Every pointer of `w` (qweight, lut, the CSR arrays) and x, y, workspace are device
// pointers. batch <= kMaxGemvBatch: fused GEMV, `blas` and `workspace` unused (may be null). Larger
// batches: dequantize + cublasGemmEx on `blas` (whose stream is set to `stream`), with
// linear_workspace_bytes(w, batch) bytes of `workspace`. Results are deterministic (no atomics).
Status linear(const format::PackedLinearView& w, const void* x, int64_t ldx, void* y, int64_t ldy, int64_t batch,
              ActivationType type, cudaStream_t stream, cublasHandle_t blas = nullptr, void* workspace = nullptr,
              std::size_t workspace_bytes = 0);

// W (dense part plus sparse part) as fp16/bf16 rows [rows, ld] on the device: the prefill path's
// dequantizer, exposed for tests and for callers that keep a dense copy.
Status dequantize(const format::PackedLinearView& w, void* out, int64_t ld, ActivationType type, cudaStream_t stream);

}  // namespace nuq::cuda
