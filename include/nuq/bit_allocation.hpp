// Mixed-precision planning (docs/sensitivity.md): the sensitivity Ω_l(c) of each layer l under each
// candidate configuration c, measured by actually quantizing the layer; then the choice of one
// configuration per layer that minimizes Σ Ω under a size budget, solved exactly as a multiple-choice
// knapsack by dynamic programming; and the plan file `nuq quantize --plan` applies.
#pragma once

#include <cstdint>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "nuq/quantize.hpp"

namespace nuq {

// ---- per-layer sensitivity ----------------------------------------------------------------------------

// One candidate configuration of a layer; the fields mirror a plan entry (docs/quantize-cli.md, "Plans").
struct LayerConfig {
  int bits = 3;
  QuantMethod method = QuantMethod::nuq;
  int64_t group_size = 0;  // 0: the method's default
  double outlier_fraction = 0, sensitive_fraction = 0;
  bool outliers_per_row = false;
  std::string label() const;  // e.g. "3-bit nuq +0.45%" or "4-bit rtn g128"
};

// How the error ΔW = W - Ŵ of a quantized layer is weighted (formulas in docs/sensitivity.md):
enum class OmegaKind {
  fisher,            // Σ F ⊙ ΔW²                       (F: mean squared gradient per weight)
  hessian,           // tr(ΔW H ΔWᵀ)                     (H = E[x xᵀ] of the layer input)
  hessian_diagonal,  // Σ_j H_jj Σ_i ΔW_ij²              (imatrix weighting)
  hawq_trace,        // tr(H)/cols · ||ΔW||²_F            (HAWQ-V2)
  unweighted,        // ||ΔW||²_F
  fisher_output,     // Σ_i g_i Δw_i H Δw_iᵀ, g_i = Σ_j F_ij / Σ_j H_jj (K-FAC: Fisher ≈ E[g²] ⊗ E[xxᵀ])
  kl,                // measured: the model's output KL when the layer alone is quantized (measured_sensitivity.hpp)
};
std::string_view to_string(OmegaKind kind);
// "fisher", "hessian", "hessian-diag", "hawq", "unweighted", "fisher-output", "kl"
OmegaKind parse_omega_kind(std::string_view text);

// Statistics of one layer (weight [rows, cols]); pointers not owned, null when unavailable.
struct LayerStatistics {
  const float* fisher = nullptr;             // [rows, cols] row-major, finite, >= 0
  const double* hessian = nullptr;           // [cols, cols] row-major, symmetric
  const double* hessian_diagonal = nullptr;  // [cols]
  // [rows, cols]: the per-weight sensitivity the nuq quantizer is given (what `nuq quantize --fisher`
  // would pass it); null quantizes unweighted. Independent of the Ω measure.
  const float* sensitivity = nullptr;
  // [cols, cols]: candidates are rounded with error feedback on this XᵀX (what `nuq quantize --hessian`
  // does), with this damping; null rounds to nearest. Independent of the Ω measure.
  const double* error_feedback_hessian = nullptr;
  double damping = 0.01;
};

// Ω of a layer given the original and the quantized weights (both [rows, cols] row-major). Throws
// Errc::invalid_argument when `kind` needs a statistic `stats` lacks.
double layer_omega(OmegaKind kind, const float* weight, const float* quantized, int64_t rows, int64_t cols,
                   const LayerStatistics& stats);

struct CandidateEvaluation {
  LayerConfig config;
  uint64_t bytes = 0;  // exact stored bytes (nuq::packed_storage: indices, codebooks, sparse part)
  double omega = 0;
  double mse = 0;
  double bits_per_weight = 0;
  int64_t nnz = 0;
};

// Whether candidate c can quantize a layer of `cols` columns (its group size divides them).
bool candidate_applies(const LayerConfig& c, int64_t cols);
// The layer quantized under c exactly as `nuq quantize` with the same statistics will: stats.sensitivity
// steers the nuq method, stats.error_feedback_hessian (with stats.damping) turns on error feedback.
PackedLinear quantize_candidate(const float* weight, int64_t rows, int64_t cols, const LayerStatistics& stats,
                                const LayerConfig& c, int threads, std::string_view name,
                                QuantizeReport* report = nullptr);

// Quantizes the layer with nuq::quantize_linear under every candidate (with stats.sensitivity as the
// per-weight sensitivity when the method is nuq, as `nuq quantize --fisher` does) and measures Ω.
// Candidates whose group size does not divide cols are skipped. `name` is used in error messages.
// relative: divide each Ω by the layer's weighted energy Ω(Ŵ = 0) (e.g. E‖Wx‖² for `hessian`), making
// it a relative error that does not depend on the scale of the layer's weights or inputs.
std::vector<CandidateEvaluation> evaluate_candidates(const float* weight, int64_t rows, int64_t cols,
                                                     const LayerStatistics& stats, OmegaKind kind,
                                                     const std::vector<LayerConfig>& candidates, int threads,
                                                     std::string_view name, bool relative = false);

// ---- the allocation (multiple-choice knapsack) ---------------------------------------------------------

struct AllocationChoice {
  uint64_t bytes = 0;
  double omega = 0;  // finite, >= 0
};

struct AllocationOptions {
  // Upper bound on the DP's budget axis. Sizes above each layer's smallest choice are counted in
  // granules g = the gcd of all those differences (exact) or, when that would need more than
  // max_units cells, ceil(range / max_units) with sizes rounded up (never over budget; see below).
  int64_t max_units = int64_t(1) << 18;
};

struct Allocation {
  std::vector<int> choice;  // per layer, an index into its choices
  uint64_t bytes = 0;
  double omega = 0;
  uint64_t granule = 1;  // bytes per DP unit; 1 or the gcd means the optimum is exact
  bool exact = true;     // false when sizes were rounded up to the granule
  // When !exact: the result is at least as good as the true optimum for budget - slack_bytes
  // (slack_bytes = (layers + 1) · granule), and never exceeds the budget.
  uint64_t slack_bytes = 0;
};

// Smallest total size any allocation can have.
uint64_t minimum_bytes(const std::vector<std::vector<AllocationChoice>>& layers);

// Minimizes Σ omega subject to Σ bytes <= budget_bytes. Ties go to the smaller size, then to the
// earlier choice. Throws Errc::invalid_argument for an empty layer, a NaN/negative omega, or an
// infeasible budget (naming the minimum achievable size).
Allocation allocate_bits(const std::vector<std::vector<AllocationChoice>>& layers, uint64_t budget_bytes,
                         const AllocationOptions& options = {});

struct FrontierPoint {
  uint64_t bytes = 0;
  double omega = 0;
  std::vector<int> choice;
};

// The Pareto frontier of (total bytes, total omega) over all allocations, sorted by size with omega
// strictly decreasing (exact under the same conditions as allocate_bits; otherwise every point is an
// achievable allocation and optimal for its rounded size).
std::vector<FrontierPoint> pareto_frontier(const std::vector<std::vector<AllocationChoice>>& layers,
                                           const AllocationOptions& options = {});

// ---- whole checkpoints ---------------------------------------------------------------------------------

struct CheckpointPlanProgress {
  int64_t index = 0, count = 0;  // layer index (0-based) among those planned
  std::string name;
  double seconds = 0;  // spent on this layer
  const std::vector<CandidateEvaluation>* candidates = nullptr;
};

struct CheckpointPlanOptions {
  std::string model;       // .safetensors file, sharded directory/index, or .gguf
  std::string stats_path;  // Fisher or Hessian statistics, or `nuq calibrate` output (docs/sensitivity.md)
  // Optional full XᵀX (`nuq calibrate --hessian`): candidates are rounded with error feedback as
  // `nuq quantize --hessian` will round them, and with a Fisher --stats file the default measure becomes
  // fisher_output.
  std::string hessian_path;
  double damping = 0.01;
  std::optional<OmegaKind> omega;  // default: fisher for a Fisher file, hessian (or hessian_diagonal
                                   // where only diagonals exist) for a Hessian file, else unweighted
  bool relative = false;           // per-layer relative Ω (see evaluate_candidates)
  // Exactly one budget: average bits per weight over the planned layers (every stored byte), or bytes.
  double budget_bits_per_weight = 0;
  uint64_t budget_bytes = 0;
  std::vector<LayerConfig> candidates;  // empty: default_plan_candidates(...)
  int threads = 0;
  AllocationOptions allocation;
  std::function<void(const CheckpointPlanProgress&)> progress;
};

// bits × sparse fractions (× methods × group sizes) with nuq quantize's split of a sparse fraction
// into outliers and sensitive weights (0.05% sensitive when Fisher sensitivities are used by nuq).
std::vector<LayerConfig> make_candidates(const std::vector<int>& bits, const std::vector<double>& sparse_fractions,
                                         const std::vector<QuantMethod>& methods,
                                         const std::vector<int64_t>& group_sizes, bool fisher);

struct PlannedLayer {
  std::string name, base;  // "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj"
  int64_t rows = 0, cols = 0;
  std::vector<CandidateEvaluation> candidates;
  int chosen = 0;
};

struct UniformBaseline {  // every layer with the same candidate
  std::string label;
  uint64_t bytes = 0;
  double omega = 0;
  double bits_per_weight = 0;
};

// A plan (or uniform configuration) measured whole: the table's additive prediction of its KL against the
// whole quantized model's KL on validation windows (measured_sensitivity.hpp).
struct PlanMeasurement {
  std::string label;  // "knapsack", "search", "uniform 3-bit nuq", ...
  uint64_t bytes = 0;
  double bits_per_weight = 0;
  double predicted_kl = 0;   // Σ over layers of the table's KL
  double predicted_dnll = 0; // Σ over layers of the table's NLL increase
  double kl = 0, nll = 0;    // measured: mean KL to the reference and mean NLL
};

struct PlanSearchSummary {
  bool ran = false, resumed = false;
  int64_t generations = 0, evaluations = 0, improvements = 0;
  double seconds = 0;
  std::string objective = "kl";        // what was minimized: "kl" or "nll"
  double start_kl = 0, search_kl = 0;  // the objective on the validation windows
  bool accepted = false;               // the search's plan replaced the knapsack's (it had the lower value)
};

struct CheckpointPlan {
  std::string model, stats_path, hessian_path;
  OmegaKind omega = OmegaKind::unweighted;
  bool relative = false;
  std::vector<PlannedLayer> layers;
  int64_t weights = 0;
  uint64_t budget_bytes = 0;
  uint64_t bytes = 0;
  double total_omega = 0;
  double bits_per_weight = 0;
  Allocation allocation;
  std::vector<FrontierPoint> frontier;
  std::vector<UniformBaseline> uniform;  // candidates available for every layer
  std::vector<std::string> warnings;
  // Plans from a measured table (OmegaKind::kl) with validation windows: predicted vs measured divergence
  // of the knapsack plan, the searched plan and the uniform configurations; and the search.
  std::vector<PlanMeasurement> measured;
  int64_t validation_positions = 0;
  double reference_nll = 0;
  PlanSearchSummary search;
};

// Plans the layers `nuq quantize` would select by default (nuq::default_quantize_rule), reading one
// layer at a time. Throws nuq::Error naming the file, tensor or budget at fault.
CheckpointPlan plan_checkpoint(const CheckpointPlanOptions& options);

// The plan file: {"layers": {base: {bits, method, group_size, outlier_fraction, sensitive_fraction,
// outliers_per_row}}, plus informational top-level keys that `nuq quantize` ignores.
std::string plan_to_json(const CheckpointPlan& plan);

}  // namespace nuq
