// y = Ŵ·x on the CPU for layers in nuq's packed format (docs/format.md): a fused look-up-table GEMV for
// small batches (decode), dequantize-to-dense + Eigen GEMM for large ones (prefill), behind one
// dispatcher. docs/cpu-kernels.md explains the decode strategy, the test tolerance and the measured
// throughput.
//
// Results do not depend on the thread count (each output row is computed by one thread in a fixed
// order). They do depend on the implementation (ISA) and on whether the batch takes the fused or the
// dense path: implementations agree with linear_ref to within a relative 1e-5 of sum_c |W[r,c]|·|x[c]|.
//
// The packed data is trusted: check layers from untrusted files once with nuq::validate_packed
// (include/nuq/packed.hpp) before running them; these functions only check shapes and pointers.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

#include "nuq/format.hpp"

namespace nuq::cpu {

enum class Isa { scalar, avx2, avx512 };

// The fastest implementation this CPU runs: avx512 needs AVX-512 F/BW/VL (plus AVX2, FMA, F16C), avx2 needs AVX2, FMA and
// F16C, both with OS support for the registers.
Isa best_isa();
bool isa_supported(Isa isa);
std::string_view to_string(Isa isa);

// How the fused path (batch <= kMaxFusedBatch) multiplies.
//   exact: fp32 codebook values times fp32 activations (the default; agrees with linear_ref).
//   int8:  each activation row is quantized to int8 per block of kInt8Block columns (scale max|x|/127,
//          round to nearest even), each codebook to int8 per row and group (scale max|c|/127), and the
//          products are integer dot products (AVX-512 VNNI), scaled back per block; the sparse part
//          still multiplies the unquantized activations in fp32. Faster, with an extra error bounded by
//          linear_int8_ref's contract (docs/cpu-kernels.md gives the measured size). Needs per-row
//          codebooks or groups of a multiple of kInt8Block columns. Larger batches take the exact dense
//          path either way.
//   fastest: int8 where this CPU has the int8 kernel (int8_kernel_supported()) and the layer's groups
//          allow it, exact elsewhere (and whenever a forced isa is not avx512). What the decoder's tasks
//          (`nuq eval --step`, nuq_generate, nuq.generate) use unless told otherwise.
enum class Arithmetic { exact, int8, fastest };
std::string_view to_string(Arithmetic arithmetic);
// The inverse of to_string: "exact", "int8" or "fastest"; nullopt for any other name.
std::optional<Arithmetic> arithmetic_from_string(std::string_view name);

class Int8Codebooks;

struct LinearOptions {
  int threads = 0;           // 0 = all hardware threads
  std::optional<Isa> isa;    // force an implementation (tests, benches); must be supported by the CPU
  Arithmetic arithmetic = Arithmetic::exact;
  // The layer's codebooks converted once (Int8Codebooks below), used when int8 arithmetic runs and
  // ignored otherwise; null: the int8 kernel converts them on every call. Must have been built from the
  // layer of the call (linear() throws otherwise).
  const Int8Codebooks* int8_codebooks = nullptr;
};

// Columns per int8 activation block (one scale each).
inline constexpr int64_t kInt8Block = 256;

// A layer's codebooks as int8 arithmetic multiplies them: each (row, group) codebook as bytes q + 128
// (16 per codebook, the first 2^bits used) and its scale s, with q and s as linear_int8_ref defines
// them. Without them the int8 kernel converts the codebooks of its rows on every call, which on
// SmolLM2's small layers is a measurable share of a decode step (docs/cpu-kernels.md); a decoder builds
// one per layer at load and passes it on every call. Results are bit-identical either way. Holds
// 20 bytes per row and group; keeps pointing at w's codebook array (to check calls against it).
class Int8Codebooks {
 public:
  // Throws nuq::Error when int8 arithmetic cannot run w (groups that are not per row or a multiple
  // of kInt8Block columns) or w has no codebooks.
  explicit Int8Codebooks(const format::PackedLinearView& w);

  // Whether these were built from w: the same codebook array, rows, groups and bits.
  bool built_from(const format::PackedLinearView& w) const noexcept;
  int64_t bytes() const noexcept { return int64_t(codes_.size() + scales_.size() * sizeof(float)); }
  const uint8_t* codes() const noexcept { return codes_.data(); }  // [rows][groups][16]
  const float* scales() const noexcept { return scales_.data(); }  // [rows][groups]

 private:
  const uint16_t* lut_;
  int64_t rows_, groups_;
  int bits_;
  std::vector<uint8_t> codes_;
  std::vector<float> scales_;
};

// Whether this CPU has the int8 kernel (AVX-512 F/BW/VL + VNNI + VBMI); elsewhere Arithmetic::int8
// runs a portable implementation of the same arithmetic.
bool int8_kernel_supported();

// The arithmetic linear() applies to calls of <= kMaxFusedBatch rows of layer `w`: options.arithmetic
// with fastest resolved (int8 where this CPU has the int8 kernel, the isa is avx512 and the layer's
// groups allow it; exact elsewhere). Reports say which arithmetic ran from this, not a guess.
Arithmetic fused_arithmetic(const format::PackedLinearView& w, const LinearOptions& options);

// Batches up to this size take the fused LUT GEMV (weights read once for all rows of the batch);
// larger ones dequantize blocks of rows to fp32 and multiply with Eigen.
inline constexpr int64_t kMaxFusedBatch = 16;

// Y[b, r] = sum_c W[r, c] * X[b, c] for b < batch. X: fp32 row-major [batch, ldx] (ldx >= cols),
// Y: fp32 [batch, ldy] (ldy >= rows). Fused LUT GEMV for batch <= 16, dequantize-to-dense + Eigen GEMM
// above (one dispatcher). Throws nuq::Error naming the problem on bad arguments.
void linear(const format::PackedLinearView& w, const float* x, int64_t ldx, float* y, int64_t ldy,
            int64_t batch, const LinearOptions& options = {});

// The same with bf16 activations and outputs (raw bf16 bits, row-major like the fp32 version): the
// activations are widened to fp32 once per call (exact), the fp32 result is rounded to bf16 (nearest,
// ties to even). Bandwidth-wise nothing changes: the weights dominate the bytes read.
void linear_bf16(const format::PackedLinearView& w, const uint16_t* x, int64_t ldx, uint16_t* y, int64_t ldy,
                 int64_t batch, const LinearOptions& options = {});

// The scalar reference every implementation is tested against: single-threaded, each weight decoded
// as in nuq::dequantize_reference, products summed in double.
void linear_ref(const format::PackedLinearView& w, const float* x, int64_t ldx, float* y, int64_t ldy,
                int64_t batch);

// The reference of Arithmetic::int8: the same quantization of activations and codebooks, products
// summed exactly (int64 per block, double across blocks), the sparse part in double:
//   Y[b, r] = Σ_g s[r,g] Σ_{block k in g} d[b,k] Σ_{c in k} q[r,c]·xq[b,c] + Σ_sparse v·X[b, c]
// Its distance from linear_ref is at most Σ_c |W_dense[r,c]|·d/2 + (|X[b,c]| + d/2)·s/2 (rounding of
// both operands), which the tests check.
void linear_int8_ref(const format::PackedLinearView& w, const float* x, int64_t ldx, float* y, int64_t ldy,
                     int64_t batch);

// W as dense fp32 [rows, ld] (ld >= cols), multithreaded; bit-identical to nuq::dequantize_reference.
void dequantize_dense(const format::PackedLinearView& w, float* out, int64_t ld, const LinearOptions& options = {});

}  // namespace nuq::cpu
