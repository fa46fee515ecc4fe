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

#include "nuq/format.hpp"

namespace nuq::cpu {

enum class Isa { scalar, avx2, avx512 };

// The fastest implementation this CPU runs: avx512 needs AVX-512 F/BW/VL (plus AVX2, FMA, F16C), avx2 needs AVX2, FMA and
// F16C, both with OS support for the registers.
Isa best_isa();
bool isa_supported(Isa isa);
std::string_view to_string(Isa isa);

struct LinearOptions {
  int threads = 0;           // 0 = all hardware threads
  std::optional<Isa> isa;    // force an implementation (tests, benches); must be supported by the CPU
};

// Batches up to this size take the fused LUT GEMV (weights read once for all rows of the batch);
// larger ones dequantize blocks of rows to fp32 and multiply with Eigen.
inline constexpr int64_t kMaxFusedBatch = 16;

// Y[b, r] = sum_c W[r, c] * X[b, c] for b < batch. X: fp32 row-major [batch, ldx] (ldx >= cols),
// Y: fp32 [batch, ldy] (ldy >= rows). Fused LUT GEMV for batch <= 16, dequantize-to-dense + Eigen GEMM
// above (one dispatcher). Throws nuq::Error naming the problem on bad arguments.
void linear(const format::PackedLinearView& w, const float* x, int64_t ldx, float* y, int64_t ldy,
            int64_t batch, const LinearOptions& options = {});

// The scalar reference every implementation is tested against: single-threaded, each weight decoded
// as in nuq::dequantize_reference, products summed in double.
void linear_ref(const format::PackedLinearView& w, const float* x, int64_t ldx, float* y, int64_t ldy,
                int64_t batch);

// W as dense fp32 [rows, ld] (ld >= cols), multithreaded; bit-identical to nuq::dequantize_reference.
void dequantize_dense(const format::PackedLinearView& w, float* out, int64_t ld, const LinearOptions& options = {});

}  // namespace nuq::cpu
