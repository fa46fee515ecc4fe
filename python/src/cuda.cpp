// CUDA entry points for callers that hold device memory themselves (nuq.torch passes the data pointers of
// its CUDA tensors, the current stream and cuBLAS handle). Pointers are plain integers here: the caller
// guarantees they are device pointers of the right sizes; everything else is checked by the launchers'
// can_implement_* functions, and failures are ValueError (arguments) or RuntimeError (CUDA).
#include <string>

#include "bindings.hpp"
#include "interop.hpp"
#include "nuq/format.hpp"

#ifdef NUQ_WITH_CUDA
#include "nuq/linear_cuda.hpp"
#endif

namespace nuq::python {
namespace {

format::PackedLinearView device_view(int64_t rows, int64_t cols, int bits, int64_t group_size, int64_t nnz,
                                     uintptr_t qweight, uintptr_t lut, uintptr_t row_ptr, uintptr_t col_idx,
                                     uintptr_t values) {
  if (!format::is_supported_bits(bits)) throw py::value_error("cuda_linear: bits must be 2, 3 or 4, got " + std::to_string(bits));
  if (rows <= 0 || cols <= 0 || group_size <= 0 || cols % group_size != 0 || nnz < 0)
    throw py::value_error("cuda_linear: inconsistent layer geometry rows=" + std::to_string(rows) + " cols=" +
                          std::to_string(cols) + " group_size=" + std::to_string(group_size) + " nnz=" + std::to_string(nnz));
  format::PackedLinearView v;
  v.rows = rows;
  v.cols = cols;
  v.bits = bits;
  v.group_size = group_size;
  v.nnz = nnz;
  v.qweight = reinterpret_cast<const uint8_t*>(qweight);
  v.lut = reinterpret_cast<const uint16_t*>(lut);
  if (nnz > 0) {
    v.sparse_row_ptr = reinterpret_cast<const int32_t*>(row_ptr);
    v.sparse_col_idx = reinterpret_cast<const void*>(col_idx);
    v.sparse_values = reinterpret_cast<const uint16_t*>(values);
  }
  return v;
}

[[noreturn]] void no_cuda(const char* fn) {
  throw py::value_error(std::string(fn) + ": this nuq build has no CUDA support (rebuild with nvcc on PATH)");
}

}  // namespace

void bind_cuda(py::module_& m) {
  m.def(
      "cuda_linear_workspace_bytes",
      [](int64_t rows, int64_t cols, int bits, int64_t group_size, int64_t nnz, int64_t batch) -> std::size_t {
#ifdef NUQ_WITH_CUDA
        return cuda::linear_workspace_bytes(device_view(rows, cols, bits, group_size, nnz, 0, 0, 0, 0, 0), batch);
#else
        (void)rows, (void)cols, (void)bits, (void)group_size, (void)nnz, (void)batch;
        no_cuda("cuda_linear_workspace_bytes");
#endif
      },
      py::arg("rows"), py::arg("cols"), py::arg("bits"), py::arg("group_size"), py::arg("nnz"), py::arg("batch"),
      "Device workspace bytes cuda_linear needs for this layer and batch (0 for batches up to 16).");
  m.def(
      "cuda_linear",
      [](int64_t rows, int64_t cols, int bits, int64_t group_size, int64_t nnz, uintptr_t qweight, uintptr_t lut,
         uintptr_t row_ptr, uintptr_t col_idx, uintptr_t values, uintptr_t x, int64_t ldx, uintptr_t y, int64_t ldy,
         int64_t batch, const std::string& dtype, uintptr_t stream, uintptr_t blas, uintptr_t workspace,
         std::size_t workspace_bytes) {
#ifdef NUQ_WITH_CUDA
        if (dtype != "float16" && dtype != "bfloat16")
          throw py::type_error("cuda_linear: dtype must be 'float16' or 'bfloat16', got '" + dtype + "'");
        const format::PackedLinearView v =
            device_view(rows, cols, bits, group_size, nnz, qweight, lut, row_ptr, col_idx, values);
        const void* xp = reinterpret_cast<const void*>(x);
        void* yp = reinterpret_cast<void*>(y);
        cuda::Status s = cuda::can_implement_linear(v, xp, ldx, yp, ldy, batch);
        if (!s.ok()) throw py::value_error("cuda_linear: " + s.message);
        {
          py::gil_scoped_release release;
          s = cuda::linear(v, xp, ldx, yp, ldy, batch,
                           dtype == "float16" ? cuda::ActivationType::f16 : cuda::ActivationType::bf16,
                           reinterpret_cast<cudaStream_t>(stream), reinterpret_cast<cublasHandle_t>(blas),
                           reinterpret_cast<void*>(workspace), workspace_bytes);
        }
        if (s.code == cuda::StatusCode::invalid_argument) throw py::value_error("cuda_linear: " + s.message);
        if (!s.ok()) throw std::runtime_error("cuda_linear: " + s.message);
#else
        (void)rows, (void)cols, (void)bits, (void)group_size, (void)nnz, (void)qweight, (void)lut, (void)row_ptr;
        (void)col_idx, (void)values, (void)x, (void)ldx, (void)y, (void)ldy, (void)batch, (void)dtype, (void)stream;
        (void)blas, (void)workspace, (void)workspace_bytes;
        no_cuda("cuda_linear");
#endif
      },
      py::arg("rows"), py::arg("cols"), py::arg("bits"), py::arg("group_size"), py::arg("nnz"), py::arg("qweight"),
      py::arg("lut"), py::arg("sparse_row_ptr"), py::arg("sparse_col_idx"), py::arg("sparse_values"), py::arg("x"),
      py::arg("ldx"), py::arg("y"), py::arg("ldy"), py::arg("batch"), py::arg("dtype"), py::arg("stream") = 0,
      py::arg("blas") = 0, py::arg("workspace") = 0, py::arg("workspace_bytes") = 0,
      R"doc(Y = X @ W.T on a CUDA device with nuq::cuda::linear (include/nuq/linear_cuda.hpp). Low level:
every array is given as a device pointer (an int, e.g. tensor.data_ptr()); nuq.torch.QuantLinear calls
it for CUDA tensors.

rows, cols, bits, group_size, nnz: the layer's geometry. qweight, lut, sparse_*: device pointers of the
packed arrays (docs/format.md; the sparse ones are ignored when nnz == 0). x: [batch, ldx], y: [batch,
ldy], row-major, dtype 'float16' or 'bfloat16'. stream: cudaStream_t as an int (0 = default stream).
Batches above 16 need blas (a cublasHandle_t on that stream) and workspace of
cuda_linear_workspace_bytes(...) bytes. Asynchronous on the stream. ValueError for arguments the kernels
cannot handle, RuntimeError for CUDA errors; ValueError in a build without CUDA.)doc");
}

}  // namespace nuq::python
