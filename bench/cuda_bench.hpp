// What nuq's CUDA benchmarks share: the device's copy bandwidth, which every case reports its fraction of.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>

namespace nuq::bench {

// Device-to-device copy bandwidth (bytes read + written per second) of 1 GiB, best of 5, measured once
// per process.
inline double copy_bandwidth() {
  static const double bw = [] {
    const size_t bytes = size_t(1) << 30;
    void *a = nullptr, *b = nullptr;
    if (cudaMalloc(&a, bytes) != cudaSuccess || cudaMalloc(&b, bytes) != cudaSuccess) return 0.0;
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    float best = 1e30f;
    for (int i = 0; i < 5; ++i) {
      cudaEventRecord(e0);
      cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice);
      cudaEventRecord(e1);
      cudaEventSynchronize(e1);
      float ms = 0;
      cudaEventElapsedTime(&ms, e0, e1);
      best = std::min(best, ms);
    }
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    cudaFree(a);
    cudaFree(b);
    return 2.0 * double(bytes) / (double(best) * 1e-3);
  }();
  return bw;
}

}  // namespace nuq::bench
