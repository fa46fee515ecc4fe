// How the bindings receive and return arrays. Every input goes through host_array(): a NumPy array is
// used as is, anything else that speaks DLPack (PyTorch, JAX, CuPy tensors) or the buffer protocol is
// wrapped as a NumPy array over the same memory, never copied. The checks then name the function and
// the argument, so that a wrong dtype, shape, device or layout is a TypeError/ValueError the user can
// act on instead of a crash or a silent conversion.
//
// pybind11 2.10 (Debian 12) reads NumPy's dtype descriptor through a struct whose layout changed in
// NumPy 2, so dtype::itemsize(), array::itemsize() and array constructors that derive strides from a
// runtime dtype (array_t<T>(count) among them: it gives stride 0) are avoided here: dtypes are compared
// by name, strides are always given, and array_t<T> is built from a shape vector.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <exception>
#include <string>
#include <vector>

namespace nuq::python {

namespace py = pybind11;

// Whether this extension was compiled together with nuq's CUDA library.
bool built_with_cuda();

// A NumPy array over obj's memory (see above). Throws TypeError when obj exposes no array memory,
// ValueError when it lives on a device other than the host.
py::array host_array(py::handle obj, const std::string& fn, const std::string& arg);

// "float32", "uint8", ... for native byte order; "<f4"-style strings otherwise.
std::string dtype_name(const py::array& a);

// The checks every argument goes through. `what` is "fn: arg" for messages.
struct ArrayArg {
  py::array array;
  std::string what;

  ArrayArg(py::handle obj, const std::string& fn, const std::string& arg);
  // TypeError unless the dtype is one of `dtypes` (e.g. {"float32"}).
  ArrayArg& dtype(std::initializer_list<const char*> dtypes);
  // ValueError unless ndim is in [min_ndim, max_ndim].
  ArrayArg& ndim(int min_ndim, int max_ndim);
  ArrayArg& ndim(int n) { return ndim(n, n); }
  // ValueError unless C-contiguous (with a hint how to make it so).
  ArrayArg& contiguous();
  // ValueError unless writeable (outputs).
  ArrayArg& writeable();
  // ValueError unless dim(i) == n; `meaning` names the dimension.
  ArrayArg& dim(int i, int64_t n, const std::string& meaning);

  int64_t shape(int i) const { return int64_t(array.shape(i)); }
  int ndims() const { return int(array.ndim()); }
  const void* data() const { return array.data(); }
  void* mutable_data() { return array.mutable_data(); }
  template <class T>
  const T* as() const {
    return static_cast<const T*>(array.data());
  }
  template <class T>
  T* as_mutable() {
    return static_cast<T*>(array.mutable_data());
  }
};

// A C-contiguous array of `dtype` over memory owned by `base` (kept alive by the array), without a copy.
// `dtype` is a NumPy dtype name; itemsize must match it.
py::array view_of(const void* data, const char* dtype, std::size_t itemsize, const std::vector<int64_t>& shape,
                  py::handle base, bool writeable = false);

// Python callbacks from C++ that runs without the GIL. Every long-running binding installs one, even
// without a user callback, so that Ctrl-C (KeyboardInterrupt) stops it at the next callback.
//
// Thrown through nuq code to unwind it when a callback raised; deliberately not a std::exception, so
// that nothing in between mistakes it for a nuq failure.
struct CallbackRaised {};

// Collects the first Python exception raised by a callback; run() re-raises it unchanged once the C++
// call has unwound and the GIL is held again.
struct CallbackScope {
  std::exception_ptr error;

  // Call from a callback, with the GIL held, around the Python call.
  template <class F>
  void call(F&& f) {
    try {
      // Ctrl-C while nuq works is delivered here: the work stops at the next callback.
      if (PyErr_CheckSignals() != 0) throw py::error_already_set();
      f();
    } catch (py::error_already_set&) {
      error = std::current_exception();
      throw CallbackRaised{};
    }
  }

  template <class F>
  auto run(F&& f) {
    try {
      py::gil_scoped_release release;
      return f();
    } catch (const CallbackRaised&) {
      std::rethrow_exception(error);
    }
  }
};

}  // namespace nuq::python
