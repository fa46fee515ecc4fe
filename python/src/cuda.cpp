// CUDA entry points for callers that hold device memory themselves (nuq.torch passes the data pointers of
// its CUDA tensors, the current stream and cuBLAS handle). Pointers are plain integers here: the caller
// guarantees they are device pointers of the right sizes; everything else is checked by the launchers'
// can_implement_* functions, and failures are ValueError (arguments) or RuntimeError (CUDA).
#include <pybind11/stl.h>

#include <cmath>
#include <optional>
#include <string>

#include "bindings.hpp"
#include "interop.hpp"
#include "nuq/format.hpp"

#ifdef NUQ_WITH_CUDA
#include "nuq/kv_cuda.hpp"
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

#ifdef NUQ_WITH_CUDA
// The device cache as a dict keyed by nuq::cuda::KvDeviceCache's field names (KVCache.export_pages
// gives that dict with host arrays; the caller uploads them and puts the device pointers in their
// place). A host array left in place would be dereferenced on the device, so it is refused by name.
cuda::KvDeviceCache device_cache(const py::dict& d) {
  const std::string fn = "cuda_kv_decode_attention";
  auto get = [&](const char* key) -> py::object {
    if (!d.contains(key)) throw py::value_error(fn + ": cache has no '" + key + "' (see KVCache.export_pages)");
    return d[key];
  };
  auto pointer = [&](const char* key) -> uintptr_t {
    py::object o = get(key);
    if (!py::isinstance<py::int_>(o))
      throw py::type_error(fn + ": cache['" + key + "'] must be a device pointer (an int, e.g. tensor.data_ptr()), " +
                           "got " + std::string(py::str(py::type::of(o))) + "; upload the host array first");
    return o.cast<uintptr_t>();
  };
  auto integer = [&](const char* key) -> int64_t {
    py::object o = get(key);
    if (!py::isinstance<py::int_>(o))
      throw py::type_error(fn + ": cache['" + key + "'] must be an int, got " + std::string(py::str(py::type::of(o))));
    return o.cast<int64_t>();
  };
  cuda::KvDeviceCache c;
  c.pages = reinterpret_cast<const uint8_t*>(pointer("pages"));
  c.page_stride = integer("page_stride");
  c.block_tables = reinterpret_cast<const int32_t*>(pointer("block_tables"));
  c.max_blocks = integer("max_blocks");
  c.lengths = reinterpret_cast<const int32_t*>(pointer("lengths"));
  c.sink_k = reinterpret_cast<const uint16_t*>(pointer("sink_k"));
  c.sink_v = reinterpret_cast<const uint16_t*>(pointer("sink_v"));
  c.sink_tokens = int(integer("sink_tokens"));
  c.n_kv_heads = int(integer("n_kv_heads"));
  c.head_dim = int(integer("head_dim"));
  c.block_tokens = int(integer("block_tokens"));
  c.bits_k = int(integer("bits_k"));
  c.bits_v = int(integer("bits_v"));
  c.slots = int(integer("slots"));
  c.k_scale = reinterpret_cast<const float*>(pointer("k_scale"));
  c.k_offset = reinterpret_cast<const float*>(pointer("k_offset"));
  c.k_codebook = reinterpret_cast<const float*>(pointer("k_codebook"));
  c.v_codebook = reinterpret_cast<const float*>(pointer("v_codebook"));
  c.storage = reinterpret_cast<const int32_t*>(pointer("storage"));
  c.rope_page_cos = reinterpret_cast<const float*>(pointer("rope_page_cos"));
  c.rope_page_sin = reinterpret_cast<const float*>(pointer("rope_page_sin"));
  c.rope_pages = integer("rope_pages");
  c.rope_step_cos = reinterpret_cast<const float*>(pointer("rope_step_cos"));
  c.rope_step_sin = reinterpret_cast<const float*>(pointer("rope_step_sin"));
  return c;
}
#endif

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

  m.def(
      "cuda_kv_decode_workspace_bytes",
      [](int batch, int n_heads, int head_dim, int max_length, int split_tokens) -> int64_t {
#ifdef NUQ_WITH_CUDA
        return cuda::kv_decode_workspace_bytes(batch, n_heads, head_dim, max_length, split_tokens);
#else
        (void)batch, (void)n_heads, (void)head_dim, (void)max_length, (void)split_tokens;
        no_cuda("cuda_kv_decode_workspace_bytes");
#endif
      },
      py::arg("batch"), py::arg("n_heads"), py::arg("head_dim"), py::arg("max_length"), py::arg("split_tokens") = 1024,
      "Device workspace bytes cuda_kv_decode_attention needs (the per-split partial results).");
  m.def(
      "cuda_kv_decode_attention",
      [](const py::dict& cache, int batch, int n_heads, uintptr_t q, uintptr_t out, int max_length,
         std::optional<double> scale, int split_tokens, uintptr_t workspace, int64_t workspace_bytes,
         uintptr_t stream) {
#ifdef NUQ_WITH_CUDA
        const cuda::KvDeviceCache c = device_cache(cache);
        if (scale && (!(*scale > 0) || !std::isfinite(*scale)))
          throw py::value_error(
              "cuda_kv_decode_attention: scale must be positive and finite (None for 1/sqrt(head_dim))");
        // The launcher takes the scale as is; the CPU API's "None = 1/sqrt(head_dim)" is applied here.
        const float s = scale ? float(*scale) : float(1.0 / std::sqrt(double(c.head_dim)));
        cuda::Status st = cuda::can_implement_kv_decode(c, batch, n_heads, max_length, split_tokens, workspace_bytes);
        if (!st.ok()) throw py::value_error("cuda_kv_decode_attention: " + st.message);
        if (q == 0 || out == 0 || workspace == 0)
          throw py::value_error(
              "cuda_kv_decode_attention: q, out and workspace must be device pointers, got a null one");
        {
          py::gil_scoped_release release;
          st = cuda::kv_decode_attention(c, batch, n_heads, reinterpret_cast<const uint16_t*>(q),
                                         reinterpret_cast<uint16_t*>(out), s, max_length, split_tokens,
                                         reinterpret_cast<void*>(workspace), workspace_bytes,
                                         reinterpret_cast<cudaStream_t>(stream));
        }
        if (st.code == cuda::StatusCode::invalid_argument)
          throw py::value_error("cuda_kv_decode_attention: " + st.message);
        if (!st.ok()) throw std::runtime_error("cuda_kv_decode_attention: " + st.message);
#else
        (void)cache, (void)batch, (void)n_heads, (void)q, (void)out, (void)max_length, (void)scale, (void)split_tokens;
        (void)workspace, (void)workspace_bytes, (void)stream;
        no_cuda("cuda_kv_decode_attention");
#endif
      },
      py::arg("cache"), py::arg("batch"), py::arg("n_heads"), py::arg("q"), py::arg("out"), py::arg("max_length"),
      py::kw_only(), py::arg("scale") = py::none(), py::arg("split_tokens") = 1024, py::arg("workspace") = 0,
      py::arg("workspace_bytes") = 0, py::arg("stream") = 0,
      R"doc(Decode attention over the quantized KV cache on a CUDA device (nuq::cuda::kv_decode_attention,
include/nuq/kv_cuda.hpp; compiled, NOT yet run on a GPU). Low level, like cuda_linear: device memory is
given as pointers (ints, e.g. tensor.data_ptr()).

cache: the dict of KVCache.export_pages(seqs) with every array uploaded to the device and replaced by
  its device pointer (the ints stay). A host array left in it is a TypeError.
batch: len(seqs) of that export. n_heads: query heads, a multiple of n_kv_heads, at most 8 per kv head.
q: float16 [batch, n_heads, head_dim], model channel order, pre-RoPE (rotated to position
  lengths[b] - 1 on the device). out: float16 [batch, n_heads, head_dim].
max_length: at least every lengths[b] (it sizes the grid). scale: None for 1/sqrt(head_dim).
workspace: workspace_bytes >= cuda_kv_decode_workspace_bytes(batch, n_heads, head_dim, max_length,
  split_tokens) bytes of device memory. stream: cudaStream_t as an int (0 = default stream).
Asynchronous on the stream. ValueError for arguments the kernel cannot handle, RuntimeError for CUDA
errors; ValueError in a build without CUDA.)doc");
}

}  // namespace nuq::python
