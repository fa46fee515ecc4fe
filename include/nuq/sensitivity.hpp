// Calibration statistics for sensitivity-aware quantization (docs/sensitivity.md):
//   FisherAccumulator  — the diagonal of the empirical Fisher, E[g²], per weight tensor;
//   HessianAccumulator — the layer-input second moment H = E[x xᵀ] = XᵀX / tokens, per linear layer
//                        (its diagonal alone is llama.cpp's "imatrix").
// Sums are kept in fp64, so streaming millions of samples loses nothing measurable; files hold the
// means as F32 (or F64) plus the sample counts, so runs can be split, saved, merged and resumed.
// Neither class is thread-safe: feed one accumulator from one thread (or one per thread, then merge).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "nuq/dtype.hpp"
#include "nuq/tensor.hpp"

namespace nuq {

// Metadata key of a statistics file; its value is a JSON object (docs/sensitivity.md, "Files").
inline constexpr const char* kStatsMetadataKey = "nuq_stats";

enum class StatsKind { fisher, hessian };
std::string_view to_string(StatsKind kind);
// Reads only the header of a safetensors statistics file and says which kind it holds. Throws
// Errc::invalid_file naming the path when the nuq_stats metadata is absent or malformed. The output of
// `nuq calibrate` (metadata nuq_statistics = activation_mean_square: per weight name, one F32 [cols]
// tensor holding diag(XᵀX)/tokens) counts as diagonal-only Hessian statistics.
StatsKind detect_stats_kind(const std::string& path);

// Per named tensor: Σ g² over samples (fp64) and the number of samples.
class FisherAccumulator {
 public:
  // Adds one sample: the gradient of `name`, contiguous, of `shape`. The first call for a name fixes
  // its shape; a later call with another shape, or a NaN/Inf entry, throws Errc::invalid_argument
  // naming the tensor and the position, and leaves the accumulator unchanged.
  void add(const std::string& name, const float* grad, const Shape& shape);
  // Adds the sums and counts of `other`; shapes of common names must agree.
  void merge(const FisherAccumulator& other);

  bool contains(std::string_view name) const;
  std::vector<std::string> names() const;  // sorted
  const Shape& shape(std::string_view name) const;
  int64_t count(std::string_view name) const;
  const std::vector<double>& sum(std::string_view name) const;  // Σ g², row-major
  std::vector<float> mean(std::string_view name) const;         // Σ g² / count

  // One F32 tensor per name holding the mean, with the weight's name and shape (so the file is what
  // `nuq quantize --fisher` reads), and the counts in the nuq_stats metadata. Written atomically.
  void save(const std::string& path) const;
  // Reads a file written by save() (or any safetensors file of F32/F16/BF16 tensors with nuq_stats
  // metadata of kind "fisher"); checks every value is finite and >= 0, naming tensor and position.
  static FisherAccumulator load(const std::string& path);

 private:
  struct Entry {
    Shape shape;
    int64_t count = 0;
    std::vector<double> sum;
  };
  const Entry& entry(std::string_view name) const;
  std::map<std::string, Entry, std::less<>> entries_;
};

// Per linear layer: Σ x xᵀ over the rows x of its input activations (fp64), and the token count.
// Names are the layer's base name, e.g. "model.layers.0.self_attn.q_proj" or "blk.0.attn_q": the
// weight "<base>.weight" of shape [rows, cols] multiplies inputs of width cols.
class HessianAccumulator {
 public:
  // diagonal_only keeps only diag(XᵀX) (cols numbers instead of cols² per layer): enough for imatrix-
  // style weighting and HAWQ traces, not for the exact second-order error tr(ΔW H ΔWᵀ).
  explicit HessianAccumulator(bool diagonal_only = false) : diagonal_only_(diagonal_only) {}

  // Adds a batch of input activations: `tokens` rows of `cols` floats, row i at X + i*ldx (ldx >= cols).
  // The first call for a name fixes cols; a different cols later, or a NaN/Inf activation, throws
  // Errc::invalid_argument naming the layer and the (token, column), leaving the accumulator unchanged.
  void add(const std::string& name, const float* X, int64_t tokens, int64_t cols, int64_t ldx);
  // Declares that layer `name` reads the same input as `same_input_as` (q/k/v projections, gate/up):
  // statistics are stored once and every accessor and file lookup of `name` resolves to the target.
  void alias(const std::string& name, const std::string& same_input_as);
  // Adds the sums and counts of `other` (its aliases too); the widths of common layers must agree.
  void merge(const HessianAccumulator& other);

  bool diagonal_only() const noexcept { return diagonal_only_; }
  bool contains(std::string_view name) const;        // aliases included
  std::vector<std::string> names() const;            // layers holding statistics, sorted
  const std::map<std::string, std::string, std::less<>>& aliases() const noexcept { return aliases_; }
  std::string resolve(std::string_view name) const;  // the layer an alias points to, or name itself
  int64_t cols(std::string_view name) const;
  int64_t count(std::string_view name) const;  // tokens seen
  bool has_matrix(std::string_view name) const;

  // Accessors return means (divided by the token count).
  double trace(std::string_view name) const;
  std::vector<double> diagonal(std::string_view name) const;
  // The full symmetric matrix, row-major [cols, cols]; throws for a diagonal-only layer.
  std::vector<double> matrix(std::string_view name) const;

  // Tensors "<base>.xtx" [cols, cols] (unless diagonal-only) and "<base>.xtx_diag" [cols], both the
  // mean, in `dtype` (F32 or F64); counts, aliases and the diagonal_only flag in the nuq_stats metadata.
  void save(const std::string& path, DType dtype = DType::F32) const;
  // Reads a file written by save(); a layer with only "<base>.xtx_diag" loads as diagonal-only (and so
  // does the whole accumulator if any layer is). Checks shapes, finiteness and a non-negative diagonal.
  static HessianAccumulator load(const std::string& path);

 private:
  struct Entry {
    int64_t cols = 0;
    int64_t count = 0;
    bool full = false;
    std::vector<double> sum;       // [cols, cols] column-major upper triangle valid (full), else empty
    std::vector<double> diag_sum;  // [cols]
  };
  const Entry& entry(std::string_view name) const;
  bool diagonal_only_ = false;
  std::map<std::string, Entry, std::less<>> entries_;
  std::map<std::string, std::string, std::less<>> aliases_;
};

class SafetensorsCheckpoint;

// Read access to a statistics file one tensor at a time, for consumers that must not hold a whole
// model's statistics in memory (nuq plan). Values are the stored means, checked finite (and >= 0 for
// Fisher values and Hessian diagonals); errors name the file, the tensor and the position.
class StatisticsFile {
 public:
  explicit StatisticsFile(const std::string& path);
  ~StatisticsFile();
  StatisticsFile(StatisticsFile&&) noexcept;

  const std::string& path() const noexcept { return path_; }
  StatsKind kind() const noexcept { return kind_; }
  // A `nuq calibrate` file: Hessian diagonals stored as "<base>.weight" [cols], which
  // `nuq quantize --fisher` also accepts as per-column sensitivities.
  bool is_calibrate_output() const noexcept { return calibrate_; }

  // Fisher: whether the file has a tensor `name`, and its values (shape checked against `shape`).
  bool has_fisher(std::string_view name) const;
  std::vector<float> fisher(std::string_view name, const Shape& shape) const;

  // Hessian, by layer base name (aliases resolved): whether the layer has statistics, the full matrix
  // (row-major [cols, cols]; empty when the file holds only its diagonal) and the diagonal.
  bool has_layer(std::string_view base) const;
  std::string resolve(std::string_view base) const;
  std::vector<double> hessian_matrix(std::string_view base, int64_t cols) const;
  // Whether hessian_matrix would return the full matrix, from the file's header alone (its values are
  // checked when it is read): what a run checks up front without reading gigabytes of statistics.
  // Throws, as hessian_matrix does, when the stored matrix has the wrong width.
  bool has_hessian_matrix(std::string_view base, int64_t cols) const;
  std::vector<double> hessian_diagonal(std::string_view base, int64_t cols) const;

 private:
  std::string path_;
  StatsKind kind_;
  std::unique_ptr<SafetensorsCheckpoint> file_;
  std::map<std::string, std::string, std::less<>> aliases_;
  bool calibrate_ = false;
  std::string diag_name(std::string_view base) const;
};

}  // namespace nuq
