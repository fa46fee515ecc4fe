// Bindings for KV-cache calibration (include/nuq/kv_cache.hpp, docs/kv-cache.md): fit one layer from
// NumPy arrays of pre-RoPE keys and values, and save/load calibrations.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <tuple>

#include "bindings.hpp"
#include "interop.hpp"
#include "nuq/kv_cache.hpp"

namespace py = pybind11;

namespace nuq::python {
namespace {

using F32 = py::array_t<float, py::array::c_style | py::array::forcecast>;

py::dict to_dict(const kv::LayerCalibration& c) {
  py::dict d;
  auto arr = [](const std::vector<float>& v, std::vector<py::ssize_t> shape) {
    py::array_t<float> a(shape);
    std::copy(v.begin(), v.end(), a.mutable_data());
    return a;
  };
  d["k_scale"] = arr(c.k_scale, {py::ssize_t(c.n_kv_heads), py::ssize_t(c.head_dim)});
  d["k_offset"] = arr(c.k_offset, {py::ssize_t(c.n_kv_heads), py::ssize_t(c.head_dim)});
  d["k_codebook"] = arr(c.k_codebook, {py::ssize_t(c.k_codebook.size())});
  d["v_codebook"] = arr(c.v_codebook, {py::ssize_t(c.v_codebook.size())});
  d["bits_k"] = c.bits_k;
  d["bits_v"] = c.bits_v;
  return d;
}

kv::LayerCalibration from_dict(const py::dict& d) {
  kv::LayerCalibration c;
  const F32 scale = d["k_scale"].cast<F32>(), offset = d["k_offset"].cast<F32>();
  if (scale.ndim() != 2 || offset.ndim() != 2 || scale.shape(0) != offset.shape(0) || scale.shape(1) != offset.shape(1))
    throw py::value_error("k_scale and k_offset must be [n_kv_heads, head_dim] arrays of one shape");
  c.n_kv_heads = scale.shape(0);
  c.head_dim = scale.shape(1);
  c.k_scale.assign(scale.data(), scale.data() + scale.size());
  c.k_offset.assign(offset.data(), offset.data() + offset.size());
  const F32 kc = d["k_codebook"].cast<F32>(), vc = d["v_codebook"].cast<F32>();
  c.k_codebook.assign(kc.data(), kc.data() + kc.size());
  c.v_codebook.assign(vc.data(), vc.data() + vc.size());
  c.bits_k = d["bits_k"].cast<int>();
  c.bits_v = d["bits_v"].cast<int>();
  return c;
}

py::dict calibrate(py::handle k_obj, py::handle v_obj, py::handle k_sens_obj, py::handle v_sens_obj, int bits_k,
                   int bits_v, double outlier_fraction, bool q_norm) {
  // The shared argument checks (interop.hpp): float32, C-contiguous, host memory, any buffer or DLPack
  // producer; a wrong dtype is refused by name rather than converted.
  ArrayArg k(k_obj, "calibrate_kv_layer", "k"), v(v_obj, "calibrate_kv_layer", "v");
  k.dtype({"float32"}).contiguous();
  v.dtype({"float32"}).contiguous();
  if (k.ndims() != 3 || v.ndims() != 3)
    throw py::value_error("keys and values must be [tokens, n_kv_heads, head_dim] arrays");
  for (int i = 0; i < 3; ++i)
    if (k.shape(i) != v.shape(i)) throw py::value_error("keys and values differ in shape");
  std::optional<ArrayArg> k_sens, v_sens;
  for (auto [obj, sens, name] : {std::tuple{k_sens_obj, &k_sens, "k_sensitivity"}, std::tuple{v_sens_obj, &v_sens, "v_sensitivity"}}) {
    if (obj.is_none()) continue;
    sens->emplace(obj, "calibrate_kv_layer", name);
    (*sens)->dtype({"float32"}).contiguous();
    if (int64_t((*sens)->array.size()) != int64_t(k.array.size()))
      throw py::value_error("a sensitivity array differs in size from the keys");
  }
  kv::CalibrationOptions o;
  o.bits_k = bits_k;
  o.bits_v = bits_v;
  o.outlier_fraction = outlier_fraction;
  o.q_norm = q_norm;
  kv::LayerCalibration c;
  {
    py::gil_scoped_release release;
    c = kv::calibrate_layer(k.as<float>(), v.as<float>(), k_sens ? k_sens->as<float>() : nullptr,
                            v_sens ? v_sens->as<float>() : nullptr, k.shape(0), k.shape(1), k.shape(2), o);
  }
  return to_dict(c);
}

}  // namespace

void bind_kv(py::module_& m) {
  m.def("calibrate_kv_layer", &calibrate, py::arg("k"), py::arg("v"), py::arg("k_sensitivity") = py::none(),
        py::arg("v_sensitivity") = py::none(), py::arg("bits_k") = 3, py::arg("bits_v") = 3,
        py::arg("outlier_fraction") = 0.01, py::arg("q_norm") = false,
        "KV-cache calibration of one layer from pre-RoPE keys and values [tokens, n_kv_heads, head_dim]: a dict "
        "with k_scale, k_offset, k_codebook, v_codebook, bits_k, bits_v (docs/kv-cache.md).");
  m.def(
      "save_kv_calibration",
      [](const std::vector<py::dict>& layers, const std::string& path, double outlier_fraction, int sink_tokens,
         bool q_norm) {
        kv::Calibration cal;
        cal.outlier_fraction = outlier_fraction;
        cal.sink_tokens = sink_tokens;
        cal.q_norm = q_norm;
        for (const auto& d : layers) cal.layers.push_back(from_dict(d));
        kv::save_calibration(cal, path);
      },
      py::arg("layers"), py::arg("path"), py::arg("outlier_fraction") = 0.01, py::arg("sink_tokens") = 1,
      py::arg("q_norm") = false, "Write per-layer calibration dicts as a nuq KV calibration safetensors file.");
  m.def(
      "load_kv_calibration",
      [](const std::string& path) {
        const kv::Calibration cal = kv::load_calibration(path);
        py::dict d;
        py::list layers;
        for (const auto& l : cal.layers) layers.append(to_dict(l));
        d["layers"] = layers;
        d["outlier_fraction"] = cal.outlier_fraction;
        d["sink_tokens"] = cal.sink_tokens;
        d["q_norm"] = cal.q_norm;
        return d;
      },
      py::arg("path"), "Read a KV calibration file: {layers: [dict], outlier_fraction, sink_tokens, q_norm}.");
}

}  // namespace nuq::python
