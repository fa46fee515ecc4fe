#include "interop.hpp"

#include <Python.h>

#include <algorithm>

namespace nuq::python {

bool built_with_cuda() {
#ifdef NUQ_WITH_CUDA
  return true;
#else
  return false;
#endif
}

namespace {

// DLPack's device type codes (the DLDeviceType enum of the DLPack specification).
std::string dlpack_device_name(int type) {
  switch (type) {
    case 1: return "cpu";
    case 2: return "cuda";
    case 3: return "cuda_host";
    case 4: return "opencl";
    case 7: return "vulkan";
    case 8: return "metal";
    case 10: return "rocm";
    case 13: return "cuda_managed";
    case 14: return "oneapi";
    default: return "device type " + std::to_string(type);
  }
}

std::string type_name(py::handle obj) {
  py::handle t = reinterpret_cast<PyObject*>(Py_TYPE(obj.ptr()));
  return std::string(py::str(t.attr("__module__"))) + "." + std::string(py::str(t.attr("__qualname__")));
}

}  // namespace

py::array host_array(py::handle obj, const std::string& fn, const std::string& arg) {
  const std::string what = fn + ": " + arg;
  if (obj.is_none()) throw py::type_error(what + " is required, got None");
  if (py::isinstance<py::array>(obj)) return py::reinterpret_borrow<py::array>(obj);
  py::module_ np = py::module_::import("numpy");
  if (py::hasattr(obj, "__dlpack_device__")) {
    py::tuple device = obj.attr("__dlpack_device__")();
    const int type = device[0].cast<int>();
    const int id = device[1].cast<int>();
    // kDLCUDAHost memory is pinned host memory and as readable as any other.
    if (type != 1 && type != 3) {
      std::string msg = what + " is on " + dlpack_device_name(type) + ":" + std::to_string(id) +
                        ", but this function reads host (CPU) memory";
      msg += built_with_cuda() ? "; copy it to the CPU first (e.g. tensor.cpu())"
                               : " and this nuq build has no CUDA support; copy it to the CPU first (e.g. tensor.cpu())";
      throw py::value_error(msg);
    }
    try {
      return np.attr("from_dlpack")(obj);
    } catch (py::error_already_set& e) {
      throw py::type_error(what + " (" + type_name(obj) + ") cannot be shared through DLPack: " +
                           std::string(py::str(e.value())));
    }
  }
  if (PyObject_CheckBuffer(obj.ptr()) || py::hasattr(obj, "__array_interface__")) {
    // asarray never copies an object that exports a buffer or an array interface: it views its memory.
    try {
      return np.attr("asarray")(obj);
    } catch (py::error_already_set& e) {
      throw py::type_error(what + " (" + type_name(obj) + ") cannot be viewed as an array: " +
                           std::string(py::str(e.value())));
    }
  }
  throw py::type_error(what + " must be a NumPy array or an object exposing DLPack or the buffer protocol, got " +
                       type_name(obj));
}

std::string dtype_name(const py::array& a) { return py::str(a.attr("dtype")); }

ArrayArg::ArrayArg(py::handle obj, const std::string& fn, const std::string& arg)
    : array(host_array(obj, fn, arg)), what(fn + ": " + arg) {}

ArrayArg& ArrayArg::dtype(std::initializer_list<const char*> dtypes) {
  const std::string have = dtype_name(array);
  if (std::none_of(dtypes.begin(), dtypes.end(), [&](const char* d) { return have == d; })) {
    std::string want;
    for (const char* d : dtypes) want += (want.empty() ? "" : " or ") + std::string(d);
    throw py::type_error(what + " must have dtype " + want + ", got " + have +
                         " (convert explicitly, e.g. .astype(np." + *dtypes.begin() + "))");
  }
  return *this;
}

ArrayArg& ArrayArg::ndim(int min_ndim, int max_ndim) {
  const int n = ndims();
  if (n < min_ndim || n > max_ndim) {
    std::string want = min_ndim == max_ndim ? std::to_string(min_ndim) + "-D"
                                            : std::to_string(min_ndim) + "-D to " + std::to_string(max_ndim) + "-D";
    std::string shape = "(";
    for (int i = 0; i < n; ++i) shape += (i ? ", " : "") + std::to_string(array.shape(i));
    shape += n == 1 ? ",)" : ")";
    throw py::value_error(what + " must be " + want + ", got shape " + shape);
  }
  return *this;
}

ArrayArg& ArrayArg::contiguous() {
  if (!(array.flags() & py::array::c_style))
    throw py::value_error(what +
                          " must be C-contiguous (row-major, densely packed); pass np.ascontiguousarray(...) "
                          "or tensor.contiguous()");
  return *this;
}

ArrayArg& ArrayArg::writeable() {
  if (!array.writeable()) throw py::value_error(what + " must be writeable");
  return *this;
}

ArrayArg& ArrayArg::dim(int i, int64_t n, const std::string& meaning) {
  if (shape(i) != n)
    throw py::value_error(what + ": dimension " + std::to_string(i) + " must be " + std::to_string(n) + " (" +
                          meaning + "), got " + std::to_string(shape(i)));
  return *this;
}

py::array view_of(const void* data, const char* dtype, std::size_t itemsize, const std::vector<int64_t>& shape,
                  py::handle base, bool writeable) {
  std::vector<py::ssize_t> dims(shape.begin(), shape.end()), strides(shape.size());
  py::ssize_t stride = py::ssize_t(itemsize);
  for (std::size_t i = shape.size(); i-- > 0;) {
    strides[i] = stride;
    stride *= std::max<py::ssize_t>(dims[i], 1);
  }
  // NumPy refuses a null data pointer for a view; an empty array needs no memory at all.
  static const uint64_t empty_storage = 0;
  if (data == nullptr) data = &empty_storage, writeable = false;
  py::array a(py::dtype(dtype), dims, strides, data, base);
  if (!writeable) a.attr("flags").attr("writeable") = false;
  return a;
}

}  // namespace nuq::python
