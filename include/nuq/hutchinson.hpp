// Hutchinson's stochastic trace estimator: tr(H) = E[vᵀ H v] for probes v with independent entries of
// mean 0 and variance 1. Rademacher probes (±1) give the smallest variance among such distributions:
// Var[vᵀHv] = 2 Σ_{i≠j} H_ij², so a diagonal operator is estimated exactly by one probe.
#pragma once

#include <cstdint>
#include <functional>

namespace nuq {

// hv = H v for a vector of n floats; called once per probe, from the calling thread.
using HessianVectorProduct = std::function<void(const float* v, float* hv)>;

struct HutchinsonOptions {
  uint64_t seed = 0;            // probes are a deterministic function of the seed
  int64_t min_probes = 8;       // never stop before this many (a small sample's variance is unreliable)
  int64_t max_probes = 1000;    // the budget
  double rel_tolerance = 1e-2;  // stop once standard error <= rel_tolerance * |estimate|
};

struct TraceEstimate {
  double trace = 0;           // mean of the probe values vᵀHv
  double standard_error = 0;  // sqrt(sample variance / probes); 0 with a single probe
  int64_t probes = 0;
  bool converged = false;     // stopped on the tolerance rather than the budget
};

// Throws Errc::invalid_argument for n <= 0, a bad option, or a probe value that is NaN/Inf (naming
// the probe number).
TraceEstimate hutchinson_trace(const HessianVectorProduct& hvp, int64_t n, const HutchinsonOptions& options = {});

}  // namespace nuq
