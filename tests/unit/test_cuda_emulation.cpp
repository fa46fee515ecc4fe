// The emulation layer itself (kernels/emulation, NUQ_CUDA=EMULATED): what the kernels rely on must mean
// what it means on a GPU, or an emulated pass proves nothing. Warp shuffles follow the lane arithmetic
// of the CUDA Programming Guide for every width, ballots are per 32-lane warp, bfloat16 rounds to
// nearest even, dynamic shared memory has exactly the launch's size, launches refuse what a GPU refuses,
// and misuse a GPU would let pass silently (partial masks, partial warps) stops the program.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "nuq/half.hpp"
#include "portable.cuh"

namespace {

using nuq::cuda::detail::launch;

enum class Shuffle { idx, xor_, down, up };

__global__ void shuffle_kernel(Shuffle op, int arg, int width, int* out) {
  const int t = int(threadIdx.x), v = 1000 + t;
  int r = 0;
  switch (op) {
    case Shuffle::idx: r = __shfl_sync(0xffffffffu, v, arg, width); break;
    case Shuffle::xor_: r = __shfl_xor_sync(0xffffffffu, v, arg, width); break;
    case Shuffle::down: r = __shfl_down_sync(0xffffffffu, v, unsigned(arg), width); break;
    case Shuffle::up: r = __shfl_up_sync(0xffffffffu, v, unsigned(arg), width); break;
  }
  out[t] = r;
}

// The source lane each shuffle reads, from the CUDA Programming Guide (B.22, "Warp Shuffle Functions").
int expected_source(Shuffle op, int lane, int arg, int width) {
  const int seg = lane / width * width;
  switch (op) {
    case Shuffle::idx: return seg + arg % width;
    case Shuffle::xor_: {
      const int src = lane ^ arg;
      return src >= seg + width ? lane : src;
    }
    case Shuffle::down: return lane % width + arg < width ? lane + arg : lane;
    case Shuffle::up: return lane % width >= arg ? lane - arg : lane;
  }
  return -1;
}

TEST(CudaEmulation, ShufflesFollowTheProgrammingGuide) {
  const int threads = 96;  // three warps: lanes 32-63 sit in the upper half of HIP-CPU's 64-wide groups
  int* out = nullptr;
  ASSERT_EQ(cudaMalloc(&out, threads * sizeof(int)), cudaSuccess);
  for (Shuffle op : {Shuffle::idx, Shuffle::xor_, Shuffle::down, Shuffle::up})
    for (int width : {2, 4, 8, 16, 32})
      for (int arg : {0, 1, 3, width - 1, width / 2}) {
        ASSERT_TRUE(launch("shuffle", shuffle_kernel, 1, threads, 0, nullptr, op, arg, width, out).ok());
        std::vector<int> got(threads);
        ASSERT_EQ(cudaMemcpy(got.data(), out, threads * sizeof(int), cudaMemcpyDeviceToHost), cudaSuccess);
        for (int t = 0; t < threads; ++t) {
          const int lane = t % 32, warp = t / 32;
          EXPECT_EQ(got[t], 1000 + warp * 32 + expected_source(op, lane, arg, width))
              << "op " << int(op) << " width " << width << " arg " << arg << " thread " << t;
        }
      }
  cudaFree(out);
}

__global__ void ballot_kernel(unsigned* out) {
  const int t = int(threadIdx.x);
  out[t] = __ballot_sync(0xffffffffu, t % 3 == 0 || t == 40);
}

TEST(CudaEmulation, BallotIsPerThirtyTwoLaneWarp) {
  unsigned* out = nullptr;
  ASSERT_EQ(cudaMalloc(&out, 64 * sizeof(unsigned)), cudaSuccess);
  ASSERT_TRUE(launch("ballot", ballot_kernel, 1, 64, 0, nullptr, out).ok());
  std::vector<unsigned> got(64);
  ASSERT_EQ(cudaMemcpy(got.data(), out, 64 * sizeof(unsigned), cudaMemcpyDeviceToHost), cudaSuccess);
  for (int warp = 0; warp < 2; ++warp) {
    unsigned want = 0;
    for (int lane = 0; lane < 32; ++lane) {
      const int t = warp * 32 + lane;
      if (t % 3 == 0 || t == 40) want |= 1u << lane;
    }
    for (int lane = 0; lane < 32; ++lane) EXPECT_EQ(got[warp * 32 + lane], want) << "warp " << warp;
  }
  cudaFree(out);
}

// Each block writes its index into every dynamic shared float, then every thread sums what the block's
// other threads wrote: a block-shared buffer of exactly the launch's size.
__global__ void shared_kernel(int n, float* out) {
  float* s = nuq::cuda::detail::dynamic_shared<float>();
  const int t = int(threadIdx.x);
  if (t == 0) out[blockIdx.x * 2 + 1] = std::isnan(s[n - 1]) ? 1.0f : 0.0f;  // poisoned at block start
  __syncthreads();
  for (int i = t; i < n; i += int(blockDim.x)) s[i] = float(blockIdx.x + 1);
  __syncthreads();
  if (t == 0) {
    float sum = 0;
    for (int i = 0; i < n; ++i) sum += s[i];
    out[blockIdx.x * 2] = sum;
  }
}

TEST(CudaEmulation, DynamicSharedMemoryIsPerBlockAndPoisoned) {
  const int n = 1000, blocks = 7;
  float* out = nullptr;
  ASSERT_EQ(cudaMalloc(&out, blocks * 2 * sizeof(float)), cudaSuccess);
  ASSERT_TRUE(launch("shared", shared_kernel, blocks, 64, n * sizeof(float), nullptr, n, out).ok());
  std::vector<float> got(blocks * 2);
  ASSERT_EQ(cudaMemcpy(got.data(), out, got.size() * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
  for (int b = 0; b < blocks; ++b) {
    EXPECT_EQ(got[b * 2], float(n * (b + 1))) << b;
    EXPECT_EQ(got[b * 2 + 1], 1.0f) << "block " << b << " saw the previous block's shared memory";
  }
  cudaFree(out);
}

TEST(CudaEmulation, LaunchesRefuseWhatAGpuRefuses) {
  float* out = nullptr;
  ASSERT_EQ(cudaMalloc(&out, 64), cudaSuccess);
  auto status = launch("empty grid", shared_kernel, 0, 64, 64, nullptr, 1, out);
  EXPECT_FALSE(status.ok());
  EXPECT_NE(status.message.find("empty grid"), std::string::npos) << status.message;
  EXPECT_FALSE(launch("big block", shared_kernel, 1, 1025, 64, nullptr, 1, out).ok());
  // 48 KiB of dynamic shared memory is the default limit; more needs the kernel's opt-in.
  EXPECT_FALSE(launch("64 KiB", shared_kernel, 1, 32, 64 * 1024, nullptr, 1, out).ok());
  cudaFree(out);
}

__global__ void partial_mask_kernel(int* out) { out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1, 1); }
__global__ void partial_warp_kernel(int* out) { out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1); }

TEST(CudaEmulationDeathTest, RefusesWhatItCannotEmulate) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  int* out = nullptr;
  ASSERT_EQ(cudaMalloc(&out, 64 * sizeof(int)), cudaSuccess);
  EXPECT_DEATH(
      {
        launch("mask", partial_mask_kernel, 1, 32, 0, nullptr, out);
        cudaDeviceSynchronize();
      },
      "mask 0x0000ffff");
  EXPECT_DEATH(
      {
        launch("warp", partial_warp_kernel, 1, 48, 0, nullptr, out);
        cudaDeviceSynchronize();
      },
      "whole 32-thread warps");
  cudaFree(out);
}

// A thread with 64 KiB of locals: HIP-CPU's default 7 KiB fiber stacks would overflow into the heap.
__global__ void deep_stack_kernel(int* out) {
  volatile int local[16384];
  for (int i = 0; i < 16384; ++i) local[i] = i + int(threadIdx.x);
  __syncthreads();
  int sum = 0;
  for (int i = 0; i < 16384; ++i) sum += local[i];
  out[threadIdx.x] = sum;
}

TEST(CudaEmulation, FibersHaveRoomForLargeFrames) {
  int* out = nullptr;
  ASSERT_EQ(cudaMalloc(&out, 64 * sizeof(int)), cudaSuccess);
  ASSERT_TRUE(launch("deep", deep_stack_kernel, 2, 64, 0, nullptr, out).ok());
  std::vector<int> got(64);
  ASSERT_EQ(cudaMemcpy(got.data(), out, got.size() * sizeof(int), cudaMemcpyDeviceToHost), cudaSuccess);
  for (int t = 0; t < 64; ++t) EXPECT_EQ(got[t], 16383 * 16384 / 2 + 16384 * t) << t;
  cudaFree(out);
}

TEST(CudaEmulation, Bfloat16RoundsToNearestEven) {
  // Every bf16 value, its neighbours' midpoints (ties), and points just beside them.
  for (uint32_t hi = 0; hi < 0x10000; ++hi) {
    for (uint32_t low : {0x0000u, 0x7fffu, 0x8000u, 0x8001u, 0xffffu}) {
      const uint32_t u = hi << 16 | low;
      float f;
      std::memcpy(&f, &u, 4);
      const uint16_t got = __bfloat16_as_ushort(__float2bfloat16_rn(f));
      if (std::isnan(f)) {
        EXPECT_TRUE(std::isnan(nuq::bf16_to_float(got))) << std::hex << u;
        continue;
      }
      ASSERT_EQ(got, nuq::float_to_bf16(f)) << std::hex << u;
      ASSERT_EQ(__bfloat162float(__ushort_as_bfloat16(got)), nuq::bf16_to_float(got));
    }
  }
}

}  // namespace
