// The LlamaModel's packed linear layers on a CUDA GPU: a LinearBackend (include/nuq/llama.hpp) over
// nuq::cuda::linear. Each packed layer is copied to the device once at load; every call converts the
// fp32 activations to fp16/bf16 on the device, runs the fused GEMV (up to kMaxGemvBatch tokens) or the
// dequantize + cuBLAS prefill path, and copies fp32 results back. Only the linear layers move, so this
// proves the packed CUDA path inside a real model (logits, perplexity), not serving speed.
#pragma once

#include <memory>

#include "nuq/linear_cuda.hpp"
#include "nuq/llama.hpp"

namespace nuq::cuda {

// Throws nuq::Error (Errc::unsupported) when there is no such CUDA device. The backend owns a stream, a
// cuBLAS handle and every device buffer; it is used from one thread at a time (calls are serialized).
std::shared_ptr<LinearBackend> make_linear_backend(ActivationType type = ActivationType::f16, int device = 0);

}  // namespace nuq::cuda
