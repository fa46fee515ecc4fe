// Stand-in for <cuda_runtime.h> in the emulated build (NUQ_CUDA=EMULATED): see hip_cpu_bridge.hpp.
#pragma once
#include "hip_cpu_bridge.hpp"
