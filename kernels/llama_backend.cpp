// nuq::cuda::make_linear_backend (include/nuq/llama_cuda.hpp). Host code over the CUDA runtime and the
// launchers of linear.cu; compiled by the host compiler so that it can report errors through nuq::Error.
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <string>
#include <vector>

#include "nuq/error.hpp"
#include "nuq/half.hpp"
#include "nuq/llama_cuda.hpp"

namespace nuq::cuda {
namespace {

void check_cuda(cudaError_t e, const char* what) {
  NUQ_CHECK(e == cudaSuccess, Errc::io, "CUDA linear backend: {} failed: {}", what, cudaGetErrorString(e));
}

// One device allocation, freed with its owner.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (ptr_) cudaFree(ptr_);
  }
  // Grows to at least `bytes` (contents are not kept).
  void reserve(std::size_t bytes, const char* what) {
    if (bytes <= bytes_) return;
    if (ptr_) cudaFree(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
    check_cuda(cudaMalloc(&ptr_, bytes), what);
    bytes_ = bytes;
  }
  void upload(const void* host, std::size_t bytes, const char* what) {
    reserve(bytes, what);
    check_cuda(cudaMemcpy(ptr_, host, bytes, cudaMemcpyHostToDevice), what);
  }
  void* get() const { return ptr_; }
  std::size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  std::size_t bytes_ = 0;
};

struct DeviceLayer {
  std::string name;
  format::PackedLinearView view;  // device pointers into the buffers below
  DeviceBuffer qweight, lut, row_ptr, col_idx, values;
};

// Even leading dimensions: the kernels load and store pairs of activations.
int64_t even(int64_t n) { return n + (n & 1); }

class CudaLinearBackend final : public LinearBackend {
 public:
  CudaLinearBackend(ActivationType type, int device) : type_(type), device_(device) {
    const int n = device_count();
    NUQ_CHECK(device >= 0 && device < n, Errc::unsupported,
              "CUDA linear backend: no CUDA device {} ({} visible); run on the CPU instead", device, n);
    check_cuda(cudaSetDevice(device), "cudaSetDevice");
    cudaDeviceProp prop{};
    check_cuda(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
    description_ = "CUDA device " + std::to_string(device) + " (" + prop.name + "), " +
                   (type == ActivationType::f16 ? "fp16" : "bf16") + " activations";
    check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    if (cublasCreate(&blas_) != CUBLAS_STATUS_SUCCESS) {
      cudaStreamDestroy(stream_);  // a throwing constructor runs no destructor
      fail(Errc::io, "CUDA linear backend: cublasCreate failed");
    }
  }
  ~CudaLinearBackend() override {
    if (blas_) cublasDestroy(blas_);
    if (stream_) cudaStreamDestroy(stream_);
  }

  std::string description() const override { return description_; }

  int64_t add_layer(const std::string& name, const format::PackedLinearView& w) override {
    std::lock_guard lock(mutex_);
    check_cuda(cudaSetDevice(device_), "cudaSetDevice");
    // Added to layers_ only once it is complete: a failed upload leaves no half-copied layer behind.
    auto owned = std::make_unique<DeviceLayer>();
    DeviceLayer& l = *owned;
    l.name = name;
    l.view = w;
    const std::size_t entries = std::size_t(w.rows * w.groups()) << w.bits;
    l.qweight.upload(w.qweight, std::size_t(w.rows * w.row_stride()), "copying qweight to the device");
    l.lut.upload(w.lut, entries * 2, "copying the codebooks to the device");
    l.view.qweight = static_cast<const uint8_t*>(l.qweight.get());
    l.view.lut = static_cast<const uint16_t*>(l.lut.get());
    if (w.nnz > 0) {
      const std::size_t idx_bytes = format::sparse_cols_are_u16(w.cols) ? 2 : 4;
      l.row_ptr.upload(w.sparse_row_ptr, std::size_t(w.rows + 1) * 4, "copying the sparse part to the device");
      l.col_idx.upload(w.sparse_col_idx, std::size_t(w.nnz) * idx_bytes, "copying the sparse part to the device");
      l.values.upload(w.sparse_values, std::size_t(w.nnz) * 2, "copying the sparse part to the device");
      l.view.sparse_row_ptr = static_cast<const int32_t*>(l.row_ptr.get());
      l.view.sparse_col_idx = l.col_idx.get();
      l.view.sparse_values = static_cast<const uint16_t*>(l.values.get());
    }
    // Refuse at load what the kernels cannot run, not at the first token.
    reserve_activations(l.view, 1);
    const Status s = can_implement_linear(l.view, x_dev_.get(), even(w.cols), y_dev_.get(), even(w.rows), 1);
    NUQ_CHECK(s.ok(), Errc::unsupported, "layer '{}': the CUDA kernels cannot run it: {}", name, s.message);
    layers_.push_back(std::move(owned));
    return int64_t(layers_.size()) - 1;
  }

  void run(int64_t id, const float* x, int64_t n, float* y) override {
    std::lock_guard lock(mutex_);
    NUQ_CHECK(id >= 0 && id < int64_t(layers_.size()), Errc::invalid_argument,
              "CUDA linear backend: no layer {} ({} added)", id, layers_.size());
    NUQ_CHECK(n > 0, Errc::invalid_argument, "CUDA linear backend: {} tokens", n);
    check_cuda(cudaSetDevice(device_), "cudaSetDevice");
    const DeviceLayer& l = *layers_[std::size_t(id)];
    const int64_t rows = l.view.rows, cols = l.view.cols, ldx = even(cols), ldy = even(rows);
    reserve_activations(l.view, n);

    // fp16 overflows at 65504: say so (and where) instead of returning infinities. bf16 cannot overflow
    // from finite fp32 values.
    x_host_.assign(std::size_t(n * ldx), 0);
    for (int64_t t = 0; t < n; ++t)
      for (int64_t c = 0; c < cols; ++c) {
        const float v = x[t * cols + c];
        NUQ_CHECK(std::isfinite(v), Errc::invalid_argument, "layer '{}': input {} of token {} is {}", l.name, c, t, v);
        if (type_ == ActivationType::f16)
          NUQ_CHECK(std::fabs(v) <= 65504.0f, Errc::unsupported,
                    "layer '{}': input {} of token {} is {}, beyond fp16's range; use bf16 activations", l.name, c,
                    t, v);
        x_host_[std::size_t(t * ldx + c)] = type_ == ActivationType::f16 ? float_to_fp16(v) : float_to_bf16(v);
      }
    check_cuda(cudaMemcpyAsync(x_dev_.get(), x_host_.data(), x_host_.size() * 2, cudaMemcpyHostToDevice, stream_),
               "copying activations to the device");
    const std::size_t ws = linear_workspace_bytes(l.view, n);
    if (ws > 0) workspace_.reserve(ws, "allocating the prefill workspace");
    const Status s = linear(l.view, x_dev_.get(), ldx, y_dev_.get(), ldy, n, type_, stream_, blas_, workspace_.get(),
                            workspace_.bytes());
    NUQ_CHECK(s.ok(), s.code == StatusCode::invalid_argument ? Errc::internal : Errc::io, "layer '{}': {}", l.name,
              s.message);
    y_host_.resize(std::size_t(n * ldy));
    check_cuda(cudaMemcpyAsync(y_host_.data(), y_dev_.get(), y_host_.size() * 2, cudaMemcpyDeviceToHost, stream_),
               "copying results from the device");
    check_cuda(cudaStreamSynchronize(stream_), "running the layer");
    for (int64_t t = 0; t < n; ++t)
      for (int64_t r = 0; r < rows; ++r) {
        const uint16_t h = y_host_[std::size_t(t * ldy + r)];
        y[t * rows + r] = type_ == ActivationType::f16 ? fp16_to_float(h) : bf16_to_float(h);
      }
  }

 private:
  void reserve_activations(const format::PackedLinearView& w, int64_t n) {
    x_dev_.reserve(std::size_t(n * even(w.cols)) * 2, "allocating activations");
    y_dev_.reserve(std::size_t(n * even(w.rows)) * 2, "allocating results");
  }

  ActivationType type_;
  int device_;
  std::string description_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t blas_ = nullptr;
  std::mutex mutex_;
  std::vector<std::unique_ptr<DeviceLayer>> layers_;
  DeviceBuffer x_dev_, y_dev_, workspace_;
  std::vector<uint16_t> x_host_, y_host_;
};

}  // namespace

std::shared_ptr<LinearBackend> make_linear_backend(ActivationType type, int device) {
  return std::make_shared<CudaLinearBackend>(type, device);
}

}  // namespace nuq::cuda
