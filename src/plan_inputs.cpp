// Internal planning inputs (src/plan_inputs.hpp).
#include "plan_inputs.hpp"

#include <cstring>

#include "nuq/error.hpp"
#include "nuq/inspect.hpp"
#include "nuq/mapped_file.hpp"
#include "nuq/packed.hpp"
#include "nuq/quantize_checkpoint.hpp"

namespace nuq::detail {

ModelReader::ModelReader(const std::string& path) : path_(path) {
  if (detect_checkpoint_kind(path) == CheckpointKind::gguf) {
    gguf_ = std::make_unique<GgufFile>(path);
    for (const GgufTensorInfo& info : gguf_->tensors()) {
      const GgmlTypeTraits* traits = ggml_type_traits(uint32_t(info.type));
      const bool floating = traits && traits->can_dequantize && info.type != GgmlType::I8 &&
                            info.type != GgmlType::I16 && info.type != GgmlType::I32 && info.type != GgmlType::I64;
      if (floating && default_quantize_rule(info.name, info.shape)) tensors_.push_back({info.name, info.shape});
    }
  } else {
    st_ = std::make_unique<SafetensorsCheckpoint>(path);
    NUQ_CHECK(!st_->metadata().count(kQuantizationConfigKey), Errc::invalid_argument,
              "{}: this checkpoint is already quantized (it has quantization_config metadata)", path);
    for (const std::string& name : st_->tensor_names()) {
      const SafetensorsTensorInfo& info = st_->info(name);
      const bool floating = info.dtype == DType::F32 || info.dtype == DType::F16 || info.dtype == DType::BF16;
      if (floating && default_quantize_rule(name, info.shape)) tensors_.push_back({name, info.shape});
    }
  }
}

Buffer ModelReader::read(const ModelTensor& t) const {
  if (gguf_) {
    Buffer b = gguf_->dequantize(t.name);
    release_mapped_pages(gguf_->tensor_bytes(*gguf_->find_tensor(t.name)));
    return b;
  }
  Buffer b = to_float32(st_->tensor(t.name));
  release_mapped_pages(st_->file_of(t.name).tensor_bytes(st_->info(t.name)));
  return b;
}

std::vector<float> steering_sensitivity(const StatisticsFile& stats, const ModelTensor& t) {
  if (stats.kind() == StatsKind::fisher) return stats.fisher(t.name, t.shape);
  if (!stats.is_calibrate_output()) return {};
  const int64_t rows = t.shape[0], cols = t.shape[1];
  const std::vector<double> diag = stats.hessian_diagonal(weight_base(t.name), cols);
  std::vector<float> out(std::size_t(rows * cols));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) out[std::size_t(r * cols + c)] = float(diag[std::size_t(c)]);
  return out;
}

QuantizerSteering::QuantizerSteering(const std::string& stats_path, const std::string& hessian_path, double damping)
    : damping_(damping) {
  if (!stats_path.empty()) {
    stats_ = std::make_unique<StatisticsFile>(stats_path);
    steers_ = stats_->kind() == StatsKind::fisher || stats_->is_calibrate_output();
  }
  if (!hessian_path.empty()) {
    feedback_ = std::make_unique<StatisticsFile>(hessian_path);
    NUQ_CHECK(feedback_->kind() == StatsKind::hessian && !feedback_->is_calibrate_output(), Errc::invalid_argument,
              "{}: the error-feedback statistics must be the full XᵀX of `nuq calibrate --hessian`", hessian_path);
  }
}

void QuantizerSteering::check(const std::vector<ModelTensor>& tensors) const {
  for (const ModelTensor& t : tensors) {
    if (stats_ && stats_->kind() == StatsKind::fisher)
      NUQ_CHECK(stats_->has_fisher(t.name), Errc::invalid_argument, "{}: no Fisher tensor '{}'", stats_->path(),
                t.name);
    if (stats_ && stats_->is_calibrate_output())
      NUQ_CHECK(stats_->has_layer(weight_base(t.name)), Errc::invalid_argument, "{}: no activation statistics for '{}'",
                stats_->path(), t.name);
    if (feedback_)
      NUQ_CHECK(feedback_->has_layer(weight_base(t.name)) && feedback_->has_hessian_matrix(weight_base(t.name), t.shape[1]),
                Errc::invalid_argument, "{}: no full XᵀX for layer '{}'", feedback_->path(), weight_base(t.name));
  }
}

QuantizerSteering::Layer QuantizerSteering::load(const ModelTensor& t) const {
  Layer l;
  if (steers_) l.sensitivity = steering_sensitivity(*stats_, t);
  if (feedback_) l.xtx = feedback_->hessian_matrix(weight_base(t.name), t.shape[1]);
  l.damping = damping_;
  return l;
}

LayerStatistics QuantizerSteering::Layer::statistics() const {
  LayerStatistics s;
  if (!sensitivity.empty()) s.sensitivity = sensitivity.data();
  if (!xtx.empty()) s.error_feedback_hessian = xtx.data();
  s.damping = damping;
  return s;
}

}  // namespace nuq::detail
