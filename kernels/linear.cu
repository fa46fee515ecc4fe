// nuq::cuda::linear over nuq's packed format (include/nuq/linear_cuda.hpp, docs/cuda-kernels.md): the
// fused look-up-table GEMV on tensor cores for batches 1-16 (kernels/gemv.cuh) and, above, the prefill
// path: row blocks dequantized to fp16/bf16, sparse residuals added in place, cuBLAS GEMM.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

#include "gemv.cuh"
#include "nuq/cuda.hpp"
#include "nuq/linear_cuda.hpp"
#include "portable.cuh"

namespace nuq::cuda {
namespace {

using detail::invalid;
using detail::launch;
using gemv::Params;

template <class T>
struct Act;
template <>
struct Act<__half> {
  static __device__ float to_float(__half v) { return __half2float(v); }
  static __device__ __half from_float(float v) { return __float2half_rn(v); }
};
template <>
struct Act<__nv_bfloat16> {
  static __device__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

// Columns per 8-byte piece of the low plane.
template <int BITS>
constexpr int piece_cols() {
  return BITS == 4 ? 16 : 32;
}

// Index of field f of an 8-byte piece (lo = its two words, hi = the matching word of the 1-bit plane).
template <int BITS>
__device__ __forceinline__ int field(uint2 lo, uint32_t hi, int f) {
  if constexpr (BITS == 4) {
    const uint32_t w = f < 8 ? lo.x : lo.y;
    return int((w >> (4 * (f % 8))) & 15u);
  } else {
    const uint32_t w = f < 16 ? lo.x : lo.y;
    int i = int((w >> (2 * (f % 16))) & 3u);
    if constexpr (BITS == 3) i |= int((hi >> f) & 1u) << 2;
    return i;
  }
}

// One thread per 8-byte piece: rows [r0, r0 + n) of W decoded into out [n, ld] (dense part only).
template <int BITS, class T>
__global__ void dequantize_kernel(Params p, int64_t r0, int64_t n, T* out, int64_t ld) {
  constexpr int E = 1 << BITS;
  constexpr int PC = piece_cols<BITS>();
  const int64_t pieces = p.padded * (BITS == 4 ? 4 : 2) / 8 / 8;
  const int64_t total = n * pieces;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t rr = i / pieces, k = i % pieces, r = r0 + rr;
    const int64_t c0 = k * PC;
    if (c0 >= p.cols) continue;
    const uint8_t* row = p.qweight + r * p.stride;
    const uint2 lo = reinterpret_cast<const uint2*>(row)[k];
    const uint32_t hi = BITS == 3 ? reinterpret_cast<const uint32_t*>(row + p.padded / 4)[k] : 0u;
    const uint16_t* cb = p.lut + (r * p.groups + c0 / p.group_size) * E;
    for (int f = 0; f < PC && c0 + f < p.cols; ++f)
      out[rr * ld + c0 + f] = Act<T>::from_float(__half2float(__ushort_as_half(cb[field<BITS>(lo, hi, f)])));
  }
}

// Adds the sparse residuals of rows [r0, r0 + n) into out; each nonzero has its own (row, column), so
// the writes never collide. One thread per row's nonzero range would serialize long rows: threads take
// nonzeros, and find their row by binary search in row_ptr.
template <class T>
__global__ void scatter_sparse_kernel(Params p, int64_t r0, int64_t n, T* out, int64_t ld) {
  const int64_t begin = p.row_ptr[r0], end = p.row_ptr[r0 + n];
  for (int64_t k = begin + int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < end;
       k += int64_t(gridDim.x) * blockDim.x) {
    int64_t lo = r0, hi = r0 + n - 1;  // the row r with row_ptr[r] <= k < row_ptr[r + 1]
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (p.row_ptr[mid] <= k) lo = mid; else hi = mid - 1;
    }
    const int64_t c = p.col16 ? int64_t(static_cast<const uint16_t*>(p.col_idx)[k])
                              : int64_t(static_cast<const int32_t*>(p.col_idx)[k]);
    T& dst = out[(lo - r0) * ld + c];
    dst = Act<T>::from_float(Act<T>::to_float(dst) + __half2float(__ushort_as_half(p.values[k])));
  }
}

Params make_params(const format::PackedLinearView& w) {
  Params p{};
  p.qweight = w.qweight;
  p.lut = w.lut;
  p.rows = w.rows;
  p.cols = w.cols;
  p.groups = w.groups();
  p.group_size = w.group_size;
  p.stride = w.row_stride();
  p.padded = format::padded_cols(w.cols);
  p.row_ptr = w.sparse_row_ptr;
  p.col_idx = w.sparse_col_idx;
  p.col16 = format::sparse_cols_are_u16(w.cols);
  p.values = w.sparse_values;
  p.nnz = w.nnz;
  return p;
}

// Activations and rows that allow 16-byte loads of indices and activations (VEC16); other shapes and
// pointers take the 8- and 4-byte loads of the same kernel.
bool vec16_ok(const Params& p) {
  return reinterpret_cast<uintptr_t>(p.qweight) % 16 == 0 && p.stride % 16 == 0 &&
         reinterpret_cast<uintptr_t>(p.x) % 16 == 0 && p.ldx % 8 == 0;
}

template <int BITS, int NT, bool GROUPED, bool VEC16, class T>
Status launch_gemv_kernel(const Params& p, cudaStream_t stream) {
  constexpr std::size_t shared = sizeof(gemv::Shared<BITS, NT, GROUPED>);
  const auto kernel = gemv::gemv_kernel<BITS, NT, GROUPED, VEC16, T>;
  const dim3 grid(unsigned((p.rows + gemv::kTileRows - 1) / gemv::kTileRows));
  return launch("linear: GEMV launch", kernel, grid, gemv::warps_for(p.cols) * 32, shared, stream, p);
}

// The one place where run-time bits, batch bound, codebook kind, alignment and activation type become
// template arguments.
template <class T>
Status launch_gemv(const Params& p, int bits, cudaStream_t stream) {
  const bool grouped = p.groups > 1, vec16 = vec16_ok(p), two_tiles = p.batch > 8;
  auto with_tiles = [&](auto bits_c, auto grouped_c, auto vec16_c) {
    constexpr int B = decltype(bits_c)::value;
    constexpr bool G = decltype(grouped_c)::value, V = decltype(vec16_c)::value;
    return two_tiles ? launch_gemv_kernel<B, 2, G, V, T>(p, stream) : launch_gemv_kernel<B, 1, G, V, T>(p, stream);
  };
  auto with_layout = [&](auto bits_c) {
    if (grouped)
      return vec16 ? with_tiles(bits_c, std::true_type{}, std::true_type{})
                   : with_tiles(bits_c, std::true_type{}, std::false_type{});
    return vec16 ? with_tiles(bits_c, std::false_type{}, std::true_type{})
                 : with_tiles(bits_c, std::false_type{}, std::false_type{});
  };
  switch (bits) {
    case 2: return with_layout(std::integral_constant<int, 2>{});
    case 3: return with_layout(std::integral_constant<int, 3>{});
    case 4: return with_layout(std::integral_constant<int, 4>{});
    default: return invalid("linear: no GEMV kernel for " + std::to_string(bits) + " bits");
  }
}

template <class T>
Status launch_dequantize(const Params& p, int bits, int64_t r0, int64_t n, T* out, int64_t ld,
                         cudaStream_t stream) {
  const int64_t pieces = n * (p.padded * (bits == 4 ? 4 : 2) / 64);
  const unsigned blocks = unsigned(pieces / 256 + 1 < 65536 ? pieces / 256 + 1 : 65536);
  Status s;
  switch (bits) {
    case 2: s = launch("dequantize launch", dequantize_kernel<2, T>, blocks, 256, 0, stream, p, r0, n, out, ld); break;
    case 3: s = launch("dequantize launch", dequantize_kernel<3, T>, blocks, 256, 0, stream, p, r0, n, out, ld); break;
    case 4: s = launch("dequantize launch", dequantize_kernel<4, T>, blocks, 256, 0, stream, p, r0, n, out, ld); break;
    default: return invalid("dequantize: no kernel for " + std::to_string(bits) + " bits");
  }
  if (!s.ok() || p.nnz == 0) return s;
  const unsigned scatter_blocks = unsigned(n / 8 + 1 < 4096 ? n / 8 + 1 : 4096);
  return launch("sparse scatter launch", scatter_sparse_kernel<T>, scatter_blocks, 256, 0, stream, p, r0, n, out, ld);
}

Status check_layer(const format::PackedLinearView& w) {
  if (!format::is_supported_bits(w.bits)) return invalid("linear: unsupported bit width " + std::to_string(w.bits));
  if (w.rows <= 0 || w.cols <= 0)
    return invalid("linear: empty layer shape [" + std::to_string(w.rows) + ", " + std::to_string(w.cols) + "]");
  if (w.group_size <= 0 || w.cols % w.group_size != 0)
    return invalid("linear: group size " + std::to_string(w.group_size) + " does not divide the " +
                   std::to_string(w.cols) + " columns");
  if (w.group_size != w.cols && w.group_size % 64 != 0)
    return invalid("linear: the CUDA kernels need per-row codebooks or groups of a multiple of 64 columns, this "
                   "layer has groups of " + std::to_string(w.group_size));
  if (w.qweight == nullptr || w.lut == nullptr) return invalid("linear: qweight or lut is null");
  if (reinterpret_cast<uintptr_t>(w.qweight) % 8 != 0) return invalid("linear: qweight is not 8-byte aligned");
  if (w.groups() > 1 && reinterpret_cast<uintptr_t>(w.lut) % 8 != 0)
    return invalid("linear: lut is not 8-byte aligned (grouped codebooks are read 8 bytes at a time)");
  if (w.nnz < 0) return invalid("linear: negative nnz " + std::to_string(w.nnz));
  if (w.nnz > 0 && (w.sparse_row_ptr == nullptr || w.sparse_col_idx == nullptr || w.sparse_values == nullptr))
    return invalid("linear: nnz is " + std::to_string(w.nnz) + " but a sparse array (row_ptr, col_idx, values) is null");
  return {};
}

}  // namespace

std::size_t linear_workspace_bytes(const format::PackedLinearView& w, int64_t batch) {
  if (batch <= kMaxGemvBatch) return 0;
  const int64_t rows = w.rows < kPrefillRowBlock ? w.rows : kPrefillRowBlock;
  return std::size_t(rows * w.cols) * 2;
}

Status can_implement_linear(const format::PackedLinearView& w, const void* x, int64_t ldx, const void* y, int64_t ldy,
                            int64_t batch) {
  if (Status s = check_layer(w); !s.ok()) return s;
  if (x == nullptr || y == nullptr) return invalid("linear: activations x or output y is null");
  if (batch <= 0) return invalid("linear: batch must be positive, got " + std::to_string(batch));
  if (ldx < w.cols) return invalid("linear: ldx " + std::to_string(ldx) + " is less than the " + std::to_string(w.cols) + " columns");
  if (ldy < w.rows) return invalid("linear: ldy " + std::to_string(ldy) + " is less than the " + std::to_string(w.rows) + " rows");
  if (ldx % 2 != 0 || ldy % 2 != 0)
    return invalid("linear: ldx (" + std::to_string(ldx) + ") and ldy (" + std::to_string(ldy) +
                   ") must be even: the kernels load and store pairs of values");
  if (reinterpret_cast<uintptr_t>(x) % 4 != 0 || reinterpret_cast<uintptr_t>(y) % 4 != 0)
    return invalid("linear: x and y must be 4-byte aligned");
  return {};
}

Status linear(const format::PackedLinearView& w, const void* x, int64_t ldx, void* y, int64_t ldy, int64_t batch,
              ActivationType type, cudaStream_t stream, cublasHandle_t blas, void* workspace,
              std::size_t workspace_bytes) {
  if (Status s = can_implement_linear(w, x, ldx, y, ldy, batch); !s.ok()) return s;
  Params p = make_params(w);
  p.x = x;
  p.ldx = ldx;
  p.y = y;
  p.ldy = ldy;
  p.batch = int(batch < kMaxGemvBatch ? batch : kMaxGemvBatch);
  if (batch <= kMaxGemvBatch)
    return type == ActivationType::f16 ? launch_gemv<__half>(p, w.bits, stream)
                                       : launch_gemv<__nv_bfloat16>(p, w.bits, stream);

  if (blas == nullptr) return invalid("linear: batch " + std::to_string(batch) + " takes the prefill path, which needs a cuBLAS handle");
  if (workspace == nullptr || workspace_bytes < linear_workspace_bytes(w, batch))
    return invalid("linear: the prefill path needs " + std::to_string(linear_workspace_bytes(w, batch)) +
                   " bytes of workspace, got " + std::to_string(workspace_bytes));
  if (cublasSetStream(blas, stream) != CUBLAS_STATUS_SUCCESS) return {StatusCode::cuda_error, "linear: cublasSetStream failed"};
  const cudaDataType dt = type == ActivationType::f16 ? CUDA_R_16F : CUDA_R_16BF;
  const float alpha = 1.0f, beta = 0.0f;
  for (int64_t r0 = 0; r0 < w.rows; r0 += kPrefillRowBlock) {
    const int64_t n = w.rows - r0 < kPrefillRowBlock ? w.rows - r0 : kPrefillRowBlock;
    Status s = type == ActivationType::f16
                   ? launch_dequantize(p, w.bits, r0, n, static_cast<__half*>(workspace), w.cols, stream)
                   : launch_dequantize(p, w.bits, r0, n, static_cast<__nv_bfloat16*>(workspace), w.cols, stream);
    if (!s.ok()) return s;
    // Row-major Y[batch, ldy] is column-major Yᵀ (rows × batch); the block of W, row-major [n, cols], is
    // column-major Wᵀ (cols × n): Yᵀ[r0 .. r0+n) = (Wᵀ)ᵀ · Xᵀ.
    char* ybase = static_cast<char*>(y) + r0 * 2;
    const cublasStatus_t st = cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, int(n), int(batch), int(w.cols), &alpha,
                                           workspace, dt, int(w.cols), x, dt, int(ldx), &beta, ybase, dt, int(ldy),
                                           CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (st != CUBLAS_STATUS_SUCCESS)
      return {StatusCode::cuda_error, "linear: cublasGemmEx failed with status " + std::to_string(int(st))};
  }
  return {};
}

Status dequantize(const format::PackedLinearView& w, void* out, int64_t ld, ActivationType type, cudaStream_t stream) {
  if (Status s = check_layer(w); !s.ok()) return s;
  if (out == nullptr) return invalid("dequantize: output is null");
  if (ld < w.cols) return invalid("dequantize: ld " + std::to_string(ld) + " is less than the " + std::to_string(w.cols) + " columns");
  const Params p = make_params(w);
  return type == ActivationType::f16
             ? launch_dequantize(p, w.bits, 0, w.rows, static_cast<__half*>(out), ld, stream)
             : launch_dequantize(p, w.bits, 0, w.rows, static_cast<__nv_bfloat16*>(out), ld, stream);
}

}  // namespace nuq::cuda
