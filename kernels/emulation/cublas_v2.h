// Stand-in for <cublas_v2.h> in the emulated build (NUQ_CUDA=EMULATED): the handle, stream binding and
// cublasGemmEx that nuq's prefill path uses, computed on the CPU when called (emulated launches have
// completed by then, so stream order holds). fp16/bf16/fp32 matrices, fp32 accumulation in k order, one
// rounding of the result: within what cuBLAS guarantees, not bit-identical to it (cuBLAS may split k
// and sum in another order).
#pragma once
#include <cstdint>
#include <vector>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "hip_cpu_bridge.hpp"

enum cublasStatus_t {
  CUBLAS_STATUS_SUCCESS = 0,
  CUBLAS_STATUS_NOT_INITIALIZED = 1,
  CUBLAS_STATUS_INVALID_VALUE = 7,
  CUBLAS_STATUS_NOT_SUPPORTED = 15,
};
enum cublasOperation_t { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 };
enum cudaDataType { CUDA_R_32F = 0, CUDA_R_16F = 2, CUDA_R_16BF = 14 };
using cudaDataType_t = cudaDataType;
enum cublasComputeType_t { CUBLAS_COMPUTE_32F = 68 };
enum cublasGemmAlgo_t { CUBLAS_GEMM_DEFAULT = -1 };

struct cublasContext {
  cudaStream_t stream = nullptr;
};
typedef struct cublasContext* cublasHandle_t;

inline cublasStatus_t cublasCreate(cublasHandle_t* h) {
  *h = new cublasContext{};
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasDestroy(cublasHandle_t h) {
  delete h;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  h->stream = s;
  return CUBLAS_STATUS_SUCCESS;
}

namespace nuq_emulation {

struct GemmArgs {
  cublasOperation_t ta, tb;
  int m, n, k;
  float alpha, beta;
  const void *a, *b;
  void* c;
  cudaDataType at, bt, ct;
  int lda, ldb, ldc;
};

inline float load_element(const void* p, cudaDataType t, std::int64_t i) {
  switch (t) {
    case CUDA_R_16F: return __half2float(static_cast<const __half*>(p)[i]);
    case CUDA_R_16BF: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}
inline void store_element(void* p, cudaDataType t, std::int64_t i, float v) {
  switch (t) {
    case CUDA_R_16F: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    case CUDA_R_16BF: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(p)[i] = v; break;
  }
}

// C (m × n, column-major) = alpha · op(A) · op(B) + beta · C.
inline void gemm(const GemmArgs& g) {
  for (int j = 0; j < g.n; ++j)
    for (int i = 0; i < g.m; ++i) {
      float acc = 0.0f;
      for (int p = 0; p < g.k; ++p) {
        const std::int64_t ai = g.ta == CUBLAS_OP_N ? i + std::int64_t(p) * g.lda : p + std::int64_t(i) * g.lda;
        const std::int64_t bi = g.tb == CUBLAS_OP_N ? p + std::int64_t(j) * g.ldb : j + std::int64_t(p) * g.ldb;
        acc += load_element(g.a, g.at, ai) * load_element(g.b, g.bt, bi);
      }
      const std::int64_t ci = i + std::int64_t(j) * g.ldc;
      const float old = g.beta == 0.0f ? 0.0f : load_element(g.c, g.ct, ci);  // beta = 0 ignores C, even NaN
      store_element(g.c, g.ct, ci, g.alpha * acc + g.beta * old);
    }
}

inline bool supported_type(cudaDataType t) { return t == CUDA_R_16F || t == CUDA_R_16BF || t == CUDA_R_32F; }

}  // namespace nuq_emulation

inline cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                   const void* alpha, const void* a, cudaDataType at, int lda, const void* b,
                                   cudaDataType bt, int ldb, const void* beta, void* c, cudaDataType ct, int ldc,
                                   cublasComputeType_t compute, cublasGemmAlgo_t /*algo*/) {
  using namespace nuq_emulation;
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (compute != CUBLAS_COMPUTE_32F || !supported_type(at) || !supported_type(bt) || !supported_type(ct))
    return CUBLAS_STATUS_NOT_SUPPORTED;
  if (m < 0 || n < 0 || k < 0 || lda < (ta == CUBLAS_OP_N ? m : k) || ldb < (tb == CUBLAS_OP_N ? k : n) || ldc < m)
    return CUBLAS_STATUS_INVALID_VALUE;
  if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
  gemm(GemmArgs{ta, tb, m, n, k, *static_cast<const float*>(alpha), *static_cast<const float*>(beta), a, b, c, at, bt,
                ct, lda, ldb, ldc});
  return CUBLAS_STATUS_SUCCESS;
}
