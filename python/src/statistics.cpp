// Bindings for sensitivity statistics (Fisher and Hessian accumulators, Hutchinson traces), the bit
// allocation solver and whole-checkpoint quantization with a Python progress callback.
#include <Python.h>
#include <pybind11/functional.h>
#include <pybind11/stl.h>

#include <cstring>
#include <exception>
#include <optional>

#include "bindings.hpp"
#include "interop.hpp"
#include "nuq/bit_allocation.hpp"
#include "nuq/codebook_tuning.hpp"
#include "nuq/hutchinson.hpp"
#include "nuq/quantize_checkpoint.hpp"
#include "nuq/sensitivity.hpp"

namespace nuq::python {
namespace {

template <class T>
py::array_t<T> to_numpy(const std::vector<T>& v, const Shape& shape) {
  std::vector<py::ssize_t> dims(shape.begin(), shape.end());
  py::array_t<T> out(dims);
  std::memcpy(out.mutable_data(), v.data(), v.size() * sizeof(T));
  return out;
}

Shape shape_of(const ArrayArg& a) {
  if (a.ndims() > Shape::kMaxRank)
    throw py::value_error(a.what + " has " + std::to_string(a.ndims()) + " dimensions; at most " +
                          std::to_string(Shape::kMaxRank) + " are supported");
  Shape s;
  for (int i = 0; i < a.ndims(); ++i) s.push_back(a.shape(i));
  return s;
}

// ---- accumulators --------------------------------------------------------------------------------------

void fisher_add(FisherAccumulator& acc, const std::string& name, py::handle grad_obj) {
  ArrayArg g(grad_obj, "FisherAccumulator.add", "grad");
  g.dtype({"float32"}).ndim(1, Shape::kMaxRank).contiguous();
  const Shape shape = shape_of(g);
  // The GIL stays held: the accumulators are not thread-safe, and it serializes calls on one object.
  acc.add(name, g.as<float>(), shape);
}

void hessian_add(HessianAccumulator& acc, const std::string& name, py::handle x_obj) {
  ArrayArg x(x_obj, "HessianAccumulator.add", "x");
  x.dtype({"float32"}).ndim(1, Shape::kMaxRank).contiguous();
  const int64_t cols = x.shape(x.ndims() - 1);
  int64_t tokens = 1;
  for (int i = 0; i + 1 < x.ndims(); ++i) tokens *= x.shape(i);
  acc.add(name, x.as<float>(), tokens, cols, cols);  // GIL held, as in fisher_add
}

DType parse_stats_dtype(const std::string& s) {
  if (s == "F32" || s == "float32") return DType::F32;
  if (s == "F64" || s == "float64") return DType::F64;
  throw py::value_error("HessianAccumulator.save: dtype must be 'F32' or 'F64', got '" + s + "'");
}

// ---- bit allocation ----------------------------------------------------------------------------------

std::vector<std::vector<AllocationChoice>> to_choices(const std::vector<std::vector<std::pair<uint64_t, double>>>& in) {
  std::vector<std::vector<AllocationChoice>> out(in.size());
  for (std::size_t l = 0; l < in.size(); ++l)
    for (const auto& c : in[l]) out[l].push_back({c.first, c.second});
  return out;
}

py::dict allocation_dict(const Allocation& a) {
  py::dict d;
  d["choice"] = a.choice;
  d["bytes"] = a.bytes;
  d["omega"] = a.omega;
  d["granule"] = a.granule;
  d["exact"] = a.exact;
  d["slack_bytes"] = a.slack_bytes;
  return d;
}

// ---- checkpoints -------------------------------------------------------------------------------------

const char* stage_name(CheckpointQuantizeProgress::Stage s) {
  switch (s) {
    case CheckpointQuantizeProgress::Stage::disk: return "disk";
    case CheckpointQuantizeProgress::Stage::start: return "start";
    case CheckpointQuantizeProgress::Stage::quantized: return "quantized";
    case CheckpointQuantizeProgress::Stage::resumed: return "resumed";
    case CheckpointQuantizeProgress::Stage::assemble: return "assemble";
    case CheckpointQuantizeProgress::Stage::done: return "done";
  }
  return "?";
}

py::dict record_dict(const QuantizedTensorRecord& r) {
  py::dict d;
  d["name"] = r.name;
  d["base"] = r.base;
  d["rows"] = r.rows;
  d["cols"] = r.cols;
  d["source_dtype"] = r.source_dtype;
  d["bits"] = r.bits;
  d["method"] = std::string(to_string(r.method));
  d["group_size"] = r.group_size;
  d["nnz"] = r.nnz;
  d["outliers"] = r.outliers;
  d["sensitive"] = r.sensitive;
  d["mse"] = r.mse;
  d["weighted_mse"] = r.weighted_mse;
  d["max_abs_error"] = r.max_abs_error;
  d["bits_per_weight"] = r.bits_per_weight;
  d["sensitivity"] = r.sensitivity == SensitivitySource::fisher    ? "fisher"
                     : r.sensitivity == SensitivitySource::missing ? "missing"
                                                                   : "none";
  d["error_feedback"] = r.error_feedback;
  d["relative_output_error"] = r.relative_output_error;
  d["resumed"] = r.resumed;
  d["seconds"] = r.seconds;
  return d;
}

py::dict quantize_checkpoint_py(const std::string& input, const std::string& output_dir, int bits,
                                const std::string& method, int64_t group_size, double outlier_fraction,
                                double sensitive_fraction, bool outliers_per_row, const std::optional<std::string>& fisher,
                                const std::optional<std::string>& plan, const std::vector<std::string>& include,
                                const std::vector<std::string>& exclude, uint64_t max_shard_bytes, int threads, bool force,
                                bool restart, py::object progress, const std::optional<std::string>& hessian,
                                double damping) {
  CheckpointQuantizeOptions o;
  o.hessian_path = hessian.value_or("");
  o.hessian_damping = damping;
  o.input = input;
  o.output_dir = output_dir;
  try {
    o.layer.method = parse_quant_method(method);
  } catch (const Error& e) {
    throw py::value_error(std::string("quantize_checkpoint: method: ") + e.what());
  }
  o.layer.bits = bits;
  o.layer.group_size = group_size;
  o.layer.outlier_fraction = outlier_fraction;
  o.layer.sensitive_fraction = sensitive_fraction;
  o.layer.outliers_per_row = outliers_per_row;
  o.layer.threads = threads;
  o.fisher_path = fisher.value_or("");
  o.plan_path = plan.value_or("");
  o.include = include;
  o.exclude = exclude;
  o.max_shard_bytes = max_shard_bytes;
  o.threads = threads;
  o.force = force;
  o.restart = restart;
  o.arg_style = ArgStyle::python;
  if (!progress.is_none() && !PyCallable_Check(progress.ptr()))
    throw py::type_error("quantize_checkpoint: progress must be callable or None");
  CallbackScope scope;
  // Installed even without a user callback, so that Ctrl-C stops a long run between tensors.
  o.progress = [&scope, &progress](const CheckpointQuantizeProgress& p) {
    py::gil_scoped_acquire gil;
    scope.call([&] {
      if (progress.is_none()) return;
      py::dict d;
      d["stage"] = stage_name(p.stage);
      d["tensor_index"] = p.tensor_index;
      d["tensor_count"] = p.tensor_count;
      d["name"] = p.name;
      d["weights_done"] = p.weights_done;
      d["weights_total"] = p.weights_total;
      d["weights_resumed"] = p.weights_resumed;
      d["elapsed_seconds"] = p.elapsed_seconds;
      d["tensor_seconds"] = p.tensor_seconds;
      d["layer"] = p.layer ? py::object(record_dict(*p.layer)) : py::none();
      if (p.stage == CheckpointQuantizeProgress::Stage::disk) {
        d["bytes_needed"] = p.bytes_needed;
        d["bytes_free"] = p.bytes_free;
      }
      progress(d);
    });
  };
  const QuantizeCheckpointResult r = scope.run([&] { return quantize_checkpoint(o); });
  py::dict d;
  py::list layers;
  for (const auto& l : r.layers) layers.append(record_dict(l));
  d["layers"] = layers;
  d["tensors_copied"] = r.tensors_copied;
  d["quantized_weights"] = r.quantized_weights;
  d["average_bits_per_weight"] = r.average_bits_per_weight;
  d["files"] = r.files;
  d["output_bytes"] = r.output_bytes;
  d["warnings"] = r.warnings;
  d["seconds"] = r.seconds;
  return d;
}

py::dict tune_codebooks_py(const std::string& packed, const std::string& reference, const std::vector<int32_t>& ids,
                           int32_t start, const std::string& output_dir, int64_t ctx, int epochs, double lr, bool norms,
                           bool indices, double index_lr, int64_t save_every, int threads, py::object progress) {
  CodebookTuningOptions o;
  o.ctx = ctx, o.epochs = epochs, o.learning_rate = lr, o.tune_norms = norms, o.tune_indices = indices,
  o.index_learning_rate = index_lr, o.save_every = save_every,
  o.threads = threads;
  if (!progress.is_none() && !PyCallable_Check(progress.ptr()))
    throw py::type_error("tune_codebooks: progress must be callable or None");
  CallbackScope scope;
  // Installed even without a user callback, so that Ctrl-C stops a long run between steps.
  const auto on_step = [&scope, &progress](const CodebookTuningProgress& p) {
    py::gil_scoped_acquire gil;
    scope.call([&] {
      if (progress.is_none()) return;
      py::dict d;
      d["step"] = p.step, d["steps"] = p.steps, d["epoch"] = p.epoch, d["kl"] = p.kl, d["seconds"] = p.seconds;
      d["resumed_steps"] = p.resumed_steps;
      progress(d);
    });
  };
  const CodebookTuningResult r =
      scope.run([&] { return tune_codebooks(packed, reference, ids, start, output_dir, o, on_step); });
  py::dict d;
  d["windows"] = r.windows, d["tokens"] = r.tokens, d["steps"] = r.steps, d["resumed_steps"] = r.resumed_steps;
  d["layers"] = r.layers, d["entries"] = r.entries, d["first_epoch_kl"] = r.first_epoch_kl;
  d["last_epoch_kl"] = r.last_epoch_kl, d["files"] = r.files, d["seconds"] = r.seconds;
  d["indices_changed"] = r.indices_changed;
  return d;
}

}  // namespace

void bind_statistics(py::module_& m) {
  py::class_<FisherAccumulator>(m, "FisherAccumulator", R"doc(Diagonal empirical Fisher, E[g**2] per weight tensor,
summed in float64 (docs/sensitivity.md). Files it saves are what `nuq quantize --fisher` reads.
Not thread-safe in C++; from Python, calls on one accumulator are serialized by the GIL.)doc")
      .def(py::init<>())
      .def("add", &fisher_add, py::arg("name"), py::arg("grad"),
           R"doc(Add one sample: grad is float32, any shape (the weight's), C-contiguous. The first call for a
name fixes its shape; a different shape or a NaN/Inf entry raises ValueError and changes nothing.)doc")
      .def("merge", &FisherAccumulator::merge, py::arg("other"), "Add the sums and counts of another accumulator.")
      .def("names", &FisherAccumulator::names, "Tensor names, sorted.")
      .def("__contains__", [](const FisherAccumulator& a, const std::string& n) { return a.contains(n); })
      .def("count", [](const FisherAccumulator& a, const std::string& n) { return a.count(n); }, py::arg("name"),
           "Samples added for `name`.")
      .def("shape",
           [](const FisherAccumulator& a, const std::string& n) {
             const Shape& s = a.shape(n);
             return py::tuple(py::cast(std::vector<int64_t>(s.begin(), s.end())));
           },
           py::arg("name"))
      .def("sum", [](const FisherAccumulator& a, const std::string& n) { return to_numpy(a.sum(n), a.shape(n)); },
           py::arg("name"), "Sum of g**2: float64 array of the weight's shape (a copy).")
      .def("mean", [](const FisherAccumulator& a, const std::string& n) { return to_numpy(a.mean(n), a.shape(n)); },
           py::arg("name"), "Mean of g**2: float32 array of the weight's shape (a copy).")
      .def("save",
           [](const FisherAccumulator& a, const std::string& path) { a.save(path); },
           py::arg("path"), "Write the means (F32) and counts to a safetensors file, atomically.")
      .def_static("load",
                  [](const std::string& path) {
                    py::gil_scoped_release release;
                    return FisherAccumulator::load(path);
                  },
                  py::arg("path"), "Read a file written by save().");

  py::class_<HessianAccumulator>(m, "HessianAccumulator", R"doc(Layer-input second moments H = E[x x^T] per linear
layer (or only their diagonal), summed in float64 (docs/sensitivity.md).

HessianAccumulator(diagonal_only=False).)doc")
      .def(py::init<bool>(), py::arg("diagonal_only") = false)
      .def("add", &hessian_add, py::arg("name"), py::arg("x"),
           R"doc(Add input activations of layer `name` (its base name, e.g. 'model.layers.0.mlp.up_proj'):
x is float32 [..., cols], C-contiguous; every leading index is one token. The first call fixes cols;
a different width or a NaN/Inf raises ValueError and changes nothing.)doc")
      .def("alias", &HessianAccumulator::alias, py::arg("name"), py::arg("same_input_as"),
           "Declare that layer `name` reads the same input as `same_input_as` (q/k/v, gate/up).")
      .def("merge", &HessianAccumulator::merge, py::arg("other"))
      .def_property_readonly("diagonal_only", &HessianAccumulator::diagonal_only)
      .def("names", &HessianAccumulator::names, "Layers holding statistics, sorted (aliases excluded).")
      .def("aliases", [](const HessianAccumulator& a) {
        return std::map<std::string, std::string>(a.aliases().begin(), a.aliases().end());
      })
      .def("__contains__", [](const HessianAccumulator& a, const std::string& n) { return a.contains(n); })
      .def("cols", [](const HessianAccumulator& a, const std::string& n) { return a.cols(n); }, py::arg("name"))
      .def("count", [](const HessianAccumulator& a, const std::string& n) { return a.count(n); }, py::arg("name"),
           "Tokens seen.")
      .def("trace", [](const HessianAccumulator& a, const std::string& n) { return a.trace(n); }, py::arg("name"),
           "tr(H), H = sum of x x^T / tokens.")
      .def("diagonal",
           [](const HessianAccumulator& a, const std::string& n) { return to_numpy(a.diagonal(n), Shape{a.cols(n)}); },
           py::arg("name"), "diag(H): float64 [cols].")
      .def("matrix",
           [](const HessianAccumulator& a, const std::string& n) {
             return to_numpy(a.matrix(n), Shape{a.cols(n), a.cols(n)});
           },
           py::arg("name"), "H: float64 [cols, cols], symmetric; ValueError for diagonal-only layers.")
      .def("save",
           [](const HessianAccumulator& a, const std::string& path, const std::string& dtype) {
             a.save(path, parse_stats_dtype(dtype));
           },
           py::arg("path"), py::arg("dtype") = "F32", "Write means and counts to safetensors ('F32' or 'F64').")
      .def_static("load",
                  [](const std::string& path) {
                    py::gil_scoped_release release;
                    return HessianAccumulator::load(path);
                  },
                  py::arg("path"));

  m.def(
      "hutchinson_trace",
      [](py::function hvp, int64_t n, uint64_t seed, int64_t min_probes, int64_t max_probes, double rel_tolerance) {
        HutchinsonOptions o{seed, min_probes, max_probes, rel_tolerance};
        // The callback runs with the GIL held throughout: the estimator itself costs nothing next to it.
        auto call = [&hvp, n](const float* v, float* hv) {
          py::array_t<float> probe(std::vector<py::ssize_t>{n});
          std::memcpy(probe.mutable_data(), v, std::size_t(n) * sizeof(float));
          py::object result = hvp(probe);
          ArrayArg r(result, "hutchinson_trace", "the value returned by hvp");
          r.dtype({"float32", "float64"}).ndim(1).dim(0, n, "n");
          py::array_t<float> f = py::array_t<float, py::array::forcecast | py::array::c_style>::ensure(r.array);
          std::memcpy(hv, f.data(), std::size_t(n) * sizeof(float));
        };
        const TraceEstimate e = hutchinson_trace(call, n, o);
        py::dict d;
        d["trace"] = e.trace;
        d["standard_error"] = e.standard_error;
        d["probes"] = e.probes;
        d["converged"] = e.converged;
        return d;
      },
      py::arg("hvp"), py::arg("n"), py::kw_only(), py::arg("seed") = 0, py::arg("min_probes") = 8,
      py::arg("max_probes") = 1000, py::arg("rel_tolerance") = 1e-2,
      R"doc(Hutchinson's estimate of tr(H) from Hessian-vector products, with Rademacher probes.

hvp: callable(v) -> H @ v, where v is a new float32 [n] array of +-1 and the result is float32 or
     float64 [n] (NumPy or any CPU DLPack/buffer producer). Exceptions it raises propagate unchanged.
n: dimension. seed: probes are a deterministic function of it. Stops after at least min_probes once the
standard error is <= rel_tolerance * |estimate|, or after max_probes.
Returns a dict: trace, standard_error, probes, converged.)doc");

  m.def(
      "allocate_bits",
      [](const std::vector<std::vector<std::pair<uint64_t, double>>>& layers, uint64_t budget_bytes, int64_t max_units) {
        const auto choices = to_choices(layers);
        AllocationOptions o;
        o.max_units = max_units;
        return allocation_dict(allocate_bits(choices, budget_bytes, o));
      },
      py::arg("layers"), py::arg("budget_bytes"), py::arg("max_units") = int64_t(1) << 18,
      R"doc(Multiple-choice knapsack: pick one (bytes, omega) choice per layer minimizing the sum of omega
with total bytes <= budget_bytes, by exact dynamic programming (docs/sensitivity.md).

layers: list (one entry per layer) of lists of (bytes: int, omega: float >= 0) tuples.
max_units: bound on the DP's budget axis; beyond it sizes are rounded up (result flagged exact=False).
Returns a dict: choice (list of indices, one per layer), bytes, omega, granule, exact, slack_bytes.
ValueError for an infeasible budget (naming the minimum size), an empty layer or a NaN/negative omega.)doc");
  m.def(
      "pareto_frontier",
      [](const std::vector<std::vector<std::pair<uint64_t, double>>>& layers, int64_t max_units) {
        AllocationOptions o;
        o.max_units = max_units;
        const auto points = pareto_frontier(to_choices(layers), o);
        py::list out;
        for (const auto& p : points) {
          py::dict d;
          d["bytes"] = p.bytes;
          d["omega"] = p.omega;
          d["choice"] = p.choice;
          out.append(d);
        }
        return out;
      },
      py::arg("layers"), py::arg("max_units") = int64_t(1) << 18,
      "Pareto frontier of (total bytes, total omega) over all allocations of `layers` (as in allocate_bits), "
      "sorted by bytes with omega strictly decreasing: a list of dicts bytes, omega, choice.");
  m.def(
      "minimum_bytes",
      [](const std::vector<std::vector<std::pair<uint64_t, double>>>& layers) { return minimum_bytes(to_choices(layers)); },
      py::arg("layers"), "Smallest total size any allocation of `layers` (as in allocate_bits) can have.");
}

void bind_checkpoint_quantizer(py::module_& m) {
  m.def("tune_codebooks", &tune_codebooks_py, py::arg("packed"), py::arg("reference"), py::arg("ids"),
        py::arg("start"), py::arg("output_dir"), py::kw_only(), py::arg("ctx") = 512, py::arg("epochs") = 1,
        py::arg("lr") = 2e-4, py::arg("norms") = false, py::arg("indices") = false, py::arg("index_lr") = 2e-3,
        py::arg("save_every") = 8, py::arg("threads") = 0, py::arg("progress") = py::none(),
        R"doc(Tune the codebooks of a packed checkpoint by distillation from its reference (the library behind
`nuq tune`, docs/quantization.md#codebook-tuning-nuq-tune): Adam on the LUT entries (and with norms=True
the RMSNorm gains) minimizing the mean KL divergence between the reference's and the quantized model's
next-token distributions; sparse part and sizes unchanged. With indices=True each weight may also move
to another entry of its codebook (straight-through offsets, Adam step index_lr x the codebook's RMS).

packed: nuq-packed checkpoint (file or directory). reference: any checkpoint the decoder reads.
ids: calibration token ids (a list or int32 array), cut into windows of `start` + ctx - 1 tokens.
output_dir: created if absent, not the input's. lr: Adam step relative to each codebook's RMS (cosine
decay after a 5% warm-up). save_every: steps between saved optimizer states; a call with the same
arguments after an interruption resumes. progress: optional callable(dict) with step, steps, epoch, kl,
seconds, resumed_steps; an exception it raises stops the run and propagates.
Returns a dict: windows, tokens, steps, resumed_steps, layers, entries, first_epoch_kl, last_epoch_kl,
files, seconds, indices_changed.)doc");
  m.def("quantize_checkpoint", &quantize_checkpoint_py, py::arg("input"), py::arg("output_dir"), py::arg("bits") = 4,
        py::kw_only(), py::arg("method") = "nuq", py::arg("group_size") = 0, py::arg("outlier_fraction") = 0.0,
        py::arg("sensitive_fraction") = 0.0, py::arg("outliers_per_row") = false, py::arg("fisher") = py::none(),
        py::arg("plan") = py::none(), py::arg("include") = std::vector<std::string>{},
        py::arg("exclude") = std::vector<std::string>{}, py::arg("max_shard_bytes") = uint64_t(5'000'000'000),
        py::arg("threads") = 0, py::arg("force") = false, py::arg("restart") = false, py::arg("progress") = py::none(),
        py::arg("hessian") = py::none(), py::arg("damping") = 0.01,
        R"doc(Quantize a whole checkpoint into a packed nuq checkpoint, streaming one tensor at a time and
resuming an interrupted run (the library behind `nuq quantize`, docs/quantize-cli.md).

input: .safetensors file, sharded directory or index .json, or .gguf file. output_dir: created if absent.
bits, method, group_size, outlier_fraction, sensitive_fraction, outliers_per_row: as in nuq.quantize,
  for every selected layer (a plan overrides them per layer).
fisher: optional safetensors file of per-weight sensitivities (same names and shapes).
hessian: optional `nuq calibrate --hessian` file (full XᵀX per layer input): round with error feedback
  (docs/quantization.md#error-feedback); damping as in nuq.quantize.
plan: optional JSON plan file (nuq plan). include/exclude: lists of regular expressions on tensor names.
max_shard_bytes: split bigger outputs into shards. threads: 0 = all cores.
force: replace a complete checkpoint in output_dir. restart: discard unfinished work instead of resuming.
progress: optional callable(dict) called from the calling thread with keys stage ('start', 'quantized',
  'resumed', 'assemble', 'done'), tensor_index, tensor_count, name, weights_done, weights_total,
  weights_resumed, elapsed_seconds, tensor_seconds and layer (a dict for 'quantized'/'resumed', else None).
  An exception it raises stops the work and propagates unchanged; the run can be resumed later.
The GIL is released while nuq works (other Python threads run) and held during callbacks.
Returns a dict: layers (list of per-layer dicts), tensors_copied, quantized_weights,
average_bits_per_weight, files, output_bytes, warnings, seconds.)doc");
}

}  // namespace nuq::python
