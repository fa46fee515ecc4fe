// The dispatcher of the CPU linear kernels (include/nuq/linear_cpu.hpp): argument checks, ISA choice,
// the activation reorder, the portable scalar kernel, the dense path and the reference. Built for
// baseline x86-64; the AVX kernels live in their own translation units (linear_kernel.hpp says why).
#include "nuq/linear_cpu.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "linear_kernel.hpp"
#include "thread_pool.hpp"
#include "../cpu_features.hpp"
#include "nuq/error.hpp"
#include "nuq/half.hpp"

namespace nuq::cpu {
namespace detail {

[[noreturn]] void kernel_unsupported(const char* what, long long value) {
  fail(Errc::internal, "CPU linear kernel: no implementation for {} = {}", what, value);
}

int avx512_lanes(int bits, int64_t cols, int64_t group_size) {
  if (chunks_aligned(bits, 16, cols, group_size)) return 16;
  return chunks_aligned(bits, 8, cols, group_size) ? 8 : 16;
}

namespace {
inline float h2f(uint16_t h) { return fp16_to_float(h); }
#include "linear_kernel.inl"
}  // namespace

}  // namespace detail

namespace {

using detail::KernelArgs;

// Output rows per GEMV task. Threads take tasks in turn, so each task starts a new stream whose first
// prefetch distance (NUQ_PREFETCH_BYTES, 16 KiB) of rows was prefetched by nobody; tasks of 16 rows
// left ~3 of every 16 rows of a 14336-column layer to demand misses, which capped two threads at about
// the bandwidth of one. A task therefore covers at least 256 KiB of weights (16 prefetch distances),
// but the layer still splits into at least 16 tasks, to balance two threads on a shared machine.
// Results do not depend on where tasks start (every row is summed the same way).
int64_t gemv_rows_per_task(const format::PackedLinearView& w) {
  constexpr int64_t kMinRows = 16, kMinTasks = 16, kMinTaskBytes = 256 * 1024;
  const int64_t by_bytes = (kMinTaskBytes + w.row_stride() - 1) / w.row_stride();
  const int64_t by_balance = (w.rows + kMinTasks - 1) / kMinTasks;
  return std::max(kMinRows, std::min(by_bytes, by_balance));
}
// Rows dequantized per dense-path task, then multiplied as one Eigen GEMM. A constant (not a share of
// the rows per thread) so that Eigen sees the same shapes, hence sums in the same order, for any
// thread count.
constexpr int64_t kDenseBlockRows = 64;

void check_layer(const format::PackedLinearView& w) {
  NUQ_CHECK(format::is_supported_bits(w.bits), Errc::invalid_argument,
            "CPU linear: unsupported bit width {} (supported: 2, 3, 4)", w.bits);
  NUQ_CHECK(w.rows > 0 && w.cols > 0, Errc::invalid_argument, "CPU linear: empty layer shape [{}, {}]", w.rows,
            w.cols);
  NUQ_CHECK(w.group_size > 0 && w.cols % w.group_size == 0, Errc::invalid_argument,
            "CPU linear: group size {} does not divide the {} columns", w.group_size, w.cols);
  NUQ_CHECK(w.qweight != nullptr, Errc::invalid_argument, "CPU linear: qweight is null");
  NUQ_CHECK(w.lut != nullptr, Errc::invalid_argument, "CPU linear: lut is null");
  NUQ_CHECK(w.nnz >= 0, Errc::invalid_argument, "CPU linear: negative nnz {}", w.nnz);
  if (w.nnz > 0) {
    NUQ_CHECK(w.sparse_row_ptr != nullptr && w.sparse_col_idx != nullptr && w.sparse_values != nullptr,
              Errc::invalid_argument, "CPU linear: nnz is {} but a sparse array (row_ptr, col_idx, values) is null",
              w.nnz);
  }
}

// x and y are untyped: the same checks serve the fp32 and bf16 entry points.
void check_call(const format::PackedLinearView& w, const void* x, int64_t ldx, const void* y, int64_t ldy,
                int64_t batch) {
  check_layer(w);
  NUQ_CHECK(x != nullptr, Errc::invalid_argument, "CPU linear: activations x are null");
  NUQ_CHECK(y != nullptr, Errc::invalid_argument, "CPU linear: output y is null");
  NUQ_CHECK(batch > 0, Errc::invalid_argument, "CPU linear: batch must be positive, got {}", batch);
  NUQ_CHECK(ldx >= w.cols, Errc::invalid_argument, "CPU linear: ldx {} is less than the {} columns", ldx, w.cols);
  NUQ_CHECK(ldy >= w.rows, Errc::invalid_argument, "CPU linear: ldy {} is less than the {} rows", ldy, w.rows);
}

void check_threads(const LinearOptions& o) {
  NUQ_CHECK(o.threads >= 0, Errc::invalid_argument, "CPU linear: threads must be >= 0 (0 = all), got {}",
            o.threads);
}

KernelArgs make_args(const format::PackedLinearView& w) {
  KernelArgs a{};
  a.qweight = w.qweight;
  a.lut = w.lut;
  a.rows = w.rows;
  a.cols = w.cols;
  a.group_size = w.group_size;
  a.groups = w.groups();
  a.stride = w.row_stride();
  a.padded = format::padded_cols(w.cols);
  a.bits = w.bits;
  a.nnz = w.nnz;
  a.row_ptr = w.sparse_row_ptr;
  a.col_idx = w.sparse_col_idx;
  a.col16 = format::sparse_cols_are_u16(w.cols);
  a.values = w.sparse_values;
  return a;
}

Isa resolve_isa(const LinearOptions& o) {
  if (!o.isa) return best_isa();
  NUQ_CHECK(isa_supported(*o.isa), Errc::unsupported, "CPU linear: this CPU does not support the {} implementation",
            to_string(*o.isa));
  return *o.isa;
}

// The portable kernel: each row decoded to fp32 (as the reference does), then one dot product per batch
// row with 8 interleaved partial sums (a fixed order, so results do not depend on threads).
void scalar_rows(const KernelArgs& a, int64_t r0, int64_t r1, float* row) {
  for (int64_t r = r0; r < r1; ++r) {
    detail::decode_row(a, r, row);
    for (int64_t b = 0; b < a.batch; ++b) {
      const float* x = a.x + b * a.ldx;
      float p[8] = {};
      int64_t c = 0;
      for (; c + 8 <= a.cols; c += 8)
        for (int i = 0; i < 8; ++i) p[i] += row[c + i] * x[c + i];
      for (int i = 0; c < a.cols; ++c, ++i) p[i] += row[c] * x[c];
      a.y[b * a.ldy + r] = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
    }
  }
}

// xr as described in KernelArgs; reused across calls of one thread (it is read by the pool's workers
// only while this call runs).
const float* reorder_activations(const float* x, int64_t ldx, int64_t batch, int64_t cols, int bits, int lanes) {
  thread_local std::vector<float> xr;
  const int64_t per_word = bits == 4 ? 8 : 16;
  const int64_t chunk = per_word * lanes;
  const int64_t chunks = (cols + chunk - 1) / chunk;
  const int64_t tile = detail::max_tile(lanes);
  xr.assign(size_t(chunks * chunk * batch), 0.0f);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t b0 = b / tile * tile, bt = std::min(tile, batch - b0);
    float* base = xr.data() + b0 * chunks * chunk + (b - b0) * lanes;
    const float* xb = x + b * ldx;
    for (int64_t k = 0; k < chunks; ++k) {
      const int64_t c0 = k * chunk;
      const int64_t n = std::min(chunk, cols - c0);
      float* dst = base + k * per_word * bt * lanes;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t l = i / per_word, s = i % per_word;
        dst[s * bt * lanes + l] = xb[c0 + i];
      }
    }
  }
  return xr.data();
}

struct GemvJob {
  KernelArgs args;
  Isa isa;
  int64_t scratch_floats;
  float* scratch;
  int64_t rows_per_task;
};

void gemv_task(void* context, int64_t task, int worker) {
  const auto& job = *static_cast<const GemvJob*>(context);
  const int64_t r0 = task * job.rows_per_task;
  const int64_t r1 = std::min(job.args.rows, r0 + job.rows_per_task);
  float* scratch = job.scratch + worker * job.scratch_floats;
  switch (job.isa) {
    case Isa::avx512: detail::gemv_rows_avx512(job.args, r0, r1, scratch); return;
    case Isa::avx2: detail::gemv_rows_avx2(job.args, r0, r1, scratch); return;
    case Isa::scalar: scalar_rows(job.args, r0, r1, scratch); return;
  }
}

void fused(const format::PackedLinearView& w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t batch,
           Isa isa, int threads) {
  GemvJob job{make_args(w), isa, 0, nullptr, 0};
  job.args.x = x;
  job.args.ldx = ldx;
  job.args.y = y;
  job.args.ldy = ldy;
  job.args.batch = batch;
  if (isa != Isa::scalar) {
    const int lanes = isa == Isa::avx512 ? detail::avx512_lanes(w.bits, w.cols, w.group_size) : 8;
    job.args.lanes = lanes;
    job.args.aligned = detail::chunks_aligned(w.bits, lanes, w.cols, w.group_size);
    job.args.xr = reorder_activations(x, ldx, batch, w.cols, w.bits, lanes);
  }
  job.rows_per_task = gemv_rows_per_task(w);
  const int64_t tasks = (w.rows + job.rows_per_task - 1) / job.rows_per_task;
  const int participants = detail::max_participants(tasks, threads);
  // Row scratch is only touched by the scalar kernel and the unaligned-group path.
  const bool needs_scratch = isa == Isa::scalar || !job.args.aligned;
  thread_local std::vector<float> scratch;
  job.scratch_floats = needs_scratch ? (w.cols + 15) / 16 * 16 : 0;
  scratch.resize(size_t(job.scratch_floats * participants));
  job.scratch = scratch.data();
  detail::parallel_for(tasks, threads, gemv_task, &job);
}

// ---- int8 path (LinearOptions::arithmetic == int8) ------------------------------------------------

bool int8_layer_supported(const format::PackedLinearView& w) {
  return w.groups() == 1 || w.group_size % kInt8Block == 0;
}

// The int8 scale of one fp16 codebook (int8_codebook_scale of its largest |c|): what linear_int8_ref and
// Int8Codebooks divide by.
float codebook_int8_scale(const uint16_t* book, int entries) {
  float max_abs = 0.0f;
  for (int e = 0; e < entries; ++e) max_abs = std::max(max_abs, std::fabs(fp16_to_float(book[e])));
  return detail::int8_codebook_scale(max_abs);
}

void check_int8_layer(const format::PackedLinearView& w) {
  NUQ_CHECK(int8_layer_supported(w), Errc::unsupported,
            "CPU linear: int8 arithmetic needs per-row codebooks or groups of a multiple of {} columns, this "
            "layer has groups of {}",
            kInt8Block, w.group_size);
}

// One block of activations to int8 in natural column order; returns its scale d (0 for an all-zero
// block, NaN when the block holds a non-finite value, which then propagates to the outputs as it
// would in the exact path). The one definition of activation quantization for the kernel and the
// reference. Written so that the compiler vectorizes both loops (it runs once per block on every
// decode step of every layer; with a libm call per element it was 4% of SmolLM2's generation time):
// the largest |x| as the largest sign-cleared bit pattern (for non-negative floats the integer order is
// the numeric order, and every non-finite value lies above the largest finite one), and rounding by
// adding and taking away 1.5·2²³, which leaves v rounded to nearest even as std::nearbyint does in the
// default rounding mode (|v| <= 127 here; the build never enables -ffast-math, which would fold it).
float quantize_activation_block(const float* x, int64_t n, int8_t* q) {
  uint32_t max_bits = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, x + i, sizeof bits);
    max_bits = std::max(max_bits, bits & 0x7FFFFFFFu);
  }
  std::fill(q, q + kInt8Block, int8_t(0));
  if (max_bits >= 0x7F800000u) return std::numeric_limits<float>::quiet_NaN();
  if (max_bits == 0) return 0.0f;
  float max_abs;
  std::memcpy(&max_abs, &max_bits, sizeof max_abs);
  const float d = max_abs / 127.0f;
  if (d == 0.0f) return 0.0f;  // |x| of a few subnormal units: d underflows; such a block counts as zeros
  constexpr float kRound = 12582912.0f;  // 1.5·2²³
  for (int64_t i = 0; i < n; ++i) q[i] = int8_t(int32_t((x[i] / d + kRound) - kRound));
  return d;
}

// Where column cc (0..255) of a block goes in the kernel's activation order (Int8Args).
int64_t int8_position(int bits, int64_t cc) {
  if (bits == 4) {
    const int64_t h = cc / 128, w = cc % 128 / 8, f = cc % 8;
    return (2 * h + f % 2) * 64 + 4 * w + f / 2;
  }
  const int64_t w = cc / 16, f = cc % 16;
  return f % 4 * 64 + 4 * w + f / 4;
}

struct Int8Job {
  detail::Int8Args args;
  int64_t rows_per_task;
};

void int8_task(void* context, int64_t task, int /*worker*/) {
  const auto& job = *static_cast<const Int8Job*>(context);
  const int64_t r0 = task * job.rows_per_task;
  detail::gemv_rows_int8_avx512(job.args, r0, std::min(job.args.layer.rows, r0 + job.rows_per_task));
}

void fused_int8(const format::PackedLinearView& w, const float* x, int64_t ldx, float* y, int64_t ldy,
                int64_t batch, int threads, const Int8Codebooks* books) {
  check_int8_layer(w);
  detail::Int8Args g{};
  g.layer = make_args(w);
  g.book_codes = books ? books->codes() : nullptr;
  g.book_scales = books ? books->scales() : nullptr;
  g.layer.x = x;
  g.layer.ldx = ldx;
  g.layer.y = y;
  g.layer.ldy = ldy;
  g.layer.batch = batch;
  g.blocks = (w.cols + kInt8Block - 1) / kInt8Block;
  g.blocks_per_group = w.groups() == 1 ? g.blocks : w.group_size / kInt8Block;
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<float> xscale, xoffset;
  xq.assign(size_t(batch * g.blocks * kInt8Block), 0);
  xscale.assign(size_t(batch * g.blocks), 0.0f);
  xoffset.assign(size_t(batch * w.groups()), 0.0f);
  int8_t natural[kInt8Block];
  thread_local std::vector<double> offset;
  for (int64_t b = 0; b < batch; ++b) {
    offset.assign(size_t(w.groups()), 0.0);
    for (int64_t k = 0; k < g.blocks; ++k) {
      const int64_t c0 = k * kInt8Block, n = std::min(kInt8Block, w.cols - c0);
      const float d = quantize_activation_block(x + b * ldx + c0, n, natural);
      int64_t sum = 0;
      int8_t* dst = xq.data() + (k * batch + b) * kInt8Block;
      for (int64_t i = 0; i < n; ++i) {
        dst[int8_position(w.bits, i)] = natural[i];
        sum += natural[i];
      }
      xscale[size_t(k * batch + b)] = d;
      offset[size_t(k / g.blocks_per_group)] += 128.0 * double(d) * double(sum);
    }
    for (int64_t grp = 0; grp < w.groups(); ++grp) xoffset[size_t(b * w.groups() + grp)] = float(offset[size_t(grp)]);
  }
  g.xq = xq.data();
  g.xscale = xscale.data();
  g.xoffset = xoffset.data();
  const int64_t rows_per_task = gemv_rows_per_task(w);
  Int8Job job{g, rows_per_task};
  detail::parallel_for((w.rows + rows_per_task - 1) / rows_per_task, threads, int8_task, &job);
}

struct DenseJob {
  KernelArgs args;
  float* block;  // [participants][kDenseBlockRows][cols]
};

void dense_task(void* context, int64_t task, int worker) {
  const auto& job = *static_cast<const DenseJob*>(context);
  const KernelArgs& a = job.args;
  const int64_t r0 = task * kDenseBlockRows;
  const int64_t n = std::min(a.rows - r0, kDenseBlockRows);
  float* block = job.block + int64_t(worker) * kDenseBlockRows * a.cols;
  for (int64_t i = 0; i < n; ++i) detail::decode_row(a, r0 + i, block + i * a.cols);
  using RowMajor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Stride = Eigen::OuterStride<>;
  Eigen::Map<const RowMajor, 0, Stride> X(a.x, a.batch, a.cols, Stride(a.ldx));
  Eigen::Map<const RowMajor> Wb(block, n, a.cols);
  Eigen::Map<RowMajor, 0, Stride> Y(a.y + r0, a.batch, n, Stride(a.ldy));
  Y.noalias() = X * Wb.transpose();
}

void dense(const format::PackedLinearView& w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t batch,
           int threads) {
  DenseJob job{make_args(w), nullptr};
  job.args.x = x;
  job.args.ldx = ldx;
  job.args.y = y;
  job.args.ldy = ldy;
  job.args.batch = batch;
  const int64_t tasks = (w.rows + kDenseBlockRows - 1) / kDenseBlockRows;
  std::vector<float> block(size_t(detail::max_participants(tasks, threads) * kDenseBlockRows * w.cols));
  job.block = block.data();
  detail::parallel_for(tasks, threads, dense_task, &job);
}

struct DequantJob {
  KernelArgs args;
  float* out;
  int64_t ld;
};

void dequant_task(void* context, int64_t task, int /*worker*/) {
  const auto& job = *static_cast<const DequantJob*>(context);
  const int64_t r0 = task * kDenseBlockRows;
  const int64_t r1 = std::min(job.args.rows, r0 + kDenseBlockRows);
  for (int64_t r = r0; r < r1; ++r) detail::decode_row(job.args, r, job.out + r * job.ld);
}

}  // namespace

bool isa_supported(Isa isa) {
  const auto& f = nuq::detail::cpu_features();
  switch (isa) {
    case Isa::scalar: return true;
    case Isa::avx2: return f.avx2 && f.fma && f.f16c;
    case Isa::avx512: return f.avx512f && f.avx512bw && f.avx512vl && f.f16c && f.fma && f.avx2;
  }
  return false;
}

Isa best_isa() {
  static const Isa best = isa_supported(Isa::avx512) ? Isa::avx512 : isa_supported(Isa::avx2) ? Isa::avx2 : Isa::scalar;
  return best;
}

std::string_view to_string(Isa isa) {
  switch (isa) {
    case Isa::scalar: return "scalar";
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
  }
  return "unknown";
}

std::string_view to_string(Arithmetic arithmetic) {
  switch (arithmetic) {
    case Arithmetic::exact: return "exact";
    case Arithmetic::int8: return "int8";
    case Arithmetic::fastest: return "fastest";
  }
  return "unknown";
}

std::optional<Arithmetic> arithmetic_from_string(std::string_view name) {
  for (Arithmetic a : {Arithmetic::exact, Arithmetic::int8, Arithmetic::fastest})
    if (name == to_string(a)) return a;
  return std::nullopt;
}

namespace {
// fused_arithmetic with the isa already resolved: linear() resolves it once per call.
Arithmetic fused_arithmetic_on(const format::PackedLinearView& w, Arithmetic arithmetic, Isa isa) {
  if (arithmetic != Arithmetic::fastest) return arithmetic;
  // fastest: only the VNNI kernel is faster than exact; the portable int8 reference is slower.
  return isa == Isa::avx512 && int8_kernel_supported() && int8_layer_supported(w) ? Arithmetic::int8
                                                                                  : Arithmetic::exact;
}
}  // namespace

Arithmetic fused_arithmetic(const format::PackedLinearView& w, const LinearOptions& options) {
  return fused_arithmetic_on(w, options.arithmetic, resolve_isa(options));
}

void linear(const format::PackedLinearView& w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t batch,
            const LinearOptions& options) {
  check_call(w, x, ldx, y, ldy, batch);
  check_threads(options);
  // Codebooks of another layer would silently give another layer's products.
  NUQ_CHECK(!options.int8_codebooks || options.int8_codebooks->built_from(w), Errc::invalid_argument,
            "CPU linear: LinearOptions::int8_codebooks were not built from this layer ({} x {}, {} bits)", w.rows,
            w.cols, w.bits);
  const Isa isa = resolve_isa(options);
  const bool int8 = fused_arithmetic_on(w, options.arithmetic, isa) == Arithmetic::int8;
  if (batch <= kMaxFusedBatch && int8) {
    // Without VNNI (or when the scalar implementation is forced) the reference is the implementation.
    if (isa == Isa::avx512 && int8_kernel_supported())
      fused_int8(w, x, ldx, y, ldy, batch, options.threads, options.int8_codebooks);
    else
      linear_int8_ref(w, x, ldx, y, ldy, batch);
  } else if (batch <= kMaxFusedBatch) {
    fused(w, x, ldx, y, ldy, batch, isa, options.threads);
  } else
    dense(w, x, ldx, y, ldy, batch, options.threads);
}

void linear_bf16(const format::PackedLinearView& w, const uint16_t* x, int64_t ldx, uint16_t* y, int64_t ldy,
                 int64_t batch, const LinearOptions& options) {
  check_call(w, x, ldx, y, ldy, batch);
  thread_local std::vector<float> xf, yf;
  xf.resize(size_t(batch * w.cols));
  yf.resize(size_t(batch * w.rows));
  for (int64_t b = 0; b < batch; ++b) convert_bf16_to_float(x + b * ldx, xf.data() + b * w.cols, size_t(w.cols));
  linear(w, xf.data(), w.cols, yf.data(), w.rows, batch, options);
  for (int64_t b = 0; b < batch; ++b) convert_float_to_bf16(yf.data() + b * w.rows, y + b * ldy, size_t(w.rows));
}

void linear_ref(const format::PackedLinearView& w, const float* x, int64_t ldx, float* y, int64_t ldy,
                int64_t batch) {
  check_call(w, x, ldx, y, ldy, batch);
  const KernelArgs a = make_args(w);
  std::vector<float> row(size_t(w.cols));
  for (int64_t r = 0; r < w.rows; ++r) {
    detail::decode_row(a, r, row.data());
    for (int64_t b = 0; b < batch; ++b) {
      double sum = 0;
      for (int64_t c = 0; c < w.cols; ++c) sum += double(row[size_t(c)]) * double(x[b * ldx + c]);
      y[b * ldy + r] = float(sum);
    }
  }
}

Int8Codebooks::Int8Codebooks(const format::PackedLinearView& w)
    : lut_(w.lut), rows_(w.rows), groups_(w.groups()), bits_(w.bits) {
  check_layer(w);
  check_int8_layer(w);
  const int entries = 1 << w.bits;
  const int64_t n = rows_ * groups_;
  codes_.assign(size_t(n * 16), uint8_t(128));  // unused entries: code 0
  scales_.resize(size_t(n));
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t* book = w.lut + i * entries;
    // As the kernel converts them (and linear_int8_ref): c / s rounded to nearest even, offset by 128.
    const float s = codebook_int8_scale(book, entries);
    for (int e = 0; e < entries; ++e)
      codes_[size_t(i * 16 + e)] = uint8_t(int32_t(std::nearbyint(fp16_to_float(book[e]) / s)) + 128);
    scales_[size_t(i)] = s;
  }
}

bool Int8Codebooks::built_from(const format::PackedLinearView& w) const noexcept {
  return w.lut == lut_ && w.rows == rows_ && w.groups() == groups_ && w.bits == bits_;
}

bool int8_kernel_supported() {
  const auto& f = nuq::detail::cpu_features();
  return isa_supported(Isa::avx512) && f.avx512vnni && f.avx512vbmi;
}

void linear_int8_ref(const format::PackedLinearView& w, const float* x, int64_t ldx, float* y, int64_t ldy,
                     int64_t batch) {
  check_call(w, x, ldx, y, ldy, batch);
  check_int8_layer(w);
  KernelArgs dense_only = make_args(w);
  dense_only.nnz = 0;  // the codebook values alone; the sparse part is added below in double
  const KernelArgs a = make_args(w);
  const int64_t blocks = (w.cols + kInt8Block - 1) / kInt8Block;
  const int64_t blocks_per_group = w.groups() == 1 ? blocks : w.group_size / kInt8Block;
  const int entries = 1 << w.bits;
  std::vector<int8_t> xq(static_cast<size_t>(blocks * kInt8Block));
  std::vector<float> d(static_cast<size_t>(blocks));
  std::vector<float> row(size_t(w.cols));
  std::vector<double> scale(size_t(w.groups()));
  std::vector<int32_t> q(size_t(w.cols));
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t k = 0; k < blocks; ++k)
      d[size_t(k)] = quantize_activation_block(x + b * ldx + k * kInt8Block,
                                               std::min(kInt8Block, w.cols - k * kInt8Block),
                                               xq.data() + k * kInt8Block);
    for (int64_t r = 0; r < w.rows; ++r) {
      detail::decode_row(dense_only, r, row.data());
      for (int64_t grp = 0; grp < w.groups(); ++grp) {
        const float s = codebook_int8_scale(w.lut + (r * w.groups() + grp) * entries, entries);
        scale[size_t(grp)] = s;
        for (int64_t c = grp * w.group_size; c < (grp + 1) * w.group_size; ++c)
          q[size_t(c)] = int32_t(std::nearbyint(row[size_t(c)] / s));
      }
      double sum = 0;
      for (int64_t k = 0; k < blocks; ++k) {
        int64_t dot = 0;
        for (int64_t c = k * kInt8Block; c < std::min(w.cols, (k + 1) * kInt8Block); ++c)
          dot += int64_t(q[size_t(c)]) * xq[size_t(c)];
        sum += scale[size_t(k / blocks_per_group)] * double(d[size_t(k)]) * double(dot);
      }
      for (int64_t k = w.nnz > 0 ? a.row_ptr[r] : 0; k < (w.nnz > 0 ? a.row_ptr[r + 1] : 0); ++k)
        sum += double(fp16_to_float(a.values[k])) * double(x[b * ldx + detail::sparse_column(a, k)]);
      y[b * ldy + r] = float(sum);
    }
  }
}

void dequantize_dense(const format::PackedLinearView& w, float* out, int64_t ld, const LinearOptions& options) {
  check_layer(w);
  check_threads(options);
  NUQ_CHECK(out != nullptr, Errc::invalid_argument, "dequantize_dense: output is null");
  NUQ_CHECK(ld >= w.cols, Errc::invalid_argument, "dequantize_dense: ld {} is less than the {} columns", ld, w.cols);
  DequantJob job{make_args(w), out, ld};
  detail::parallel_for((w.rows + kDenseBlockRows - 1) / kDenseBlockRows, options.threads, dequant_task, &job);
}

}  // namespace nuq::cpu
