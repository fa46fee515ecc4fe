// Quantizing a whole checkpoint: choosing the layers, streaming them one at a time through
// quantize_linear(), and writing a packed safetensors checkpoint (docs/format.md) that can be resumed
// after a crash and is byte-identical whether or not it was. docs/quantize-cli.md describes the
// behaviour from the `nuq quantize` side; this is the library entry point the CLI and the Python
// bindings share.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "nuq/error.hpp"
#include "nuq/quantize.hpp"
#include "nuq/tensor.hpp"

namespace nuq {

// The rule applied when neither --include, --exclude nor a plan decides: a tensor is quantized when it
// is 2-D with both dimensions >= 2, its name ends in ".weight", and its name contains none of
// "embed", "token_embd", "wte", "wpe", "norm", "lm_head", "classifier" and is not exactly
// "output.weight" (GGUF's output head).
bool default_quantize_rule(std::string_view name, const Shape& shape);
// The rule above in words (printed by `nuq quantize --help`).
std::string_view default_quantize_rule_text();

// Where the sensitivities of a quantized layer came from.
enum class SensitivitySource { none, fisher, missing };  // missing: a fisher file was given without this tensor

struct QuantizedTensorRecord {
  std::string name;  // the input tensor, e.g. "model.layers.0.mlp.up_proj.weight"
  std::string base;  // the packed layer's base name, e.g. "model.layers.0.mlp.up_proj"
  int64_t rows = 0, cols = 0;
  std::string source_dtype;  // "F32", "BF16", "Q4_1", ...
  int bits = 0;
  QuantMethod method = QuantMethod::nuq;
  int64_t group_size = 0;  // resolved (cols for one codebook per row)
  int64_t nnz = 0, outliers = 0, sensitive = 0;
  double outlier_fraction = 0, sensitive_fraction = 0;
  double mse = 0, weighted_mse = 0, max_abs_error = 0, bits_per_weight = 0;
  SensitivitySource sensitivity = SensitivitySource::none;
  bool error_feedback = false;  // rounded with the layer's XᵀX (--hessian)
  double relative_output_error = 0;  // QuantizeReport::relative_output_error (error feedback only)
  bool resumed = false;  // finished by an earlier, interrupted run
  double seconds = 0;    // 0 when resumed; never written to any output file
};

struct CheckpointQuantizeProgress {
  enum class Stage {
    disk,       // before any layer: the run writes up to `bytes_needed` more bytes into the output directory,
                // which has `bytes_free` (0 when unknown); it refuses to start when they do not fit
    start,      // about to quantize `name` (tensor_index of tensor_count): once per tensor, before its work
    quantized,  // `name` was quantized now; `layer` is set
    resumed,    // `name` was found already quantized in the partial directory; `layer` is set
    assemble,   // writing output file `name` (tensor_index = file number, tensor_count = files)
    done,       // everything written; `name` is the output directory
  };
  Stage stage = Stage::start;
  int64_t tensor_index = 0;  // 0-based, among the tensors to quantize
  int64_t tensor_count = 0;
  std::string name;
  int64_t weights_done = 0;   // weights of the tensors to quantize finished so far (resumed ones included)
  int64_t weights_total = 0;
  int64_t weights_resumed = 0;  // of weights_done, those that were already finished before this run
  double elapsed_seconds = 0;   // since quantize_checkpoint() started
  double tensor_seconds = 0;    // time spent on `name` (quantized only)
  const QuantizedTensorRecord* layer = nullptr;
  uint64_t bytes_needed = 0, bytes_free = 0;  // disk
};

struct CheckpointQuantizeOptions {
  std::string input;       // .safetensors file, sharded directory / index .json, or .gguf file
  std::string output_dir;  // created if absent
  QuantizeOptions layer;   // defaults for every quantized layer (the plan overrides per layer)
  std::string fisher_path; // optional: safetensors checkpoint of per-weight sensitivities, same names/shapes
  // optional: `nuq calibrate --hessian` output (HessianAccumulator file with full XᵀX per layer input):
  // turns on error feedback (QuantizeOptions::hessian) for every layer it has, read one layer at a time.
  std::string hessian_path;
  double hessian_damping = 0.01;
  bool error_feedback = true;  // false: only measure each layer's output error with the --hessian file
  std::string plan_path;   // optional: JSON plan {"layers": {name: {bits, method, group_size, ...}}}
  // ECMAScript regular expressions searched (std::regex_search) in tensor names. When include is not
  // empty it replaces the default rule: exactly the matching 2-D tensors are quantized (plus the plan's).
  // exclude keeps matching tensors unquantized and wins over include, the plan and the default rule.
  std::vector<std::string> include;
  std::vector<std::string> exclude;
  // Bigger outputs are split into model-0000k-of-0000N files (tensor bytes; a packed layer is never split).
  uint64_t max_shard_bytes = 5'000'000'000;
  int threads = 0;          // for quantize_linear (0 = all cores); results do not depend on it
  bool force = false;       // replace a complete checkpoint already in output_dir
  bool restart = false;     // discard unfinished work in output_dir/.nuq-partial instead of resuming it
  std::string tool_version; // recorded in the metadata ("extra"); empty = the library version
  ArgStyle arg_style = ArgStyle::cli;  // how messages name the options above (--force or force=True)
  std::function<void(const CheckpointQuantizeProgress&)> progress;  // called from the calling thread
};

struct QuantizeCheckpointResult {
  std::vector<QuantizedTensorRecord> layers;  // in input order
  int64_t tensors_copied = 0;                 // tensors written unquantized
  int64_t quantized_weights = 0;
  double average_bits_per_weight = 0;  // over the quantized layers, every stored byte counted
  std::vector<std::string> files;      // written into output_dir, relative names
  uint64_t output_bytes = 0;           // sum of the sizes of the checkpoint files (headers included)
  std::vector<std::string> warnings;
  double seconds = 0;
};

// Quantizes `options.input` into `options.output_dir`:
//   model.safetensors, or model-0000k-of-0000N.safetensors + model.safetensors.index.json;
//   quant_report.json (per-layer error figures, deterministic, no timings);
//   small non-checkpoint files (config.json, tokenizer files) copied from an input directory.
// Work in progress lives in output_dir/.nuq-partial (one small file per finished layer); an interrupted
// run started again with the same input and options resumes from there, and the result is
// byte-identical to an uninterrupted run. Throws nuq::Error naming the tensor or file at fault.
QuantizeCheckpointResult quantize_checkpoint(const CheckpointQuantizeOptions& options);

// Name of the directory inside output_dir that holds unfinished work.
inline constexpr const char* kPartialDirName = ".nuq-partial";
// Name of the per-layer report written next to the checkpoint.
inline constexpr const char* kQuantReportName = "quant_report.json";

}  // namespace nuq
