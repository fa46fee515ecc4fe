// Codebook tuning: after a checkpoint is quantized, its codebooks (the fp16 LUT entries) are moved by
// gradient descent so that the quantized decoder's next-token distribution matches its full-precision
// reference's (distillation, the mean KL divergence per position) on calibration text. The sparse part
// and every size stay as they were, and so do the indices unless tune_indices is set: the result is the
// same packed format with the same bits per weight, only better codebook values (and, optionally, some
// weights reading another entry). docs/quantization.md ("Codebook tuning") has the method and its
// measured effect.
//
// Why: per-row k-means (even sensitivity-weighted, even with error feedback) places each codebook to
// reconstruct its own layer's weights or outputs; the errors of all layers then add up through the
// network. The gradient of the model's output with respect to the codebooks sees all of them at once.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace nuq {

struct CodebookTuningOptions {
  int64_t ctx = 512;  // window length in tokens, the start token included (the windows of `nuq eval`)
  int epochs = 1;     // passes over the calibration windows; one Adam step per window
  // Adam's step size relative to each codebook's scale (the RMS of its entries): an entry moves by about
  // learning_rate × scale per step at most.
  double learning_rate = 2e-4;
  int threads = 0;  // 0 = all cores
  // Also tune the RMSNorm gains (full-precision tensors of the checkpoint, written in their stored dtype).
  bool tune_norms = false;
  // Also move weights between the entries of their codebook (the indices), by straight-through
  // estimation: each weight keeps an fp32 offset from the entry it reads, trained by Adam on the weight's
  // gradient (step index_learning_rate × the codebook's RMS), and reads whichever entry of its codebook is
  // nearest to entry + offset after each step. Weights of the sparse part keep their index. The bits per
  // weight do not change; only which entry each index names. Costs 12 bytes of state per packed weight.
  // The step must stay small: a move is a whole gap between entries, and single-window gradients are
  // mostly noise, so a step that lets many weights cross makes the model worse (2e-2 on stories260K; on
  // SmolLM2-135M at 4 bits 2e-3 helps and 4e-3 already diverges).
  bool tune_indices = false;
  double index_learning_rate = 2e-3;
  // Every this many steps the optimizer's state is saved (atomically) in the output directory as
  // .nuq-tune-state.safetensors; a run started again with the same inputs and settings continues from
  // it and, with the same thread count, writes the same bytes as an uninterrupted run. 0: never.
  int64_t save_every = 8;
};

struct CodebookTuningProgress {
  int64_t step = 0, steps = 0;  // 0-based step; steps = epochs × windows
  int epoch = 0;
  double kl = 0;       // the window's mean KL divergence (nats per position) before this step's update
  double seconds = 0;  // this step's time
  int64_t resumed_steps = 0;  // steps restored from a saved state before this run's first step
};

struct CodebookTuningResult {
  int64_t windows = 0, tokens = 0, steps = 0;
  int64_t resumed_steps = 0;        // steps restored from a saved state instead of run
  int64_t layers = 0, entries = 0;  // packed layers tuned and LUT entries among them
  int64_t indices_changed = 0;      // with tune_indices: weights whose index differs from the input's
  double first_epoch_kl = 0;        // mean KL per position over the first epoch (each window before its step)
  double last_epoch_kl = 0;         // the same over the last epoch
  std::vector<std::string> files;   // written into the output directory, relative names
  double seconds = 0;
};

// Tunes the codebooks of the nuq-packed checkpoint `packed_path` (a file or a directory, as `nuq
// quantize` writes them) against `reference_path` (any checkpoint LlamaModel::load reads, e.g. the one it
// was quantized from) on the token stream `ids`, cut like `nuq eval`'s windows (`start` followed by
// ctx − 1 tokens). Writes a checkpoint into `output_dir` (created if absent): every file of the input
// with each packed layer's `.lut` replaced and the quantization_config's "extra" recording the tuning;
// small files beside a directory input (config.json, tokenizer, quant_report.json) are copied. Files
// are written atomically; an interrupted run resumes (CodebookTuningOptions::save_every). Throws
// nuq::Error (invalid_argument) when the models do not match, the packed checkpoint has no packed layer,
// or the output would overwrite the input.
CodebookTuningResult tune_codebooks(const std::string& packed_path, const std::string& reference_path,
                                    const std::vector<int32_t>& ids, int32_t start, const std::string& output_dir,
                                    const CodebookTuningOptions& options = {},
                                    const std::function<void(const CodebookTuningProgress&)>& progress = {});

}  // namespace nuq
