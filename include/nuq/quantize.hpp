// Weight quantization: sensitivity-weighted non-uniform codebooks (SqueezeLLM style), the
// dense-and-sparse decomposition, and the baselines (unweighted k-means, RTN), all producing the
// packed format of docs/format.md. docs/quantization.md explains the algorithms and their measured
// trade-offs.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "nuq/packed.hpp"

namespace nuq {

// ---------------------------------------------------------------------------------------------------
// 1-D weighted k-means
// ---------------------------------------------------------------------------------------------------

// How a 1-D weighted k-means problem is solved (docs/quantization.md measures each).
enum class KMeansInit {
  binned_dp,       // exact DP restricted to boundaries at a few hundred candidate cuts, then Lloyd (default)
  quantiles,       // centers at weighted quantiles, then Lloyd
  kmeans_plus_plus,  // k-means++ seeding (deterministic seed), then Lloyd
  exact_dp,        // exact optimum by DP over every cut (O(k n log n)); Lloyd cannot improve it
};

struct KMeansOptions {
  KMeansInit init = KMeansInit::binned_dp;
  int max_iterations = 50;  // Lloyd iterations after the initialization (stops earlier at a fixed point)
  int dp_candidates = 256;  // candidate cut positions for binned_dp
  uint64_t seed = 0;        // for kmeans_plus_plus
};

// A 1-D problem with its points sorted by value and prefix sums of w, w·x and w·x², so that the cost of
// any run of consecutive points, and hence a Lloyd step, costs O(1) per cluster plus a binary search.
class SortedWeightedPoints {
 public:
  SortedWeightedPoints() = default;
  // x[i] must be finite; w[i] finite and >= 0 (w == nullptr means all 1). Ties in x are ordered by i,
  // so the result never depends on the sort implementation.
  void assign(const float* x, const float* w, int64_t n);

  int64_t size() const noexcept { return int64_t(value_.size()); }
  const std::vector<float>& values() const noexcept { return value_; }   // sorted
  const std::vector<int32_t>& order() const noexcept { return order_; }  // sorted position -> input index
  // Weighted sum of squared deviations from the weighted mean over sorted positions [begin, end).
  double segment_cost(int64_t begin, int64_t end) const;
  // Weighted mean of [begin, end); the midpoint of the values for a segment of zero total weight.
  double segment_mean(int64_t begin, int64_t end) const;
  // Weighted sum of squared deviations from `center` over [begin, end).
  double segment_cost_at(int64_t begin, int64_t end, double center) const;
  // The prefix sums (of the centred data) over sorted positions [0, i).
  void prefix_at(int64_t i, double& w, double& wx, double& wxx) const;
  double segment_weight(int64_t begin, int64_t end) const;

 private:
  std::vector<float> value_;
  std::vector<int32_t> order_;
  // Prefix sums over sorted positions, of data centred on `shift_` to limit cancellation.
  std::vector<double> sum_w_, sum_wx_, sum_wxx_;
  double shift_ = 0;
};

// Weighted k-means on sorted points: writes k centers in ascending order (duplicates possible when
// there are fewer than k distinct values) and returns the weighted SSE of the nearest-center assignment.
double kmeans_1d(const SortedWeightedPoints& points, int k, const KMeansOptions& options, float* centers);

// Weighted SSE of assigning every point to its nearest center (centers ascending).
double kmeans_1d_cost(const SortedWeightedPoints& points, const float* centers, int k);

// ---------------------------------------------------------------------------------------------------
// Layer quantization
// ---------------------------------------------------------------------------------------------------

enum class QuantMethod {
  nuq,     // sensitivity-weighted k-means codebooks + dense-and-sparse (SqueezeLLM)
  kmeans,  // unweighted k-means codebooks (sensitivities ignored)
  rtn,     // round-to-nearest uniform asymmetric per group
};
std::string_view to_string(QuantMethod method);
QuantMethod parse_quant_method(std::string_view text);  // throws Errc::invalid_argument

struct QuantizeOptions {
  QuantMethod method = QuantMethod::nuq;
  int bits = 4;
  // Columns sharing one codebook; must divide cols. 0 picks the method's default: one codebook per row
  // for nuq and kmeans, 128 for rtn (per row when 128 does not divide cols).
  int64_t group_size = 0;
  // Fractions of the layer's weights kept exactly in the sparse part (0 <= f < 1): the largest
  // magnitudes, then, among the rest, the largest sensitivities (ignored without sensitivities).
  double outlier_fraction = 0;
  double sensitive_fraction = 0;
  // Count outliers per row (round(f * cols) each) instead of over the whole matrix.
  bool outliers_per_row = false;
  KMeansOptions kmeans;
  int threads = 0;  // 0 = all hardware threads; results do not depend on it
  // Optional second-order error feedback (GPTQ-style, docs/quantization.md#error-feedback): the mean
  // XᵀX of the layer's inputs, row-major [cols, cols], not owned. Codebooks and the sparse part are
  // chosen as without it; then columns are rounded one at a time, largest diagonal first, and each
  // column's rounding error is pushed onto the columns not yet rounded, so that the output error
  // ‖(W − Ŵ)X‖ rather than ‖W − Ŵ‖ is kept small. Without per-weight sensitivities, nuq's k-means
  // is weighted by the diagonal of this matrix (each column's mean x²).
  const double* hessian = nullptr;
  // Added to the diagonal of `hessian` before it is factored, relative to the diagonal's mean (GPTQ's
  // percdamp): keeps the factorization stable when calibration saw fewer tokens than columns.
  double hessian_damping = 0.01;
  // false: round to nearest as without `hessian`, only measuring the output error (for comparisons).
  bool error_feedback = true;
};

// Per-layer error and size figures.
struct QuantizeReport {
  double mse = 0;             // mean (w - ŵ)²
  double weighted_mse = 0;    // Σ s·(w - ŵ)² / Σ s (equals mse without sensitivities)
  double max_abs_error = 0;
  double bits_per_weight = 0; // every stored byte counted (format.md, "Storage and bits per weight")
  // With options.hessian: Σ_r Δ_r H Δ_rᵀ / Σ_r w_r H w_rᵀ (Δ = ŵ − w), the output error relative to the
  // output's energy over the calibration inputs, i.e. what error feedback minimizes; 0 without it.
  double relative_output_error = 0;
  PackedStorage storage;
  int64_t nnz = 0;
  int64_t outliers = 0, sensitive = 0;  // how the sparse entries were chosen (before dropping zero residuals)
};

// Quantizes a row-major fp32 weight matrix [rows, cols] (row stride `ld` >= cols elements).
// `sensitivity` (nullable) is a per-weight importance (e.g. the Fisher diagonal) with the same
// shape and row stride. Throws Errc::invalid_argument naming `name` and the position of the first
// NaN/Inf weight or NaN/Inf/negative sensitivity, a non-finite, asymmetric or (after damping) not
// positive definite `options.hessian`, or a bad option.
PackedLinear quantize_linear(const float* weight, const float* sensitivity, int64_t rows, int64_t cols,
                             int64_t ld, const QuantizeOptions& options, std::string_view name = "weight",
                             QuantizeReport* report = nullptr);

// Error figures of a packed layer against the original weights (sensitivity nullable).
QuantizeReport measure_quantization(const format::PackedLinearView& layer, const float* weight,
                                    const float* sensitivity, int64_t ld);

}  // namespace nuq
