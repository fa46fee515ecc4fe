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
#include <random>
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

// mma.m16n8k16 against a plain product. The fragment table below is transcribed from the PTX ISA
// ("Matrix Fragments for mma.m16n8k16 with floating point type") independently of the emulation's:
// groupID = lane >> 2, threadID_in_group = lane % 4; A element i of a lane sits at row groupID (+8 for
// i in {2,3,6,7}) and column 2·tid + (i & 1) (+8 for i >= 4), registers holding elements (0,1), (2,3),
// (4,5), (6,7); B element i at row 2·tid + (i & 1) (+8 for i >= 2), column groupID; C/D element i at
// row groupID (+8 for i >= 2), column 2·tid + (i & 1).
template <bool BF16>
__global__ void mma_kernel(const uint16_t* a_bits, const uint16_t* b_bits, const float* c, float* d) {
  const int lane = int(threadIdx.x), group = lane >> 2, tid = lane % 4;
  uint32_t a[4], b[2];
  for (int reg = 0; reg < 4; ++reg) {
    uint32_t r = 0;
    for (int half = 0; half < 2; ++half) {
      const int i = 2 * reg + half;
      const int row = group + ((i == 2 || i == 3 || i == 6 || i == 7) ? 8 : 0);
      const int col = 2 * tid + (i & 1) + (i >= 4 ? 8 : 0);
      r |= uint32_t(a_bits[row * 16 + col]) << (16 * half);
    }
    a[reg] = r;
  }
  for (int reg = 0; reg < 2; ++reg) {
    uint32_t r = 0;
    for (int half = 0; half < 2; ++half) {
      const int i = 2 * reg + half;
      const int row = 2 * tid + (i & 1) + (i >= 2 ? 8 : 0);
      r |= uint32_t(b_bits[row * 8 + group]) << (16 * half);
    }
    b[reg] = r;
  }
  float acc[4];
  for (int i = 0; i < 4; ++i) acc[i] = c[(group + (i >= 2 ? 8 : 0)) * 8 + 2 * tid + (i & 1)];
  nuq::cuda::detail::mma_16816<BF16>(acc, a, b);
  for (int i = 0; i < 4; ++i) d[(group + (i >= 2 ? 8 : 0)) * 8 + 2 * tid + (i & 1)] = acc[i];
}

template <bool BF16>
void check_mma() {
  std::mt19937 rng(BF16 ? 2 : 1);
  std::normal_distribution<float> normal;
  std::vector<uint16_t> a(256), b(128);
  std::vector<float> af(256), bf(128), c(128);
  auto round = [](float v, uint16_t& bits) {
    bits = BF16 ? nuq::float_to_bf16(v) : nuq::float_to_fp16(v);
    return BF16 ? nuq::bf16_to_float(bits) : nuq::fp16_to_float(bits);
  };
  for (int i = 0; i < 256; ++i) af[i] = round(normal(rng), a[i]);
  for (int i = 0; i < 128; ++i) bf[i] = round(normal(rng), b[i]);
  for (auto& v : c) v = normal(rng);
  uint16_t *da = nullptr, *db = nullptr;
  float *dc = nullptr, *dd = nullptr;
  ASSERT_EQ(cudaMalloc(&da, 512), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&db, 256), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&dc, 512), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&dd, 512), cudaSuccess);
  cudaMemcpy(da, a.data(), 512, cudaMemcpyHostToDevice);
  cudaMemcpy(db, b.data(), 256, cudaMemcpyHostToDevice);
  cudaMemcpy(dc, c.data(), 512, cudaMemcpyHostToDevice);
  ASSERT_TRUE(launch("mma", mma_kernel<BF16>, 1, 32, 0, nullptr, da, db, dc, dd).ok());
  std::vector<float> d(128);
  cudaMemcpy(d.data(), dd, 512, cudaMemcpyDeviceToHost);
  for (int row = 0; row < 16; ++row)
    for (int col = 0; col < 8; ++col) {
      double want = c[row * 8 + col], scale = std::fabs(want);
      for (int k = 0; k < 16; ++k) {
        want += double(af[row * 16 + k]) * bf[k * 8 + col];
        scale += std::fabs(double(af[row * 16 + k]) * bf[k * 8 + col]);
      }
      // Products of 16-bit inputs are exact in fp32; 17 additions in fp32 round within 17·2^-24 of the sum.
      EXPECT_NEAR(d[row * 8 + col], want, 17 * std::ldexp(scale, -24)) << "row " << row << " col " << col;
    }
  for (void* p : {static_cast<void*>(da), static_cast<void*>(db), static_cast<void*>(dc), static_cast<void*>(dd)})
    cudaFree(p);
}

TEST(CudaEmulation, MmaFollowsThePtxFragmentTables) {
  check_mma<false>();
  check_mma<true>();
}

// ldmatrix.m8n8.x4 from shared memory against the PTX ISA's description ("Warp-level matrix load
// instruction: ldmatrix"), transcribed here independently of the emulation: threads 8i..8i+7 give the
// addresses of matrix i's rows; thread 4g + t receives, of matrix i, elements 2t and 2t + 1 of row g, or
// with .trans elements [2t][g] and [2t + 1][g]. Rows are 16 bytes apart by a stride of 40 halves here, and
// the matrices sit at scattered offsets, so a wrong row or lane shows.
template <bool TRANS>
__global__ void ldmatrix_kernel(uint32_t* out) {
  uint16_t* tile = nuq::cuda::detail::dynamic_shared<uint16_t>();
  const int lane = int(threadIdx.x);
  for (int e = lane; e < 32 * 40; e += 32) tile[e] = uint16_t(e);
  __syncwarp();
  // Matrix i's rows start at row 8i (lanes 8i..8i+7), column 8 (i % 2) + 16.
  uint32_t r[4];
  nuq::cuda::detail::ldmatrix<4, TRANS>(r, tile + lane * 40 + 8 * (lane / 8 % 2) + 16);
  for (int i = 0; i < 4; ++i) out[lane * 4 + i] = r[i];
}

template <bool TRANS>
void check_ldmatrix() {
  uint32_t* d = nullptr;
  ASSERT_EQ(cudaMalloc(&d, 32 * 4 * 4), cudaSuccess);
  ASSERT_TRUE(launch("ldmatrix", ldmatrix_kernel<TRANS>, 1, 32, 32 * 40 * 2, nullptr, d).ok());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<uint32_t> got(32 * 4);
  cudaMemcpy(got.data(), d, got.size() * 4, cudaMemcpyDeviceToHost);
  cudaFree(d);
  auto element = [](int i, int row, int col) { return uint32_t((8 * i + row) * 40 + 8 * (i % 2) + 16 + col); };
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 4; ++i) {
      const int g = lane / 4, t = lane % 4;
      const uint32_t lo = TRANS ? element(i, 2 * t, g) : element(i, g, 2 * t);
      const uint32_t hi = TRANS ? element(i, 2 * t + 1, g) : element(i, g, 2 * t + 1);
      EXPECT_EQ(got[size_t(lane * 4 + i)], lo | hi << 16) << "lane " << lane << " matrix " << i << (TRANS ? " trans" : "");
    }
}

TEST(CudaEmulation, LdmatrixFollowsThePtxFragmentLayout) {
  check_ldmatrix<false>();
  check_ldmatrix<true>();
}

// movmatrix.m8n8.trans: lane 4g + t holds row g's elements 2t, 2t + 1 of M (here M[r][c] = 8r + c) and
// receives row g of M^T, i.e. M[2t][g] and M[2t + 1][g].
__global__ void movmatrix_kernel(uint32_t* out) {
  const uint32_t lane = threadIdx.x, g = lane / 4, t = lane % 4;
  out[lane] = nuq::cuda::detail::movmatrix_trans((8 * g + 2 * t) | (8 * g + 2 * t + 1) << 16);
}

TEST(CudaEmulation, MovmatrixTransposesTheFragment) {
  uint32_t* d = nullptr;
  ASSERT_EQ(cudaMalloc(&d, 32 * 4), cudaSuccess);
  ASSERT_TRUE(launch("movmatrix", movmatrix_kernel, 1, 32, 0, nullptr, d).ok());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<uint32_t> got(32);
  cudaMemcpy(got.data(), d, got.size() * 4, cudaMemcpyDeviceToHost);
  cudaFree(d);
  for (uint32_t lane = 0; lane < 32; ++lane) {
    const uint32_t g = lane / 4, t = lane % 4;
    EXPECT_EQ(got[lane], (8 * (2 * t) + g) | (8 * (2 * t + 1) + g) << 16) << "lane " << lane;
  }
}

}  // namespace
