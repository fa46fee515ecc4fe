// Internal: the statistics `nuq calibrate` collects through the decoder's activation hook, shared by the
// one-pass run (model_tasks.cpp) and the block-by-block run (block_calibration.cpp).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "nuq/error.hpp"
#include "nuq/safetensors.hpp"
#include "nuq/sensitivity.hpp"

namespace nuq::detail {

// Collects, for every linear layer's input, the sum of x² per column and (optionally) the full XᵀX.
class ActivationStatistics {
 public:
  explicit ActivationStatistics(bool full) : full_(full) {}

  void add(const std::string& layer, const float* x, int64_t n, int64_t cols) {
    auto& s = sums_[layer];
    s.resize(std::size_t(cols), 0.0);
    for (int64_t t = 0; t < n; ++t)
      for (int64_t c = 0; c < cols; ++c) {
        const double v = x[t * cols + c];
        NUQ_CHECK(std::isfinite(v), Errc::invalid_argument, "calibration: the input of {} is {} at token {}", layer,
                  v, t);
        s[std::size_t(c)] += v * v;
      }
    tokens_[layer] += n;
    if (full_) add_hessian(layer, x, n, cols);
  }

  // Writes the per-column means; returns the number of layers.
  int64_t save_means(const std::string& path, const std::map<std::string, std::string>& metadata) const {
    std::vector<std::vector<float>> data;
    std::vector<std::pair<std::string, ConstTensorView>> views;
    data.reserve(sums_.size());
    for (const auto& [layer, s] : sums_) {
      std::vector<float> mean(s.size());
      for (std::size_t c = 0; c < s.size(); ++c) mean[c] = float(s[c] / double(tokens_.at(layer)));
      data.push_back(std::move(mean));
      views.emplace_back(layer + ".weight", ConstTensorView(reinterpret_cast<const std::byte*>(data.back().data()),
                                                            DType::F32, Shape{int64_t(s.size())}));
    }
    write_safetensors(path, views, metadata);
    return int64_t(views.size());
  }

  const HessianAccumulator& hessian() const { return hessian_; }
  // The layers seen, by base name, in order.
  std::vector<std::string> layers() const {
    std::vector<std::string> out;
    for (const auto& [layer, s] : sums_) out.push_back(layer);
    return out;
  }

 private:
  // q/k/v (and gate/up) are applied to one input; storing its XᵀX once saves 2/3 of the rank updates
  // and of the file. Compared by contents: the decoder reuses its buffers.
  void add_hessian(const std::string& layer, const float* x, int64_t n, int64_t cols) {
    const bool same_input = !last_layer_.empty() && last_n_ == n && last_cols_ == cols &&
                            std::memcmp(last_x_.data(), x, std::size_t(n * cols) * sizeof(float)) == 0;
    if (hessian_.contains(layer) && hessian_.resolve(layer) != layer) {
      NUQ_CHECK(same_input && hessian_.resolve(last_layer_) == hessian_.resolve(layer), Errc::internal,
                "calibration: {} shared the input of {} in the first window but not now", layer,
                hessian_.resolve(layer));
    } else if (same_input && !hessian_.contains(layer)) {
      hessian_.alias(layer, hessian_.resolve(last_layer_));
    } else {
      hessian_.add(layer, x, n, cols, cols);
    }
    last_x_.assign(x, x + n * cols);
    last_n_ = n;
    last_cols_ = cols;
    last_layer_ = layer;
  }

  bool full_;
  // Sums in double: a long calibration run adds up millions of squares per column.
  std::map<std::string, std::vector<double>> sums_;
  std::map<std::string, int64_t> tokens_;
  HessianAccumulator hessian_;
  // The input the hook saw last (a copy), to recognize layers fed the same activations.
  std::vector<float> last_x_;
  int64_t last_n_ = 0, last_cols_ = 0;
  std::string last_layer_;
};

}  // namespace nuq::detail
