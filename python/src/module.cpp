// pybind11 bindings: thin wrappers that validate NumPy arguments and call the C++ library. Arrays are
// read through the buffer protocol without copies; errors from nuq surface as ValueError/OSError with
// nuq's message.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bindings.hpp"
#include "interop.hpp"
#include "nuq/error.hpp"
#include "nuq/format.hpp"
#include "nuq/inspect.hpp"
#include "nuq/packed.hpp"
#include "nuq/version.hpp"

#ifdef NUQ_WITH_CUDA
#include "nuq/cuda.hpp"
#endif

namespace py = pybind11;

namespace {

py::array_t<uint8_t> pack_indices(py::handle indices_obj, int bits) {
  nuq::python::ArrayArg indices(indices_obj, "pack_indices", "indices");
  indices.dtype({"uint8"}).ndim(2).contiguous();
  const int64_t rows = indices.shape(0), cols = indices.shape(1);
  nuq::checked_index_layout(bits);
  py::array_t<uint8_t> out({rows, nuq::format::row_bytes(cols, bits)});
  {
    py::gil_scoped_release release;
    nuq::pack_indices(indices.as<uint8_t>(), rows, cols, bits, out.mutable_data());
  }
  return out;
}

py::array_t<uint8_t> unpack_indices(py::handle packed_obj, int64_t cols, int bits) {
  nuq::checked_index_layout(bits);
  if (cols < 0) throw py::value_error("unpack_indices: cols must be >= 0, got " + std::to_string(cols));
  nuq::python::ArrayArg packed(packed_obj, "unpack_indices", "packed");
  packed.dtype({"uint8"}).ndim(2).contiguous().dim(1, nuq::format::row_bytes(cols, bits),
                                                   "row_bytes(cols, bits) for " + std::to_string(cols) +
                                                       " columns at " + std::to_string(bits) + " bits");
  const int64_t rows = packed.shape(0);
  py::array_t<uint8_t> out({rows, cols});
  {
    py::gil_scoped_release release;
    nuq::unpack_indices(packed.as<uint8_t>(), rows, cols, bits, out.mutable_data());
  }
  return out;
}

py::dict inspect(const std::string& path, bool full_check) {
  nuq::InspectReport r = nuq::inspect_checkpoint(path, {full_check});
  py::dict d;
  d["path"] = r.path;
  d["kind"] = nuq::checkpoint_kind_name(r.kind);
  d["total_bytes"] = r.total_bytes;
  py::dict metadata;
  for (const auto& [k, v] : r.metadata) metadata[py::str(k)] = v;
  d["metadata"] = metadata;
  py::list tensors;
  for (const auto& t : r.tensors) {
    py::dict td;
    td["name"] = t.name;
    td["dtype"] = t.dtype;
    td["shape"] = py::tuple(py::cast(std::vector<int64_t>(t.shape.begin(), t.shape.end())));
    td["bytes"] = t.nbytes;
    tensors.append(td);
  }
  d["tensors"] = tensors;
  return d;
}

}  // namespace

PYBIND11_MODULE(_nuq, m) {
  m.doc() = "nuq: post-training quantization of large language models (C++ core)";
  m.attr("__version__") = NUQ_VERSION_STRING;
  m.attr("FORMAT_VERSION") = nuq::format::kVersion;

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const nuq::Error& e) {
      if (e.code() == nuq::Errc::io)
        PyErr_SetString(PyExc_OSError, e.what());
      else
        PyErr_SetString(PyExc_ValueError, e.what());
    }
  });

  m.def("pack_indices", &pack_indices, py::arg("indices"), py::arg("bits"),
        R"doc(Pack codebook indices into nuq's qweight layout (docs/format.md).

indices: uint8 array, shape [rows, cols], C-contiguous, each value < 2**bits.
bits: 2, 3 or 4.
Returns a uint8 array of shape [rows, row_bytes(cols, bits)].)doc");
  m.def("unpack_indices", &unpack_indices, py::arg("packed"), py::arg("cols"), py::arg("bits"),
        R"doc(Inverse of pack_indices.

packed: uint8 array, shape [rows, row_bytes(cols, bits)], C-contiguous.
cols: number of columns of the original matrix. bits: 2, 3 or 4.
Returns a uint8 array of shape [rows, cols].)doc");
  m.def("row_bytes", [](int64_t cols, int bits) {
    nuq::checked_index_layout(bits);
    return nuq::format::row_bytes(cols, bits);
  }, py::arg("cols"), py::arg("bits"), "Bytes of one packed row of `cols` indices at `bits` bits.");
  m.attr("HAS_CUDA") = nuq::python::built_with_cuda();
  m.def("cuda_device_count", [] {
#ifdef NUQ_WITH_CUDA
    return nuq::cuda::device_count();
#else
    return 0;
#endif
  }, "CUDA devices visible to this build (0 for a CPU-only build).");
  nuq::python::bind_layers(m);
  nuq::python::bind_statistics(m);
  nuq::python::bind_checkpoint_quantizer(m);
  nuq::python::bind_cuda(m);
  nuq::python::bind_kv(m);
  nuq::python::bind_tasks(m);
  m.def("inspect", &inspect, py::arg("path"), py::arg("full_check") = false,
        "Summarize a checkpoint (safetensors file or directory, GGUF file): a dict with path, kind, "
        "total_bytes, metadata (str -> str) and tensors (list of dicts: name, dtype, shape, bytes).");
}
