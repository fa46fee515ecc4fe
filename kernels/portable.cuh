// The few things kernels/*.cu need that are written differently for nvcc and for the emulated build
// (NUQ_CUDA=EMULATED, kernels compiled as C++ on the HIP CPU Runtime; kernels/emulation). Everything
// else is plain CUDA C++ that both compile. Launches go through cudaLaunchKernelEx, a C++ template in the
// CUDA runtime that the emulation implements too, instead of the <<<...>>> syntax no C++ compiler
// parses; dynamic shared memory is a function instead of an `extern __shared__` array.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
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

}  // namespace nuq::cuda::detail
