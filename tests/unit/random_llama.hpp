// A random llama2.c checkpoint for decoder tests that must not depend on ../shared.
#pragma once

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <random>
#include <vector>

namespace nuq::testing {

// A random llama2.c checkpoint: 2 layers, grouped-query attention, odd SwiGLU width (so that packed rows
// of 172 columns take the padded tail of a packing unit); the classifier tied to the embedding unless
// `tied` is false (llama2.c then stores it last, after the RoPE tables, with a negative vocabulary size).
inline void write_random_llama2c(const std::filesystem::path& path, bool tied = true) {
  const int32_t dim = 128, hidden = 172, layers = 2, heads = 4, kv_heads = 2, vocab = 97, seq = 64;
  const int64_t kvd = int64_t(kv_heads) * (dim / heads);
  std::mt19937_64 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> w;
  auto add = [&](int64_t n, float sd) {
    for (int64_t i = 0; i < n; ++i) w.push_back(sd * normal(rng));
  };
  auto ones = [&](int64_t n) { w.insert(w.end(), size_t(n), 1.0f); };
  const float in_sd = 1.0f / std::sqrt(float(dim));
  add(int64_t(vocab) * dim, 1.0f);
  ones(int64_t(layers) * dim);
  add(int64_t(layers) * dim * dim, 2 * in_sd);
  add(int64_t(layers) * kvd * dim, 2 * in_sd);
  add(int64_t(layers) * kvd * dim, in_sd);
  add(int64_t(layers) * dim * dim, in_sd);
  ones(int64_t(layers) * dim);
  add(int64_t(layers) * hidden * dim, in_sd);
  add(int64_t(layers) * dim * hidden, 1.0f / std::sqrt(float(hidden)));
  add(int64_t(layers) * hidden * dim, in_sd);
  ones(dim);
  w.insert(w.end(), size_t(seq) * size_t(dim / heads), 0.0f);  // llama2.c's unused RoPE tables
  if (!tied) add(int64_t(vocab) * dim, in_sd);
  const int32_t header[7] = {dim, hidden, layers, heads, kv_heads, tied ? vocab : -vocab, seq};
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(header), sizeof header);
  out.write(reinterpret_cast<const char*>(w.data()), std::streamsize(w.size() * sizeof(float)));
}

}  // namespace nuq::testing
