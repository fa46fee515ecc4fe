// Bindings for the whole-model tasks of include/nuq/model_tasks.hpp (the code behind `nuq calibrate`,
// `nuq fisher`, `nuq eval` and nuq_generate) and `nuq convert`. They are private (_calibrate, ...): the
// Python functions in python/nuq/_tasks.py add the progress bar and check arguments first. Errors name
// options in Python spelling (ArgStyle::python). The GIL is released while the model runs; the progress
// callback is called with it held, between windows (or tokens), and an exception it raises stops the
// task and propagates unchanged.
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <string>

#include "bindings.hpp"
#include "interop.hpp"
#include "nuq/llama.hpp"
#include "nuq/model_tasks.hpp"
#ifdef NUQ_WITH_CUDA
#include "nuq/llama_cuda.hpp"
#endif

namespace nuq::python {
namespace {

LinearBackendFactory backend_factory() {
#ifdef NUQ_WITH_CUDA
  return [](const std::string& device) -> std::shared_ptr<LinearBackend> {
    return cuda::make_linear_backend(device == "cuda" ? cuda::ActivationType::f16 : cuda::ActivationType::bf16);
  };
#else
  return nullptr;
#endif
}

void check_callable(const py::object& progress, const char* fn) {
  if (!progress.is_none() && !PyCallable_Check(progress.ptr()))
    throw py::type_error(std::string(fn) + ": progress must be callable or None");
}

const char* stage_name(TextTaskProgress::Stage stage) {
  switch (stage) {
    case TextTaskProgress::Stage::loaded: return "loaded";
    case TextTaskProgress::Stage::window: return "window";
    case TextTaskProgress::Stage::disk: return "disk";
    case TextTaskProgress::Stage::block: return "block";
  }
  return "?";
}

// The C++ callback that forwards a window's (or, by block, a block's) progress to `progress` as a dict.
TextTaskCallback text_task_callback(CallbackScope& scope, const py::object& progress) {
  return [&scope, &progress](const TextTaskProgress& p) {
    py::gil_scoped_acquire gil;
    scope.call([&] {
      if (progress.is_none()) return;
      py::dict d;
      d["stage"] = stage_name(p.stage);
      if (p.stage == TextTaskProgress::Stage::block) {
        d["block"] = p.block;
        d["blocks"] = p.blocks;
        d["first_block"] = p.first_block;
        d["block_seconds"] = p.block_seconds;
      } else if (p.stage == TextTaskProgress::Stage::disk) {
        d["where"] = p.where;
        d["bytes_needed"] = p.bytes_needed;
        d["bytes_free"] = p.bytes_free;
      }
      d["window"] = p.window;
      d["windows"] = p.windows;
      d["tokens"] = p.tokens;
      d["tokens_done"] = p.tokens_done;
      d["value"] = p.value;
      d["window_seconds"] = p.window_seconds;
      d["elapsed_seconds"] = p.elapsed_seconds;
      d["load_seconds"] = p.load_seconds;
      d["description"] = p.model ? p.model->description() : std::string();
      progress(d);
    });
  };
}

py::dict calibrate_py(const std::string& model, const std::string& text, const std::string& out,
                      const std::optional<std::string>& hessian, const std::optional<std::string>& tokenizer,
                      int64_t ctx, int64_t max_tokens, int64_t skip_tokens, int threads, bool by_block,
                      int sequential_bits, double sequential_sparse, py::object progress) {
  check_callable(progress, "calibrate");
  CalibrateOptions o;
  o.model = model, o.text = text, o.out = out, o.hessian = hessian.value_or("");
  o.tokenizer = tokenizer.value_or("");
  o.ctx = ctx, o.max_tokens = max_tokens, o.skip_tokens = skip_tokens, o.threads = threads;
  o.by_block = by_block;
  if (sequential_bits > 0) {  // what `nuq calibrate --sequential B --sequential-sparse F` builds
    QuantizeOptions q;
    q.bits = sequential_bits;
    q.outlier_fraction = sequential_sparse;
    q.threads = threads;
    o.sequential = q;
  }
  o.arg_style = ArgStyle::python;
  CallbackScope scope;
  const TextTaskCallback cb = text_task_callback(scope, progress);
  const CalibrateResult r = scope.run([&] { return calibrate_activations(o, cb); });
  py::dict d;
  d["out"] = out;
  d["hessian"] = hessian ? py::object(py::str(*hessian)) : py::none();
  d["layers"] = r.layers;
  d["tokens"] = r.tokens;
  d["windows"] = r.windows;
  d["hessian_inputs"] = r.hessian_inputs;
  d["hessian_layers"] = r.hessian_layers;
  d["seconds"] = r.seconds;
  return d;
}

py::dict fisher_py(const std::string& model, const std::string& text, const std::string& out,
                   const std::optional<std::string>& tokenizer, int64_t ctx, int64_t max_tokens, int64_t skip_tokens,
                   int threads, py::object progress) {
  check_callable(progress, "fisher");
  FisherOptions o;
  o.model = model, o.text = text, o.out = out, o.tokenizer = tokenizer.value_or("");
  o.ctx = ctx, o.max_tokens = max_tokens, o.skip_tokens = skip_tokens, o.threads = threads;
  o.arg_style = ArgStyle::python;
  CallbackScope scope;
  const TextTaskCallback cb = text_task_callback(scope, progress);
  const FisherResult r = scope.run([&] { return compute_fisher(o, cb); });
  py::dict d;
  d["out"] = out;
  d["weights"] = r.weights;
  d["windows"] = r.windows;
  d["tokens"] = r.tokens;
  d["mean_loss"] = r.mean_loss;
  d["seconds"] = r.seconds;
  d["load_seconds"] = r.load_seconds;
  return d;
}

py::dict evaluate_py(const std::string& model, const std::string& text, const std::optional<std::string>& tokenizer,
                     int64_t ctx, int64_t max_tokens, int64_t step, int threads, bool decode_packed,
                     const std::string& arithmetic,
                     const std::string& device, const std::optional<std::string>& kv_calibration,
                     const std::optional<std::string>& kv_path, const std::string& kv_method, int kv_bits,
                     std::optional<double> kv_outliers, const std::string& kv_outliers_text, py::object progress) {
  check_callable(progress, "evaluate");
  EvalOptions o;
  o.model = model, o.text = text, o.tokenizer = tokenizer.value_or("");
  o.ctx = ctx, o.max_tokens = max_tokens, o.step = step, o.threads = threads;
  o.decode_packed = decode_packed, o.arithmetic = arithmetic, o.device = device;
  o.make_backend = backend_factory();
  o.kv.calibration = kv_calibration.value_or("");
  o.kv.path = kv_path.value_or("");
  o.kv.method = kv_method;
  o.kv.bits = kv_bits;
  if (kv_outliers) o.kv.outlier_fraction = *kv_outliers, o.kv.outliers_text = kv_outliers_text;
  o.arg_style = ArgStyle::python;
  CallbackScope scope;
  const TextTaskCallback cb = text_task_callback(scope, progress);
  const EvalResult r = scope.run([&] { return evaluate_perplexity(o, cb); });
  // The very object `nuq eval --json` prints.
  return py::module_::import("json").attr("loads")(to_json(r, -1));
}

py::dict generate_py(const std::string& model, const std::string& prompt, const std::optional<std::string>& tokenizer,
                     int64_t max_new_tokens, float temperature, uint64_t seed, int threads, bool decode_packed,
                     const std::string& arithmetic, const std::string& device,
                     const std::optional<std::string>& kv_calibration,
                     py::object progress) {
  check_callable(progress, "generate");
  GenerateOptions o;
  o.model = model, o.prompt = prompt, o.tokenizer = tokenizer.value_or("");
  o.steps = max_new_tokens, o.temperature = temperature, o.seed = seed, o.threads = threads;
  o.decode_packed = decode_packed, o.arithmetic = arithmetic, o.device = device;
  o.make_backend = backend_factory();
  o.kv_calibration = kv_calibration.value_or("");
  o.arg_style = ArgStyle::python;
  CallbackScope scope;
  const auto cb = [&scope, &progress](const GenerateProgress& p) {
    py::gil_scoped_acquire gil;
    scope.call([&] {
      if (progress.is_none()) return;
      py::dict d;
      d["stage"] = p.stage == GenerateProgress::Stage::loaded      ? "loaded"
                   : p.stage == GenerateProgress::Stage::prefilled ? "prefilled"
                                                                   : "token";
      d["step"] = p.step;
      d["steps"] = p.steps;
      d["prompt_tokens"] = p.prompt_tokens;
      d["token"] = p.token;
      // Bytes, not str: a token can hold part of a UTF-8 character.
      d["piece"] = py::bytes(p.piece);
      d["description"] = p.model ? p.model->description() : std::string();
      progress(d);
    });
  };
  const GenerateResult r = scope.run([&] { return generate_text(o, cb); });
  py::dict d;
  d["text"] = py::bytes(r.text).attr("decode")("utf-8", "replace");
  d["tokens"] = r.ids;
  d["prompt_tokens"] = r.prompt_ids;
  d["description"] = r.description;
  d["linear_bits_per_weight"] = r.linear_bits_per_weight;
  d["prefill_seconds"] = r.prefill_seconds;
  d["decode_seconds"] = r.decode_seconds;
  d["tokens_per_second"] = r.ids.empty() ? 0.0 : double(r.ids.size()) / r.decode_seconds;
  d["kv_cache"] = r.quantized_cache ? "quantized" : "fp32";
  d["arithmetic"] = r.arithmetic;
  d["kv_cache_bytes"] = r.cache_bytes;
  d["kv_cache_tokens"] = r.cache_tokens;
  d["kv_cache_fp16_bytes"] = r.cache_fp16_bytes;
  return d;
}

py::dict convert_py(const std::string& input, const std::string& out) {
  std::unique_ptr<LlamaModel> model;
  {
    py::gil_scoped_release release;
    model = LlamaModel::load(input);
    model->save_hf(out);
  }
  py::dict d;
  d["out"] = out;
  d["description"] = model->description();
  d["layers"] = model->config().n_layers;
  return d;
}

}  // namespace

void bind_tasks(py::module_& m) {
  m.def("_calibrate", &calibrate_py, py::arg("model"), py::arg("text"), py::arg("out"), py::arg("hessian"),
        py::arg("tokenizer"), py::arg("ctx"), py::arg("max_tokens"), py::arg("skip_tokens"), py::arg("threads"),
        py::arg("by_block"), py::arg("sequential_bits"), py::arg("sequential_sparse"), py::arg("progress"),
        "nuq.calibrate without the argument checks and progress bar (python/nuq/_tasks.py).");
  m.def("_fisher", &fisher_py, py::arg("model"), py::arg("text"), py::arg("out"), py::arg("tokenizer"),
        py::arg("ctx"), py::arg("max_tokens"), py::arg("skip_tokens"), py::arg("threads"), py::arg("progress"),
        "nuq.fisher without the argument checks and progress bar.");
  m.def("_evaluate", &evaluate_py, py::arg("model"), py::arg("text"), py::arg("tokenizer"), py::arg("ctx"),
        py::arg("max_tokens"), py::arg("step"), py::arg("threads"), py::arg("decode_packed"), py::arg("arithmetic"),
        py::arg("device"), py::arg("kv_calibration"), py::arg("kv_path"), py::arg("kv_method"), py::arg("kv_bits"),
        py::arg("kv_outliers"), py::arg("kv_outliers_text"), py::arg("progress"),
        "nuq.evaluate without the argument checks and progress bar.");
  m.def("_generate", &generate_py, py::arg("model"), py::arg("prompt"), py::arg("tokenizer"),
        py::arg("max_new_tokens"), py::arg("temperature"), py::arg("seed"), py::arg("threads"),
        py::arg("decode_packed"), py::arg("arithmetic"), py::arg("device"), py::arg("kv_calibration"), py::arg("progress"),
        "nuq.generate without the argument checks and progress bar.");
  m.def("_convert", &convert_py, py::arg("input"), py::arg("out"), "nuq.convert (python/nuq/_tasks.py).");
}

}  // namespace nuq::python
