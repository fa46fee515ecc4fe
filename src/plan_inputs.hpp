// Internal: what planning reads besides its own statistics — the layers `nuq quantize` selects in a
// checkpoint, and the files that steer the quantizer (`--fisher`, `--hessian`) — shared by the proxy
// planner (bit_allocation.cpp) and the measured one (measured_sensitivity.cpp), so that both quantize
// every candidate exactly as `nuq quantize` will.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "nuq/bit_allocation.hpp"
#include "nuq/gguf.hpp"
#include "nuq/safetensors.hpp"
#include "nuq/sensitivity.hpp"
#include "nuq/tensor.hpp"
#include "tensor_names.hpp"

namespace nuq::detail {

struct ModelTensor {
  std::string name;
  Shape shape;
};

// The model's tensors `nuq quantize` would quantize by default, readable as fp32 one at a time.
class ModelReader {
 public:
  explicit ModelReader(const std::string& path);
  const std::vector<ModelTensor>& tensors() const { return tensors_; }
  Buffer read(const ModelTensor& t) const;

 private:
  std::string path_;
  std::unique_ptr<GgufFile> gguf_;
  std::unique_ptr<SafetensorsCheckpoint> st_;
  std::vector<ModelTensor> tensors_;
};

// The per-weight sensitivity `nuq quantize --fisher FILE` gives the nuq quantizer for tensor t: the Fisher
// tensor itself, or a `nuq calibrate` file's per-column values repeated over the rows. Empty when the file
// steers nothing (nuq's own Hessian statistics).
std::vector<float> steering_sensitivity(const StatisticsFile& stats, const ModelTensor& t);

// The files that steer the quantizer, opened and checked once; per layer, the buffers LayerStatistics
// points into.
class QuantizerSteering {
 public:
  QuantizerSteering(const std::string& stats_path, const std::string& hessian_path, double damping);
  // Fisher or `nuq calibrate` statistics: the nuq quantizer is weighted by them (and a sparse fraction
  // is split into sensitive and outlier parts, make_candidates).
  bool steers() const { return steers_; }
  // Throws naming the file and the tensor when a statistic the quantizer will need is missing.
  void check(const std::vector<ModelTensor>& tensors) const;
  struct Layer {
    std::vector<float> sensitivity;
    std::vector<double> xtx;
    LayerStatistics statistics() const;
    double damping = 0.01;
  };
  Layer load(const ModelTensor& t) const;

 private:
  std::unique_ptr<StatisticsFile> stats_, feedback_;
  double damping_ = 0.01;
  bool steers_ = false;
};

}  // namespace nuq::detail

namespace nuq {
class LlamaModel;
}
namespace nuq::detail {
// The decoder block of each linear layer (by base name, in the checkpoint's naming); throws naming the
// first layer the decoder does not have.
std::vector<int64_t> decoder_blocks(const LlamaModel& model, const std::vector<std::string>& bases,
                                    const std::string& model_path);
}  // namespace nuq::detail
