// Example: open any checkpoint nuq reads (safetensors file or directory, GGUF), decode every floating
// point tensor to fp32 one at a time (memory stays bounded by the largest tensor), and print its range,
// mean and RMS. Usage: nuq_example_tensor_stats <checkpoint> [max-tensors]
#include <cmath>
#include <cstdio>
#include <string>

#include "nuq/gguf.hpp"
#include "nuq/inspect.hpp"
#include "nuq/safetensors.hpp"

namespace {

void print_stats(const std::string& name, const nuq::Buffer& values) {
  const float* v = values.data_as<float>();
  const auto n = std::size_t(values.shape().numel());
  double sum = 0, sq = 0;
  float lo = INFINITY, hi = -INFINITY;
  for (std::size_t i = 0; i < n; ++i) {
    sum += v[i];
    sq += double(v[i]) * v[i];
    lo = std::fmin(lo, v[i]);
    hi = std::fmax(hi, v[i]);
  }
  std::printf("%-48s %-16s min %+.4g  max %+.4g  mean %+.4g  rms %.4g\n", name.c_str(),
              nuq::to_string(values.shape()).c_str(), lo, hi, n ? sum / n : 0.0, n ? std::sqrt(sq / n) : 0.0);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s <checkpoint> [max-tensors]\n", argv[0]);
    return 2;
  }
  const std::string path = argv[1];
  const long limit = argc > 2 ? std::stol(argv[2]) : 20;
  try {
    long shown = 0;
    if (nuq::detect_checkpoint_kind(path) == nuq::CheckpointKind::gguf) {
      nuq::GgufFile file(path);
      for (const auto& t : file.tensors()) {
        if (shown++ >= limit) break;
        print_stats(t.name, file.dequantize(t.name));
      }
    } else {
      nuq::SafetensorsCheckpoint ckpt(path);
      for (const auto& name : ckpt.tensor_names()) {
        const auto& info = ckpt.info(name);
        if (info.dtype != nuq::DType::F32 && info.dtype != nuq::DType::F16 && info.dtype != nuq::DType::BF16) continue;
        if (shown++ >= limit) break;
        print_stats(name, nuq::to_float32(ckpt.tensor(name)));
      }
    }
  } catch (const nuq::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
