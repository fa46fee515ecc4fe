// The CUDA runtime as kernels/*.cu and the CUDA tests use it, implemented on the HIP CPU Runtime's
// execution engine (ROCm/HIP-CPU, header-only: a block's threads run as fibers, blocks in parallel on
// TBB; launches are synchronous, see "errors, devices" below). Built only
// with NUQ_CUDA=EMULATED, so that every CUDA kernel runs against its CPU reference on machines without a
// GPU. The stand-in headers beside this one (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h, cublas_v2.h)
// include it; nothing under kernels/ knows which runtime it is compiled against, beyond
// kernels/portable.cuh.
//
// What an emulated run proves and what it cannot (races, the memory model, timing, register and
// shared-memory limits) is in docs/cuda-kernels.md, "Emulated runs". Rules enforced here, loudly (a
// message naming the operation, then abort), because a GPU would misbehave silently:
//   - warp operations take the full mask 0xffffffff and run in blocks of whole 32-thread warps;
//   - dynamic shared memory above 48 KiB needs cudaFuncSetAttribute, as on a GPU;
//   - a zero-sized grid or block, or more than 1024 threads per block, fail the launch.
// HIP-CPU's own limit: every warp operation and barrier is a block-wide yield point, so all threads of
// a block must execute the same sequence of them (a GPU allows warps to diverge here). Kernels are
// written so; a kernel that breaks the rule desynchronizes and fails its test.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

// Fiber stacks. HIP-CPU asks libco for 7 KiB stacks (hip/detail/tile.hpp), too small for kernels with
// register arrays once compiled without optimization or with sanitizers, and an overflow would silently
// corrupt the heap below the stack. libco's allocation hook is the one place where the size can be
// changed without patching the runtime: it receives co_create's `size` parameter, which co_create then
// passes on to co_derive, so assigning to it here gives every fiber a larger stack.
#define NUQ_EMULATION_FIBER_STACK_BYTES (512u * 1024u)
#define LIBCO_MALLOC(size) ::std::malloc((size) = NUQ_EMULATION_FIBER_STACK_BYTES)
#define LIBCO_FREE ::std::free

#include <hip/hip_runtime.h>

// HIP-CPU marks every __global__ and __device__ function for GCC as `simd` (vector clones) and kernels
// as `flatten`: neither helps code that fibers run one thread at a time, and both slow the build.
#undef __global__
#define __global__
#undef __device__
#define __device__

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <limits>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace nuq_emulation {

[[noreturn]] inline void refuse(const char* what) {
  std::fprintf(stderr, "CUDA emulation (HIP CPU Runtime): %s\n", what);
  std::fflush(stderr);
  std::abort();
}

inline constexpr int kWarp = 32;
inline constexpr std::size_t kDefaultDynamicSharedLimit = 48 * 1024;

inline unsigned threads_per_block() { return unsigned(blockDim.x) * unsigned(blockDim.y) * unsigned(blockDim.z); }

// CUDA's linear thread index (x fastest): warps are 32 consecutive ones. HIP-CPU numbers its fibers in
// another order for 2-D and 3-D blocks, so warp membership is computed from this, never from fiber ids.
// Each threadIdx.x / blockDim.x look the fiber and the block up again (thread-local lookups, ~30% of
// an emulated GEMV under the sanitizers when made five times per call), so both are read once.
inline unsigned linear_thread() {
  const auto thread = ::hip::detail::TIdx::call(), block = ::hip::detail::BDim::call();
  return unsigned(thread.x) + unsigned(block.x) * (unsigned(thread.y) + unsigned(block.y) * unsigned(thread.z));
}

inline void check_warp_op(unsigned mask, int width, const char* op) {
  if (mask != 0xffffffffu) {
    char message[160];
    std::snprintf(message, sizeof message, "%s with mask 0x%08x: only full-warp masks are emulated", op, mask);
    refuse(message);
  }
  if (width <= 0 || width > kWarp || (width & (width - 1)) != 0) refuse("a warp operation with a width that is not a power of two up to 32");
  if (threads_per_block() % kWarp != 0) refuse("a warp operation in a block that is not made of whole 32-thread warps");
}

// Dynamic shared memory of the block running on this OS thread: exactly the launch's size, so that
// AddressSanitizer sees any access past its end, and filled with 0xFF bytes (a NaN for every float
// type) whenever a new block starts, so that reading what no thread wrote shows up in the results.
struct DynamicShared {
  std::unique_ptr<unsigned char[]> bytes;
  std::size_t size = 0;
  std::uint64_t owner_launch = 0;
  unsigned owner_block[3] = {~0u, ~0u, ~0u};
};
inline thread_local DynamicShared dynamic_shared_state;
inline thread_local std::uint64_t running_launch = 0;
inline std::atomic<std::uint64_t> launch_counter{0};

inline void* dynamic_shared_memory() {
  DynamicShared& s = dynamic_shared_state;
  const std::size_t size = scratchpad_size(domain(::hip::detail::Tile::this_tile()));
  const unsigned block[3] = {unsigned(blockIdx.x), unsigned(blockIdx.y), unsigned(blockIdx.z)};
  const bool new_block = s.owner_launch != running_launch || !std::equal(block, block + 3, s.owner_block);
  if (!new_block) return s.bytes.get();
  if (size != s.size) {
    s.bytes = size ? std::make_unique<unsigned char[]>(size) : nullptr;
    s.size = size;
  }
  if (size) std::memset(s.bytes.get(), 0xFF, size);
  s.owner_launch = running_launch;
  std::copy(block, block + 3, s.owner_block);
  return s.bytes.get();
}

}  // namespace nuq_emulation

// ---- errors, devices ------------------------------------------------------------------------------
//
// Only HIP-CPU's execution engine is used (tiles of fibers, blocks on TBB). Its streams are not: a
// launch runs the whole grid before cudaLaunchKernelEx returns, and copies happen at once. HIP-CPU's
// stream processor (a background thread over a flat combiner) gave nondeterministic results under
// AddressSanitizer, work of one stream overlapping the next task; a synchronous schedule is one of the
// schedules a GPU may choose, so kernels that are right under it are right in stream order too. What
// it cannot show is a missing stream synchronization (docs/cuda-kernels.md, "Emulated runs").

using cudaError_t = hipError_t;
inline constexpr cudaError_t cudaSuccess = hipSuccess;
inline constexpr cudaError_t cudaErrorInvalidValue = hipErrorInvalidValue;
inline constexpr cudaError_t cudaErrorInvalidConfiguration = hipErrorInvalidConfiguration;
inline constexpr cudaError_t cudaErrorInvalidDevice = hipErrorInvalidDevice;
inline constexpr cudaError_t cudaErrorNoDevice = hipErrorNoDevice;
inline constexpr cudaError_t cudaErrorMemoryAllocation = hipErrorOutOfMemory;

namespace nuq_emulation {
inline thread_local cudaError_t last_error = cudaSuccess;
// Records a failed call for cudaGetLastError, as the CUDA runtime does, and returns its status.
inline cudaError_t record(cudaError_t e) {
  if (e != cudaSuccess) last_error = e;
  return e;
}
}  // namespace nuq_emulation

inline const char* cudaGetErrorString(cudaError_t e) { return hipGetErrorString(e); }
inline const char* cudaGetErrorName(cudaError_t e) { return hipGetErrorName(e); }
inline cudaError_t cudaGetLastError() { return std::exchange(nuq_emulation::last_error, cudaSuccess); }
inline cudaError_t cudaPeekAtLastError() { return nuq_emulation::last_error; }

// One emulated device, number 0.
inline cudaError_t cudaGetDeviceCount(int* n) {
  if (!n) return nuq_emulation::record(cudaErrorInvalidValue);
  *n = 1;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int d) { return nuq_emulation::record(d == 0 ? cudaSuccess : cudaErrorInvalidDevice); }
inline cudaError_t cudaGetDevice(int* d) {
  if (!d) return nuq_emulation::record(cudaErrorInvalidValue);
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }  // every launch has completed already

// The fields nuq reads; the name says where the kernels ran, so that no report can mistake an emulated
// run for a GPU run.
struct cudaDeviceProp {
  char name[256];
  std::size_t totalGlobalMem;
  std::size_t sharedMemPerBlock;
  int multiProcessorCount;
  int l2CacheSize;
  int warpSize;
  int maxThreadsPerBlock;
  int major, minor;
};
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int device) {
  hipDeviceProp_t h{};
  if (const hipError_t e = hipGetDeviceProperties(&h, device); e != hipSuccess) return nuq_emulation::record(e);
  *p = cudaDeviceProp{};
  std::snprintf(p->name, sizeof p->name, "emulated on the CPU by the HIP CPU Runtime (%.180s)", h.name);
  p->totalGlobalMem = h.totalGlobalMem;
  p->sharedMemPerBlock = nuq_emulation::kDefaultDynamicSharedLimit;
  p->multiProcessorCount = h.multiProcessorCount;
  p->l2CacheSize = h.l2CacheSize;
  p->warpSize = nuq_emulation::kWarp;
  p->maxThreadsPerBlock = 1024;
  p->major = 9;
  p->minor = 0;
  return cudaSuccess;
}

enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrL2CacheSize = 89 };
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  cudaDeviceProp p;
  if (const cudaError_t e = cudaGetDeviceProperties(&p, device); e != cudaSuccess) return e;
  *value = attr == cudaDevAttrL2CacheSize ? p.l2CacheSize : p.multiProcessorCount;
  return cudaSuccess;
}

// ---- memory --------------------------------------------------------------------------------------

enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};

// Device memory is host memory of exactly the requested size (AddressSanitizer sees overruns).
inline cudaError_t cudaMalloc(void** p, std::size_t bytes) {
  if (!p) return nuq_emulation::record(cudaErrorInvalidValue);
  *p = std::malloc(bytes ? bytes : 1);
  return nuq_emulation::record(*p ? cudaSuccess : cudaErrorMemoryAllocation);
}
template <class T>
cudaError_t cudaMalloc(T** p, std::size_t bytes) {
  return cudaMalloc(reinterpret_cast<void**>(p), bytes);
}
inline cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaMemGetInfo(std::size_t* free_bytes, std::size_t* total_bytes) {
  return nuq_emulation::record(hipMemGetInfo(free_bytes, total_bytes));
}

// ---- streams and events --------------------------------------------------------------------------

// The opaque types of the CUDA headers (and of include/nuq/cuda.hpp), defined here: a stream is only an
// identity (work on it has completed when the call that queued it returns); an event holds the host
// time at which it was recorded.
struct CUstream_st {
  int unused = 0;
};
struct CUevent_st {
  std::chrono::steady_clock::time_point at{};
};
typedef struct CUstream_st* cudaStream_t;
typedef struct CUevent_st* cudaEvent_t;
inline constexpr unsigned cudaStreamDefault = 0, cudaStreamNonBlocking = 1;

inline cudaError_t cudaStreamCreate(cudaStream_t* s) {
  if (!s) return nuq_emulation::record(cudaErrorInvalidValue);
  *s = new CUstream_st{};
  return cudaSuccess;
}
inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned /*flags*/) { return cudaStreamCreate(s); }
inline cudaError_t cudaStreamDestroy(cudaStream_t s) {
  delete s;
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

inline cudaError_t cudaMemcpy(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind) {
  if (bytes == 0) return cudaSuccess;
  if (!dst || !src || unsigned(kind) > 4) return nuq_emulation::record(cudaErrorInvalidValue);
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind,
                                   cudaStream_t = nullptr) {
  return cudaMemcpy(dst, src, bytes, kind);
}
inline cudaError_t cudaMemset(void* dst, int value, std::size_t bytes) {
  if (bytes == 0) return cudaSuccess;
  if (!dst) return nuq_emulation::record(cudaErrorInvalidValue);
  std::memset(dst, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* dst, int value, std::size_t bytes, cudaStream_t = nullptr) {
  return cudaMemset(dst, value, bytes);
}

inline cudaError_t cudaEventCreate(cudaEvent_t* e) {
  if (!e) return nuq_emulation::record(cudaErrorInvalidValue);
  *e = new CUevent_st{};
  return cudaSuccess;
}
inline cudaError_t cudaEventDestroy(cudaEvent_t e) {
  delete e;
  return cudaSuccess;
}
inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t = nullptr) {
  if (!e) return nuq_emulation::record(cudaErrorInvalidValue);
  e->at = std::chrono::steady_clock::now();
  return cudaSuccess;
}
inline cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
inline cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t a, cudaEvent_t b) {
  if (!ms || !a || !b) return nuq_emulation::record(cudaErrorInvalidValue);
  *ms = std::chrono::duration<float, std::milli>(b->at - a->at).count();
  return cudaSuccess;
}

// ---- launches ------------------------------------------------------------------------------------

enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace nuq_emulation {
// Per kernel: the dynamic shared memory it was allowed with cudaFuncSetAttribute.
struct FuncLimits {
  const void* kernel;
  std::size_t max_dynamic_shared;
};
inline std::vector<FuncLimits>& func_limits() {
  static std::vector<FuncLimits> limits;
  return limits;
}
inline std::size_t dynamic_shared_limit(const void* kernel) {
  for (const FuncLimits& l : func_limits())
    if (l.kernel == kernel) return l.max_dynamic_shared;
  return kDefaultDynamicSharedLimit;
}

// Runs the grid on HIP-CPU's engine, as its own launch task does, but on the calling thread: blocks in
// parallel on TBB, a block's threads as fibers when the kernel synchronizes.
template <class F, class Tuple>
void run_grid(dim3 grid, dim3 block, std::size_t shared_bytes, const F& fn, const Tuple& args) {
  struct {
    const F* fn_;
    const Tuple* args_;
    void operator()() const noexcept { std::apply(*fn_, *args_); }
  } body{&fn, &args};
  const ::hip::detail::Tiled_domain domain{block, grid, std::uint32_t(shared_bytes), std::move(body)};
  for_each_tile(domain, fn, args);
}
}  // namespace nuq_emulation

template <class... Params>
cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attr, int value) {
  // An H100 allows 227 KiB per block.
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > 227 * 1024)
    return nuq_emulation::record(cudaErrorInvalidValue);
  auto& limits = nuq_emulation::func_limits();
  const void* key = reinterpret_cast<const void*>(kernel);
  for (auto& l : limits)
    if (l.kernel == key) return l.max_dynamic_shared = std::size_t(value), cudaSuccess;
  limits.push_back({key, std::size_t(value)});
  return cudaSuccess;
}

struct cudaLaunchConfig_t {
  dim3 gridDim;
  dim3 blockDim;
  std::size_t dynamicSmemBytes = 0;
  cudaStream_t stream = nullptr;
  void* attrs = nullptr;
  unsigned numAttrs = 0;
};

// As the CUDA runtime's template of the same name: arguments are converted to the kernel's parameter
// types at the call (kernels take their parameters by value); the grid then runs to completion.
template <class... Params, class... Args>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(Params...), Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "cudaLaunchKernelEx: wrong number of kernel arguments");
  using nuq_emulation::record;
  const dim3 g = config->gridDim, b = config->blockDim;
  if (g.x == 0 || g.y == 0 || g.z == 0 || b.x == 0 || b.y == 0 || b.z == 0) return record(cudaErrorInvalidConfiguration);
  if (std::uint64_t(b.x) * b.y * b.z > 1024 || b.z > 64 || g.y > 65535 || g.z > 65535)
    return record(cudaErrorInvalidConfiguration);
  if (config->numAttrs != 0) return record(cudaErrorInvalidValue);  // no launch attribute is emulated
  if (config->dynamicSmemBytes > nuq_emulation::dynamic_shared_limit(reinterpret_cast<const void*>(kernel)))
    return record(cudaErrorInvalidValue);
  const std::uint64_t id = ++nuq_emulation::launch_counter;
  const auto body = [kernel, id](auto&&... xs) noexcept {
    nuq_emulation::running_launch = id;
    kernel(xs...);
  };
  nuq_emulation::run_grid(g, b, config->dynamicSmemBytes, body, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...));
  return cudaSuccess;
}

// ---- device functions ----------------------------------------------------------------------------

namespace nuq_emulation {
inline void block_barrier() { ::hip::detail::Tile::this_tile().barrier(); }

// Which of two scratch buffers this thread's next warp operation uses. Alternating lets one barrier per
// operation suffice: a thread writes buffer p only after the barrier of the operation before, which
// every thread reaches only once it has read buffer p for the operation before that. All lanes of a
// warp run the same warp operations, so they agree on the parity. Threads of a block share this OS
// thread, so thread_local arrays indexed by the thread are block-shared.
inline unsigned next_parity() {
  thread_local unsigned counts[1024];
  return counts[linear_thread()]++ & 1u;
}

// The one mechanism of every warp operation that moves data between lanes: each thread of the block
// publishes v, and after one barrier reads the block's values (indexed by linear thread) from the
// returned buffer, until its next warp operation.
template <class T>
const T* publish(T v) {
  thread_local std::unique_ptr<T[]> slots = std::make_unique<T[]>(2 * 1024);
  T* buffer = slots.get() + 1024 * next_parity();
  buffer[linear_thread()] = v;
  block_barrier();
  return buffer;
}

// One warp-wide exchange: the value of thread `source` (the caller's own when source < 0). HIP-CPU's own
// shuffles are not used: __shfl and __shfl_down compare the absolute slot with the width, which returns
// the caller's value on lanes 32-63 of its 64-wide groups.
template <class T>
T exchange(T v, long source) {
  const T* values = publish(v);
  return source < 0 ? v : values[std::size_t(source)];
}
// Lane `lane` of the caller's warp, or -1 for "keep your own value".
inline long warp_thread(int lane) { return lane < 0 ? -1 : long(linear_thread() / kWarp * kWarp + unsigned(lane)); }
inline int lane_id() { return int(linear_thread() % kWarp); }
}  // namespace nuq_emulation

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  nuq_emulation::check_warp_op(mask, nuq_emulation::kWarp, "__syncwarp");
  // HIP-CPU has no warp barrier; a block barrier orders this warp's lanes as well.
  nuq_emulation::block_barrier();
}

// Lane arithmetic as the CUDA Programming Guide defines it for each shuffle, per segment of `width`
// lanes.
template <class T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  nuq_emulation::check_warp_op(mask, width, "__shfl_sync");
  const int lane = nuq_emulation::lane_id();
  return nuq_emulation::exchange(v, nuq_emulation::warp_thread(lane / width * width + (src_lane & (width - 1))));
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  nuq_emulation::check_warp_op(mask, width, "__shfl_xor_sync");
  const int lane = nuq_emulation::lane_id(), src = lane ^ lane_mask;
  // A later segment is out of reach: the caller keeps its value.
  return nuq_emulation::exchange(v, nuq_emulation::warp_thread(src >= (lane / width + 1) * width ? -1 : src & 31));
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  nuq_emulation::check_warp_op(mask, width, "__shfl_down_sync");
  const int lane = nuq_emulation::lane_id();
  const bool inside = lane % width + int(delta) < width;
  return nuq_emulation::exchange(v, nuq_emulation::warp_thread(inside ? lane + int(delta) : -1));
}
template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  nuq_emulation::check_warp_op(mask, width, "__shfl_up_sync");
  const int lane = nuq_emulation::lane_id();
  const bool inside = lane % width >= int(delta);
  return nuq_emulation::exchange(v, nuq_emulation::warp_thread(inside ? lane - int(delta) : -1));
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  nuq_emulation::check_warp_op(mask, nuq_emulation::kWarp, "__ballot_sync");
  const unsigned me = nuq_emulation::linear_thread(), first = me / nuq_emulation::kWarp * nuq_emulation::kWarp;
  const unsigned char* buffer = nuq_emulation::publish<unsigned char>(predicate != 0);
  unsigned bits = 0;
  for (int lane = 0; lane < nuq_emulation::kWarp; ++lane) bits |= unsigned(buffer[first + unsigned(lane)]) << lane;
  return bits;
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) == 0xffffffffu; }

// ---- tensor cores ---------------------------------------------------------------------------------

namespace nuq_emulation {
inline float bits16_to_float(std::uint16_t h, bool bf16) {
  if (bf16) {
    const std::uint32_t u = std::uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  return __half2float(__ushort_as_half(h));
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: the warp's fragments are gathered into whole
// matrices by the PTX ISA's fragment table (kernels/portable.cuh repeats it), every lane computes its
// four outputs. The 16 products of fp16/bf16 inputs are exact in double (11- or 8-bit significands)
// and are summed with the accumulator in double, rounded once to fp32: tensor cores also form exact
// products and add them in an unspecified order and width, and tests state tolerances that cover it.
// (std::fma per product, as before, ran ~40% of the sanitizer build's CUDA linear test in libm calls.)
inline void mma_m16n8k16(bool bf16, float (&d)[4], const std::uint32_t (&a)[4], const std::uint32_t (&b)[2]) {
  check_warp_op(0xffffffffu, kWarp, "mma.sync.m16n8k16");
  struct Tiles {
    float A[16][16];
    float B[16][8];
  };
  // Two per warp, alternating as next_parity() explains.
  thread_local std::unique_ptr<Tiles[]> tiles = std::make_unique<Tiles[]>(2 * 1024 / kWarp);
  const unsigned me = linear_thread();
  Tiles& m = tiles[2 * (me / kWarp) + next_parity()];
  const int lane = int(me % kWarp), g = lane / 4, t = lane % 4;
  for (int r = 0; r < 4; ++r) {
    const int row = g + 8 * (r & 1), col = 2 * t + 8 * (r >> 1);
    m.A[row][col] = bits16_to_float(std::uint16_t(a[r]), bf16);
    m.A[row][col + 1] = bits16_to_float(std::uint16_t(a[r] >> 16), bf16);
  }
  for (int r = 0; r < 2; ++r) {
    const int k = 2 * t + 8 * r;
    m.B[k][g] = bits16_to_float(std::uint16_t(b[r]), bf16);
    m.B[k + 1][g] = bits16_to_float(std::uint16_t(b[r] >> 16), bf16);
  }
  block_barrier();
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
    double acc = d[i];
    for (int k = 0; k < 16; ++k) acc += double(m.A[row][k]) * double(m.B[k][col]);
    d[i] = float(acc);
  }
}

// ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16 as the PTX ISA lays it out: lanes 8i..8i+7 give
// the addresses of matrix i's eight rows (16 bytes each); lane 4g + t receives halves 2t, 2t + 1 of
// matrix i's row g, or with .trans half g of rows 2t and 2t + 1 (the transposed matrix's row g). One
// publish of the row addresses (one barrier), then plain loads.
inline void ldmatrix(bool trans, int count, std::uint32_t* r, const void* row) {
  check_warp_op(0xffffffffu, kWarp, "ldmatrix");
  using Row = const unsigned char*;
  const unsigned me = linear_thread(), first = me / kWarp * kWarp;
  const Row* rows = publish(static_cast<Row>(row));
  const unsigned lane = me % kWarp, g = lane / 4, t = lane % 4;
  for (int i = 0; i < count; ++i) {
    const unsigned m = first + 8 * unsigned(i);
    if (!trans) {
      std::memcpy(&r[i], rows[m + g] + 4 * t, 4);
    } else {
      std::uint16_t lo, hi;
      std::memcpy(&lo, rows[m + 2 * t] + 2 * g, 2);
      std::memcpy(&hi, rows[m + 2 * t + 1] + 2 * g, 2);
      r[i] = std::uint32_t(lo) | std::uint32_t(hi) << 16;
    }
  }
}

// movmatrix.sync.aligned.m8n8.trans.b16: lane 4g + t holds halves 2t, 2t + 1 of row g of an 8x8 matrix and
// receives those of the transpose: M[2t][g] (lane 8t + g/2, half g % 2) and M[2t + 1][g] (lane 8t + 4 + g/2).
inline std::uint32_t movmatrix_trans(std::uint32_t x) {
  check_warp_op(0xffffffffu, kWarp, "movmatrix");
  const unsigned me = linear_thread(), first = me / kWarp * kWarp;
  const std::uint32_t* buffer = publish(x);
  const unsigned lane = me % kWarp, g = lane / 4, t = lane % 4;
  const std::uint32_t lo = buffer[first + 8 * t + g / 2] >> (16 * (g % 2)) & 0xffffu;
  const std::uint32_t hi = buffer[first + 8 * t + 4 + g / 2] >> (16 * (g % 2)) & 0xffffu;
  return lo | hi << 16;
}
}  // namespace nuq_emulation

template <class T>
T __ldg(const T* p) {
  return *p;
}

// Fast-math intrinsics. A GPU computes these with small documented errors (e.g. __expf within 2 + 1.5·|x|
// ulp); the emulation computes them exactly, so tests must state a tolerance that covers the GPU's.
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline void __sincosf(float x, float* s, float* c) {
  *s = std::sin(x);
  *c = std::cos(x);
}
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : (x == x ? x : 0.0f)); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float exp2f(float x) { return std::exp2(x); }

inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline int __float_as_int(float f) { return int(__float_as_uint(f)); }
inline float __int_as_float(int i) { return __uint_as_float(unsigned(i)); }

// PTX prmt in its default mode: byte i of the result is byte s_i (selector nibble i, low 3 bits) of the
// eight bytes {y, x}; bit 3 of the nibble replicates that byte's sign bit instead.
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const std::uint64_t bytes = std::uint64_t(y) << 32 | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) {
    const unsigned sel = (s >> (4 * i)) & 15u;
    unsigned byte = unsigned(bytes >> (8 * (sel & 7u))) & 0xFFu;
    if (sel & 8u) byte = (byte & 0x80u) ? 0xFFu : 0u;
    r |= byte << (8 * i);
  }
  return r;
}
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned shift) {
  const std::uint64_t v = std::uint64_t(hi) << 32 | lo;
  return unsigned((v << (shift & 31u)) >> 32);
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
  const std::uint64_t v = std::uint64_t(hi) << 32 | lo;
  return unsigned(v >> (shift & 31u));
}

// CUDA's global min/max overloads for integers (floats use fminf/fmaxf).
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }

static_assert(sizeof(uint2) == 8 && sizeof(uint4) == 16 && sizeof(float2) == 8 && sizeof(float4) == 16,
              "HIP-CPU vector types must have CUDA's sizes for reinterpret_cast loads");
