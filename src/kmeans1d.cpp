// 1-D weighted k-means over sorted points with prefix sums (docs/quantization.md).
//
// In one dimension an optimal clustering assigns each cluster a run of consecutive sorted points, so
// a clustering is k−1 cut positions and the cost of a cluster is an O(1) expression of three prefix
// sums. Lloyd's step becomes: cuts at the midpoints between centers (k binary searches), centers at
// the segment means (k prefix-sum differences), O(k log n) per iteration instead of O(n k). The exact
// optimum is a DP over cuts whose optimal previous cut is monotone in the current one (the cost is a
// Monge array), which divide and conquer evaluates in O(k n log n).
#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include "nuq/error.hpp"
#include "nuq/quantize.hpp"

namespace nuq {
namespace {

// Maps a float to an unsigned key with the same order (negative values flipped), so that points sort
// as integers; the input index in the low half breaks ties, which makes the order fully determined.
uint32_t ordered_key(float x) {
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Cuts are sorted positions 0 = cut[0] <= cut[1] <= ... <= cut[k] = n; cluster j is [cut[j], cut[j+1]).
using Cuts = std::vector<int64_t>;

// Lloyd iterations from the given cuts until a fixed point or the budget. Each step cannot increase the
// cost: moving centers to segment means is optimal for fixed segments, and moving cuts to midpoints is
// optimal for fixed centers.
void lloyd(const SortedWeightedPoints& p, int k, int max_iterations, Cuts& cuts, std::vector<double>& centers) {
  const auto& v = p.values();
  const int64_t n = p.size();
  centers.assign(k, 0.0);
  for (int j = 0; j < k; ++j)
    centers[j] = cuts[j] < cuts[j + 1] ? p.segment_mean(cuts[j], cuts[j + 1]) : (j ? centers[j - 1] : v[0]);
  Cuts next(k + 1);
  for (int it = 0; it < max_iterations; ++it) {
    next[0] = 0;
    next[k] = n;
    for (int j = 1; j < k; ++j) {
      const double mid = 0.5 * (centers[j - 1] + centers[j]);
      // Points strictly below the midpoint go left; an equal point is equidistant either way.
      next[j] = std::lower_bound(v.begin() + next[j - 1], v.end(), mid,
                                 [](float a, double b) { return double(a) < b; }) - v.begin();
    }
    if (next == cuts) break;
    cuts = next;
    for (int j = 0; j < k; ++j)
      if (cuts[j] < cuts[j + 1]) centers[j] = p.segment_mean(cuts[j], cuts[j + 1]);
    // An empty cluster keeps its center; centers stay sorted because segments are ordered.
  }
}

// Exact DP over the candidate cut positions `cand` (ascending, cand.front() == 0, cand.back() == n):
// the best k clusters whose boundaries are all candidates. With every position a candidate this is the
// global optimum. Returns the cuts.
Cuts dp_over_candidates(const SortedWeightedPoints& p, int k, const std::vector<int64_t>& cand) {
  const int64_t m = int64_t(cand.size()) - 1;  // candidate index m is the end position n
  k = int(std::min<int64_t>(k, m));
  // Prefix sums gathered at the candidates: the inner loop then reads three contiguous arrays.
  std::vector<double> cw(m + 1), cs(m + 1), cq(m + 1);
  for (int64_t a = 0; a <= m; ++a) p.prefix_at(cand[a], cw[a], cs[a], cq[a]);
  auto cost = [&](int64_t b, int64_t a) {
    const double w = cw[a] - cw[b];
    if (!(w > 0)) return 0.0;
    const double s = cs[a] - cs[b];
    return std::max(0.0, (cq[a] - cq[b]) - s * s / w);
  };
  std::vector<double> prev(m + 1), cur(m + 1);
  std::vector<int32_t> arg(size_t(k) * size_t(m + 1), 0);
  for (int64_t a = 0; a <= m; ++a) prev[a] = cost(0, a);
  for (int c = 2; c <= k; ++c) {
    int32_t* arg_c = arg.data() + size_t(c - 1) * size_t(m + 1);
    // cur[a] = min over b in [0, a] of prev[b] + cost(cand[b], cand[a]) (b == a: an empty cluster);
    // the argmin is monotone in a, so divide and conquer over (a range, b range) finds every one.
    struct Task { int64_t lo, hi, blo, bhi; };
    std::vector<Task> stack{{0, m, 0, m}};
    while (!stack.empty()) {
      const Task t = stack.back();
      stack.pop_back();
      if (t.lo > t.hi) continue;
      const int64_t a = (t.lo + t.hi) / 2;
      double best = std::numeric_limits<double>::infinity();
      int64_t best_b = t.blo;
      const int64_t b_end = std::min(t.bhi, a);
      for (int64_t b = t.blo; b <= b_end; ++b) {
        const double v = prev[b] + cost(b, a);
        if (v < best) { best = v; best_b = b; }
      }
      cur[a] = best;
      arg_c[a] = int32_t(best_b);
      stack.push_back({t.lo, a - 1, t.blo, best_b});
      stack.push_back({a + 1, t.hi, best_b, t.bhi});
    }
    std::swap(prev, cur);
  }
  Cuts cuts(size_t(k) + 1);
  int64_t a = m;
  cuts[k] = cand[m];
  for (int c = k; c >= 2; --c) {
    a = arg[size_t(c - 1) * size_t(m + 1) + size_t(a)];
    cuts[c - 1] = cand[a];
  }
  cuts[0] = 0;
  return cuts;
}

// Exact DP when cut j may only take positions from layers[j] (each ascending; layers[0] = {0},
// layers[k] = {n}): the local search around a current solution. The optimal previous cut is monotone in
// the current one here too, so each layer costs O(|layer| log |layer|) cost evaluations.
Cuts dp_over_layers(const SortedWeightedPoints& p, const std::vector<std::vector<int64_t>>& layers) {
  const int k = int(layers.size()) - 1;
  std::vector<std::vector<double>> best(k + 1);
  std::vector<std::vector<int32_t>> arg(k + 1);
  best[0] = {0.0};
  for (int j = 1; j <= k; ++j) {
    const auto& prev_pos = layers[j - 1];
    const auto& pos = layers[j];
    const auto& prev = best[j - 1];
    best[j].assign(pos.size(), std::numeric_limits<double>::infinity());
    arg[j].assign(pos.size(), 0);
    struct Task { int64_t lo, hi, blo, bhi; };
    std::vector<Task> stack{{0, int64_t(pos.size()) - 1, 0, int64_t(prev_pos.size()) - 1}};
    while (!stack.empty()) {
      const Task t = stack.back();
      stack.pop_back();
      if (t.lo > t.hi) continue;
      const int64_t a = (t.lo + t.hi) / 2;
      double v_best = std::numeric_limits<double>::infinity();
      int64_t b_best = t.blo;
      for (int64_t b = t.blo; b <= t.bhi && prev_pos[b] <= pos[a]; ++b) {
        const double v = prev[b] + p.segment_cost(prev_pos[b], pos[a]);
        if (v < v_best) { v_best = v; b_best = b; }
      }
      best[j][a] = v_best;
      arg[j][a] = int32_t(b_best);
      stack.push_back({t.lo, a - 1, t.blo, b_best});
      stack.push_back({a + 1, t.hi, b_best, t.bhi});
    }
  }
  Cuts cuts(k + 1);
  int64_t a = 0;
  cuts[k] = layers[k][0];
  for (int j = k; j >= 1; --j) {
    a = arg[j][a];
    cuts[j - 1] = layers[j - 1][a];
  }
  return cuts;
}

// Candidate cuts for the binned DP: equal-count, equal-weight and equal-width positions. Equal-count
// cuts resolve the dense middle of a weight distribution, equal-width ones its sparse heavy tails, and
// equal-weight ones the regions the sensitivities say matter.
std::vector<int64_t> candidate_cuts(const SortedWeightedPoints& p, int count) {
  const auto& v = p.values();
  const int64_t n = p.size();
  const int per_family = std::max(1, count / 3);
  std::vector<int64_t> cand{0, n};
  const double total_w = p.segment_weight(0, n);
  for (int t = 1; t < per_family; ++t) {
    cand.push_back(n * t / per_family);
    const double lo = v.front(), hi = v.back();
    const double at = lo + (hi - lo) * t / per_family;
    cand.push_back(std::lower_bound(v.begin(), v.end(), at, [](float a, double b) { return double(a) < b; }) -
                   v.begin());
    if (total_w > 0) {
      // Smallest position whose prefix weight reaches the target (binary search on the prefix sums).
      const double target = total_w * t / per_family;
      int64_t lo_i = 0, hi_i = n;
      while (lo_i < hi_i) {
        const int64_t mid = (lo_i + hi_i) / 2;
        if (p.segment_weight(0, mid) < target) lo_i = mid + 1; else hi_i = mid;
      }
      cand.push_back(lo_i);
    }
  }
  std::sort(cand.begin(), cand.end());
  cand.erase(std::unique(cand.begin(), cand.end()), cand.end());
  return cand;
}

Cuts quantile_cuts(const SortedWeightedPoints& p, int k) {
  const int64_t n = p.size();
  const double total_w = p.segment_weight(0, n);
  Cuts cuts(k + 1);
  cuts[0] = 0;
  cuts[k] = n;
  for (int j = 1; j < k; ++j) {
    if (total_w <= 0) { cuts[j] = n * j / k; continue; }
    const double target = total_w * j / k;
    int64_t lo = cuts[j - 1], hi = n;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (p.segment_weight(0, mid) < target) lo = mid + 1; else hi = mid;
    }
    cuts[j] = lo;
  }
  return cuts;
}

// k-means++ seeding (D² sampling weighted by w), deterministic for a seed; returns cuts of the
// nearest-center assignment of the seeds.
Cuts kmeans_pp_cuts(const SortedWeightedPoints& p, int k, uint64_t seed) {
  const auto& v = p.values();
  const int64_t n = p.size();
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> uni(0.0, 1.0);
  std::vector<double> w(n), d2(n, std::numeric_limits<double>::infinity());
  for (int64_t i = 0; i < n; ++i) w[i] = p.segment_weight(i, i + 1);
  std::vector<double> seeds;
  auto pick = [&](const std::vector<double>& mass) {
    double total = 0;
    for (int64_t i = 0; i < n; ++i) total += mass[i];
    if (!(total > 0)) return int64_t(uni(rng) * double(n)) % n;
    double r = uni(rng) * total;
    for (int64_t i = 0; i < n; ++i) {
      r -= mass[i];
      if (r <= 0) return i;
    }
    return n - 1;
  };
  std::vector<double> mass(w);
  for (int j = 0; j < k; ++j) {
    const int64_t i = pick(mass);
    seeds.push_back(v[i]);
    for (int64_t t = 0; t < n; ++t) {
      const double d = double(v[t]) - double(v[i]);
      d2[t] = std::min(d2[t], d * d);
      mass[t] = w[t] * d2[t];
    }
  }
  std::sort(seeds.begin(), seeds.end());
  Cuts cuts(k + 1);
  cuts[0] = 0;
  cuts[k] = n;
  for (int j = 1; j < k; ++j) {
    const double mid = 0.5 * (seeds[j - 1] + seeds[j]);
    cuts[j] = std::lower_bound(v.begin() + cuts[j - 1], v.end(), mid,
                               [](float a, double b) { return double(a) < b; }) - v.begin();
  }
  return cuts;
}

}  // namespace

void SortedWeightedPoints::assign(const float* x, const float* w, int64_t n) {
  NUQ_CHECK(n >= 0 && n < int64_t(std::numeric_limits<int32_t>::max()), Errc::invalid_argument,
            "k-means over {} points is out of range", n);
  // Keys in index order, then a stable LSD radix sort on the value half (11+11+10 bits): equal values
  // keep index order, and three linear passes beat a comparison sort several times on rows of 10^3-10^4.
  std::vector<uint64_t> keys(n), tmp(n);
  for (int64_t i = 0; i < n; ++i) keys[i] = (uint64_t(ordered_key(x[i])) << 32) | uint64_t(i);
  for (int shift : {32, 43, 54}) {
    const int width = shift == 54 ? 10 : 11;
    std::array<int64_t, 2049> count{};
    for (int64_t i = 0; i < n; ++i) ++count[((keys[i] >> shift) & ((1u << width) - 1)) + 1];
    for (int b = 0; b < (1 << width); ++b) count[b + 1] += count[b];
    for (int64_t i = 0; i < n; ++i) tmp[count[(keys[i] >> shift) & ((1u << width) - 1)]++] = keys[i];
    keys.swap(tmp);
  }
  value_.resize(n);
  order_.resize(n);
  double mean = 0;
  for (int64_t i = 0; i < n; ++i) mean += x[i];
  shift_ = n ? mean / double(n) : 0.0;
  sum_w_.assign(n + 1, 0.0);
  sum_wx_.assign(n + 1, 0.0);
  sum_wxx_.assign(n + 1, 0.0);
  for (int64_t s = 0; s < n; ++s) {
    const int32_t i = int32_t(keys[s] & 0xffffffffu);
    order_[s] = i;
    value_[s] = x[i];
    const double wi = w ? double(w[i]) : 1.0;
    const double d = double(x[i]) - shift_;
    sum_w_[s + 1] = sum_w_[s] + wi;
    sum_wx_[s + 1] = sum_wx_[s] + wi * d;
    sum_wxx_[s + 1] = sum_wxx_[s] + wi * d * d;
  }
}

void SortedWeightedPoints::prefix_at(int64_t i, double& w, double& wx, double& wxx) const {
  w = sum_w_[i];
  wx = sum_wx_[i];
  wxx = sum_wxx_[i];
}

double SortedWeightedPoints::segment_weight(int64_t begin, int64_t end) const {
  return sum_w_[end] - sum_w_[begin];
}

double SortedWeightedPoints::segment_cost(int64_t begin, int64_t end) const {
  const double w = sum_w_[end] - sum_w_[begin];
  if (!(w > 0)) return 0.0;
  const double s = sum_wx_[end] - sum_wx_[begin];
  const double q = sum_wxx_[end] - sum_wxx_[begin];
  return std::max(0.0, q - s * s / w);
}

double SortedWeightedPoints::segment_cost_at(int64_t begin, int64_t end, double center) const {
  // Σ w (x − c)² = Σ w d² − 2 (c − shift) Σ w d + (c − shift)² Σ w, with d = x − shift.
  const double w = sum_w_[end] - sum_w_[begin];
  const double s = sum_wx_[end] - sum_wx_[begin];
  const double q = sum_wxx_[end] - sum_wxx_[begin];
  const double c = center - shift_;
  return std::max(0.0, q - 2 * c * s + c * c * w);
}

double SortedWeightedPoints::segment_mean(int64_t begin, int64_t end) const {
  const double w = sum_w_[end] - sum_w_[begin];
  if (w > 0) return (sum_wx_[end] - sum_wx_[begin]) / w + shift_;
  return 0.5 * (double(value_[begin]) + double(value_[end - 1]));
}

double kmeans_1d_cost(const SortedWeightedPoints& p, const float* centers, int k) {
  const auto& v = p.values();
  const int64_t n = p.size();
  double total = 0;
  int64_t begin = 0;
  for (int j = 0; j < k; ++j) {
    int64_t end = n;
    if (j + 1 < k) {
      const double mid = 0.5 * (double(centers[j]) + double(centers[j + 1]));
      end = std::lower_bound(v.begin() + begin, v.end(), mid, [](float a, double b) { return double(a) < b; }) -
            v.begin();
    }
    if (end > begin) total += p.segment_cost_at(begin, end, centers[j]);
    begin = end;
  }
  return total;
}

double kmeans_1d(const SortedWeightedPoints& p, int k, const KMeansOptions& options, float* centers) {
  NUQ_CHECK(k >= 1, Errc::invalid_argument, "k-means needs k >= 1, got {}", k);
  const auto& v = p.values();
  const int64_t n = p.size();
  if (n == 0) {
    std::fill(centers, centers + k, 0.0f);
    return 0.0;
  }
  // Few distinct values: each gets its own center, cost 0.
  std::vector<float> distinct;
  for (int64_t i = 0; i < n && int(distinct.size()) <= k; ++i)
    if (distinct.empty() || v[i] != distinct.back()) distinct.push_back(v[i]);
  if (int(distinct.size()) <= k) {
    for (int j = 0; j < k; ++j) centers[j] = distinct[std::min<size_t>(j, distinct.size() - 1)];
    return 0.0;
  }

  auto all_positions = [n] {
    std::vector<int64_t> all(n + 1);
    for (int64_t i = 0; i <= n; ++i) all[i] = i;
    return all;
  };
  const bool exact = options.init == KMeansInit::exact_dp ||
                     (options.init == KMeansInit::binned_dp && n <= std::max(options.dp_candidates, 3 * k));
  Cuts cuts;
  if (exact) {
    // Short rows (stories260K's 64-172 weights) get the exact optimum too: every cut is a candidate.
    cuts = dp_over_candidates(p, k, all_positions());
  } else if (options.init == KMeansInit::binned_dp) {
    cuts = dp_over_candidates(p, k, candidate_cuts(p, std::max(options.dp_candidates, 3 * k)));
  } else if (options.init == KMeansInit::quantiles) {
    cuts = quantile_cuts(p, k);
  } else {
    cuts = kmeans_pp_cuts(p, k, options.seed);
  }
  while (int(cuts.size()) < k + 1) cuts.push_back(n);  // fewer candidates than clusters
  std::vector<double> c;
  auto cost_of = [&](const Cuts& cu) {
    double total = 0;
    for (int j = 0; j < k; ++j) total += p.segment_cost(cu[j], cu[j + 1]);
    return total;
  };
  if (exact) {
    lloyd(p, k, 0, cuts, c);  // centers of the optimal segments
  } else {
    lloyd(p, k, options.max_iterations, cuts, c);
    if (options.init == KMeansInit::binned_dp) {
      // Lloyd stops at a fixed point that a better set of nearby cuts may still beat. An exact DP over
      // windows around the current cuts (which include the current cuts, so it never gets worse) finds
      // such moves; Lloyd then re-balances, until neither improves.
      // Offsets are dense near each cut and geometric further out, so both small and large moves are
      // in reach at a cost of ~37 candidates per cut.
      static constexpr int64_t kOffsets[] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 20, 24, 32, 48, 64, 96, 128};
      for (int round = 0; round < 4; ++round) {
        std::vector<std::vector<int64_t>> layers(k + 1);
        layers[0] = {0};
        layers[k] = {n};
        for (int j = 1; j < k; ++j) {
          auto& l = layers[j];
          for (int64_t d : kOffsets) {
            l.push_back(std::clamp<int64_t>(cuts[j] + d, 0, n));
            l.push_back(std::clamp<int64_t>(cuts[j] - d, 0, n));
          }
          std::sort(l.begin(), l.end());
          l.erase(std::unique(l.begin(), l.end()), l.end());
        }
        Cuts better = dp_over_layers(p, layers);
        if (!(cost_of(better) < cost_of(cuts) * (1 - 1e-12))) break;
        cuts = better;
        lloyd(p, k, options.max_iterations, cuts, c);
      }
    }
  }
  for (int j = 0; j < k; ++j) centers[j] = float(c[j]);
  std::sort(centers, centers + k);
  return kmeans_1d_cost(p, centers, k);
}

}  // namespace nuq
