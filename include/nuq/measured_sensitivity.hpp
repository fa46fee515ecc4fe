// Mixed precision by measured output divergence (docs/sensitivity.md, "Measured sensitivity"): instead of
// a per-layer proxy (Fisher, XᵀX) that is summed over layers, each layer's sensitivity to each candidate
// configuration is the increase of the whole model's output divergence from its reference when that
// layer alone is quantized that way; a plan chosen from those numbers by the knapsack is then refined by
// an evolutionary search whose fitness is the divergence of the whole quantized model.
//
// Why: the proxies add up to a number that does not predict what the model loses (2-bit layers are
// underrated and errors compound through later layers), and plans built on them made models worse than
// uniform quantization at the same size. Measuring the model's own output sees both effects.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "nuq/bit_allocation.hpp"
#include "nuq/format.hpp"

namespace nuq {

class LlamaModel;
class SafetensorsCheckpoint;

// ---- the output divergence of a changed decoder ----------------------------------------------------------

// Windows of text as `nuq eval` cuts them: `start` followed by up to ctx − 1 tokens, every token a target
// once.
struct CalibrationWindows {
  std::vector<std::vector<int32_t>> inputs, targets;
  int64_t positions() const;
  int64_t size() const { return int64_t(inputs.size()); }
};
// Windows [first, first + count) of `ids` cut into windows of `ctx` (count < 0: all from `first`).
CalibrationWindows calibration_windows(const std::vector<int32_t>& ids, int32_t start, int64_t ctx,
                                       int64_t first = 0, int64_t count = -1);
// A subset of windows, by index.
CalibrationWindows select_windows(const CalibrationWindows& all, const std::vector<int64_t>& which);

struct Divergence {
  double kl = 0;   // mean over positions of KL(p_reference ‖ p_model) in nats
  double nll = 0;  // mean negative log-likelihood of the targets in nats
  std::vector<double> window_kl, window_nll;  // the same per window
};

// The reference's next-token distributions on a set of windows, held as probabilities, and the residual
// stream entering every block of the model as it was at the last capture(), so that a change of layers in
// block b and later needs only blocks b.. rerun. Memory: positions × vocab floats plus positions × dim ×
// blocks floats. Not thread-safe; the model's own threads do the work.
class DivergenceMeter {
 public:
  // The reference is `model` as it is now (weights unchanged by the caller since). Captures its stream.
  DivergenceMeter(LlamaModel& model, CalibrationWindows windows);
  // The reference's final hidden states [positions, dim] (window after window) are given, e.g. computed
  // once for a pool of windows (reference_hidden_states); the stream is captured from `model` as it is now.
  DivergenceMeter(LlamaModel& model, CalibrationWindows windows, const std::vector<float>& reference_hidden);
  ~DivergenceMeter();

  const CalibrationWindows& windows() const;
  // The reference's mean negative log-likelihood (its KL is 0).
  double reference_nll() const;
  // Records the residual stream entering every block under the model's current weights.
  void capture();
  // The divergence of the model's current weights, running blocks first.. from the captured stream: exact
  // when blocks before `first` are unchanged since the capture.
  Divergence measure(int64_t first = 0);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The final hidden states of `model` on `windows` ([positions, dim], window after window).
std::vector<float> reference_hidden_states(LlamaModel& model, const CalibrationWindows& windows);

// ---- the measured table --------------------------------------------------------------------------------

struct MeasuredTableProgress {
  int64_t index = 0, count = 0;  // layer (0-based) among those planned
  std::string name;
  bool resumed = false;  // finished by an earlier run
  double seconds = 0;    // spent on this layer by this run
  const std::vector<CandidateEvaluation>* candidates = nullptr;  // omega = KL increase
  const std::vector<double>* nll = nullptr;                      // NLL increase, per candidate
};

struct MeasuredTableOptions {
  std::string model;  // .safetensors file, sharded directory/index, or .gguf (what `nuq quantize` reads)
  std::vector<int32_t> ids;  // calibration tokens; windows [0, windows) of them are measured
  int32_t start = 1;         // the token each window starts with (BOS)
  int64_t ctx = 256;
  int64_t windows = 2;
  std::string text;          // describes the tokens (recorded; part of the fingerprint with the ids)
  // What steers the quantizer, exactly as `nuq quantize --fisher STATS --hessian HESSIAN --damping D`:
  std::string stats_path;    // Fisher diagonal or `nuq calibrate` output; empty: unweighted
  std::string hessian_path;  // full XᵀX for error feedback; empty: round to nearest
  double damping = 0.01;
  std::vector<LayerConfig> candidates;  // empty: bits 2/3/4 × sparse 0/0.45% (make_candidates)
  int threads = 0;
  bool restart = false;  // discard unfinished work from a run with other settings instead of failing
  std::function<void(const MeasuredTableProgress&)> progress;
};

// Measures, for every layer `nuq quantize` selects by default and every candidate, the mean KL of the
// model's next-token distribution from the unquantized model's, and the NLL increase, on the calibration
// windows when that layer alone is quantized that way (dequantized with the reference dequantizer, so the
// numbers are those of the stored format). Each layer is quantized as `nuq quantize` will (same
// sensitivities, same error feedback), and its packed candidates are kept in the table, so that the
// search and the plan's report never quantize again. Writes `out` (a safetensors statistics file with
// "nuq_stats" kind "kl", docs/sensitivity.md). Resumable: finished layers are kept in `out`.partial/ and a
// run started again with the same inputs continues there, producing the same bytes. When `out` already
// holds a table measured with the same inputs, nothing is done and false is returned.
bool measure_sensitivity_table(const MeasuredTableOptions& options, const std::string& out);

// Whether `path` is a table written by measure_sensitivity_table.
bool is_divergence_table(const std::string& path);

// A measured table, read (memory-mapped).
class DivergenceTable {
 public:
  explicit DivergenceTable(const std::string& path);
  ~DivergenceTable();

  struct Layer {
    std::string name, base;  // weight name and base name in the checkpoint
    int64_t rows = 0, cols = 0;
    std::vector<CandidateEvaluation> candidates;  // omega = KL increase; config, bytes, bits_per_weight
    std::vector<double> nll;                      // NLL increase per candidate
  };
  const std::string& path() const;
  const std::string& model() const;  // the checkpoint it was measured on
  const std::string& stats_path() const;
  const std::string& hessian_path() const;
  double damping() const;
  int64_t positions() const;  // calibration positions measured
  double reference_nll() const;
  const std::vector<Layer>& layers() const;
  int64_t weights() const;
  // The packed layer of candidate `c` (index into layers()[l].candidates), a view into the file.
  format::PackedLinearView packed(std::size_t l, std::size_t c) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// ---- the search ----------------------------------------------------------------------------------------

// What plans minimize: the mean KL to the reference's next-token distributions (the default: it asks the
// quantized model to behave like the original on any text), or the mean NLL of the calibration text itself
// (what perplexity measures, but only on text like the calibration's).
enum class PlanObjective { kl, nll };
std::string_view to_string(PlanObjective objective);
// The table's cost of candidate c of a layer under an objective: its KL, or its NLL increase minus the
// layer's smallest (a per-layer constant, which no allocation's ranking depends on, keeping costs >= 0).
double table_cost(const DivergenceTable::Layer& layer, std::size_t c, PlanObjective objective);
double objective_value(const Divergence& d, PlanObjective objective);
const std::vector<double>& objective_windows(const Divergence& d, PlanObjective objective);

struct PlanSearchOptions {
  uint64_t budget_bytes = 0;
  PlanObjective objective = PlanObjective::kl;
  uint64_t seed = 0;
  int64_t max_generations = 200;  // the search stops at whichever comes first
  double max_seconds = 0;         // 0: no time limit
  int offspring = 8;              // per generation, each evaluated on stage_windows[0] windows
  int survivors = 2;              // best offspring re-evaluated with the parent on stage_windows[1] windows
  int64_t stage_windows[2] = {2, 8};
  // A survivor replaces the parent only when its per-window differences from the parent on the second
  // stage's windows are below zero by this many standard errors (a paired test): without it, the noise of
  // small samples is taken for improvements and the plan drifts.
  double margin_se = 1.0;
  std::string state_path;  // saved after each generation (atomically) and resumed from when present
  int threads = 0;
  std::function<void(int64_t generation, int64_t generations, double parent_kl, int64_t accepted, double seconds)>
      progress;
};

struct PlanSearchResult {
  std::vector<int> choice;  // per table layer, an index into its candidates
  int64_t generations = 0, evaluations = 0, improvements = 0;
  double seconds = 0;
  bool resumed = false;
};

// EvoPress-style search over whole configurations at a fixed size: from `start` (e.g. the knapsack
// optimum of the table), each generation mutates the parent into `offspring` children by moving layers
// one step up and down their candidates ordered by size (never above the budget), ranks the children by
// the whole quantized model's KL on a few windows drawn from `pool` (the same draw for all), re-evaluates
// the best `survivors` with the parent on a larger fresh draw, and keeps the best of those as the next
// parent. Deterministic given the seed when bounded by generations (the decoder's results do not depend on
// the thread count); resumable through state_path. `model` must hold the reference weights on entry; it
// is left with the returned choice applied.
PlanSearchResult search_plan(LlamaModel& model, const DivergenceTable& table, const std::vector<int>& start,
                             const CalibrationWindows& pool, const PlanSearchOptions& options);

// Sets the table's layers of `model` to a choice of candidates (dequantized with the reference
// dequantizer), rewriting only the layers whose choice differs from `current` (empty: all), which it
// then holds.
void apply_choice(LlamaModel& model, const DivergenceTable& table, const std::vector<int>& choice,
                  std::vector<int>& current);

// The whole model's divergence with `choice` applied (the model is left with it; `current` as above).
Divergence measure_choice(LlamaModel& model, const DivergenceTable& table, const std::vector<int>& choice,
                          std::vector<int>& current, DivergenceMeter& meter);

// ---- plans from a table ----------------------------------------------------------------------------

struct MeasuredPlanOptions {
  std::string table;  // from measure_sensitivity_table
  // Exactly one budget, as for plan_checkpoint.
  double budget_bits_per_weight = 0;
  uint64_t budget_bytes = 0;
  AllocationOptions allocation;
  // Windows the plans are measured on whole (the report's "measured" column and the search's acceptance);
  // empty: the knapsack plan, unmeasured.
  CalibrationWindows validation;
  // Windows the search draws its samples from; empty or search.max_generations == 0: no search.
  CalibrationWindows pool;
  PlanSearchOptions search;  // budget_bytes and objective are set from this struct
  PlanObjective objective = PlanObjective::kl;
  int threads = 0;
  // Called when a stage starts ("measuring the uniform configurations", ...), for progress output.
  std::function<void(const std::string&)> stage;
};

// The knapsack optimum of the table's KL under the budget, then (with a pool) the search from it; the
// search's plan is kept only if its whole-model KL on the validation windows is lower than the knapsack
// plan's. With validation windows, the knapsack plan, the searched plan and every uniform configuration
// are measured whole, next to the table's prediction for them. The model is the table's, loaded once.
CheckpointPlan plan_from_table(const MeasuredPlanOptions& options);

}  // namespace nuq
