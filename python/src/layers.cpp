// Bindings for packed layers: the PackedLayer object (owned by nuq or viewing caller/checkpoint memory),
// the quantizers, dequantization, the CPU linear kernels, 1-D k-means and nuq checkpoints.
#include <pybind11/stl.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
#include <optional>

#include "bindings.hpp"
#include "interop.hpp"
#include "nuq/error.hpp"
#include "nuq/linear_cpu.hpp"
#include "nuq/packed.hpp"
#include "nuq/quantize.hpp"
#include "nuq/safetensors.hpp"

namespace nuq::python {
namespace {

// A packed layer as Python sees it. Either nuq owns the data (`owned`, from a quantizer) or `view`
// points into memory kept alive by `holder` (the caller's arrays, or a Checkpoint's mapping).
struct PackedLayer {
  std::shared_ptr<PackedLinear> owned;
  py::object holder;
  format::PackedLinearView view;
  std::string method = "custom";
  std::string source_dtype = "F32";
  std::optional<QuantizeReport> report;
};

py::dict report_dict(const QuantizeReport& r) {
  py::dict d;
  d["mse"] = r.mse;
  d["weighted_mse"] = r.weighted_mse;
  d["relative_output_error"] = r.relative_output_error;
  d["max_abs_error"] = r.max_abs_error;
  d["bits_per_weight"] = r.bits_per_weight;
  d["nnz"] = r.nnz;
  d["outliers"] = r.outliers;
  d["sensitive"] = r.sensitive;
  py::dict storage;
  storage["qweight"] = r.storage.qweight;
  storage["lut"] = r.storage.lut;
  storage["sparse"] = r.storage.sparse;
  storage["total"] = r.storage.total();
  d["storage_bytes"] = storage;
  return d;
}

KMeansInit parse_init(const std::string& s) {
  if (s == "binned_dp") return KMeansInit::binned_dp;
  if (s == "quantiles") return KMeansInit::quantiles;
  if (s == "kmeans++" || s == "kmeans_plus_plus") return KMeansInit::kmeans_plus_plus;
  if (s == "exact_dp") return KMeansInit::exact_dp;
  throw py::value_error("kmeans_init must be one of binned_dp, quantiles, kmeans++, exact_dp; got '" + s + "'");
}

int64_t sparse_col_bytes(int64_t cols) { return format::sparse_cols_are_u16(cols) ? 2 : 4; }

// Builds a layer over caller-provided arrays (no copies), checked with nuq::validate_packed.
PackedLayer layer_from_arrays(py::handle qweight_obj, py::handle lut_obj, int64_t cols, py::handle row_ptr_obj,
                              py::handle col_idx_obj, py::handle values_obj, const std::string& method, bool validate) {
  const std::string fn = "PackedLayer";
  if (cols <= 0) throw py::value_error("PackedLayer: cols must be positive, got " + std::to_string(cols));
  ArrayArg lut(lut_obj, fn, "lut");
  lut.dtype({"float16", "uint16"}).ndim(3).contiguous();
  const int64_t entries = lut.shape(2);
  int bits = 0;
  for (int b = format::kMinBits; b <= format::kMaxBits; ++b)
    if (format::lut_entries(b) == entries) bits = b;
  if (bits == 0)
    throw py::value_error("PackedLayer: lut: dimension 2 must be 4, 8 or 16 (2^bits codebook entries), got " +
                          std::to_string(entries));
  const int64_t groups = lut.shape(1);
  if (groups <= 0 || cols % groups != 0)
    throw py::value_error("PackedLayer: lut: dimension 1 (" + std::to_string(groups) +
                          " groups) must divide cols = " + std::to_string(cols));
  ArrayArg qweight(qweight_obj, fn, "qweight");
  qweight.dtype({"uint8"}).ndim(2).contiguous().dim(1, format::row_bytes(cols, bits), "row_bytes(cols, bits)");
  const int64_t rows = qweight.shape(0);
  lut.dim(0, rows, "rows, as qweight");

  PackedLayer layer;
  layer.method = method;
  format::PackedLinearView& v = layer.view;
  v.rows = rows;
  v.cols = cols;
  v.bits = bits;
  v.group_size = cols / groups;
  v.qweight = qweight.as<uint8_t>();
  v.lut = lut.as<uint16_t>();
  py::list keep;
  keep.append(qweight.array);
  keep.append(lut.array);
  const int given = int(!row_ptr_obj.is_none()) + int(!col_idx_obj.is_none()) + int(!values_obj.is_none());
  if (given != 0 && given != 3)
    throw py::value_error("PackedLayer: give all of sparse_row_ptr, sparse_col_idx and sparse_values, or none");
  if (given == 3) {
    ArrayArg values(values_obj, fn, "sparse_values");
    values.dtype({"float16", "uint16"}).ndim(1).contiguous();
    const int64_t nnz = values.shape(0);
    ArrayArg row_ptr(row_ptr_obj, fn, "sparse_row_ptr");
    row_ptr.dtype({"int32"}).ndim(1).contiguous().dim(0, rows + 1, "rows + 1");
    ArrayArg col_idx(col_idx_obj, fn, "sparse_col_idx");
    col_idx.dtype({format::sparse_cols_are_u16(cols) ? "uint16" : "int32"}).ndim(1).contiguous().dim(0, nnz, "nnz");
    if (nnz > 0) {
      v.nnz = nnz;
      v.sparse_row_ptr = row_ptr.as<int32_t>();
      v.sparse_col_idx = col_idx.data();
      v.sparse_values = values.as<uint16_t>();
      keep.append(row_ptr.array);
      keep.append(col_idx.array);
      keep.append(values.array);
    } else {
      for (int64_t r = 0; r <= rows; ++r)
        if (row_ptr.as<int32_t>()[r] != 0)
          throw py::value_error("PackedLayer: sparse_row_ptr must be all zero when there are no sparse values");
    }
  }
  if (validate) validate_packed(v, "PackedLayer");
  layer.holder = std::move(keep);
  return layer;
}

py::array dequantize(const PackedLayer& layer, py::object out_obj, int threads) {
  const format::PackedLinearView& v = layer.view;
  py::array out;
  if (out_obj.is_none()) {
    out = py::array_t<float>({v.rows, v.cols});
  } else {
    ArrayArg o(out_obj, "dequantize", "out");
    o.dtype({"float32"}).ndim(2).contiguous().writeable().dim(0, v.rows, "rows").dim(1, v.cols, "cols");
    out = o.array;
  }
  float* dst = static_cast<float*>(out.mutable_data());
  {
    py::gil_scoped_release release;
    cpu::dequantize_dense(v, dst, v.cols, {threads, std::nullopt});
  }
  return out;
}

std::optional<cpu::Isa> parse_isa(const std::optional<std::string>& s) {
  if (!s) return std::nullopt;
  for (cpu::Isa isa : {cpu::Isa::scalar, cpu::Isa::avx2, cpu::Isa::avx512})
    if (*s == cpu::to_string(isa)) {
      if (!cpu::isa_supported(isa)) throw py::value_error("linear: isa '" + *s + "' is not supported by this CPU");
      return isa;
    }
  throw py::value_error("linear: isa must be scalar, avx2 or avx512; got '" + *s + "'");
}

py::array linear(const PackedLayer& layer, py::handle x_obj, py::object out_obj, int threads,
                 const std::optional<std::string>& isa_name) {
  const format::PackedLinearView& v = layer.view;
  ArrayArg x(x_obj, "linear", "x");
  x.dtype({"float32"}).ndim(1, 2).contiguous().dim(x.ndims() - 1, v.cols, "the layer's input features (cols)");
  const bool vector = x.ndims() == 1;
  const int64_t batch = vector ? 1 : x.shape(0);
  py::array out;
  std::vector<py::ssize_t> shape = vector ? std::vector<py::ssize_t>{v.rows} : std::vector<py::ssize_t>{batch, v.rows};
  if (out_obj.is_none()) {
    out = py::array_t<float>(shape);
  } else {
    ArrayArg o(out_obj, "linear", "out");
    o.dtype({"float32"}).ndim(x.ndims()).contiguous().writeable();
    if (!vector) o.dim(0, batch, "batch, as x");
    o.dim(o.ndims() - 1, v.rows, "the layer's output features (rows)");
    if (py::module_::import("numpy").attr("shares_memory")(o.array, x.array).cast<bool>())
      throw py::value_error("linear: out must not overlap x");
    out = o.array;
  }
  if (batch == 0) return out;
  cpu::LinearOptions options{threads, parse_isa(isa_name)};
  const float* src = x.as<float>();
  float* dst = static_cast<float*>(out.mutable_data());
  {
    py::gil_scoped_release release;
    cpu::linear(v, src, v.cols, dst, v.rows, batch, options);
  }
  return out;
}

PackedLayer quantize(py::handle weight_obj, int bits, const std::string& method, py::handle sensitivity_obj,
                     int64_t group_size, double outlier_fraction, double sensitive_fraction, bool outliers_per_row,
                     const std::string& kmeans_init, int max_iterations, int dp_candidates, uint64_t seed, int threads,
                     const std::string& name, py::handle hessian_obj, double damping, bool error_feedback) {
  ArrayArg w(weight_obj, "quantize", "weight");
  w.dtype({"float32"}).ndim(2).contiguous();
  std::optional<ArrayArg> h;
  if (!hessian_obj.is_none()) {
    h.emplace(hessian_obj, "quantize", "hessian");
    h->dtype({"float64"}).ndim(2).contiguous().dim(0, w.shape(1), "cols of weight").dim(1, w.shape(1), "cols of weight");
  } else if (!error_feedback) {
    throw py::value_error("quantize: error_feedback=False only makes sense with a hessian (it measures the output error)");
  }
  const float* sens = nullptr;
  std::optional<ArrayArg> s;
  if (!sensitivity_obj.is_none()) {
    s.emplace(sensitivity_obj, "quantize", "sensitivity");
    s->dtype({"float32"}).ndim(2).contiguous().dim(0, w.shape(0), "rows, as weight").dim(1, w.shape(1), "cols, as weight");
    sens = s->as<float>();
  }
  QuantizeOptions o;
  try {
    o.method = parse_quant_method(method);
  } catch (const Error& e) {
    throw py::value_error(std::string("quantize: method: ") + e.what());
  }
  o.bits = bits;
  o.group_size = group_size;
  o.outlier_fraction = outlier_fraction;
  o.sensitive_fraction = sensitive_fraction;
  o.outliers_per_row = outliers_per_row;
  o.kmeans.init = parse_init(kmeans_init);
  o.kmeans.max_iterations = max_iterations;
  o.kmeans.dp_candidates = dp_candidates;
  o.kmeans.seed = seed;
  o.threads = threads;
  if (h) o.hessian = h->as<double>();
  o.hessian_damping = damping;
  o.error_feedback = error_feedback;
  PackedLayer layer;
  QuantizeReport report;
  const float* src = w.as<float>();
  {
    py::gil_scoped_release release;
    layer.owned = std::make_shared<PackedLinear>(
        quantize_linear(src, sens, w.shape(0), w.shape(1), w.shape(1), o, name, &report));
  }
  layer.view = layer.owned->view();
  layer.method = std::string(to_string(o.method));
  layer.report = report;
  return layer;
}

py::dict measure(const PackedLayer& layer, py::handle weight_obj, py::handle sensitivity_obj) {
  const format::PackedLinearView& v = layer.view;
  ArrayArg w(weight_obj, "measure", "weight");
  w.dtype({"float32"}).ndim(2).contiguous().dim(0, v.rows, "rows").dim(1, v.cols, "cols");
  const float* sens = nullptr;
  std::optional<ArrayArg> s;
  if (!sensitivity_obj.is_none()) {
    s.emplace(sensitivity_obj, "measure", "sensitivity");
    s->dtype({"float32"}).ndim(2).contiguous().dim(0, v.rows, "rows").dim(1, v.cols, "cols");
    sens = s->as<float>();
  }
  QuantizeReport r;
  {
    py::gil_scoped_release release;
    r = measure_quantization(v, w.as<float>(), sens, v.cols);
  }
  return report_dict(r);
}

py::tuple kmeans(py::handle x_obj, int k, py::handle weights_obj, const std::string& init, int max_iterations,
                 int dp_candidates, uint64_t seed) {
  ArrayArg x(x_obj, "kmeans_1d", "x");
  x.dtype({"float32"}).ndim(1).contiguous();
  if (k < 1) throw py::value_error("kmeans_1d: k must be at least 1, got " + std::to_string(k));
  if (x.shape(0) == 0) throw py::value_error("kmeans_1d: x is empty");
  std::optional<ArrayArg> w;
  if (!weights_obj.is_none()) {
    w.emplace(weights_obj, "kmeans_1d", "weights");
    w->dtype({"float32"}).ndim(1).contiguous().dim(0, x.shape(0), "len(x)");
  }
  KMeansOptions o;
  o.init = parse_init(init);
  o.max_iterations = max_iterations;
  o.dp_candidates = dp_candidates;
  o.seed = seed;
  py::array_t<float> centers(std::vector<py::ssize_t>{k});
  float* c = centers.mutable_data();
  double cost = 0;
  {
    py::gil_scoped_release release;
    SortedWeightedPoints points;
    points.assign(x.as<float>(), w ? w->as<float>() : nullptr, x.shape(0));
    cost = kmeans_1d(points, k, o, c);
  }
  return py::make_tuple(centers, cost);
}

// ---- checkpoints -------------------------------------------------------------------------------------

// A nuq (or any safetensors) checkpoint, memory-mapped. Arrays it hands out view the mapping and keep
// this object alive.
struct Checkpoint {
  std::shared_ptr<SafetensorsCheckpoint> file;
  QuantizationConfig config;
  bool quantized = false;
};

std::shared_ptr<Checkpoint> open_checkpoint(const std::string& path) {
  auto c = std::make_shared<Checkpoint>();
  {
    py::gil_scoped_release release;
    c->file = std::make_shared<SafetensorsCheckpoint>(path);
  }
  // A sharded checkpoint carries the whole config in its index and each shard's part in the shard.
  auto merge = [&](const std::map<std::string, std::string>& metadata, const std::string& source) {
    const auto it = metadata.find(kQuantizationConfigKey);
    if (it == metadata.end()) return;
    QuantizationConfig part = parse_quantization_config(it->second, source);
    c->quantized = true;
    c->config.format_version = part.format_version;
    for (auto& entry : part.layers) c->config.layers[entry.first] = entry.second;
    for (auto& entry : part.extra) c->config.extra[entry.first] = entry.second;
  };
  merge(c->file->metadata(), path);
  for (const auto& f : c->file->files()) merge(f->metadata(), f->path());
  return c;
}

std::optional<const char*> numpy_dtype(DType t) {
  switch (t) {
    case DType::BOOL: return "bool";
    case DType::U8: return "uint8";
    case DType::I8: return "int8";
    case DType::U16: return "uint16";
    case DType::I16: return "int16";
    case DType::F16: return "float16";
    case DType::U32: return "uint32";
    case DType::I32: return "int32";
    case DType::F32: return "float32";
    case DType::U64: return "uint64";
    case DType::I64: return "int64";
    case DType::F64: return "float64";
    default: return std::nullopt;
  }
}

py::array checkpoint_tensor(py::object self, const std::string& name) {
  const Checkpoint& c = self.cast<const Checkpoint&>();
  if (!c.file->contains(name)) throw py::key_error(c.file->path() + ": no tensor named '" + name + "'");
  ConstTensorView t = c.file->tensor(name);
  std::vector<int64_t> shape(t.shape().begin(), t.shape().end());
  if (auto dt = numpy_dtype(t.dtype())) return view_of(t.data(), *dt, dtype_size(t.dtype()), shape, self);
  if (t.dtype() == DType::BF16) {
    // NumPy has no bfloat16; widen (exactly) to float32, which is a copy.
    Buffer f = to_float32(t);
    py::array_t<float> out(std::vector<py::ssize_t>(shape.begin(), shape.end()));
    std::memcpy(out.mutable_data(), f.data(), f.nbytes());
    return out;
  }
  throw py::value_error(c.file->path() + ": tensor '" + name + "' has dtype " + std::string(dtype_name(t.dtype())) +
                        ", which NumPy cannot represent");
}

PackedLayer checkpoint_layer(py::object self, const std::string& base) {
  const Checkpoint& c = self.cast<const Checkpoint&>();
  const auto it = c.config.layers.find(base);
  if (it == c.config.layers.end())
    throw py::key_error(c.file->path() + ": no packed layer named '" + base + "' (see Checkpoint.layers)");
  PackedLayer layer;
  layer.view = packed_view(*c.file, base, it->second);
  validate_packed(layer.view, base);
  layer.holder = self;
  layer.method = it->second.method;
  layer.source_dtype = it->second.source_dtype;
  return layer;
}

void write_checkpoint(const std::string& path, const std::map<std::string, PackedLayer*>& layers, py::dict tensors,
                      std::map<std::string, std::string> metadata) {
  QuantizationConfig config;
  config.extra["writer"] = "nuq python";
  std::vector<std::pair<std::string, ConstTensorView>> views;
  std::vector<py::array> keep;
  auto add = [&](std::string name, const void* data, DType dtype, Shape shape) {
    views.emplace_back(std::move(name), ConstTensorView(static_cast<const std::byte*>(data), dtype, shape));
  };
  for (const auto& entry : layers) {
    const std::string& base = entry.first;
    if (entry.second == nullptr) throw py::type_error("write_checkpoint: layers['" + base + "'] is None");
    const PackedLayer& l = *entry.second;
    const format::PackedLinearView& v = l.view;
    PackedTensorMeta meta{v.bits, v.rows, v.cols, v.group_size, v.nnz, l.method, l.source_dtype};
    config.layers[base] = meta;
    add(base + format::kQWeightSuffix, v.qweight, DType::U8, {v.rows, v.row_stride()});
    add(base + format::kLutSuffix, v.lut, DType::F16, {v.rows, v.groups(), format::lut_entries(v.bits)});
    if (v.nnz > 0) {
      add(base + format::kSparseRowPtrSuffix, v.sparse_row_ptr, DType::I32, {v.rows + 1});
      add(base + format::kSparseColIdxSuffix, v.sparse_col_idx,
          format::sparse_cols_are_u16(v.cols) ? DType::U16 : DType::I32, {v.nnz});
      add(base + format::kSparseValuesSuffix, v.sparse_values, DType::F16, {v.nnz});
    }
  }
  for (auto item : tensors) {
    const std::string name = py::str(item.first);
    ArrayArg a(item.second, "write_checkpoint", "tensors['" + name + "']");
    a.contiguous();
    const std::string dt = dtype_name(a.array);
    std::optional<DType> dtype;
    for (int i = 0; i < kDTypeCount; ++i)
      if (auto n = numpy_dtype(DType(i)); n && dt == *n) dtype = DType(i);
    if (!dtype) throw py::type_error("write_checkpoint: tensors['" + name + "'] has dtype " + dt + ", which safetensors cannot store");
    Shape shape;
    for (int i = 0; i < a.ndims(); ++i) shape.push_back(a.shape(i));
    add(name, a.data(), *dtype, shape);
    keep.push_back(a.array);
  }
  metadata[kQuantizationConfigKey] = to_json(config);
  py::gil_scoped_release release;
  write_safetensors(path, views, metadata);
}

}  // namespace

void bind_layers(py::module_& m) {
  py::class_<PackedLayer>(m, "PackedLayer", R"doc(One linear layer in nuq's packed format (docs/format.md).

Dequantizes as W[r, c] = lut[r, c // group_size, index(r, c)] + sparse(r, c), summed in float32.
A layer from nuq.quantize owns its data; one built from arrays or read from a Checkpoint views that
memory without copying and keeps it alive. Array attributes are read-only views of the layer's memory.

PackedLayer(qweight, lut, cols, sparse_row_ptr=None, sparse_col_idx=None, sparse_values=None, method="custom",
            validate=True)
  qweight: uint8 [rows, row_bytes(cols, bits)], C-contiguous, packed indices (nuq.pack_indices).
  lut: float16 (or its raw bits as uint16) [rows, groups, 2**bits], C-contiguous; bits (2, 3, 4) is
       inferred from the last dimension and group_size = cols // groups.
  cols: input features.
  sparse_row_ptr: int32 [rows + 1] CSR row pointers; sparse_col_idx: uint16 [nnz] (int32 when
       cols > 65536), strictly increasing within a row; sparse_values: float16/uint16 [nnz].
       Give all three or none.
The layer is validated (nuq::validate_packed, O(size)); errors name the offending row/column.
validate=False skips that content check (shapes and dtypes are always checked): only for data
validated before, as the kernels trust it (an invalid sparse column index would read out of bounds).)doc")
      .def(py::init(&layer_from_arrays), py::arg("qweight"), py::arg("lut"), py::arg("cols"),
           py::arg("sparse_row_ptr") = py::none(), py::arg("sparse_col_idx") = py::none(),
           py::arg("sparse_values") = py::none(), py::arg("method") = "custom", py::arg("validate") = true)
      .def_property_readonly("rows", [](const PackedLayer& l) { return l.view.rows; }, "Output features.")
      .def_property_readonly("cols", [](const PackedLayer& l) { return l.view.cols; }, "Input features.")
      .def_property_readonly("shape", [](const PackedLayer& l) { return py::make_tuple(l.view.rows, l.view.cols); },
                             "(rows, cols) of the dense weight.")
      .def_property_readonly("bits", [](const PackedLayer& l) { return l.view.bits; }, "Index width: 2, 3 or 4.")
      .def_property_readonly("group_size", [](const PackedLayer& l) { return l.view.group_size; },
                             "Columns sharing one codebook (== cols for one codebook per row).")
      .def_property_readonly("nnz", [](const PackedLayer& l) { return l.view.nnz; }, "Entries of the sparse part.")
      .def_property_readonly("method", [](const PackedLayer& l) { return l.method; },
                             "Quantizer that produced the layer: nuq, kmeans, rtn or custom.")
      .def_property_readonly(
          "qweight",
          [](py::object self) {
            const auto& v = self.cast<const PackedLayer&>().view;
            return view_of(v.qweight, "uint8", 1, {v.rows, v.row_stride()}, self);
          },
          "uint8 [rows, row_bytes(cols, bits)]: packed codebook indices (docs/format.md).")
      .def_property_readonly(
          "lut",
          [](py::object self) {
            const auto& v = self.cast<const PackedLayer&>().view;
            return view_of(v.lut, "float16", 2, {v.rows, v.groups(), format::lut_entries(v.bits)}, self);
          },
          "float16 [rows, groups, 2**bits]: the codebooks, ascending within each (row, group).")
      .def_property_readonly(
          "sparse_row_ptr",
          [](py::object self) -> py::array {
            const auto& v = self.cast<const PackedLayer&>().view;
            if (v.nnz > 0) return view_of(v.sparse_row_ptr, "int32", 4, {v.rows + 1}, self);
            py::array_t<int32_t> zeros(std::vector<py::ssize_t>{v.rows + 1});
            std::fill_n(zeros.mutable_data(), v.rows + 1, 0);
            return zeros;
          },
          "int32 [rows + 1]: CSR row pointers of the sparse part (all zero when nnz == 0).")
      .def_property_readonly(
          "sparse_col_idx",
          [](py::object self) {
            const auto& v = self.cast<const PackedLayer&>().view;
            const bool u16 = format::sparse_cols_are_u16(v.cols);
            return view_of(v.sparse_col_idx, u16 ? "uint16" : "int32", std::size_t(sparse_col_bytes(v.cols)), {v.nnz}, self);
          },
          "uint16 [nnz] (int32 when cols > 65536): CSR column indices.")
      .def_property_readonly(
          "sparse_values",
          [](py::object self) {
            const auto& v = self.cast<const PackedLayer&>().view;
            return view_of(v.sparse_values, "float16", 2, {v.nnz}, self);
          },
          "float16 [nnz]: CSR values (residuals added to the codebook value).")
      .def_property_readonly(
          "stats", [](const PackedLayer& l) -> py::object { return l.report ? py::object(report_dict(*l.report)) : py::none(); },
          "For layers from nuq.quantize: dict with mse, weighted_mse, max_abs_error, bits_per_weight, nnz, "
          "outliers, sensitive, storage_bytes {qweight, lut, sparse, total}; None otherwise.")
      .def_property_readonly(
          "bits_per_weight",
          [](const PackedLayer& l) {
            const auto& v = l.view;
            return bits_per_weight(packed_storage(v.rows, v.cols, v.bits, v.group_size, v.nnz), v.rows, v.cols);
          },
          "Stored bits per weight, every byte counted (indices, codebooks, sparse part).")
      .def(
          "indices",
          [](const PackedLayer& l) {
            const auto& v = l.view;
            py::array_t<uint8_t> out({v.rows, v.cols});
            unpack_indices(v.qweight, v.rows, v.cols, v.bits, out.mutable_data());
            return out;
          },
          "The codebook indices, uint8 [rows, cols] (a new array).")
      .def("dequantize", &dequantize, py::arg("out") = py::none(), py::arg("threads") = 0,
           "Same as nuq.dequantize(layer, out, threads).")
      .def("__repr__", [](const PackedLayer& l) {
        return "PackedLayer(rows=" + std::to_string(l.view.rows) + ", cols=" + std::to_string(l.view.cols) +
               ", bits=" + std::to_string(l.view.bits) + ", group_size=" + std::to_string(l.view.group_size) +
               ", nnz=" + std::to_string(l.view.nnz) + ", method='" + l.method + "')";
      });

  m.def("quantize", &quantize, py::arg("weight"), py::arg("bits") = 4, py::kw_only(), py::arg("method") = "nuq",
        py::arg("sensitivity") = py::none(), py::arg("group_size") = 0, py::arg("outlier_fraction") = 0.0,
        py::arg("sensitive_fraction") = 0.0, py::arg("outliers_per_row") = false, py::arg("kmeans_init") = "binned_dp",
        py::arg("max_iterations") = 50, py::arg("dp_candidates") = 256, py::arg("seed") = 0, py::arg("threads") = 0,
        py::arg("name") = "weight", py::arg("hessian") = py::none(), py::arg("damping") = 0.01,
        py::arg("error_feedback") = true,
        R"doc(Quantize a weight matrix into a PackedLayer (docs/quantization.md).

weight: float32 [rows, cols], C-contiguous (rows = output features); NumPy, or any DLPack/buffer
        producer on the CPU (e.g. a torch CPU tensor), read without a copy.
bits: 2, 3 or 4.
method: "nuq" (sensitivity-weighted k-means codebooks), "kmeans" (unweighted), "rtn" (round to nearest).
sensitivity: optional float32 [rows, cols], C-contiguous, finite and >= 0 (e.g. the Fisher diagonal).
group_size: columns per codebook, dividing cols; 0 = the method's default (per row; 128 for rtn).
outlier_fraction, sensitive_fraction: fractions of the weights kept exactly in the sparse part (largest
        magnitudes; then largest sensitivities). outliers_per_row: count outliers per row.
kmeans_init: "binned_dp" (default), "quantiles", "kmeans++" or "exact_dp"; max_iterations, dp_candidates
        and seed tune the solver. threads: 0 = all cores (results do not depend on it).
name: used in error messages.
hessian: optional float64 [cols, cols], C-contiguous, symmetric: the mean XᵀX of the layer's inputs
        (HessianAccumulator.matrix). Rounds with GPTQ-style error feedback onto the same codebooks
        (docs/quantization.md#error-feedback); nuq's k-means is weighted by its diagonal when no
        sensitivity is given. damping: added to its diagonal, relative to the diagonal's mean.
        error_feedback=False rounds to nearest and only measures .stats["relative_output_error"].
Returns a PackedLayer whose .stats holds the error figures and bits per weight. Releases the GIL.)doc");
  m.def("dequantize", &dequantize, py::arg("layer"), py::arg("out") = py::none(), py::arg("threads") = 0,
        R"doc(The dense weight of a packed layer: float32 [rows, cols], C-contiguous.

out: optional float32 [rows, cols] C-contiguous writeable array to fill (returned). Bit-identical to
the reference decoder. Releases the GIL.)doc");
  m.def("linear", &linear, py::arg("layer"), py::arg("x"), py::arg("out") = py::none(), py::arg("threads") = 0,
        py::arg("isa") = py::none(),
        R"doc(y = x @ W.T for a packed layer W [rows, cols], on the CPU (nuq::cpu::linear).

x: float32 [cols] or [batch, cols], C-contiguous (NumPy or any CPU DLPack/buffer producer, not copied).
out: optional float32 [rows] or [batch, rows], C-contiguous, writeable, not overlapping x.
threads: 0 = all cores. isa: None (fastest), "scalar", "avx2" or "avx512" to force an implementation.
Batches up to 16 use the fused look-up-table GEMV, larger ones dequantize + GEMM.
Returns y: float32 [rows] or [batch, rows]. Releases the GIL.)doc");
  m.def("measure", &measure, py::arg("layer"), py::arg("weight"), py::arg("sensitivity") = py::none(),
        R"doc(Error figures of a packed layer against the original weights.

weight, sensitivity: float32 [rows, cols], C-contiguous (sensitivity optional).
Returns a dict like PackedLayer.stats.)doc");
  m.def("kmeans_1d", &kmeans, py::arg("x"), py::arg("k"), py::arg("weights") = py::none(),
        py::arg("init") = "binned_dp", py::arg("max_iterations") = 50, py::arg("dp_candidates") = 256,
        py::arg("seed") = 0,
        R"doc(Weighted 1-D k-means, the solver behind the nuq codebooks.

x: float32 [n], finite. weights: optional float32 [n], >= 0. k: number of centers.
Returns (centers: float32 [k] ascending, cost: weighted SSE of the nearest-center assignment).)doc");

  py::class_<Checkpoint, std::shared_ptr<Checkpoint>>(m, "Checkpoint", R"doc(A safetensors checkpoint (file, sharded
directory or index), memory-mapped; for nuq checkpoints also its packed layers.

Checkpoint(path). Arrays it returns view the mapping (no copy, read-only) and keep it open.)doc")
      .def(py::init(&open_checkpoint), py::arg("path"))
      .def_property_readonly("path", [](const Checkpoint& c) { return c.file->path(); })
      .def_property_readonly("tensor_names", [](const Checkpoint& c) { return c.file->tensor_names(); },
                             "Every tensor name (packed layers' parts included).")
      .def_property_readonly("metadata", [](const Checkpoint& c) { return c.file->metadata(); },
                             "The __metadata__ strings (the index's for a sharded checkpoint).")
      .def_property_readonly("is_quantized", [](const Checkpoint& c) { return c.quantized; },
                             "Whether the checkpoint has nuq quantization_config metadata.")
      .def_property_readonly(
          "layers",
          [](const Checkpoint& c) {
            std::vector<std::string> names;
            for (const auto& e : c.config.layers) names.push_back(e.first);
            return names;
          },
          "Base names of the packed layers, e.g. 'model.layers.0.mlp.up_proj'.")
      .def_property_readonly(
          "layer_config",
          [](const Checkpoint& c) {
            py::dict d;
            for (const auto& e : c.config.layers) {
              py::dict m;
              m["bits"] = e.second.bits;
              m["rows"] = e.second.rows;
              m["cols"] = e.second.cols;
              m["group_size"] = e.second.group_size;
              m["nnz"] = e.second.nnz;
              m["method"] = e.second.method;
              m["source_dtype"] = e.second.source_dtype;
              d[py::str(e.first)] = m;
            }
            return d;
          },
          "Per packed layer: bits, rows, cols, group_size, nnz, method, source_dtype.")
      .def("layer", &checkpoint_layer, py::arg("base"), "The packed layer `base` as a validated zero-copy PackedLayer.")
      .def("tensor", &checkpoint_tensor, py::arg("name"),
           "Tensor `name` as a read-only NumPy view in its stored dtype (BF16 is widened to a float32 copy).")
      .def("__contains__", [](const Checkpoint& c, const std::string& n) { return c.file->contains(n); });

  m.def("write_checkpoint", &write_checkpoint, py::arg("path"), py::arg("layers"), py::arg("tensors") = py::dict(),
        py::arg("metadata") = std::map<std::string, std::string>{},
        R"doc(Write a nuq checkpoint (one .safetensors file, docs/format.md), atomically.

layers: dict base name -> PackedLayer, stored as <base>.qweight, .lut and (when nnz > 0) the sparse CSR.
tensors: dict name -> array of any safetensors dtype (C-contiguous), stored unquantized.
metadata: extra str -> str metadata; quantization_config is added.)doc");
}

}  // namespace nuq::python
