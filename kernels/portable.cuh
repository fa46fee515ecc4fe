// The few things kernels/*.cu need that are written differently for nvcc and for the emulated build
// (NUQ_CUDA=EMULATED, kernels compiled as C++ on the HIP CPU Runtime; kernels/emulation). Everything
// else is plain CUDA C++ that both compile. Launches go through cudaLaunchKernelEx, a C++ template in the
// CUDA runtime that the emulation implements too, instead of the <<<...>>> syntax no C++ compiler
// parses; dynamic shared memory is a function instead of an `extern __shared__` array.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

#include "nuq/cuda.hpp"

namespace nuq::cuda::detail {

inline Status cuda_status(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return {};
  return {StatusCode::cuda_error, std::string(what) + ": " + cudaGetErrorString(err)};
}

inline Status invalid(std::string message) { return {StatusCode::invalid_argument, std::move(message)}; }

// Launches kernel<<<grid, block, shared_bytes, stream>>>(args...); `what` names it in the error.
template <class... Params, class... Args>
Status launch(const char* what, void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t shared_bytes,
              cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
  return cuda_status(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...), what);
}

#if defined(NUQ_CUDA_EMULATED)
template <class T>
inline T* dynamic_shared() {
  return static_cast<T*>(nuq_emulation::dynamic_shared_memory());
}
#else
// The block's dynamic shared memory (the launch's shared_bytes), 16-byte aligned.
template <class T>
__device__ __forceinline__ T* dynamic_shared() {
  extern __shared__ __align__(16) unsigned char nuq_dynamic_shared[];
  return reinterpret_cast<T*>(nuq_dynamic_shared);
}
#endif

// D += A·B on tensor cores: mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 (sm_80+), one
// instruction per warp for 16·8·16 multiply-adds with fp32 accumulation. Fragments as the PTX ISA lays
// them out ("Matrix Fragments for mma.m16n8k16 with floating point type"), lane = 4·g + t:
//   a[0] = A[g][2t, 2t+1]     a[1] = A[g+8][2t, 2t+1]     a[2] = A[g][2t+8, 2t+9]     a[3] = A[g+8][2t+8, 2t+9]
//   b[0] = B[2t, 2t+1][g]     b[1] = B[2t+8, 2t+9][g]
//   d[0] = D[g][2t]   d[1] = D[g][2t+1]   d[2] = D[g+8][2t]   d[3] = D[g+8][2t+1]
// Each a/b register holds two 16-bit values, the lower index in the low half. The emulated build
// implements the same table (kernels/emulation/hip_cpu_bridge.hpp), checked against a plain product by
// tests/unit/test_cuda_emulation.cpp.
template <bool BF16>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(NUQ_CUDA_EMULATED)
  nuq_emulation::mma_m16n8k16(BF16, d, a, b);
#else
  if constexpr (BF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

// ldmatrix.sync.aligned.m8n8.x{N}[.trans].shared.b16: N 8x8 matrices of 16-bit values from shared
// memory into fragments, one instruction per warp. Lanes 8i..8i+7 give the addresses of matrix i's rows
// (16 bytes each, 16-byte aligned); lane 4g + t receives r[i] = matrix i's row g, halves 2t and 2t + 1 —
// exactly an mma.m16n8k16 A or B register — or with TRANS the transposed matrix's row g.
template <int N, bool TRANS>
__device__ __forceinline__ void ldmatrix(uint32_t (&r)[N], const void* row) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
#if defined(NUQ_CUDA_EMULATED)
  nuq_emulation::ldmatrix(TRANS, N, r, row);
#else
  const uint32_t address = uint32_t(__cvta_generic_to_shared(row));
  if constexpr (N == 4 && TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
  else if constexpr (N == 4)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
  else if constexpr (N == 2 && TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(address));
  else if constexpr (N == 2)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(address));
  else if constexpr (TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(address));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(address));
#endif
}

// movmatrix.sync.aligned.m8n8.trans.b16 (sm_75+): an 8x8 matrix of 16-bit values held as an mma fragment
// (lane 4g + t: row g, halves 2t and 2t + 1) becomes its transpose in the same layout, in registers.
__device__ __forceinline__ uint32_t movmatrix_trans(uint32_t x) {
#if defined(NUQ_CUDA_EMULATED)
  return nuq_emulation::movmatrix_trans(x);
#else
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
#endif
}

}  // namespace nuq::cuda::detail
