// Build-wide macros shared by host and CUDA code.
#pragma once

#if defined(__CUDACC__)
#define NUQ_HOST_DEVICE __host__ __device__
#define NUQ_FORCEINLINE __forceinline__
#else
#define NUQ_HOST_DEVICE
#define NUQ_FORCEINLINE inline __attribute__((always_inline))
#endif
