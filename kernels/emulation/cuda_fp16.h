// Stand-in for <cuda_fp16.h> in the emulated build (NUQ_CUDA=EMULATED). HIP-CPU's __half is
// half_float::half with round-to-nearest-even conversions (HALF_ROUND_STYLE 1), subnormals included,
// as on a GPU; its intrinsics cover what the kernels use.
#pragma once
#include "hip_cpu_bridge.hpp"
