// Layer quantization: selection of the sparse part, per-row (or per-group) codebooks, index
// assignment, packing and error figures. docs/quantization.md describes the algorithm.
#include "nuq/quantize.hpp"

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <thread>

#include "cholesky.hpp"
#include "dense_ops.hpp"
#include "nuq/error.hpp"
#include "nuq/half.hpp"

namespace nuq {

std::string_view to_string(QuantMethod method) {
  switch (method) {
    case QuantMethod::nuq: return "nuq";
    case QuantMethod::kmeans: return "kmeans";
    case QuantMethod::rtn: return "rtn";
  }
  return "?";
}

QuantMethod parse_quant_method(std::string_view text) {
  if (text == "nuq") return QuantMethod::nuq;
  if (text == "kmeans") return QuantMethod::kmeans;
  if (text == "rtn") return QuantMethod::rtn;
  fail(Errc::invalid_argument, "unknown quantization method '{}' (expected nuq, kmeans or rtn)", text);
}

namespace {

// The k largest keys of a set, found without sorting or copying it: selected elements are those with
// key > threshold, plus the first `ties_before` (in index order) of those with key == threshold.
// Deterministic, O(n) in three passes, O(65536) memory, so it stays cheap on 100M-weight matrices.
struct TopKSelection {
  bool none = true;  // k == 0
  uint32_t threshold = 0;
  int64_t tie_end = 0;  // elements with key == threshold and index < tie_end are selected
  bool selected(uint32_t key, int64_t index) const {
    return !none && (key > threshold || (key == threshold && index < tie_end));
  }
};

// Runs fn(chunk, begin, end) over `threads` contiguous chunks of [0, n) in parallel.
template <class Fn>
void parallel_chunks(int64_t n, int threads, Fn fn) {
  threads = int(std::max<int64_t>(1, std::min<int64_t>(threads, n / 65536 + 1)));
  if (threads == 1) return fn(0, int64_t(0), n);
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) pool.emplace_back([&, t] { fn(t, n * t / threads, n * (t + 1) / threads); });
  for (auto& th : pool) th.join();
}

// key(i, out) sets the key of element i and returns false for an element that cannot be selected.
// Histograms are per chunk and summed, so the result does not depend on the thread count.
template <class KeyFn>
TopKSelection select_top_k(int64_t n, int64_t k, int threads, KeyFn key) {
  TopKSelection sel;
  if (k <= 0) return sel;
  const int chunks = int(std::max<int64_t>(1, std::min<int64_t>(threads, n / 65536 + 1)));
  std::vector<std::vector<int64_t>> hists(chunks, std::vector<int64_t>(65536, 0));
  auto histogram = [&](auto bucket) {
    for (auto& h : hists) std::fill(h.begin(), h.end(), 0);
    parallel_chunks(n, chunks, [&](int t, int64_t begin, int64_t end) {
      auto& h = hists[t];
      for (int64_t i = begin; i < end; ++i) {
        uint32_t v;
        if (key(i, v)) {
          const int b = bucket(v);
          if (b >= 0) ++h[b];
        }
      }
    });
    std::vector<int64_t> total(65536, 0);
    for (const auto& h : hists)
      for (int b = 0; b < 65536; ++b) total[b] += h[b];
    return total;
  };
  auto hist = histogram([](uint32_t v) { return int(v >> 16); });
  int64_t eligible = 0;
  for (int64_t c : hist) eligible += c;
  sel.none = false;
  if (k >= eligible) {  // everything eligible is selected
    sel.threshold = 0;
    sel.tie_end = std::numeric_limits<int64_t>::max();
    return sel;
  }
  int64_t above = 0;
  int hi = 65535;
  while (above + hist[hi] < k) above += hist[hi--];
  hist = histogram([hi](uint32_t v) { return int(v >> 16) == hi ? int(v & 0xffff) : -1; });
  int lo = 65535;
  while (above + hist[lo] < k) above += hist[lo--];
  sel.threshold = (uint32_t(hi) << 16) | uint32_t(lo);
  int64_t ties = k - above;  // >= 1: take the first `ties` elements equal to the threshold
  for (int64_t i = 0; i < n; ++i) {
    uint32_t v;
    if (key(i, v) && v == sel.threshold && --ties == 0) {
      sel.tie_end = i + 1;
      break;
    }
  }
  return sel;
}

// The same selection for one row: a partial sort of (key, index) pairs beats 65536-bucket histograms
// at a few thousand elements.
template <class KeyFn>
TopKSelection select_top_k_in_row(int64_t n, int64_t k, std::vector<uint64_t>& scratch, KeyFn key) {
  TopKSelection sel;
  if (k <= 0) return sel;
  scratch.clear();
  for (int64_t i = 0; i < n; ++i) {
    uint32_t v;
    // Among equal keys the lower index ranks higher, as in select_top_k.
    if (key(i, v)) scratch.push_back((uint64_t(v) << 32) | (0xffffffffu - uint32_t(i)));
  }
  sel.none = false;
  if (k >= int64_t(scratch.size())) {
    sel.threshold = 0;
    sel.tie_end = std::numeric_limits<int64_t>::max();
    return sel;
  }
  std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), std::greater<>());
  const uint64_t kth = scratch[k - 1];
  sel.threshold = uint32_t(kth >> 32);
  sel.tie_end = int64_t(0xffffffffu - uint32_t(kth & 0xffffffffu)) + 1;
  return sel;
}

// Non-negative floats order like their bit patterns.
inline uint32_t magnitude_key(float x) { return std::bit_cast<uint32_t>(x) & 0x7fffffffu; }

struct RowStats {
  double sse = 0, weighted_sse = 0, weight_sum = 0, max_abs = 0;
  double output_sse = 0, output_energy = 0;  // Δ H Δᵀ and w H wᵀ, with a Hessian
  int64_t outliers = 0, sensitive = 0;
};

struct SparseEntry {
  int32_t col;
  uint16_t value;
};

// Sorted fp16 codebook with the fp32 decision boundaries of nearest-entry assignment.
struct Codebook {
  int entries = 0;
  std::array<uint16_t, 16> half{};
  std::array<float, 16> value{};
  void set(const float* centers, int k) {
    entries = k;
    for (int j = 0; j < k; ++j) half[j] = float_to_fp16(centers[j]);
    std::sort(half.begin(), half.begin() + k,
              [](uint16_t a, uint16_t b) { return fp16_to_float(a) < fp16_to_float(b); });
    for (int j = 0; j < k; ++j) value[j] = fp16_to_float(half[j]);
  }
  // Nearest entry; on a tie the lower index.
  int nearest(float x) const {
    int best = 0;
    float best_d = std::fabs(x - value[0]);
    for (int j = 1; j < entries; ++j) {
      const float d = std::fabs(x - value[j]);
      if (d < best_d) { best = j; best_d = d; }
    }
    return best;
  }
  // For a weight kept in the sparse part: the index whose fp16 residual reconstructs x most closely
  // (then the smallest residual, then the lowest index), and that residual.
  std::pair<int, uint16_t> best_residual(float x) const {
    int best = 0;
    uint16_t best_r = 0;
    float best_err = std::numeric_limits<float>::infinity(), best_mag = best_err;
    for (int j = 0; j < entries; ++j) {
      const uint16_t r = float_to_fp16(x - value[j]);
      const float rf = fp16_to_float(r);
      if (!std::isfinite(rf)) continue;
      const float err = std::fabs(value[j] + rf - x), mag = std::fabs(rf);
      if (err < best_err || (err == best_err && mag < best_mag)) {
        best = j; best_r = r; best_err = err; best_mag = mag;
      }
    }
    return {best, best_r};
  }
};

void rtn_codebook(const float* x, int64_t n, int bits, Codebook& cb) {
  const int k = 1 << bits;
  float centers[16];
  if (n == 0) {
    std::fill(centers, centers + k, 0.0f);
    cb.set(centers, k);
    return;
  }
  float lo = x[0], hi = x[0];
  for (int64_t i = 1; i < n; ++i) { lo = std::min(lo, x[i]); hi = std::max(hi, x[i]); }
  const double scale = (double(hi) - double(lo)) / (k - 1);
  if (!(scale > 0)) {
    std::fill(centers, centers + k, lo);
  } else {
    // Asymmetric uniform grid with an integer zero point, as RTN baselines store it (scale, zero).
    const double zero = std::nearbyint(-double(lo) / scale);
    for (int j = 0; j < k; ++j) centers[j] = float((j - zero) * scale);
  }
  cb.set(centers, k);
}

void check_row(const float* w, const float* s, int64_t r, int64_t cols, std::string_view name) {
  for (int64_t c = 0; c < cols; ++c)
    if (!std::isfinite(w[c])) fail(Errc::invalid_argument, "{}: weight [{}, {}] is {}", name, r, c, w[c]);
  if (!s) return;
  for (int64_t c = 0; c < cols; ++c)
    if (!std::isfinite(s[c]) || s[c] < 0)
      fail(Errc::invalid_argument, "{}: sensitivity [{}, {}] is {} (must be finite and >= 0)", name, r, c, s[c]);
}

template <class Fn>
void parallel_rows(int64_t rows, int threads, Fn fn) {
  if (threads <= 1 || rows <= 1) {
    for (int64_t r = 0; r < rows; ++r) fn(0, r);
    return;
  }
  std::atomic<int64_t> next{0};
  std::vector<std::thread> pool;
  std::exception_ptr error;
  std::atomic<bool> failed{false};
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      try {
        for (int64_t r; !failed && (r = next.fetch_add(1)) < rows;) fn(t, r);
      } catch (...) {
        if (!failed.exchange(true)) error = std::current_exception();
      }
    });
  for (auto& th : pool) th.join();
  if (error) std::rethrow_exception(error);
}

int resolve_threads(int threads, int64_t rows) {
  if (threads <= 0) threads = int(std::max(1u, std::thread::hardware_concurrency()));
  return int(std::min<int64_t>(threads, std::max<int64_t>(rows, 1)));
}

// Rows per task of the Hessian-based passes: fixed, so that a row's arithmetic (blocked products
// included) never depends on the thread count.
constexpr int64_t kRowChunk = 64;

void check_hessian(const double* h, int64_t cols, double damping, std::string_view name) {
  NUQ_CHECK(std::isfinite(damping) && damping >= 0, Errc::invalid_argument,
            "{}: Hessian damping {} must be finite and >= 0", name, damping);
  for (int64_t i = 0; i < cols; ++i) {
    NUQ_CHECK(h[i * cols + i] >= 0, Errc::invalid_argument,
              "{}: XᵀX diagonal [{}] is {} (must be finite and >= 0)", name, i, h[i * cols + i]);
    for (int64_t j = 0; j < cols; ++j) {
      const double a = h[i * cols + j], b = h[j * cols + i];
      NUQ_CHECK(std::isfinite(a), Errc::invalid_argument, "{}: XᵀX [{}, {}] is {}", name, i, j, a);
      // Files store fp32 means, so a transposed pair may differ in the last bits, not more.
      NUQ_CHECK(std::fabs(a - b) <= 1e-5 * (std::fabs(a) + std::fabs(b)) + 1e-30, Errc::invalid_argument,
                "{}: XᵀX is not symmetric: [{}, {}] = {} but [{}, {}] = {}", name, i, j, a, j, i, b);
    }
  }
}

// GPTQ's column sweep onto codebooks that are already fixed (docs/quantization.md#error-feedback).
// With H = XᵀX (damped) and U the upper Cholesky factor of H⁻¹ in the processing order, rounding
// column i with error e_i and subtracting e_i·U[i, j] / U[i, i] from every later column j is the
// exact optimal update of the unrounded columns for the loss tr(ΔW H ΔWᵀ) (OBS), applied greedily.
// Columns go largest diagonal first (GPTQ's act-order): the columns whose errors cost most are
// rounded while the most freedom is left to compensate them. A weight kept in the sparse part is
// stored exactly, so its error is zero and it passes nothing on. Returns the value every weight is
// finally rounded from (row-major [rows, cols], original column order).
// What error feedback needs from XᵀX alone: the column order and the upper Cholesky factor U of the
// damped inverse (in that order), laid out for the blocked sweep: per block of kFeedbackBlock columns,
// the block's own triangle (diagonal[bi][b·nb + j] = U[i1 + b, i1 + j]) and the B operand of the
// trailing update (trailing[bi][j·nb + b] = U[i1 + b, i2 + j], [cols − i2, nb]). U's other entries are
// never read, so they are not kept: a 28672-column factor takes 1.6 GB instead of 4.9.
struct FeedbackFactor {
  uint64_t hessian_hash = 0;  // of the XᵀX it was computed from: the cache's key, with cols and damping
  int64_t cols = 0;
  double damping = 0;
  std::vector<int64_t> order;
  std::vector<std::vector<float>> diagonal;  // fp32: what the weights are
  std::vector<std::vector<float>> trailing;
};
constexpr int64_t kFeedbackBlock = 128;

// GPTQ forms H⁻¹ and factors it again (≈ 4/3·n³ multiply-adds). The same U costs n³/3: with J the
// reversal permutation, factor J·H·J = L·Lᵀ; then H = R·Rᵀ with R = J·L·J upper triangular, so
// H⁻¹ = R⁻ᵀ·R⁻¹ = Uᵀ·U with U = R⁻¹ = J·L⁻¹·J, upper with a positive diagonal: the upper Cholesky
// factor of H⁻¹, U[i, j] = L⁻¹[n − 1 − i, n − 1 − j]. Both steps run in place in one n × n double matrix
// (cholesky.hpp), whose parts the sweep reads are then copied out in fp32.
std::shared_ptr<const FeedbackFactor> factor_hessian(const double* hessian, int64_t cols, double damping, int threads,
                                                     std::string_view name) {
  auto f = std::make_shared<FeedbackFactor>();
  f->cols = cols;
  f->damping = damping;
  std::vector<int64_t>& order = f->order;
  order.resize(std::size_t(cols));
  for (int64_t c = 0; c < cols; ++c) order[c] = c;
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return hessian[a * cols + a] > hessian[b * cols + b]; });
  double mean_diag = 0;
  for (int64_t c = 0; c < cols; ++c) mean_diag += hessian[c * cols + c];
  mean_diag /= double(cols);
  const int64_t n = cols;
  std::vector<double> a(std::size_t(n * n));  // J·H·J in the processing order, damped; then L, then L⁻¹
  parallel_rows(n, threads, [&](int, int64_t i) {
    const int64_t ci = order[n - 1 - i];
    for (int64_t j = 0; j <= i; ++j) {
      const int64_t cj = order[n - 1 - j];
      a[i * n + j] = 0.5 * (hessian[ci * cols + cj] + hessian[cj * cols + ci]);
    }
  });
  for (int64_t i = 0; i < n; ++i) {
    // A column no calibration token touched cannot change the output: give it a unit diagonal so the
    // factorization exists; its zero couplings keep its rounding error to itself.
    double& d = a[i * n + i];
    if (d == 0) d = 1;
    d += damping * mean_diag;
  }
  NUQ_CHECK(detail::cholesky_lower_in_place(a.data(), n, threads), Errc::invalid_argument,
            "{}: XᵀX is not positive definite after damping {} (too few calibration tokens for {} columns? raise "
            "the damping)",
            name, damping, cols);
  detail::invert_lower_in_place(a.data(), n, threads);
  const int64_t blocks = (n + kFeedbackBlock - 1) / kFeedbackBlock;
  f->diagonal.resize(std::size_t(blocks));
  f->trailing.resize(std::size_t(blocks));
  std::atomic<bool> finite{true};
  parallel_rows(blocks, threads, [&](int, int64_t bi) {
    const int64_t i1 = bi * kFeedbackBlock, i2 = std::min(n, i1 + kFeedbackBlock), nb = i2 - i1;
    auto U = [&](int64_t i, int64_t j) { return float(a[(n - 1 - i) * n + (n - 1 - j)]); };
    std::vector<float>& d = f->diagonal[bi];
    d.assign(std::size_t(nb * nb), 0.0f);
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t j = b; j < nb; ++j) d[b * nb + j] = U(i1 + b, i1 + j);
    std::vector<float>& t = f->trailing[bi];
    t.resize(std::size_t((n - i2) * nb));
    for (int64_t j = 0; j < n - i2; ++j)
      for (int64_t b = 0; b < nb; ++b) t[j * nb + b] = U(i1 + b, i2 + j);
    for (int64_t b = 0; b < nb; ++b)
      if (!(d[b * nb + b] > 0) || !std::isfinite(d[b * nb + b])) finite = false;
  });
  NUQ_CHECK(finite, Errc::invalid_argument, "{}: the inverse of the damped XᵀX is numerically singular; raise the damping",
            name);
  return f;
}

uint64_t hash_words(const double* x, int64_t n) {
  uint64_t h = 0x9E3779B97F4A7C15ull;
  for (int64_t i = 0; i < n; ++i) {
    uint64_t v;
    std::memcpy(&v, &x[i], sizeof v);
    h = (h ^ v) * 0xFF51AFD7ED558CCDull;
    h ^= h >> 32;
  }
  return h;
}

// The factorization costs ~2/3·cols³ double flops (2.3 GFLOP at 1536 columns) and is the same for every
// candidate of a layer (nuq plan quantizes each layer up to a dozen ways) and for layers that share their
// input (q/k/v, gate/up): the last one is kept and reused when the same XᵀX and damping come again. The
// key is a hash of the matrix's content, not its address, so a reused buffer cannot return a stale
// factor. Factors above kCachedFactorBytes are not kept: held between layers they would raise the peak
// memory of models with very wide layers (a 28672-column XᵀX's factor takes 1.6 GB).
constexpr std::size_t kCachedFactorBytes = std::size_t(256) << 20;

std::shared_ptr<const FeedbackFactor> cached_hessian_factor(const double* hessian, int64_t cols, double damping,
                                                            int threads, std::string_view name) {
  static std::mutex mutex;
  static std::shared_ptr<const FeedbackFactor> last;
  const uint64_t hash = hash_words(hessian, cols * cols);
  {
    std::lock_guard<std::mutex> lock(mutex);
    if (last && last->hessian_hash == hash && last->cols == cols && last->damping == damping) return last;
  }
  auto f = std::const_pointer_cast<FeedbackFactor>(factor_hessian(hessian, cols, damping, threads, name));
  f->hessian_hash = hash;
  std::size_t bytes = 0;
  for (const auto* parts : {&f->diagonal, &f->trailing})
    for (const auto& p : *parts) bytes += p.size() * sizeof(float);
  if (bytes <= kCachedFactorBytes) {
    std::lock_guard<std::mutex> lock(mutex);
    last = f;
  }
  return f;
}

std::vector<float> error_feedback_targets(const float* weight, int64_t ld, int64_t rows, int64_t cols,
                                          const double* hessian, double damping, const uint8_t* kept,
                                          const Codebook* books, int64_t group, int threads, std::string_view name) {
  const int64_t groups = cols / group;
  const std::shared_ptr<const FeedbackFactor> factor = cached_hessian_factor(hessian, cols, damping, threads, name);
  const std::vector<int64_t>& order = factor->order;
  const std::vector<std::vector<float>>& diagonal = factor->diagonal;
  const std::vector<std::vector<float>>& trailing = factor->trailing;
  // Columns are swept in blocks; within a block updates go column by column, and the rest of the
  // matrix receives the block's errors as one product (GPTQ's lazy batch update), which is where the
  // O(rows·cols²) work goes. Rows are independent, so the matrix is cut into fixed chunks of rows:
  // the arithmetic of a row never depends on the thread count.
  constexpr int64_t kBlock = kFeedbackBlock;

  std::vector<float> targets(std::size_t(rows * cols));
  const int64_t chunks = (rows + kRowChunk - 1) / kRowChunk;
  parallel_rows(chunks, threads, [&](int, int64_t chunk) {
    const int64_t r0 = chunk * kRowChunk, m = std::min(kRowChunk, rows - r0);
    std::vector<float> w(std::size_t(m * cols));  // the chunk's rows, columns in processing order
    for (int64_t r = 0; r < m; ++r)
      for (int64_t i = 0; i < cols; ++i) w[r * cols + i] = weight[(r0 + r) * ld + order[i]];
    std::vector<float> block(std::size_t(kBlock * m)), err(std::size_t(m * kBlock)), update;
    std::vector<float> e(static_cast<std::size_t>(m));  // one column's scaled errors
    for (int64_t i1 = 0, bi = 0; i1 < cols; i1 += kBlock, ++bi) {
      const int64_t i2 = std::min(cols, i1 + kBlock), nb = i2 - i1, rest = cols - i2;
      for (int64_t b = 0; b < nb; ++b)  // column-major copy: the sweep walks one column of all rows
        for (int64_t r = 0; r < m; ++r) block[b * m + r] = w[r * cols + i1 + b];
      const float* U = diagonal[bi].data();  // U[i1 + b, i1 + j] at [b·nb + j]
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t i = i1 + b, c = order[i];
        const float inv_diag = 1.0f / U[b * nb + b];
        float* col = block.data() + b * m;
        for (int64_t r = 0; r < m; ++r) {
          const int64_t row = r0 + r;
          const float x = col[r];
          targets[row * cols + c] = x;
          const Codebook& cb = books[row * groups + c / group];
          const float q = kept[row * cols + c] ? x : cb.value[cb.nearest(x)];
          e[r] = (x - q) * inv_diag;
          err[r * nb + b] = e[r];
        }
        for (int64_t j = b + 1; j < nb; ++j) {
          const float u = U[b * nb + j];
          float* dst = block.data() + j * m;
          for (int64_t r = 0; r < m; ++r) dst[r] -= e[r] * u;
        }
      }
      if (rest == 0) break;
      update.resize(std::size_t(m * rest));
      detail::dense_gemm_nt(1, err.data(), m, nb, trailing[bi].data(), rest, nb, nb, update.data(), rest);
      for (int64_t r = 0; r < m; ++r)
        for (int64_t j = 0; j < rest; ++j) w[r * cols + i2 + j] -= update[r * rest + j];
    }
  });
  return targets;
}

// Adds Δ_r H Δ_rᵀ and w_r H w_rᵀ to every row's stats, in fixed chunks of rows (thread-count invariant).
// With H symmetric, x·H·xᵀ = Σ_J x_J·(H_JJ·x_Jᵀ + 2·H_J,<J·x_<Jᵀ) over blocks J of columns: the blocks
// left of the diagonal are multiplied once and counted twice, half the multiply-adds of x·H.
void measure_output_error(const float* weight, int64_t ld, const float* deltas, int64_t rows, int64_t cols,
                          const double* hessian, int threads, std::vector<RowStats>& stats) {
  constexpr int64_t kColumnBlock = 256;
  std::vector<float> h(std::size_t(cols * cols));
  for (int64_t i = 0; i < cols * cols; ++i) h[i] = float(hessian[i]);
  parallel_rows((rows + kRowChunk - 1) / kRowChunk, threads, [&](int, int64_t chunk) {
    const int64_t r0 = chunk * kRowChunk, m = std::min(kRowChunk, rows - r0);
    std::vector<float> w(std::size_t(m * cols)), left(std::size_t(m * kColumnBlock)), own(left.size());
    for (int64_t r = 0; r < m; ++r) std::copy(weight + (r0 + r) * ld, weight + (r0 + r) * ld + cols, w.begin() + r * cols);
    for (int pass = 0; pass < 2; ++pass) {
      const float* a = pass == 0 ? deltas + r0 * cols : w.data();
      std::vector<double> sum(std::size_t(m), 0.0);
      for (int64_t j0 = 0; j0 < cols; j0 += kColumnBlock) {
        const int64_t jb = std::min(kColumnBlock, cols - j0);
        const float* h_rows = h.data() + j0 * cols;  // H[J, :], = H[:, J]ᵀ
        if (j0 > 0) detail::dense_gemm_nt(1, a, m, cols, h_rows, jb, cols, j0, left.data(), jb);
        detail::dense_gemm_nt(1, a + j0, m, cols, h_rows + j0, jb, cols, jb, own.data(), jb);
        for (int64_t r = 0; r < m; ++r)
          for (int64_t j = 0; j < jb; ++j) {
            const double twice_left = j0 > 0 ? 2.0 * double(left[r * jb + j]) : 0.0;
            sum[r] += double(a[r * cols + j0 + j]) * (twice_left + double(own[r * jb + j]));
          }
      }
      for (int64_t r = 0; r < m; ++r) (pass == 0 ? stats[r0 + r].output_sse : stats[r0 + r].output_energy) = sum[r];
    }
  });
}

QuantizeReport summarize(const std::vector<RowStats>& stats, int64_t rows, int64_t cols, int bits,
                         int64_t group_size, int64_t nnz, bool weighted) {
  QuantizeReport rep;
  double sse = 0, wsse = 0, wsum = 0, output_sse = 0, output_energy = 0;
  for (const auto& s : stats) {
    sse += s.sse;
    wsse += s.weighted_sse;
    wsum += s.weight_sum;
    rep.max_abs_error = std::max(rep.max_abs_error, s.max_abs);
    rep.outliers += s.outliers;
    rep.sensitive += s.sensitive;
    output_sse += s.output_sse;
    output_energy += s.output_energy;
  }
  rep.relative_output_error = output_energy > 0 ? output_sse / output_energy : 0.0;
  const double n = double(rows) * double(cols);
  rep.mse = sse / n;
  rep.weighted_mse = weighted ? (wsum > 0 ? wsse / wsum : 0.0) : rep.mse;
  rep.nnz = nnz;
  rep.storage = packed_storage(rows, cols, bits, group_size, nnz);
  rep.bits_per_weight = bits_per_weight(rep.storage, rows, cols);
  return rep;
}

}  // namespace

PackedLinear quantize_linear(const float* weight, const float* sensitivity, int64_t rows, int64_t cols, int64_t ld,
                             const QuantizeOptions& options, std::string_view name, QuantizeReport* report) {
  NUQ_CHECK(weight != nullptr, Errc::invalid_argument, "{}: no weight data", name);
  NUQ_CHECK(rows > 0 && cols > 0, Errc::invalid_argument, "{}: cannot quantize an empty [{}, {}] matrix", name,
            rows, cols);
  NUQ_CHECK(ld >= cols, Errc::invalid_argument, "{}: row stride {} is smaller than the {} columns", name, ld, cols);
  NUQ_CHECK(format::is_supported_bits(options.bits), Errc::invalid_argument,
            "{}: {} bits is not supported (2, 3 or 4)", name, options.bits);
  for (double f : {options.outlier_fraction, options.sensitive_fraction})
    NUQ_CHECK(f >= 0 && f < 1, Errc::invalid_argument, "{}: sparse fraction {} is outside [0, 1)", name, f);
  NUQ_CHECK(options.kmeans.max_iterations >= 0, Errc::invalid_argument, "{}: negative iteration count", name);
  int64_t group = options.group_size;
  if (group == 0) group = options.method == QuantMethod::rtn && cols % 128 == 0 ? 128 : cols;
  NUQ_CHECK(group > 0 && cols % group == 0, Errc::invalid_argument,
            "{}: group size {} does not divide the {} columns", name, options.group_size, cols);
  const int threads = resolve_threads(options.threads, rows);
  // Every row is checked before anything is selected; the first bad row (in row order) is reported.
  {
    std::vector<uint8_t> bad(rows, 0);
    parallel_chunks(rows * cols, threads, [&](int, int64_t begin, int64_t end) {
      for (int64_t r = begin / cols; r < rows && r * cols < end; ++r) {
        if (r * cols < begin) continue;  // a row belongs to the chunk holding its first element
        const float* w = weight + r * ld;
        const float* sr = sensitivity ? sensitivity + r * ld : nullptr;
        bool ok = true;
        for (int64_t c = 0; c < cols && ok; ++c) ok = std::isfinite(w[c]) && (!sr || (std::isfinite(sr[c]) && sr[c] >= 0));
        bad[r] = !ok;
      }
    });
    for (int64_t r = 0; r < rows; ++r)
      if (bad[r]) check_row(weight + r * ld, sensitivity ? sensitivity + r * ld : nullptr, r, cols, name);
  }

  const int bits = options.bits;
  const int k = format::lut_entries(bits);
  const int64_t groups = cols / group;
  // The clustering weights: sensitivities for nuq, uniform for the unweighted baselines.
  const float* cluster_weight = options.method == QuantMethod::nuq ? sensitivity : nullptr;
  const bool per_row = options.outliers_per_row;

  // Sparse selection over the whole matrix: magnitude outliers, then the most sensitive of the rest.
  const int64_t total = rows * cols;
  auto at = [&](int64_t i) { return i / cols * ld + i % cols; };
  TopKSelection outlier_sel, sensitive_sel;
  if (!per_row) {
    outlier_sel = select_top_k(total, std::llround(options.outlier_fraction * double(total)), threads,
                               [&](int64_t i, uint32_t& key) { key = magnitude_key(weight[at(i)]); return true; });
    if (sensitivity)
      sensitive_sel = select_top_k(total, std::llround(options.sensitive_fraction * double(total)), threads,
                                   [&](int64_t i, uint32_t& key) {
                                     if (outlier_sel.selected(magnitude_key(weight[at(i)]), i)) return false;
                                     key = magnitude_key(sensitivity[at(i)]);
                                     return true;
                                   });
  }
  const int64_t row_outliers = per_row ? std::llround(options.outlier_fraction * double(cols)) : 0;
  const int64_t row_sensitive = per_row && sensitivity ? std::llround(options.sensitive_fraction * double(cols)) : 0;

  PackedLinear packed(rows, cols, bits, group, 0);
  const int64_t row_bytes = format::row_bytes(cols, bits);
  std::vector<RowStats> stats(rows);
  std::vector<std::vector<SparseEntry>> sparse(rows);

  // Error feedback needs every row's sparse mask and codebooks before the first column is rounded, so
  // it keeps them for the whole matrix; without it they live in per-thread scratch, one row at a time.
  const bool feedback = options.hessian != nullptr && options.error_feedback;
  if (options.hessian) check_hessian(options.hessian, cols, options.hessian_damping, name);
  std::vector<float> column_weight;  // k-means weights from the Hessian diagonal when no sensitivities
  if (options.hessian && options.method == QuantMethod::nuq && !cluster_weight) {
    column_weight.resize(cols);
    for (int64_t c = 0; c < cols; ++c) column_weight[c] = float(options.hessian[c * cols + c]);
  }
  std::vector<uint8_t> kept_all(feedback ? rows * cols : 0);
  // ŵ − w, for the output error figure; sized only when indices are assigned, after error feedback's
  // factorization, whose n × n double workspace sets the peak memory of wide layers (8192 × 28672: the
  // deltas' 0.9 GB on top of it took a 70B-shaped down_proj past 16 GiB).
  std::vector<float> deltas;
  std::vector<Codebook> books_all(feedback ? rows * groups : 0);

  struct Scratch {
    std::vector<uint8_t> kept, index;
    std::vector<uint64_t> keys;
    std::vector<float> x, w, centers;
    std::vector<Codebook> books;
    SortedWeightedPoints points;
  };
  std::vector<Scratch> scratch(threads);

  // Chooses row r's sparse entries (1 = magnitude outlier, 2 = sensitive) and fits its codebooks.
  auto select_and_fit = [&](Scratch& s, int64_t r, uint8_t* kept, Codebook* books) {
    const float* wrow = weight + r * ld;
    const float* srow = sensitivity ? sensitivity + r * ld : nullptr;
    const float* crow = cluster_weight ? cluster_weight + r * ld : column_weight.empty() ? nullptr : column_weight.data();
    std::fill(kept, kept + cols, uint8_t(0));
    if (per_row) {
      auto out = select_top_k_in_row(cols, row_outliers, s.keys, [&](int64_t c, uint32_t& key) {
        key = magnitude_key(wrow[c]);
        return true;
      });
      for (int64_t c = 0; c < cols; ++c)
        if (out.selected(magnitude_key(wrow[c]), c)) kept[c] = 1;
      if (srow) {
        auto sen = select_top_k_in_row(cols, row_sensitive, s.keys, [&](int64_t c, uint32_t& key) {
          if (kept[c]) return false;
          key = magnitude_key(srow[c]);
          return true;
        });
        for (int64_t c = 0; c < cols; ++c)
          if (!kept[c] && sen.selected(magnitude_key(srow[c]), c)) kept[c] = 2;
      }
    } else {
      for (int64_t c = 0; c < cols; ++c) {
        const int64_t i = r * cols + c;
        if (outlier_sel.selected(magnitude_key(wrow[c]), i)) kept[c] = 1;
        else if (srow && sensitive_sel.selected(magnitude_key(srow[c]), i)) kept[c] = 2;
      }
    }
    s.centers.resize(k);
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t c0 = g * group, c1 = c0 + group;
      // The dense part is clustered without the weights the sparse part keeps.
      s.x.clear();
      s.w.clear();
      double wsum = 0;
      for (int64_t c = c0; c < c1; ++c) {
        if (kept[c]) continue;
        s.x.push_back(wrow[c]);
        if (crow) { s.w.push_back(crow[c]); wsum += crow[c]; }
      }
      Codebook& cb = books[g];
      if (options.method == QuantMethod::rtn) {
        rtn_codebook(s.x.data(), int64_t(s.x.size()), bits, cb);
      } else {
        // A group whose sensitivities are all zero carries no preference; cluster it unweighted.
        s.points.assign(s.x.data(), crow && wsum > 0 ? s.w.data() : nullptr, int64_t(s.x.size()));
        kmeans_1d(s.points, k, options.kmeans, s.centers.data());
        cb.set(s.centers.data(), k);
      }
    }
  };

  // Writes row r's codebooks, indices and sparse residuals, rounding `target` (the weights themselves,
  // or what error feedback made of them) and measuring the error against the original weights.
  auto assign = [&](Scratch& s, int64_t r, const uint8_t* kept, const Codebook* books, const float* target) {
    const float* wrow = weight + r * ld;
    const float* srow = sensitivity ? sensitivity + r * ld : nullptr;
    RowStats& st = stats[r];
    s.index.assign(cols, 0);
    uint16_t* lut_row = packed.lut.data_as<uint16_t>() + r * groups * k;
    for (int64_t g = 0; g < groups; ++g) {
      const Codebook& cb = books[g];
      std::copy(cb.half.begin(), cb.half.begin() + k, lut_row + g * k);
      for (int64_t c = g * group; c < (g + 1) * group; ++c) {
        const float x = target[c];
        float decoded;
        if (kept[c]) {
          auto [idx, residual] = cb.best_residual(x);
          s.index[c] = uint8_t(idx);
          decoded = cb.value[idx] + fp16_to_float(residual);
          (kept[c] == 1 ? st.outliers : st.sensitive)++;
          // A zero residual adds nothing: the dense part already reproduces the weight.
          if (residual != 0 && residual != 0x8000) sparse[r].push_back({int32_t(c), residual});
        } else {
          const int idx = cb.nearest(x);
          s.index[c] = uint8_t(idx);
          decoded = cb.value[idx];
        }
        const double e = double(decoded) - double(wrow[c]);
        if (!deltas.empty()) deltas[r * cols + c] = float(e);
        st.sse += e * e;
        if (srow) { st.weighted_sse += double(srow[c]) * e * e; st.weight_sum += srow[c]; }
        st.max_abs = std::max(st.max_abs, std::fabs(e));
      }
    }
    format::pack_row(s.index.data(), cols, bits, packed.qweight.data_as<uint8_t>() + r * row_bytes);
  };

  if (!feedback) {
    if (options.hessian) deltas.resize(std::size_t(rows * cols));
    parallel_rows(rows, threads, [&](int t, int64_t r) {
      Scratch& s = scratch[t];
      s.kept.resize(cols);
      s.books.resize(groups);
      select_and_fit(s, r, s.kept.data(), s.books.data());
      assign(s, r, s.kept.data(), s.books.data(), weight + r * ld);
    });
    if (options.hessian) measure_output_error(weight, ld, deltas.data(), rows, cols, options.hessian, threads, stats);
  } else {
    parallel_rows(rows, threads, [&](int t, int64_t r) {
      select_and_fit(scratch[t], r, kept_all.data() + r * cols, books_all.data() + r * groups);
    });
    const std::vector<float> targets =
        error_feedback_targets(weight, ld, rows, cols, options.hessian, options.hessian_damping, kept_all.data(),
                               books_all.data(), group, threads, name);
    deltas.resize(std::size_t(rows * cols));
    parallel_rows(rows, threads, [&](int t, int64_t r) {
      assign(scratch[t], r, kept_all.data() + r * cols, books_all.data() + r * groups, targets.data() + r * cols);
    });
    measure_output_error(weight, ld, deltas.data(), rows, cols, options.hessian, threads, stats);
  }

  int64_t nnz = 0;
  for (const auto& row : sparse) nnz += int64_t(row.size());
  NUQ_CHECK(nnz <= std::numeric_limits<int32_t>::max(), Errc::invalid_argument,
            "{}: {} sparse entries exceed the format's 32-bit row pointers", name, nnz);
  if (nnz > 0) {
    packed.sparse_row_ptr = Buffer(DType::I32, {rows + 1});
    const bool u16 = format::sparse_cols_are_u16(cols);
    packed.sparse_col_idx = Buffer(u16 ? DType::U16 : DType::I32, {nnz});
    packed.sparse_values = Buffer(DType::F16, {nnz});
    auto* row_ptr = packed.sparse_row_ptr.data_as<int32_t>();
    auto* values = packed.sparse_values.data_as<uint16_t>();
    int64_t pos = 0;
    row_ptr[0] = 0;
    for (int64_t r = 0; r < rows; ++r) {
      for (const auto& e : sparse[r]) {
        if (u16) packed.sparse_col_idx.data_as<uint16_t>()[pos] = uint16_t(e.col);
        else packed.sparse_col_idx.data_as<int32_t>()[pos] = e.col;
        values[pos++] = e.value;
      }
      row_ptr[r + 1] = int32_t(pos);
    }
  }
  if (report) *report = summarize(stats, rows, cols, bits, group, nnz, sensitivity != nullptr);
  return packed;
}

QuantizeReport measure_quantization(const format::PackedLinearView& layer, const float* weight,
                                    const float* sensitivity, int64_t ld) {
  std::vector<RowStats> stats(layer.rows);
  std::vector<float> row(layer.cols);
  const bool u16 = format::sparse_cols_are_u16(layer.cols);
  for (int64_t r = 0; r < layer.rows; ++r) {
    const uint8_t* q = layer.qweight + r * layer.row_stride();
    for (int64_t c = 0; c < layer.cols; ++c) {
      const int idx = format::unpack_index(q, layer.cols, layer.bits, c);
      row[c] = fp16_to_float(layer.lut[(r * layer.groups() + c / layer.group_size) * format::lut_entries(layer.bits) + idx]);
    }
    if (layer.nnz > 0)
      for (int32_t e = layer.sparse_row_ptr[r]; e < layer.sparse_row_ptr[r + 1]; ++e) {
        const int64_t c = u16 ? static_cast<const uint16_t*>(layer.sparse_col_idx)[e]
                              : static_cast<const int32_t*>(layer.sparse_col_idx)[e];
        row[c] += fp16_to_float(layer.sparse_values[e]);
      }
    RowStats& st = stats[r];
    for (int64_t c = 0; c < layer.cols; ++c) {
      const double e = double(row[c]) - double(weight[r * ld + c]);
      st.sse += e * e;
      if (sensitivity) {
        st.weighted_sse += double(sensitivity[r * ld + c]) * e * e;
        st.weight_sum += sensitivity[r * ld + c];
      }
      st.max_abs = std::max(st.max_abs, std::fabs(e));
    }
  }
  return summarize(stats, layer.rows, layer.cols, layer.bits, layer.group_size, layer.nnz, sensitivity != nullptr);
}

}  // namespace nuq
