// Fused LUT GEMV (batch 1-16) and the dequantize + cuBLAS prefill path over nuq's packed format
// (include/nuq/linear_cuda.hpp, docs/cuda-kernels.md).
//
// GEMV: one warp per output row. Lane l reads 8-byte pieces l, l+32, ... of the row's low bit plane, so
// a warp's loads are 256 contiguous bytes (coalesced); a piece holds 16 (4-bit) or 32 (2/3-bit) columns
// that lie in one codebook group (groups are whole multiples of 64 columns, checked on the host). Per-row
// codebooks are staged as fp32 in shared memory, 16 entries per warp: lanes that read the same entry get
// a broadcast and different entries sit in different banks, so the look-ups never conflict. Grouped
// codebooks are read through the read-only cache instead (a warp touches at most a few groups per
// step). The row's sparse entries are spread over the warp's lanes after the dense part (each lane
// takes every 32nd nonzero), so a row's sparse cost is nnz/32 steps, not nnz as with one thread per row.
// A fixed shuffle tree reduces the lanes: results are deterministic, with no atomics and no host sync.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

#include "nuq/cuda.hpp"
#include "nuq/linear_cuda.hpp"
#include "portable.cuh"

namespace nuq::cuda {
namespace {

using detail::invalid;
using detail::launch;

constexpr int kWarpsPerBlock = 4;

template <class T>
struct Act;
template <>
struct Act<__half> {
  using Pair = __half2;
  static __device__ float to_float(__half v) { return __half2float(v); }
  static __device__ float2 to_float2(Pair v) { return __half22float2(v); }
  static __device__ __half from_float(float v) { return __float2half_rn(v); }
};
template <>
struct Act<__nv_bfloat16> {
  using Pair = __nv_bfloat162;
  static __device__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ float2 to_float2(Pair v) { return __bfloat1622float2(v); }
  static __device__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

struct GemvParams {
  const uint8_t* qweight;
  const __half* lut;
  int64_t rows, cols, groups, group_size, stride, padded;
  const int32_t* row_ptr;
  const void* col_idx;
  bool col16;
  const __half* values;
  int64_t nnz;
  const void* x;
  int64_t ldx;
  void* y;
  int64_t ldy;
  int batch;
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

template <int BITS, int MAXB, bool GROUPED, class T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) gemv_kernel(GemvParams p) {
  constexpr int E = 1 << BITS;
  constexpr int PC = piece_cols<BITS>();
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const int64_t r = int64_t(blockIdx.x) * kWarpsPerBlock + warp;
  __shared__ float tables[kWarpsPerBlock][16];
  if (r >= p.rows) return;  // whole warps only: nothing below synchronizes the block
  const uint8_t* row = p.qweight + r * p.stride;
  if constexpr (!GROUPED) {
    if (lane < E) tables[warp][lane] = __half2float(p.lut[r * E + lane]);
    __syncwarp();
  }
  const float* table = tables[warp];
  const T* x = static_cast<const T*>(p.x);
  float acc[MAXB];
#pragma unroll
  for (int b = 0; b < MAXB; ++b) acc[b] = 0.0f;

  const int64_t pieces = p.padded * (BITS == 4 ? 4 : 2) / 8 / 8;
#pragma unroll 2
  for (int64_t k = lane; k < pieces; k += 32) {
    const uint2 lo = __ldg(reinterpret_cast<const uint2*>(row) + k);
    uint32_t hi = 0;
    if constexpr (BITS == 3) hi = __ldg(reinterpret_cast<const uint32_t*>(row + p.padded / 4) + k);
    const int64_t c0 = k * PC;
    if (c0 >= p.cols) continue;  // padding only
    float w[PC];
    if constexpr (GROUPED) {
      const __half* cb = p.lut + (r * p.groups + c0 / p.group_size) * E;
#pragma unroll
      for (int f = 0; f < PC; ++f) w[f] = __half2float(__ldg(cb + field<BITS>(lo, hi, f)));
    } else {
#pragma unroll
      for (int f = 0; f < PC; ++f) w[f] = table[field<BITS>(lo, hi, f)];
    }
    if (c0 + PC <= p.cols) {
#pragma unroll
      for (int b = 0; b < MAXB; ++b) {
        if (b < p.batch) {
          const auto* xp = reinterpret_cast<const typename Act<T>::Pair*>(x + b * p.ldx + c0);
#pragma unroll
          for (int j = 0; j < PC / 2; ++j) {
            const float2 v = Act<T>::to_float2(xp[j]);
            acc[b] = fmaf(w[2 * j], v.x, acc[b]);
            acc[b] = fmaf(w[2 * j + 1], v.y, acc[b]);
          }
        }
      }
    } else {
      // The row's last piece reaches past cols: activations there may not exist.
#pragma unroll
      for (int b = 0; b < MAXB; ++b)
        if (b < p.batch)
          for (int f = 0; f < PC && c0 + f < p.cols; ++f)
            acc[b] = fmaf(w[f], Act<T>::to_float(x[b * p.ldx + c0 + f]), acc[b]);
    }
  }
  if (p.nnz > 0) {
    for (int64_t k = p.row_ptr[r] + lane; k < p.row_ptr[r + 1]; k += 32) {
      const int64_t c = p.col16 ? int64_t(static_cast<const uint16_t*>(p.col_idx)[k])
                                : int64_t(static_cast<const int32_t*>(p.col_idx)[k]);
      const float v = __half2float(p.values[k]);
#pragma unroll
      for (int b = 0; b < MAXB; ++b)
        if (b < p.batch) acc[b] = fmaf(v, Act<T>::to_float(x[b * p.ldx + c]), acc[b]);
    }
  }
#pragma unroll
  for (int b = 0; b < MAXB; ++b) {
#pragma unroll
    for (int off = 16; off > 0; off /= 2) acc[b] += __shfl_xor_sync(0xffffffffu, acc[b], off);
  }
  if (lane == 0) {
    T* y = static_cast<T*>(p.y);
#pragma unroll
    for (int b = 0; b < MAXB; ++b)
      if (b < p.batch) y[b * p.ldy + r] = Act<T>::from_float(acc[b]);
  }
}

// One thread per 8-byte piece: rows [r0, r0 + n) of W decoded into out [n, ld] (dense part only).
template <int BITS, class T>
__global__ void dequantize_kernel(GemvParams p, int64_t r0, int64_t n, T* out, int64_t ld) {
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
    const __half* cb = p.lut + (r * p.groups + c0 / p.group_size) * E;
    for (int f = 0; f < PC && c0 + f < p.cols; ++f)
      out[rr * ld + c0 + f] = Act<T>::from_float(__half2float(cb[field<BITS>(lo, hi, f)]));
  }
}

// Adds the sparse residuals of rows [r0, r0 + n) into out; each nonzero has its own (row, column), so
// the writes never collide. One thread per row's nonzero range would serialize long rows: threads take
// nonzeros, and find their row by binary search in row_ptr.
template <class T>
__global__ void scatter_sparse_kernel(GemvParams p, int64_t r0, int64_t n, T* out, int64_t ld) {
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
    dst = Act<T>::from_float(Act<T>::to_float(dst) + __half2float(p.values[k]));
  }
}

GemvParams make_params(const format::PackedLinearView& w) {
  GemvParams p{};
  p.qweight = w.qweight;
  p.lut = reinterpret_cast<const __half*>(w.lut);
  p.rows = w.rows;
  p.cols = w.cols;
  p.groups = w.groups();
  p.group_size = w.group_size;
  p.stride = w.row_stride();
  p.padded = format::padded_cols(w.cols);
  p.row_ptr = w.sparse_row_ptr;
  p.col_idx = w.sparse_col_idx;
  p.col16 = format::sparse_cols_are_u16(w.cols);
  p.values = reinterpret_cast<const __half*>(w.sparse_values);
  p.nnz = w.nnz;
  return p;
}

// The one place where run-time bits, batch bound, codebook kind and activation type become template
// arguments.
template <class T>
Status launch_gemv(const GemvParams& p, int bits, cudaStream_t stream) {
  const bool grouped = p.groups > 1;
  const int maxb = p.batch <= 1 ? 1 : p.batch <= 2 ? 2 : p.batch <= 4 ? 4 : p.batch <= 8 ? 8 : 16;
  const dim3 grid(unsigned((p.rows + kWarpsPerBlock - 1) / kWarpsPerBlock)), block(kWarpsPerBlock * 32);
  Status status;
  auto go = [&](auto bits_c, auto maxb_c, auto grouped_c) {
    status = launch("linear: GEMV launch",
                    gemv_kernel<decltype(bits_c)::value, decltype(maxb_c)::value, decltype(grouped_c)::value, T>,
                    grid, block, 0, stream, p);
  };
  auto with_maxb = [&](auto bits_c, auto grouped_c) {
    switch (maxb) {
      case 1: go(bits_c, std::integral_constant<int, 1>{}, grouped_c); break;
      case 2: go(bits_c, std::integral_constant<int, 2>{}, grouped_c); break;
      case 4: go(bits_c, std::integral_constant<int, 4>{}, grouped_c); break;
      case 8: go(bits_c, std::integral_constant<int, 8>{}, grouped_c); break;
      default: go(bits_c, std::integral_constant<int, 16>{}, grouped_c); break;
    }
  };
  auto with_grouped = [&](auto bits_c) {
    if (grouped) with_maxb(bits_c, std::true_type{}); else with_maxb(bits_c, std::false_type{});
  };
  switch (bits) {
    case 2: with_grouped(std::integral_constant<int, 2>{}); break;
    case 3: with_grouped(std::integral_constant<int, 3>{}); break;
    case 4: with_grouped(std::integral_constant<int, 4>{}); break;
    default: return invalid("linear: no GEMV kernel for " + std::to_string(bits) + " bits");
  }
  return status;
}

template <class T>
Status launch_dequantize(const GemvParams& p, int bits, int64_t r0, int64_t n, T* out, int64_t ld,
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
  GemvParams p = make_params(w);
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
  const GemvParams p = make_params(w);
  return type == ActivationType::f16
             ? launch_dequantize(p, w.bits, 0, w.rows, static_cast<__half*>(out), ld, stream)
             : launch_dequantize(p, w.bits, 0, w.rows, static_cast<__nv_bfloat16*>(out), ld, stream);
}

}  // namespace nuq::cuda
